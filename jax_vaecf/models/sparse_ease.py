"""Sparse EASE: EASE's item-item matrix for catalogues past the dense memory wall.

Dense EASE (:mod:`jax_vaecf.models.ease`) holds ``n_items^2`` float32 matrices; at 91,600 items
(Amazon-Book's width) one is 31 GiB. This module follows SANSA (Spisak, Bartyzal and
Vancura, "Scalable Approximate NonSymmetric Autoencoder for Collaborative Filtering",
RecSys 2023): never form a dense matrix, and approximate

    P = (G + l2 I)^-1,   B = I - P diag(1 / diag(P))  (diag(B) = 0),   G = X^T X,

by sparse pieces of about ``k = target_density * n_items`` entries per column:

1. ``G`` in row blocks from the sparse ``X`` (never densified), keeping the diagonal and
   the off-diagonal entries above one magnitude threshold (so ``G`` stays symmetric),
   chosen on a random eighth of the columns so that about ``gram_ratio * k`` per column
   remain; each dropped ``|g_ij|`` is added to ``g_ii`` and ``g_jj`` (so the result stays
   positive definite); plus ``l2 I``.
2. An incomplete factorisation ``G + l2 I ~ Q^T L D L^T Q`` (SciPy's SuperLU ``spilu``
   with a fill-reducing order (``ordering``: COLAMD or the minimum-degree order of
   ``A^T + A``), no pivoting, drop
   tolerance ``drop_tol``); ``L`` (unit lower triangular) is cut to ``factor_ratio * k``
   per column and only ``diag(U) = D`` is kept from ``U`` (for an exact factorisation of
   a symmetric positive definite matrix ``U = D L^T``; the symmetric form keeps ``P``
   symmetric when entries are dropped).
3. A sparse approximate inverse ``K ~ L^-1`` by Newton-Schulz steps
   ``K <- K + K (I - L K)`` (the residual squares each step), cut to ``factor_ratio * k``
   per column after each, in column blocks, and to ``k`` at the end.
4. ``P ~ M^T D^-1 M`` with ``M = K Q`` is never formed (it is nearly dense: columns of
   ``K`` share rows): as in SANSA, ``B`` stays two sparse factors of one pattern,
   ``B = I + M^T W`` with ``W = -D^-1 M diag(1/diag(P))`` (:class:`Factors`; ``diag(P)``
   from ``M`` alone), ``2 k n_items`` weights, and ``x @ B = x + (x @ M^T) @ W``.

``target_density = 1.0`` drops nothing anywhere (exact factorisation, exact inverse): the
result is dense EASE's ``B`` to rounding, which the tests check.

Why SciPy only: SANSA's own package needs CHOLMOD through scikit-sparse, which PyPI
ships as source only (its build needs SuiteSparse's headers and library from a system
package manager, and its 0.5 release a newer SuiteSparse than Debian 12's);
SuperLU's ``spilu`` is in SciPy, a core dependency. ``sansa`` is the benchmark's peer
(``experiments/bench_sparse_ease.py``), never imported here.

The model (``--model=sparse_ease``, :data:`ENTRY`): :func:`fit_run` fits the factors on
the host from the run's training rows (each ``l2`` of its settings, the best on the
validation users kept) and :class:`SparseEASE` scores ``x @ B`` in jax from them
(scatter-adds through ``M^T``, gathers through ``W``), so evaluation, checkpoints, the
recommender and exported artefacts take it as any model.

Memory: with ``m = n_items`` and ``k = target_density * m``, the host holds the cut Gram
matrix (about ``gram_ratio * k * m`` entries), SuperLU's factors (at most
``fill_factor`` times that), ``K`` and its update (``2 * factor_ratio * k * m``), each
entry 12 bytes (float64 value, int32 index), plus one column block's products
(``block_size`` columns), and the factors (``3 k m`` 4-byte values). Nothing of size
``m^2`` unless ``target_density`` is 1.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.models import base as model_lib
from jax_vaecf.models import ease


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a fit needs.

  Attributes:
    l2: EASE's ridge weight, a finite number above 0.
    target_density: share of ``B``'s ``n_items^2`` entries kept, in ``(0, 1]``; 1 is exact.
    gram_ratio: the Gram matrix keeps about this many times ``B``'s entries per column.
    factor_ratio: ``L`` and ``K ~ L^-1`` keep this many times ``B``'s entries per column.
    drop_tol: SuperLU's relative drop tolerance of the incomplete factorisation.
    fill_factor: most entries of SuperLU's factors over those of the matrix.
    inverse_steps: Newton-Schulz steps for ``K`` (each squares the residual).
    block_size: columns per block of every product (bounds the transient memory).
    ordering: the incomplete factorisation's fill-reducing order, a key of
      :data:`ORDERINGS`.
  """

  l2: float
  target_density: float
  gram_ratio: float = 4.0
  factor_ratio: float = 2.0
  drop_tol: float = 1e-4
  fill_factor: float = 10.0
  inverse_steps: int = 7
  block_size: int = 2048
  ordering: str = "colamd"


