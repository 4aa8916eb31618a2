"""Loss terms of Mult-VAE and Mult-DAE, all computed in float32.

Per-user terms return ``(B,)`` arrays so callers choose the reduction; padded rows
(``row_mask == 0``) are excluded by :func:`masked_mean`. The training objective of the
paper's code is, averaged over the real users of a batch,

  ``loss = mean_u[ nll_u ] + beta * mean_u[ kl_u ] + l2_penalty(params, lam)``

with ``beta = 0`` for Mult-DAE.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_vaecf.core import sparse as sparse_lib

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
  log-probability array is formed. Use it when the logits are at hand; the training step
  uses :func:`output_layer_nll`, which also never forms the logits.

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


def row_major_transpose(h: Array) -> Array:
  """``h.T`` ``(width, rows)``, materialised row-major when ``h`` is 16-bit.

  XLA CPU's ``bf16 x bf16 -> f32`` dot runs at the fast rate only for row-major
  ``[M, K] x [K, N]`` operands; a ``h.T`` inside the jit becomes a layout of ``h``
  (even behind an optimisation barrier) and the kernel gradient ``h.T @ g`` falls back
  to a path slower than float32 (297 against 674 GFLOP/s at ``1024 x 600 x 20,108`` on a
  2-core AMD EPYC with AVX512-BF16; ``experiments/probe_matmul.py``). A product with
  the identity is a new array, laid out row-major, and exact (each output is ``1 * h``);
  it costs ``width / n_items`` of the product it feeds. float32 keeps the plain ``h.T``.
  """
  if h.dtype == jnp.float32:
    return h.T
  eye = jnp.eye(h.shape[1], dtype=h.dtype)
  return jax.lax.dot_general(eye, h, (((1,), (1,)), ((), ())), preferred_element_type=h.dtype)


def _chunk_softmax_nll(h_c, kernel_c, bias, x, items, real, total_over):
  """One chunk's output layer: the exponentials ``e = exp(logits - max)``, their row
  totals, the rows' click totals and the multinomial NLL per row (all float32), summed
  over the item shards by ``total_over`` when ``items`` splits the columns."""
  logits = jnp.dot(h_c, kernel_c, preferred_element_type=jnp.float32) + bias
  if items is None:
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
  else:  # padding columns have probability 0
    top = jax.lax.pmax(jnp.max(jnp.where(real, logits, -jnp.inf), axis=-1,
                               keepdims=True), items.axis)
    e = jnp.where(real, jnp.exp(logits - top), 0.0)
  total = total_over(jnp.sum(e, axis=-1, keepdims=True))
  x_total = total_over(jnp.sum(x, axis=-1, keepdims=True))
  nll = (x_total[:, 0] * (jnp.log(total[:, 0]) + top[:, 0])
         - total_over(jnp.sum(x * logits, axis=-1)))
  return e, total, x_total, nll


def _scan_chunks(body, xs, with_grad, d_params, d_input, kernel_shape, bias_shape, b):
  """Runs ``body`` over the chunks ``xs = (h (C, S, W), mask (C, S), chunk index (C,))``:
  the NLL sum alone, or with the gradients asked for (``d h`` as ``(b, W)`` float32 and
  the kernel and bias gradients accumulated in the scan's carry)."""
  n_chunks, chunk_size, width = xs[0].shape
  if not with_grad:
    _, sums = jax.lax.scan(body, (), xs)
    return jnp.sum(sums)
  if d_params:
    init = (jnp.zeros(kernel_shape, jnp.float32), jnp.zeros(bias_shape, jnp.float32))
  else:  # nothing to accumulate: no (width, n_items) carry through the scan
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  if not d_input:
    (d_kernel, d_bias), sums = jax.lax.scan(body, init, xs)
    return jnp.sum(sums), jnp.zeros((b, width), jnp.float32), d_kernel, d_bias
  (d_kernel, d_bias), (sums, d_h) = jax.lax.scan(body, init, xs)
  return jnp.sum(sums), d_h.reshape(n_chunks * chunk_size, width)[:b], d_kernel, d_bias


def _output_chunks(h, kernel, bias, batch, chunk_size, dtype, with_grad, wrt="all",
                   items=None):
  """Scans the output layer and the NLL over row chunks of ``chunk_size`` users.

  With ``items`` (an :class:`jax_vaecf.core.item_shards.ItemShards`, inside ``shard_map``)
  ``kernel`` and ``bias`` hold this device's item columns: each device forms its
  shard's logits and the row's maximum, sum of exponentials, ``sum_i x_ui`` and
  ``sum_i x_ui logits_ui`` are combined over the mesh axis. The gradients returned are
  this shard's: its kernel and bias columns, and its part of ``d h`` (summed over the
  axis by the ``psum`` that made ``h``'s input, see :func:`output_layer_nll`).
  """
  d_input = wrt in ("all", "input")
  d_params = wrt in ("all", "params")
  b, width = h.shape
  n_chunks, chunk_size = sparse_lib.equal_chunks(b, chunk_size)
  pad = n_chunks * chunk_size - b
  mask = batch.row_mask.astype(jnp.float32)
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, width)
  mask = jnp.pad(mask, (0, pad)).reshape(n_chunks, chunk_size)
  kernel_c = kernel.astype(dtype)
  bias = bias.astype(jnp.float32)
  vals = batch.vals.astype(jnp.float32)
  n_items = kernel.shape[1]
  cols = batch.cols
  real = None
  if items is not None:
    cols, inside = items.local(cols)
    vals = jnp.where(inside, vals, 0.0)
    real = items.real_columns()
    total_over = lambda a: jax.lax.psum(a, items.axis)
  else:
    total_over = lambda a: a

  def body(carry, xs):
    h_c, m_c, c = xs
    local = sparse_lib.rows_of_chunk(batch.rows, c, chunk_size)
    x = jnp.zeros((chunk_size, n_items), jnp.float32).at[local, cols].add(
        vals, mode="drop")
    h_c = h_c.astype(dtype)
    e, total, x_total, nll = _chunk_softmax_nll(h_c, kernel_c, bias, x, items, real,
                                                total_over)
    nll_sum = jnp.sum(m_c * nll)
    if not with_grad:
      return carry, nll_sum
    d_kernel, d_bias = carry
    # d nll_u / d logits_u = (sum_i x_ui) * softmax(logits_u) - x_u.
    d_logits = m_c[:, None] * (x_total * (e / total) - x)
    d_logits_c = d_logits.astype(dtype)
    if d_params:
      d_kernel = d_kernel + jnp.dot(row_major_transpose(h_c), d_logits_c,
                                    preferred_element_type=jnp.float32)
      d_bias = d_bias + jnp.dot(jnp.ones((chunk_size,), jnp.float32), d_logits)
    if not d_input:
      return (d_kernel, d_bias), nll_sum
    d_h = jax.lax.dot_general(d_logits_c, kernel_c, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return (d_kernel, d_bias), (nll_sum, d_h)

  return _scan_chunks(body, (h, mask, jnp.arange(n_chunks)), with_grad, d_params,
                      d_input, kernel.shape, bias.shape, b)


OUTPUT_GRADS = ("all", "input", "params")


def _check_output_args(h, kernel, bias, batch, chunk_size, wrt="all") -> None:
  if wrt not in OUTPUT_GRADS:
    raise ValueError(f"output_layer_nll: wrt must be one of {OUTPUT_GRADS}, got {wrt!r}")
  if h.ndim != 2 or h.shape[0] != batch.batch_size or kernel.shape != (h.shape[1],) + (
      bias.shape[0],):
    raise ValueError(
        f"output_layer_nll: expected h (B={batch.batch_size}, width), kernel (width, "
        f"n_items) and bias (n_items,), got {h.shape}, {kernel.shape}, {bias.shape}")
  if chunk_size < 1:
    raise ValueError(f"output_layer_nll: chunk_size must be >= 1, got {chunk_size}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def output_layer_nll(h: Array, kernel: Array, bias: Array, batch: sparse_lib.SparseBatch,
                     chunk_size: int, dtype: Any = jnp.float32, wrt: str = "all",
                     items: Any = None) -> Array:
  """``sum_u row_mask_u * multinomial_nll(h @ kernel + bias, x)_u``, chunked over users.

  The model's output layer and the multinomial NLL in one function whose gradient is
  computed in the same pass as its value: users are taken ``chunk_size`` at a time, and
  for each chunk the logits, the softmax, ``d logits = n_u * softmax - x_u`` and its three
  products (``d kernel``, ``d bias``, ``d h``) are formed while the chunk's logits are
  still in cache. The decoder's three matmuls are done once each, as with autodiff, but
  no ``(B, n_items)`` logits, probabilities or gradients ever exist, so the memory of a
  step does not grow with ``B * n_items``. Same math as :func:`multinomial_nll` of the
  layer's logits (see ``tests/test_losses.py``); only summation order differs.

  Args:
    h: ``(B, width)`` input of the output layer (any float dtype).
    kernel: float32 ``(width, n_items)``; ``bias``: float32 ``(n_items,)``.
    batch: the targets ``x`` as a :class:`SparseBatch` of ``B`` rows.
    chunk_size: most users per chunk; ``B`` is cut into ``ceil(B / chunk_size)`` equal
      chunks (padded by under one row each when they do not divide ``B``).
    dtype: matmul dtype (float32, bfloat16 or float16); accumulation and the softmax are
      float32.
    wrt: the gradients formed: ``'all'``, ``'input'`` (``h`` only: the layer is a
      constant of the step, e.g. RecVAE's encoder phase) or ``'params'`` (``kernel`` and
      ``bias`` only: ``h`` is a constant, e.g. its decoder phase). The others are
      returned as zeros, and one of the three large products per chunk is skipped.
    items: ``None``, or the :class:`jax_vaecf.core.item_shards.ItemShards` of a
      model-parallel step (inside ``shard_map``): ``kernel`` ``(width, per_shard)`` and
      ``bias`` ``(per_shard,)`` are this device's columns, ``batch`` holds global item
      indices, and the value (the same on every shard) combines the shards' logits with
      collectives. Its gradient follows ``shard_map``'s convention that each device's
      output is a separate term of one global sum: the cotangents of all shards are
      summed, and ``d h`` is this shard's part, which the ``psum`` of the first layer
      (transposed) adds up.

  Returns:
    float32 scalar. Differentiable in ``h``, ``kernel`` and ``bias``; the data ``batch``
    gets a zero gradient.
  """
  _check_output_args(h, kernel, bias, batch, chunk_size, wrt)
  return _output_chunks(h, kernel, bias, batch, chunk_size, dtype, with_grad=False,
                        items=items)


def _output_layer_nll_fwd(h, kernel, bias, batch, chunk_size, dtype, wrt, items):
  _check_output_args(h, kernel, bias, batch, chunk_size, wrt)
  nll_sum, d_h, d_kernel, d_bias = _output_chunks(h, kernel, bias, batch, chunk_size,
                                                  dtype, with_grad=True, wrt=wrt,
                                                  items=items)
  if wrt == "input":
    d_kernel, d_bias = jnp.zeros_like(kernel), jnp.zeros_like(bias)
  return nll_sum, (d_h.astype(h.dtype), d_kernel.astype(kernel.dtype),
                   d_bias.astype(bias.dtype), batch)


def _output_layer_nll_bwd(chunk_size, dtype, wrt, items, res, g):
  del chunk_size, dtype, wrt
  d_h, d_kernel, d_bias, batch = res
  if items is not None:
    g = jax.lax.psum(g, items.axis)
  zero_batch = jax.tree_util.tree_map(
      lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
      else np.zeros(a.shape, jax.dtypes.float0), batch)
  return g * d_h, g * d_kernel, g * d_bias, zero_batch


output_layer_nll.defvjp(_output_layer_nll_fwd, _output_layer_nll_bwd)


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

  A ``lam`` of Python ``0`` (Mult-VAE's) returns a constant 0 without reading the
  weights: two passes over the item-sized kernels per step saved, and the same loss and
  gradients for finite weights.
  """
  total = jnp.zeros((), jnp.float32)
  if isinstance(lam, (int, float)) and lam == 0:
    return total
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    last = path[-1]
    if getattr(last, "key", getattr(last, "name", None)) == "kernel":
      total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return lam * total
