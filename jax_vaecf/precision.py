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