# SuperLU's orders (permc_spec) by the name a setting gives. Measured: at Amazon-Book's
# shape the factorisation took 7 s in COLAMD's order against 94 s in the minimum-degree
# order of A^T + A; on ML-1M the minimum-degree order was the more accurate (test
# NDCG@100 0.4144 against 0.4043 at 5% density, docs/results.md).
ORDERINGS = {"colamd": "COLAMD", "mmd": "MMD_AT_PLUS_A"}


def check_settings(settings: Settings) -> None:
  """Raises ``ValueError`` naming the first of ``settings`` out of its range."""
  l2, density = _number(settings.l2), _number(settings.target_density)
  if not (math.isfinite(l2) and l2 > 0):
    raise ValueError(f"sparse EASE: l2 must be a finite number above 0, got {settings.l2!r}")
  if not 0.0 < density <= 1.0:
    raise ValueError(f"sparse EASE: target_density must lie in (0, 1], got {density!r}")
  for name in ("gram_ratio", "factor_ratio", "fill_factor"):
    value = getattr(settings, name)
    if not (math.isfinite(value) and value >= 1.0):
      raise ValueError(f"sparse EASE: {name} must be a finite number >= 1, got {value!r}")
  if not (math.isfinite(settings.drop_tol) and settings.drop_tol >= 0.0):
    raise ValueError(f"sparse EASE: drop_tol must be >= 0, got {settings.drop_tol!r}")
  if settings.ordering not in ORDERINGS:
    raise ValueError(f"sparse EASE: ordering must be one of {sorted(ORDERINGS)}, got "
                     f"{settings.ordering!r}")
  if settings.inverse_steps < 1 or settings.block_size < 1:
    raise ValueError(f"sparse EASE: inverse_steps and block_size must be >= 1, got "
                     f"{settings.inverse_steps} and {settings.block_size}")


def check_inputs(x, settings: Settings) -> sp.csc_matrix:
  """``x`` as float64 CSC, after checking it and ``settings``; raises ``ValueError``
  naming the first thing wrong (before any work)."""
  check_settings(settings)
  if not sp.issparse(x) or x.ndim != 2:
    raise ValueError(f"sparse EASE: x must be a scipy sparse (users, items) matrix, got "
                     f"{type(x).__name__}")
  if x.shape[0] < 1 or x.shape[1] < 2 or x.nnz == 0:
    raise ValueError(f"sparse EASE: x is empty (shape {x.shape}, {x.nnz} stored entries); "
                     f"it needs at least one interaction and two items")
  x = sp.csc_matrix(x, dtype=np.float64)
  if not np.isfinite(x.data).all():
    raise ValueError("sparse EASE: x holds NaN or infinite values")
  return x


