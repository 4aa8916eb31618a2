"""Padded sparse user-item batches: the one format that crosses the host/device line.

A batch of ``B`` users over ``n_items`` items is carried as a padded coordinate list
(COO) of fixed length ``nnz``:

* ``rows``: int32 ``(nnz,)``, the row of each entry inside the batch, in ``[0, B)``;
* ``cols``: int32 ``(nnz,)``, the item index of each entry, in ``[0, n_items)``;
* ``vals``: float32 ``(nnz,)``, the value of each entry; ``0`` marks padding;
* ``row_mask``: float32 ``(B,)``, ``1`` for real users, ``0`` for padding rows.

Padding entries point at ``(0, 0)`` with value 0, so scatter-adding them is a no-op and
they never need to be removed. ``nnz`` comes from a small set of bucket sizes, so jit
compiles a handful of shapes, never one per batch. The dense ``(B, n_items)`` matrix is
only ever built on the device, inside a jitted function, by :func:`densify`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SparseBatch(NamedTuple):
  """Padded COO rows of a user-item matrix (see the module docstring)."""

  rows: jax.Array  # int32 (nnz,)
  cols: jax.Array  # int32 (nnz,)
  vals: jax.Array  # float32 (nnz,)
  row_mask: jax.Array  # float32 (B,)

  @property
  def batch_size(self) -> int:
    return self.row_mask.shape[-1]


class EvalBatch(NamedTuple):
  """Held-out users: the fold-in items fed to the model and the items to predict.

  Both halves share ``row_mask`` and the row numbering.
  """

  fold_in: SparseBatch
  heldout: SparseBatch


def densify(batch: SparseBatch, n_items: int, dtype=jnp.float32) -> jax.Array:
  """Scatters a padded sparse batch into a dense ``(B, n_items)`` array of ``dtype``.

  Duplicate coordinates add up; padding entries add 0 at ``(0, 0)``.
  """
  out = jnp.zeros((batch.batch_size, n_items), dtype)
  return out.at[batch.rows, batch.cols].add(batch.vals.astype(dtype), mode="drop")


def equal_chunks(n: int, max_size: int) -> tuple[int, int]:
  """``(count, size)``: the fewest equal chunks of at most ``max_size`` covering ``n``.

  ``count * size - n`` (the padding) is under one element per chunk.
  """
  if max_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {max_size}")
  count = max(-(-n // max_size), 1)
  return count, -(-n // count)


def rows_of_chunk(rows: jax.Array, chunk: jax.Array, size: int) -> jax.Array:
  """Batch rows renumbered inside row chunk ``chunk`` (``size`` rows each).

  Rows of other chunks become ``size``, out of range, so a scatter with
  ``mode='drop'`` skips them.
  """
  local = rows - chunk * size
  return jnp.where((local >= 0) & (local < size), local, size)


def matmul(rows: jax.Array, cols: jax.Array, vals: jax.Array, matrix: jax.Array,
           num_rows: int, *, chunk_size: int = 65_536) -> jax.Array:
  """``X @ matrix`` for the COO matrix ``X`` ``(num_rows, matrix.shape[0])``.

  Two forms of the same sum, chosen by the platform the computation is compiled for
  (``jax.lax.platform_dependent``):

  * CPU: one loop over the entries, ``out[rows[i]] += vals[i] * matrix[cols[i]]``, and the
    same loop from the other side for the gradient (:func:`_entry_loop`). XLA CPU's
    gather and scatter emitters index element by element and the gather forms an
    ``(nnz, F)`` intermediate; a row at a time ran a batch-500 step of the ML-20M-shaped
    benchmark 1.16x faster in bf16 and 1.06x in float32, and the first layer alone
    1.2-1.45x (1.6-3.3x with glibc's default allocator), at ``F = 600``
    (``python -m experiments.probe_matmul``).
  * elsewhere: a gather of ``matrix[cols]`` and a scatter-add, ``chunk_size`` entries at
    a time, which a GPU runs in parallel.

  Args:
    rows, cols: int ``(nnz,)`` coordinates of ``X``'s entries (padding: value 0).
      Entries outside ``(num_rows, K)`` add nothing.
    vals: float ``(nnz,)`` entry values.
    matrix: ``(K, F)``, any float dtype; gathered rows are used in float32.
    num_rows: rows of the result.
    chunk_size: gather form: entries gathered at a time. Each chunk gathers
      ``(chunk, F)`` rows of ``matrix`` and scatter-adds them, so the ``(nnz, F)``
      gathered rows never exist at once (6.9 GB for a batch of 10,000 ML-20M users at
      ``F = 600``); the gradient with respect to ``matrix`` is likewise a scatter-add per
      chunk. The loop form holds one row at a time.

  Returns:
    float32 ``(num_rows, F)``. Duplicate coordinates add up.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  matrix = jnp.asarray(matrix)
  rows, cols = jnp.asarray(rows), jnp.asarray(cols)
  vals = jnp.asarray(vals, jnp.float32)
  inside = (rows >= 0) & (rows < num_rows) & (cols >= 0) & (cols < matrix.shape[0])
  vals = jnp.where(inside, vals, 0.0)
  return jax.lax.platform_dependent(
      rows, cols, vals, matrix,
      cpu=lambda r, c, v, m: _loop_matmul(r, c, v, m, num_rows),
      default=lambda r, c, v, m: _gather_matmul(r, c, v, m, num_rows, chunk_size))


def _gather_matmul(rows, cols, vals, matrix, num_rows, chunk_size):
  rows, cols, vals, matrix = map(jnp.asarray, (rows, cols, vals, matrix))
  n_chunks, size = equal_chunks(cols.shape[0], chunk_size)
  if n_chunks == 1:
    return jax.ops.segment_sum(matrix[cols].astype(jnp.float32) * vals[:, None], rows,
                               num_segments=num_rows)
  pad = n_chunks * size - cols.shape[0]  # padding entries have value 0: no-ops
  rows, cols, vals = (jnp.pad(a, (0, pad)).reshape(n_chunks, size)
                      for a in (rows, cols, vals))

  def add_chunk(out, chunk):
    r, c, v = chunk
    return out.at[r].add(matrix[c].astype(jnp.float32) * v[:, None]), None

  out = jnp.zeros((num_rows, matrix.shape[1]), jnp.float32)
  out, _ = jax.lax.scan(add_chunk, out, (rows, cols, vals))
  return out


def _entry_loop(dst: jax.Array, src: jax.Array, vals: jax.Array, table: jax.Array,
                num_dst: int) -> jax.Array:
  """float32 ``(num_dst, F)``: ``out[dst[i]] += vals[i] * table[src[i]]``, entry by entry.

  Indices must be in range (:func:`matmul` zeroes the values of the others).
  """
  dst, src, vals, table = map(jnp.asarray, (dst, src, vals, table))
  out = jnp.zeros((num_dst, table.shape[1]), jnp.float32)
  if vals.shape[0] == 0:
    return out

  def add_entry(i, out):
    row = jax.lax.dynamic_slice_in_dim(table, src[i], 1, 0).astype(jnp.float32) * vals[i]
    at = dst[i]
    return jax.lax.dynamic_update_slice_in_dim(
        out, jax.lax.dynamic_slice_in_dim(out, at, 1, 0) + row, at, 0)

  return jax.lax.fori_loop(0, vals.shape[0], add_entry, out)


def _loop_matmul(rows, cols, vals, matrix, num_rows):
  return _loop_matmul_vjp(*map(jnp.asarray, (rows, cols, vals, matrix)), num_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loop_matmul_vjp(rows, cols, vals, matrix, num_rows):
  return _entry_loop(rows, cols, vals, matrix, num_rows)


def _loop_matmul_fwd(rows, cols, vals, matrix, num_rows):
  return _entry_loop(rows, cols, vals, matrix, num_rows), (rows, cols, vals, matrix)


def _loop_matmul_bwd(num_rows, res, g):
  del num_rows
  rows, cols, vals, matrix = res
  d_matrix = _entry_loop(cols, rows, vals, g, matrix.shape[0]).astype(matrix.dtype)

  def entry_dot(i, out):  # d vals_i = <matrix[cols_i], g[rows_i]>
    a = jax.lax.dynamic_slice_in_dim(matrix, cols[i], 1, 0).astype(jnp.float32)
    b = jax.lax.dynamic_slice_in_dim(g, rows[i], 1, 0)
    return out.at[i].set(jnp.sum(a * b))

  d_vals = (jax.lax.fori_loop(0, vals.shape[0], entry_dot, jnp.zeros_like(vals))
            if vals.shape[0] else jnp.zeros_like(vals))
  return None, None, d_vals, d_matrix


_loop_matmul_vjp.defvjp(_loop_matmul_fwd, _loop_matmul_bwd)


def check_sparse_batch(batch: SparseBatch, n_items: int | None = None) -> None:
  """Raises ``ValueError`` when a batch's shapes or dtypes break the contract.

  Checks shapes and dtypes only (they are static under jit); on concrete host arrays it
  also checks that every index is in range.
  """
  rows, cols, vals, mask = batch
  for name, a in (("rows", rows), ("cols", cols), ("vals", vals), ("row_mask", mask)):
    if not hasattr(a, "shape"):
      raise ValueError(f"SparseBatch.{name}: expected an array, got {type(a).__name__}")
  if rows.ndim != 1 or cols.shape != rows.shape or vals.shape != rows.shape:
    raise ValueError(
        "SparseBatch: rows, cols and vals must be 1-D of one length, got shapes "
        f"{rows.shape}, {cols.shape}, {vals.shape}")
  if mask.ndim != 1:
    raise ValueError(f"SparseBatch.row_mask: expected shape (B,), got {mask.shape}")
  for name, a in (("rows", rows), ("cols", cols)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(f"SparseBatch.{name}: expected an integer dtype, got {a.dtype}")
  if isinstance(rows, np.ndarray) and rows.size:
    if rows.min() < 0 or rows.max() >= mask.shape[0]:
      raise ValueError(
          f"SparseBatch.rows: expected values in [0, {mask.shape[0]}), got "
          f"[{rows.min()}, {rows.max()}]")
    if n_items is not None and (cols.min() < 0 or cols.max() >= n_items):
      raise ValueError(
          f"SparseBatch.cols: expected values in [0, {n_items}), got "
          f"[{cols.min()}, {cols.max()}]")


def from_dense(x: np.ndarray, nnz: int | None = None,
               row_mask: np.ndarray | None = None) -> SparseBatch:
  """Host-side helper: a dense ``(B, n_items)`` numpy array as a padded SparseBatch.

  Used by tests and small examples; the data pipeline builds batches from CSR directly.
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"from_dense: expected a (B, n_items) array, got shape {x.shape}")
  r, c = np.nonzero(x)
  n = r.size if nnz is None else nnz
  if n < r.size:
    raise ValueError(f"from_dense: nnz={nnz} is smaller than the {r.size} non-zeros")
  rows = np.zeros(n, np.int32)
  cols = np.zeros(n, np.int32)
  vals = np.zeros(n, np.float32)
  rows[:r.size], cols[:r.size], vals[:r.size] = r, c, x[r, c]
  mask = np.ones(x.shape[0], np.float32) if row_mask is None else np.asarray(
      row_mask, np.float32)
  return SparseBatch(rows, cols, vals, mask)
