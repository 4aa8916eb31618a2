"""Loss terms of Mult-VAE and Mult-DAE, all computed in float32.

Per-user terms return ``(B,)`` arrays so callers choose the reduction; padded rows
(``row_mask == 0``) are excluded by :func:`masked_mean`. The training objective of the
paper's code is, averaged over the real users of a batch,

  ``loss = mean_u[ nll_u ] + beta * mean_u[ kl_u ] + l2_penalty(params, lam)``

with ``beta = 0`` for Mult-DAE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_vaecf import sparse as sparse_lib

Array = jax.Array


def multinomial_nll(logits: Array, x: Array) -> Array:
  """Per-user multinomial negative log-likelihood ``-sum_i x_ui log softmax(logits_u)_i``.

  Args:
    logits: ``(B, n_items)``, any float dtype; computed in float32.
    x: ``(B, n_items)`` interaction counts or weights (the un-dropped input).

  Returns:
    float32 ``(B,)``.
  """
  if logits.shape != x.shape or logits.ndim != 2:
    raise ValueError(
        f"multinomial_nll: expected logits and x of one shape (B, n_items), got "
        f"{logits.shape} and {x.shape}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(log_probs * x.astype(jnp.float32), axis=-1)


def multinomial_nll_sparse(logits: Array, batch: sparse_lib.SparseBatch) -> Array:
  """:func:`multinomial_nll` with ``x`` given as a padded :class:`SparseBatch`.

  Uses ``-sum_i x_ui log p_ui = (sum_i x_ui) * logsumexp(logits_u) - sum_i x_ui logits_ui``
  and gathers the logits at the interacted items only, so no ``(B, n_items)``
  log-probability array is formed.

  Returns:
    float32 ``(B,)``.
  """
  if logits.ndim != 2 or logits.shape[0] != batch.batch_size:
    raise ValueError(
        f"multinomial_nll_sparse: expected logits (B={batch.batch_size}, n_items), got "
        f"{logits.shape}")
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  vals = batch.vals.astype(jnp.float32)
  b = batch.batch_size
  x_dot_logits = jax.ops.segment_sum(vals * logits[batch.rows, batch.cols], batch.rows,
                                     num_segments=b)
  x_total = jax.ops.segment_sum(vals, batch.rows, num_segments=b)
  return x_total * lse - x_dot_logits


def gaussian_kl(mu: Array, logvar: Array) -> Array:
  """Per-user ``KL(N(mu, exp(logvar)) || N(0, I))`` in float32, shape ``(B,)``."""
  if mu.shape != logvar.shape:
    raise ValueError(f"gaussian_kl: mu {mu.shape} and logvar {logvar.shape} differ")
  mu = mu.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  return jnp.sum(0.5 * (-logvar + jnp.exp(logvar) + mu * mu - 1.0), axis=-1)


def masked_mean(values: Array, row_mask: Array | None) -> Array:
  """Mean of ``values`` ``(B,)`` over the rows where ``row_mask`` is 1 (0 if none)."""
  if row_mask is None:
    return jnp.mean(values)
  if row_mask.shape != values.shape:
    raise ValueError(f"masked_mean: mask {row_mask.shape} vs values {values.shape}")
  mask = row_mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def l2_penalty(params, lam: float | Array) -> Array:
  """``lam * sum_W ||W||_F^2`` over every weight matrix (leaves named ``kernel``).

  Biases are not penalised. This equals the paper code's ``2 * l2_regularizer(lam)`` term
  (``tf.nn.l2_loss`` halves the sum of squares; the code doubles it back). The paper
  trains Mult-VAE with ``lam = 0`` and Mult-DAE with ``lam = 0.01 / batch_size``. The
  penalty is added once per step, not per user, so its weight relative to the data term
  does not depend on the batch size.
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    last = path[-1]
    if getattr(last, "key", getattr(last, "name", None)) == "kernel":
      total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return lam * total
