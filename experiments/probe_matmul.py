"""GFLOP/s of each large matmul form of the training step, fp32 against bf16, here.

  python -m experiments.probe_matmul                      # ML-20M shape, chunk 1,024
  python -m experiments.probe_matmul --rows=500 --n_items=295041

The fused output layer (:func:`jax_vaecf.core.losses.output_layer_nll`) runs three products
per chunk of ``rows`` users over ``n_items`` items at width ``width``, and evaluation a
fourth; each is timed as the step writes it and in the forms a faster layout would use:

* ``forward``: ``h @ W`` (training logits and evaluation's);
* ``kernel grad``: ``h.T @ g`` as written (a transposed left operand), with ``h.T``
  arriving row-major from outside the jit, and with the step's row-major copy
  (``losses.row_major_transpose``: a product with the identity);
* ``input grad``: ``g @ W.T`` as written (contracting both operands' item axis), and
  with ``W.T`` arriving row-major.

Each form is jitted alone with ``preferred_element_type=float32`` (the step's
accumulation) and timed best of ``--repeats``. The machine's CPU model and its
AVX512-BF16 / AMX flags are printed with the table, so the next CPU generation can be
checked in one command. Results depend on the machine's load: run it idle. Host memory is
reused between runs as in training (``--reuse_host_memory``, :mod:`jax_vaecf.core.host_memory`).

A second table times the first layer's sparse product ``X @ W1`` (``--per_user``
entries per row, ``n_items x width`` kernel) and its kernel gradient in both forms of
:func:`jax_vaecf.core.sparse.matmul`: the gather and scatter-add XLA emits for indexing, and
the entry loop the library runs on CPU.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.core.machine import best_seconds, cpu_flags

_FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags; defined when it runs, not at import (other tools have flags of
  the same names)."""
  fv = flag_values
  flags.DEFINE_integer("rows", 1024, "Users per chunk (the step's --output_chunk_size, "
                       "or a smaller batch).", flag_values=fv)
  flags.DEFINE_integer("width", 600, "Width of the output layer's input (Mult-VAE: 600).",
                       flag_values=fv)
  flags.DEFINE_integer("n_items", 20_108, "Items (ML-20M: 20,108).", flag_values=fv)
  flags.DEFINE_integer("per_user", 73, "First-layer table: entries per row (ML-20M: ~73).",
                       flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed runs of each form; the best is reported.",
                       flag_values=fv)


def forms(rows: int, width: int, n_items: int):
  """``{name: (fn, args builder)}`` of the step's matmul forms for one dtype."""
  import jax
  import jax.numpy as jnp

  from jax_vaecf.core import losses

  f32 = jnp.float32
  nt = (((1,), (1,)), ((), ()))  # contract both operands' last axis
  tn = (((0,), (0,)), ((), ()))  # contract both operands' first axis

  def make(dtype):
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(key[0], (rows, width), f32).astype(dtype)
    w = (0.01 * jax.random.normal(key[1], (width, n_items), f32)).astype(dtype)
    g = (0.01 * jax.random.normal(key[2], (rows, n_items), f32)).astype(dtype)
    return {
        "forward h @ W": (lambda h, w: jnp.dot(h, w, preferred_element_type=f32), (h, w)),
        "kernel grad h.T @ g, as written": (
            lambda h, g: jax.lax.dot_general(h, g, tn, preferred_element_type=f32), (h, g)),
        "kernel grad, h.T row-major input": (
            lambda ht, g: jnp.dot(ht, g, preferred_element_type=f32),
            (jnp.asarray(h.T.copy()), g)),
        "kernel grad, the step's form": (
            lambda h, g: jnp.dot(losses.row_major_transpose(h), g,
                                 preferred_element_type=f32), (h, g)),
        "input grad g @ W.T, as written": (
            lambda g, w: jax.lax.dot_general(g, w, nt, preferred_element_type=f32), (g, w)),
        "input grad, W.T row-major input": (
            lambda g, wt: jnp.dot(g, wt, preferred_element_type=f32),
            (g, jnp.asarray(w.T.copy()))),
    }
  return make


def first_layer_forms(rows: int, width: int, n_items: int, per_user: int):
  """``{name: (fn, args)}``: the first layer's product and kernel gradient, per form."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jax_vaecf.core import sparse as sparse_lib

  rng = np.random.default_rng(0)
  nnz = rows * per_user
  r = jnp.asarray(np.sort(rng.integers(0, rows, nnz)).astype(np.int32))
  c = jnp.asarray(rng.integers(0, n_items, nnz).astype(np.int32))
  v = jnp.asarray(rng.random(nnz).astype(np.float32))
  w = 0.01 * jax.random.normal(jax.random.PRNGKey(0), (n_items, width), jnp.float32)
  gather = lambda w: sparse_lib._gather_matmul(r, c, v, w, rows, 65_536)
  loop = lambda w: sparse_lib._loop_matmul(r, c, v, w, rows)
  grad = lambda f: jax.grad(lambda w: jnp.sum(jnp.tanh(f(w))))
  return {"X @ W1, gather": (gather, (w,)), "X @ W1, entry loop": (loop, (w,)),
          "X @ W1 + kernel grad, gather": (grad(gather), (w,)),
          "X @ W1 + kernel grad, entry loop": (grad(loop), (w,))}


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  f = _FLAGS
  for name in ("rows", "width", "n_items", "per_user", "repeats"):
    if getattr(f, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1")
  flop = 2.0 * f.rows * f.width * f.n_items
  make = forms(f.rows, f.width, f.n_items)
  rates = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    for name, (fn, args) in make(dtype).items():
      rates.setdefault(name, {})[jnp.dtype(dtype).name] = (
          flop / best_seconds(fn, args, f.repeats) / 1e9)
  info = {**cpu_flags(), "backend": jax.default_backend(), "jax": jax.__version__,
          "rows": f.rows, "width": f.width, "n_items": f.n_items}
  print(f"{info['cpu']} ({jax.default_backend()}); AVX512-BF16 {info['avx512_bf16']}, "
        f"AMX-BF16 {info['amx_bf16']}; {f.rows} x {f.width} x {f.n_items:,}, best of "
        f"{f.repeats}, GFLOP/s")
  print("| product | float32 | bfloat16 | bf16 / fp32 |")
  print("|---|---|---|---|")
  for name, r in rates.items():
    print(f"| {name} | {r['float32']:.0f} | {r['bfloat16']:.0f} | "
          f"{r['bfloat16'] / r['float32']:.2f} |")
  first = {name: 1e3 * best_seconds(fn, args, f.repeats) for name, (fn, args) in
           first_layer_forms(f.rows, f.width, f.n_items, f.per_user).items()}
  print(f"\nfirst layer, {f.rows} rows x {f.per_user} entries, kernel {f.n_items:,} x "
        f"{f.width}, float32, best of {f.repeats}")
  print("| form | ms |")
  print("|---|---|")
  for name, ms in first.items():
    print(f"| {name} | {ms:.1f} |")
  print(json.dumps({"probe_matmul": {k: {d: round(v, 1) for d, v in r.items()}
                                     for k, r in rates.items()},
                    "first_layer_ms": {k: round(v, 2) for k, v in first.items()}, **info}))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