def _number(value) -> float:
  """``value`` as a float (NumPy scalars included), NaN when it is not a number."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def per_column(density: float, ratio: float, n: int) -> int:
  """Entries kept per column: ``ratio * density * n`` rounded, at least 1, at most ``n``."""
  return int(min(n, max(1, round(ratio * density * n))))


class Factors(NamedTuple):
  """Sparse EASE's ``B = I + M^T W`` as two sparse ``(n, n)`` factors with one pattern,
  held column by column: column ``j`` of ``M`` holds ``encode[t, j]`` at row
  ``rows[t, j]`` (``t < k``; padding: row 0, value 0), column ``j`` of ``W`` holds
  ``decode[t, j]`` at the same rows. With ``M = K Q`` (``K ~ L^-1`` in the factor's order,
  ``Q`` its permutation) and ``P = M^T diag(1/d) M ~ (G + l2 I)^-1``,
  ``W = -diag(1/d) M diag(1/diag(P))``, so ``B = I - P diag(1/diag(P))`` (zero diagonal)
  as in EASE, never formed: ``x @ B = x + (x @ M^T) @ W``.

  Attributes:
    rows: int32 ``(k, n)``.
    encode: float32 ``(k, n)``.
    decode: float32 ``(k, n)``.
    shift: the diagonal shift the incomplete factorisation needed (0: none;
      :func:`shifted_ldl_factor`).
  """

  rows: np.ndarray
  encode: np.ndarray
  decode: np.ndarray
  shift: float = 0.0

  def matrices(self) -> tuple[sp.csc_matrix, sp.csc_matrix]:
    """``(M, W)``, float32 CSC ``(n, n)`` each."""
    k, n = self.rows.shape
    cols = np.tile(np.arange(n), k)
    return tuple(sp.csc_matrix((v.ravel(), (self.rows.ravel(), cols)), shape=(n, n))
                 for v in (self.encode, self.decode))

  def dense_b(self) -> np.ndarray:
    """``B`` float64 ``(n, n)`` (tests and small catalogues only)."""
    m, w = (a.astype(np.float64) for a in self.matrices())
    return np.eye(m.shape[0]) + (m.T @ w).toarray()


def fit(x, settings: Settings) -> Factors:
  """Sparse EASE's ``B`` as :class:`Factors`.

  Args:
    x: scipy sparse ``(n_users, n_items)`` training matrix (any format, finite values).
    settings: the fit's :class:`Settings`.

  Returns:
    :class:`Factors` with ``k = per_column(target_density, 1, n_items)`` entries per
    column of each factor (``2 k n_items`` weights); scores are ``x @ B``
    (:func:`score`).

  Raises:
    ValueError: bad input (see :func:`check_inputs`), or a factorisation that lost
      positive definiteness (a non-positive pivot): a larger ``l2`` or density helps.
  """
  xc = check_inputs(x, settings)
  n = xc.shape[1]
  exact = settings.target_density >= 1.0
  k = per_column(settings.target_density, 1.0, n)
  keep_g = n * n if exact else n * per_column(settings.target_density, settings.gram_ratio, n)
  k_f = n if exact else per_column(settings.target_density, settings.factor_ratio, n)
  a = gram_plus_ridge(xc, settings.l2, keep_g, settings.block_size)
  if exact:
    lower, d, perm = ldl_factor(a, 0.0, n * n / a.nnz + 1.0, settings.ordering)
    shift = 0.0
  else:
    lower, d, perm, shift = shifted_ldl_factor(a, settings.drop_tol, settings.fill_factor,
                                               settings.ordering)
  del a
  lower = keep_top_per_column(lower, k_f, keep_diagonal=True)
  steps = max(1, math.ceil(math.log2(n)) + 1) if exact else settings.inverse_steps
  k_inv = unit_lower_inverse(lower, steps, k_f, settings.block_size)
  del lower
  return factors_of(keep_top_per_column(k_inv, k, keep_diagonal=True), d, perm, k, shift)


def factors_of(k_inv: sp.csc_matrix, d: np.ndarray, perm: np.ndarray, keep: int,
               shift: float = 0.0) -> Factors:
  """:class:`Factors` of ``K ~ L^-1`` (CSC ``(n, n)``, factor order, at most ``keep``
  per column), the pivots ``d`` ``(n,)`` and the factor's order ``perm`` (item ``i`` is
  the factor's position ``perm[i]``)."""
  m = sp.csc_matrix(k_inv[:, perm])
  diag_p = np.asarray(m.multiply(m).T @ (1.0 / d)).ravel()
  rows, encode = to_columns(m, keep)
  decode = -encode.astype(np.float64) / d[rows] / diag_p[None, :]
  return Factors(rows, encode, decode.astype(np.float32), shift)


def gram_plus_ridge(xc: sp.csc_matrix, l2: float, keep: int, block_size: int,
                    seed: int = 0) -> sp.csc_matrix:
  """``X^T X + l2 I`` float64 CSC ``(n, n)`` from CSC ``xc`` ``(users, n)``, keeping the
  diagonal and the off-diagonal entries of magnitude at least a threshold chosen so that
  about ``keep`` remain (one threshold for the whole matrix keeps it symmetric); built
  ``block_size`` columns at a time."""
  n = xc.shape[1]
  xr = xc.tocsr()
  threshold = 0.0 if keep >= n * (n - 1) else _gram_threshold(xc, xr, keep, block_size,
                                                                  seed)
  blocks, moved = [], np.zeros(n)
  for start in range(0, n, block_size):
    # Rows of G (X[:, block]^T X, CSR): a third faster than its columns in SciPy.
    g = sp.csr_matrix(xc[:, start:min(n, start + block_size)].T.tocsr() @ xr)
    row = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
    dropped = (np.abs(g.data) < threshold) & (g.indices != row + start)
    moved[start:start + g.shape[0]] = np.bincount(row[dropped], np.abs(g.data[dropped]),
                                                  minlength=g.shape[0])
    g.data[dropped] = 0.0
    g.eliminate_zeros()
    blocks.append(g)
  g = sp.vstack(blocks, format="csr")
  # G is symmetric: its CSR arrays read as CSC are G itself (no conversion).
  g = sp.csc_matrix((g.data, g.indices, g.indptr), shape=(n, n))
  # Each dropped g_ij moves |g_ij| onto g_ii and g_jj: what is taken away is then
  # |g_ij| (e_i -+ e_j)(e_i -+ e_j)^T summed, positive semi-definite, so the kept matrix
  # plus l2 I stays positive definite (plain thresholding lost definiteness on ML-1M).
  return sp.csc_matrix(g + sp.diags(moved + l2, format="csc"))


