"""Randomness that depends on a user's position in the global batch, not on sharding.

Dropout masks and reparameterisation noise are functions of ``(key, global row, item)``,
so a step draws the same masks and noise whether the batch is dense or sparse, and
whether it runs on one device or is split over many.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _fmix32(x: Array) -> Array:
  # MurmurHash3's 32-bit finaliser: every input bit affects every output bit.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def key_to_seed(key: Array) -> Array:
  """A uint32 scalar seed drawn from a PRNG key."""
  return jax.random.bits(key, (), jnp.uint32)


def keep_mask(seed: Array, rows: Array, cols: Array, keep_prob: float) -> Array:
  """Bernoulli(``keep_prob``) draws indexed by ``(rows, cols)``, broadcast together.

  Args:
    seed: uint32 scalar (see :func:`key_to_seed`).
    rows: integer array of global row (user) positions.
    cols: integer array of item indices, broadcastable against ``rows``.
    keep_prob: probability of True.

  Returns:
    bool array of the broadcast shape of ``rows`` and ``cols``.
  """
  r = rows.astype(jnp.uint32)
  c = cols.astype(jnp.uint32)
  h = _fmix32(_fmix32(seed ^ _fmix32(r + jnp.uint32(0x9E3779B9))) + c)
  threshold = jnp.uint32(min(int(keep_prob * 2.0**24), 2**24))
  return (h >> 8) < threshold


def row_normal(key: Array, rows: Array, dim: int) -> Array:
  """Standard normals ``(len(rows), dim)``; row ``i`` depends only on ``key`` and ``rows[i]``."""
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows.astype(jnp.uint32))
  return jax.vmap(lambda k: jax.random.normal(k, (dim,), jnp.float32))(keys)
