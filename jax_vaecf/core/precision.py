"""Half-precision policies and dynamic loss scaling, as pure functions of pytrees.

A policy names the dtype the matmuls run in; parameters, optimiser state, logits,
log-softmax, KL and the loss stay float32 whatever the policy (see
:mod:`jax_vaecf.model`). float16's narrow exponent range needs loss scaling: the loss is
multiplied by ``scale`` before differentiation and the gradients divided by it after;
a step whose gradients are not finite is skipped and the scale halved, and after
``period`` finite steps in a row the scale doubles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
  """A precision policy.

  Attributes:
    name: ``'fp32'``, ``'bf16'`` or ``'fp16'``.
    compute_dtype: dtype of the matmuls.
    loss_scaling: whether dynamic loss scaling is used (fp16 only).
  """

  name: str
  compute_dtype: Any
  loss_scaling: bool


POLICIES = {
    "fp32": Policy("fp32", jnp.float32, False),
    "bf16": Policy("bf16", jnp.bfloat16, False),
    "fp16": Policy("fp16", jnp.float16, True),
}


def get_policy(name: str) -> Policy:
  """The policy named ``'fp32'``, ``'bf16'`` or ``'fp16'``."""
  try:
    return POLICIES[name]
  except KeyError:
    raise ValueError(
        f"unknown precision {name!r}: expected one of {sorted(POLICIES)}") from None


class LossScale(struct.PyTreeNode):
  """Dynamic loss-scale state (float32 / int32 scalars).

  Attributes:
    scale: the current loss scale (1.0 when scaling is off).
    good_steps: finite steps since the scale last changed.
    skipped_steps: total steps skipped for non-finite gradients.
  """

  scale: jax.Array
  good_steps: jax.Array
  skipped_steps: jax.Array


def init_loss_scale(enabled: bool, initial_scale: float = 2.0**15) -> LossScale:
  """A fresh state: ``initial_scale`` when enabled, else a constant 1."""
  return LossScale(
      scale=jnp.asarray(initial_scale if enabled else 1.0, jnp.float32),
      good_steps=jnp.zeros((), jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32))


def all_finite(tree) -> jax.Array:
  """bool scalar: every element of every leaf is finite."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def update_loss_scale(ls: LossScale, finite: jax.Array, *, period: int = 2000,
                      factor: float = 2.0, min_scale: float = 1.0) -> LossScale:
  """The state after a step whose gradients were (``finite``) or were not finite."""
  grown = ls.good_steps + 1 >= period
  new_scale = jnp.where(
      finite, jnp.where(grown, ls.scale * factor, ls.scale),
      jnp.maximum(ls.scale / factor, min_scale))
  return LossScale(
      scale=new_scale.astype(jnp.float32),
      good_steps=jnp.where(finite & ~grown, ls.good_steps + 1, 0).astype(jnp.int32),
      skipped_steps=(ls.skipped_steps + jnp.where(finite, 0, 1)).astype(jnp.int32))


def select_tree(pred: jax.Array, on_true, on_false):
  """Leaf-wise ``where(pred, a, b)`` over two pytrees of one structure."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class PrecisionWarning(UserWarning):
  """A precision runs on this backend, but emulated or slowly."""


# What each backend does with each half type. GPUs (CUDA, ROCm) run both on tensor /
# matrix cores (bf16 needs an Ampere-or-newer NVIDIA GPU for speed; XLA still runs it
# correctly on older ones). CPUs compute fp16 correctly but by converting to float32 and
# back, slower than fp32, so it is allowed (tests, debugging) with a warning. bf16 on a
# CPU with AVX512-BF16 or AMX runs the step's matmuls faster than float32 (measured on a
# 2-core AMD EPYC: 1.36x a batch-500 step, 1.59x at 10,000), and emulated, slower,
# elsewhere; the warning says how to check. TPUs have no fast float16 path and no need
# for loss scaling: fp16 there is an error that points to bf16.
_SLOW = {("cpu", "fp16"): "is emulated through float32 and slower than 'fp32'; use it "
                          "for testing only",
         ("cpu", "bf16"): "is faster than 'fp32' only on CPUs with AVX512-BF16 or AMX "
                          "(emulated, slower, elsewhere); `python -m "
                          "experiments.probe_matmul` measures this machine"}
_UNSUPPORTED = {("tpu", "fp16"): "TPUs have no fast float16; use precision='bf16'"}
_PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")


def check_backend_supports(policy: Policy | str, platform: str) -> Policy:
  """Checks that ``policy`` is usable on ``platform`` and returns the policy.

  Args:
    policy: a :class:`Policy` or its name.
    platform: ``jax.devices()[0].platform`` (``'cpu'``, ``'gpu'``, ``'cuda'``,
      ``'rocm'``, ``'tpu'``), passed in by the caller.

  Returns:
    The policy, unchanged (there is no silent fallback to another dtype).

  Raises:
    ValueError: an unknown platform, or a policy the platform has no useful support
      for (fp16 on TPU).

  Warns:
    PrecisionWarning: fp16 on CPU (correct, but emulated and slower than fp32); bf16
      on CPU (fast only with AVX512-BF16 or AMX).
  """
  import warnings

  if isinstance(policy, str):
    policy = get_policy(policy)
  platform = platform.lower()
  if platform not in _PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}: expected one of {_PLATFORMS}")
  reason = _UNSUPPORTED.get((platform, policy.name))
  if reason:
    raise ValueError(f"precision {policy.name!r} on {platform}: {reason}")
  slow = _SLOW.get((platform, policy.name))
  if slow:
    warnings.warn(f"precision {policy.name!r} on {platform} {slow}", PrecisionWarning,
                  stacklevel=2)
  return policy