def _gram_threshold(xc, xr, keep: int, block_size: int, seed: int) -> float:
  """The magnitude above which about ``keep`` off-diagonal entries of ``X^T X`` lie,
  estimated from ``block_size`` (or an eighth of the) columns drawn at random."""
  n = xc.shape[1]
  cols = np.sort(np.random.default_rng(seed).choice(n, min(n, max(block_size, n // 8)),
                                                    replace=False))
  g = sp.csr_matrix(xc[:, cols].T.tocsr() @ xr)
  row = np.repeat(cols, np.diff(g.indptr))
  mag = np.abs(g.data[g.indices != row])
  want = int(round(keep * cols.size / n))
  if want >= mag.size:
    return 0.0
  t = np.partition(mag, mag.size - want - 1)[mag.size - want - 1]
  # Integer co-occurrence counts tie often: take the side of t nearer the target.
  above, at_least = int((mag > t).sum()), int((mag >= t).sum())
  return float(np.nextafter(t, np.inf)) if at_least - want > want - above else float(t)


class NotPositiveDefinite(ValueError):
  """A non-positive pivot in the (incomplete) factorisation."""


# SANSA's answer to a failed incomplete factorisation: add a share of the diagonal and
# try again, the share doubling from 1e-3 (here: at most 6 more tries, up to 3.2%).
SHIFT_STEP = 1e-3
SHIFT_TRIES = 6


def shifted_ldl_factor(a: sp.csc_matrix, drop_tol: float, fill_factor: float,
                       ordering: str = "colamd"
                       ) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray, float]:
  """:func:`ldl_factor` of ``a``, or of ``a + shift * diag(a)`` with the first shift of
  ``SHIFT_STEP * 2^i`` that factors when ``a`` itself loses positive definiteness;
  returns ``(L, d, perm, shift)``. ``NotPositiveDefinite`` when no shift does."""
  shift = 0.0
  for attempt in range(SHIFT_TRIES + 1):
    shifted = a if shift == 0.0 else sp.csc_matrix(a + sp.diags(shift * a.diagonal()))
    try:
      return (*ldl_factor(shifted, drop_tol, fill_factor, ordering), shift)
    except NotPositiveDefinite:
      if attempt == SHIFT_TRIES:
        raise
      shift = SHIFT_STEP * 2.0 ** attempt
  raise AssertionError("unreachable")


def ldl_factor(a: sp.csc_matrix, drop_tol: float, fill_factor: float,
               ordering: str = "colamd"
               ) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
  """``(L, d, perm)`` with ``a[q][:, q] ~ L diag(d) L^T``, ``q = argsort(perm)``: ``L``
  float64 CSC unit lower triangular ``(n, n)``, ``d`` float64 ``(n,)`` positive, ``perm``
  int ``(n,)`` (SuperLU's column order, :data:`ORDERINGS` ``[ordering]``). Raises :class:`NotPositiveDefinite` (a
  ``ValueError``) on a non-positive pivot."""
  lu = sla.spilu(a, drop_tol=drop_tol, fill_factor=fill_factor,
                 permc_spec=ORDERINGS[ordering], diag_pivot_thresh=0.0,
                 options={"SymmetricMode": True, "Equil": False})
  d = lu.U.diagonal()
  if not np.array_equal(lu.perm_r, lu.perm_c) or not (d > 0).all():
    raise NotPositiveDefinite(
        f"sparse EASE: the incomplete factorisation of G + l2 I lost positive "
        f"definiteness ({int((d <= 0).sum())} non-positive pivots of {d.size}); "
        f"raise l2 or target_density, or lower drop_tol")
  return sp.csc_matrix(lu.L), d, np.asarray(lu.perm_c)


def unit_lower_inverse(lower: sp.csc_matrix, steps: int, keep: int, block_size: int
                       ) -> sp.csc_matrix:
  """``K ~ L^-1`` float64 CSC for unit lower triangular ``L``: Newton-Schulz
  ``K <- K + K (I - L K)`` from ``K = 2I - L``, each column's residual and result cut to
  their ``keep`` largest magnitudes (``K``'s unit diagonal kept). The residual ``I - L K``
  squares each step, so ``ceil(log2(n)) + 1`` uncut steps give ``L^-1`` exactly."""
  n = lower.shape[0]
  eye = sp.identity(n, format="csc")
  inv = keep_top_per_column(sp.csc_matrix(2.0 * eye - lower), keep, keep_diagonal=True)
  for _ in range(steps - 1):
    blocks, largest = [], 0.0
    for start in range(0, n, block_size):
      cols = slice(start, min(n, start + block_size))
      resid = sp.csc_matrix(eye[:, cols] - lower @ inv[:, cols])
      resid.eliminate_zeros()
      if resid.nnz:
        largest = max(largest, float(np.abs(resid.data).max()))
      resid = keep_top_per_column(resid, keep)
      update = sp.csc_matrix(inv[:, cols] + inv @ resid)
      blocks.append(keep_top_per_column(update, keep, keep_diagonal=True,
                                        diagonal_offset=start))
    inv = sp.hstack(blocks, format="csc")
    if largest == 0.0:
      break  # exact (triangular: nilpotent residual)
  return inv


def keep_top_per_column(m: sp.csc_matrix, keep: int, *, keep_diagonal: bool = False,
                        diagonal_offset: int = 0) -> sp.csc_matrix:
  """CSC ``m`` with each column's ``keep`` largest magnitudes (ties: lower row first);
  with ``keep_diagonal`` the entry at row ``diagonal_offset + j`` of column ``j`` always
  stays (counted in ``keep``). Explicit zeros are dropped."""
  m = sp.csc_matrix(m)
  m.sum_duplicates()
  m.eliminate_zeros()
  counts = np.diff(m.indptr)
  if counts.size == 0 or counts.max() <= keep:
    return m
  col = np.repeat(np.arange(m.shape[1]), counts)
  mag = np.abs(m.data)
  if keep_diagonal:
    mag = np.where(m.indices == col + diagonal_offset, np.inf, mag)
  # Each long column's keep-th largest magnitude t: everything above t stays, and of the
  # entries equal to t the first ones (sum_duplicates sorted the rows: lower row first).
  long = np.flatnonzero(counts > keep)
  t = np.full(m.shape[1], -1.0)
  t[long] = _kth_largest(mag, m.indptr, long, keep)
  above = mag > t[col]
  ties = mag == t[col]
  room = keep - np.bincount(col[above], minlength=m.shape[1])
  tie_rank = np.cumsum(ties) - ties
  tie_rank -= np.concatenate([[0], np.cumsum(ties)])[m.indptr[:-1]][col]
  kept = np.flatnonzero(above | (ties & (tie_rank < room[col])))
  indptr = np.concatenate([[0], np.cumsum(np.minimum(counts, keep))])
  return sp.csc_matrix((m.data[kept], m.indices[kept], indptr), shape=m.shape)


def _kth_largest(mag: np.ndarray, indptr: np.ndarray, cols: np.ndarray, keep: int,
                 chunk: int = 1 << 24) -> np.ndarray:
  """The ``keep``-th largest of ``mag[indptr[j]:indptr[j + 1]]`` for each ``j`` of
  ``cols`` (each holding more than ``keep``), float64 ``(len(cols),)``: the columns, in
  order of length, padded with -1 into rows of a dense array (at most about ``chunk``
  entries at a time) and partitioned, linear in their entries where a sort of them all
  was the fit's slowest step. Columns of like length share an array, so a few long ones
  (a popular item's) do not widen every row."""
  out = np.empty(cols.size)
  counts = indptr[cols + 1] - indptr[cols]
  order = np.argsort(counts, kind="stable")
  start = 0
  while start < order.size:
    group = max(1, chunk // int(counts[order[start]]))
    while group > 1 and group * int(counts[order[min(order.size, start + group) - 1]]) > chunk:
      group //= 2
    pick = order[start:start + group]
    c, n = cols[pick], counts[pick]
    width = int(n.max())
    padded = np.full((c.size, width), -1.0)
    owner = np.repeat(np.arange(c.size), n)
    slot = np.arange(owner.size) - np.repeat(np.cumsum(n) - n, n)
    padded[owner, slot] = mag[indptr[c][owner] + slot]
    out[pick] = np.partition(padded, width - keep, axis=1)[:, width - keep]
    start += group
  return out


def score(factors: Factors, rows) -> np.ndarray:
  """Float32 scores ``(batch, n_items)`` of history rows ``rows`` (scipy sparse or dense
  ``(batch, n_items)``): ``x @ B = x + (x @ M^T) @ W`` by two CSR products on the host.
  The users' own items are scored too; a caller ranking unseen items masks them."""
  n = factors.rows.shape[1]
  if rows.ndim != 2 or rows.shape[1] != n:
    raise ValueError(f"sparse EASE score: rows must be (batch, {n}), got {rows.shape}")
  rows = sp.csr_matrix(rows, dtype=np.float32)
  m, w = factors.matrices()
  latent = rows @ m.T.tocsr()
  return np.asarray(rows.toarray() + (latent @ w.tocsr()).toarray(), np.float32)


# --------------------------------------------------------------------------- the model


def to_columns(b: sp.spmatrix, keep: int) -> tuple[np.ndarray, np.ndarray]:
  """``B`` ``(n, n)`` with at most ``keep`` entries per column as ``(rows int32 (keep,
  n), vals float32 (keep, n))``: column ``j``'s entries ``rows[:, j]``, ``vals[:, j]``,
  padded with row 0 and value 0. ``ValueError`` for a column holding more."""
  bc = sp.csc_matrix(b, dtype=np.float32)
  bc.sum_duplicates()
  counts = np.diff(bc.indptr)
  if counts.size and counts.max() > keep:
    raise ValueError(f"sparse EASE: a column of B holds {counts.max()} entries, more "
                     f"than the {keep} its density keeps")
  col = np.repeat(np.arange(bc.shape[1]), counts)
  slot = np.arange(bc.nnz) - bc.indptr[col]
  rows = np.zeros((keep, bc.shape[1]), np.int32)
  vals = np.zeros((keep, bc.shape[1]), np.float32)
  rows[slot, col] = bc.indices
  vals[slot, col] = bc.data
  return rows, vals


def column_product(h: jax.Array, rows: jax.Array, vals: jax.Array) -> jax.Array:
  """``h @ B`` float32 ``(batch, n)`` for dense ``h`` ``(batch, n)`` and ``B`` held as
  :func:`to_columns`' ``rows`` / ``vals`` ``(k, n)``: ``k`` gathers of ``h``'s columns,
  one ``(batch, n)`` array at a time (``k * batch * n`` work, no ``(batch, nnz)``
  temporary)."""
  h = h.astype(jnp.float32)

  def add_slot(acc, slot):
    r, v = slot
    return acc + jnp.take(h, r, axis=1) * v.astype(jnp.float32)[None, :], None

  out, _ = jax.lax.scan(add_slot, jnp.zeros((h.shape[0], rows.shape[1]), jnp.float32),
                        (rows, vals))
  return out


def scatter_product(h: jax.Array, rows: jax.Array, vals: jax.Array) -> jax.Array:
  """``h @ M^T`` float32 ``(batch, n)`` for dense ``h`` ``(batch, n)`` and ``M`` held as
  ``rows`` / ``vals`` ``(k, n)`` (:class:`Factors`): ``k`` scatter-adds of ``h``'s
  columns, one ``(batch, n)`` array at a time."""
  h = h.astype(jnp.float32)

  def add_slot(acc, slot):
    r, v = slot
    return acc.at[:, r].add(h * v.astype(jnp.float32)[None, :]), None

  out, _ = jax.lax.scan(add_slot, jnp.zeros(h.shape, jnp.float32), (rows, vals))
  return out


def sparse_scatter_product(x: sparse_lib.SparseBatch, rows: jax.Array, vals: jax.Array
                           ) -> jax.Array:
  """``x @ M^T`` float32 ``(batch, n)`` for a :class:`SparseBatch` ``x``: each stored
  entry adds its ``k`` weights (``nnz * k`` work; padding entries hold 0)."""
  n = rows.shape[1]
  out = jnp.zeros((x.batch_size, n), jnp.float32)
  weights = x.vals.astype(jnp.float32)[:, None] * vals[:, x.cols].T.astype(jnp.float32)
  return out.at[x.rows[:, None], rows[:, x.cols].T].add(weights, mode="drop")


def decode(h: jax.Array, rows: jax.Array, vals: jax.Array) -> jax.Array:
  """``x @ B`` float32 ``(B, n)`` from ``h = [x, x @ M^T]`` ``(B, 2n)``:
  ``x + (x @ M^T) @ W`` (:func:`column_product` of the second half)."""
  n = rows.shape[1]
  return h[:, :n] + column_product(h[:, n:], rows, vals)


class _Factors(nn.Module):
  """:class:`Factors` as parameters (``rows`` int32, ``encode`` and ``decode`` float32,
  ``(k, n)`` each; zero at init: the state's layout only, they are fitted, never drawn):
  ``encode(x)`` is ``[x, x @ M^T]`` ``(B, 2n)``, ``__call__`` of that is ``x @ B``."""

  n_items: int
  per_column: int

  def setup(self):
    shape = (self.per_column, self.n_items)
    self.rows = self.param("rows", nn.initializers.zeros, shape, jnp.int32)
    self.encode_vals = self.param("encode", nn.initializers.zeros, shape, jnp.float32)
    self.decode_vals = self.param("decode", nn.initializers.zeros, shape, jnp.float32)

  def encode(self, x: model_lib.Input) -> jax.Array:
    if isinstance(x, sparse_lib.SparseBatch):
      h = sparse_lib.densify(x, self.n_items, jnp.float32)
      latent = sparse_scatter_product(x, self.rows, self.encode_vals)
    else:
      h = jnp.asarray(x).astype(jnp.float32)
      latent = scatter_product(h, self.rows, self.encode_vals)
    return jnp.concatenate([h, latent], axis=1)

  def __call__(self, h: jax.Array) -> jax.Array:
    return decode(h, self.rows, self.decode_vals)


class SparseEASE(model_lib.CFModel):
  """Sparse EASE's scorer ``x @ B = x + (x @ M^T) @ W`` as a model of the library: the
  raw history row (no normalisation, no dropout) through the two factors of
  :class:`Factors`, held column by column.

  Attributes:
    n_items: number of items.
    per_column: ``k``, entries per column of each factor (:func:`per_column` of the
      target density).
    dtype: unused (the scores are float32 gathers and scatters).
    param_dtype: float32.
    item_shards: always ``None``.

  Parameters: ``output/rows`` int32 ``(k, n_items)``, ``output/encode`` and
  ``output/decode`` float32 ``(k, n_items)``, ``l2`` float32 scalar (the value fitted
  with). ``features`` gives ``[x, x @ M^T]`` float32 ``(B, 2 n_items)``.
  """

  n_items: int
  per_column: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: Any = None

  closed_form = True

  @property
  def output_layer(self) -> str:
    return "output"

  @property
  def phases(self) -> tuple[model_lib.Phase, ...]:
    return ()

  @property
  def has_kl(self) -> bool:
    return False

  def setup(self):
    self.output = _Factors(self.n_items, self.per_column)
    self.l2 = self.param("l2", nn.initializers.zeros, (), self.param_dtype)

  def features(self, x: model_lib.Input, *, train: bool = False, row_offset=0,
               dropout: bool = True, frozen: Any = None, kl: bool = True
               ) -> model_lib.ModelOutput:
    """``logits`` holds ``[x, x @ M^T]`` float32 ``(B, 2 n_items)``: the output's input."""
    del train, row_offset, dropout, frozen, kl
    model_lib.check_input(x, self.n_items)
    return model_lib.ModelOutput(self.output.encode(x))

  def __call__(self, x: model_lib.Input, *, train: bool = False, row_offset=0, **kwargs
               ) -> model_lib.ModelOutput:
    h = self.features(x, train=train, row_offset=row_offset, **kwargs).logits
    return model_lib.ModelOutput(self.output(h))

  def output_logits(self, params: Any, h: jax.Array) -> jax.Array:
    """The output layer outside ``apply``: float32 scores ``(B, n_items)`` of the
    features ``h`` ``(B, 2 n_items)`` (the chunked evaluation step has no dense kernel
    to multiply here)."""
    layer = params[self.output_layer]
    return decode(h, layer["rows"], layer["decode"])


@dataclasses.dataclass(frozen=True)
class SparseEASESettings:
  """Sparse EASE's own settings (``target_density`` shapes the parameters)."""

  l2: tuple = model_lib.model_setting(
      (500.0,), "The L2 weight lambda, or comma-separated values to try on the "
      "validation data (a whole fit each; the best is kept).", element=float)
  target_density: float = model_lib.model_setting(
      0.01, "Share of B's n_items^2 entries kept, in (0, 1] (1: dense EASE exactly; "
      "each column keeps its round(target_density * n_items) largest).", shapes=True)
  gram_ratio: float = model_lib.model_setting(
      4.0, "The thresholded Gram matrix keeps about this many times B's entries, >= 1 "
      "(more: closer to EASE, slower).")
  factor_ratio: float = model_lib.model_setting(
      2.0, "The factor L and its inverse keep this many times B's entries per column, "
      ">= 1.")
  drop_tol: float = model_lib.model_setting(
      1e-4, "Relative drop tolerance of the incomplete LDL^T factorisation, >= 0.")
  inverse_steps: int = model_lib.model_setting(
      7, "Newton-Schulz steps of the sparse inverse of L, >= 1.")
  ordering: str = model_lib.model_setting(
      "colamd", "Fill-reducing order of the incomplete factorisation: colamd (fast on "
      "wide catalogues) or mmd (minimum degree of A^T + A; more accurate on ML-1M, 13x "
      "slower at Amazon-Book's shape).", choices=tuple(ORDERINGS))

  def __post_init__(self):
    if not self.l2:
      raise ValueError("sparse EASE needs at least one l2 value")
    ease.l2_values(self.l2)
    for l2 in self.l2:
      check_settings(self.fit_settings(l2))

  def fit_settings(self, l2: float) -> Settings:
    """The :class:`Settings` of one fit."""
    return Settings(l2=float(l2), target_density=self.target_density,
                    gram_ratio=self.gram_ratio, factor_ratio=self.factor_ratio,
                    drop_tol=self.drop_tol, inverse_steps=self.inverse_steps,
                    ordering=self.ordering)


def fit_bytes_floor(n_items: int, settings: Settings) -> int:
  """Bytes a fit holds at least at its peak: the cut Gram matrix, ``K`` and its update
  on the host (12 bytes an entry), the three ``(k, n_items)`` arrays of
  :class:`Factors` on the host and on the device (12 bytes a column entry each);
  SuperLU's fill comes on top."""
  n = int(n_items)
  k = per_column(settings.target_density, 1.0, n)
  if settings.target_density >= 1.0:
    return 12 * n * (3 * n) + 24 * n * k
  entries = (per_column(settings.target_density, settings.gram_ratio, n)
             + 2 * per_column(settings.target_density, settings.factor_ratio, n))
  return 12 * n * entries + 24 * n * k


def check_host_memory(n_items: int, settings: Settings) -> None:
  """``MemoryError`` with the figures when :func:`fit_bytes_floor` exceeds the host's
  available memory (before any work)."""
  need, have = fit_bytes_floor(n_items, settings), ease.host_memory_bytes()
  if have is not None and need > have:
    raise MemoryError(
        f"sparse EASE on {n_items:,} items at target_density "
        f"{settings.target_density:g} needs at least {need / 2**30:.1f} GiB; the host "
        f"has {have / 2**30:.1f} GiB available. Lower target_density")


def params_of(factors: Factors, l2: float) -> dict:
  """:class:`SparseEASE`'s parameters holding ``factors`` (host arrays)."""
  return {"output": {"rows": factors.rows, "encode": factors.encode,
                     "decode": factors.decode}, "l2": np.float32(l2)}


def fit_run(settings: SparseEASESettings, problem: model_lib.ClosedFormProblem
            ) -> model_lib.ClosedFormFit:
  """Sparse EASE's closed-form fit (its :attr:`ModelEntry.fit`), on the host whatever
  the device: each ``l2`` of ``settings`` fitted (:func:`fit`), scored on the validation
  users when there are several, the best kept."""
  grid = ease.l2_values(settings.l2)
  n = problem.n_items
  check_host_memory(n, settings.fit_settings(grid[0]))
  x = ease.training_rows(problem.train_batches(), n)
  keep = per_column(settings.target_density, 1.0, n)
  scorer, fitted = SparseEASE(n, keep), {}

  def params(c):
    if c["l2"] not in fitted:
      t0 = time.perf_counter()
      factors = fit(x, settings.fit_settings(c["l2"]))
      if problem.progress is not None:
        shifted = (f", the factorisation's diagonal raised by {factors.shift:.1%} (it "
                   "lost positive definiteness without)" if factors.shift else "")
        problem.progress(f"l2 {c['l2']:g}: factors of {keep} x {n:,} in "
                         f"{time.perf_counter() - t0:.1f}s{shifted}")
      fitted[c["l2"]] = jax.device_put(params_of(factors, c["l2"]), problem.device)
    return fitted[c["l2"]]

  best = problem.choose([{"l2": v} for v in grid], lambda c: (scorer, params(c)))
  return model_lib.ClosedFormFit(
      params(best), {"l2": (best["l2"],)},
      f"l2 {best['l2']:g}, target_density {settings.target_density:g} ({len(fitted)} "
      f"sparse fit{'s' if len(fitted) > 1 else ''} on the host)")


def _build(n_items, settings: SparseEASESettings, dropout_rate, dtype) -> SparseEASE:
  del dropout_rate, dtype  # no input dropout; float32 gathers
  return SparseEASE(n_items, per_column(settings.target_density, 1.0, n_items))


def _space():
  from jax_vaecf.models import space  # pylint: disable=g-import-not-at-top
  return (space.Param("l2", "float", "Sparse EASE's L2 weight lambda (one value per "
                      "trial).", 1.0, 1e5, log=True, applies="model",
                      read=space.one_value, write=space.as_list),)


ENTRY = model_lib.ModelEntry(_build, "sparse EASE", SparseEASESettings, fit=fit_run,
                             space=_space())
