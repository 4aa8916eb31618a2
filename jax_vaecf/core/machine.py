"""What this machine offers the step's matmuls: the CPU's bf16 instruction sets, and
how much faster the step's large products run in bf16 than in float32 on a device."""

from __future__ import annotations

import platform
import time

# --precision=auto picks bf16 when the step's large products run at least this much
# faster in it: below, the casts and the rest of the step eat the gain.
AUTO_BF16_SPEEDUP = 1.2


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), or ``""`` where it cannot be read."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def cpu_flags() -> dict:
  """The CPU model and whether it reports AVX512-BF16 and AMX (Linux /proc/cpuinfo)."""
  model, found = platform.processor() or "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model in ("", "unknown", "x86_64"):
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          found = set(line.split(":", 1)[1].split())
          break
  except OSError:
    pass
  return {"cpu": model, "avx512_bf16": "avx512_bf16" in found,
          "amx_bf16": "amx_bf16" in found, "amx_tile": "amx_tile" in found}


def bf16_speedup(device=None, rows: int = 1024, width: int = 600, n_items: int = 20_108,
                 repeats: int = 3) -> float:
  """float32 time over bfloat16 time of the fused output layer's three products on
  ``device`` (default: jax's first): the forward ``h @ W``, the kernel gradient in the
  step's form and the input gradient ``g @ W.T``, at ``rows x width x n_items``, in one
  jit, best of ``repeats``. About two seconds on a 2-core CPU."""
  import jax
  import jax.numpy as jnp

  from jax_vaecf.core import losses

  device = device or jax.devices()[0]
  f32 = jnp.float32

  def products(h, w, g):
    fwd = jnp.dot(h, w, preferred_element_type=f32)
    d_w = jnp.dot(losses.row_major_transpose(h), g, preferred_element_type=f32)
    d_h = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    return fwd, d_w, d_h

  seconds = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    args = [jax.device_put((0.01 * jax.random.normal(k, shape, f32)).astype(dtype), device)
            for k, shape in zip(keys, ((rows, width), (width, n_items), (rows, n_items)))]
    seconds[dtype] = best_seconds(products, args, repeats)
  return seconds[jnp.float32] / seconds[jnp.bfloat16]


def best_seconds(fn, args, repeats: int) -> float:
  """The fastest of ``repeats`` runs of ``jax.jit(fn)(*args)``, after one that compiles."""
  import jax
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    best = min(best, time.perf_counter() - t0)
  return best
