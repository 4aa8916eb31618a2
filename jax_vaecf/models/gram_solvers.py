"""Inverses of ``G + D`` for item-item models (EASE, EDLAE), in place, at LAPACK speed.

``X`` is a scipy CSR ``(n_users, n_items)`` training matrix, ``G = X^T X`` its Gram
matrix and ``D = diag(d)`` a positive per-item diagonal (EASE: ``d = l2``; EDLAE:
``d = l2 + p / (1 - p) * diag(G)``). Everything here computes ``P = (G + D)^-1`` or what
follows from it, on the host with SciPy's LAPACK (float32, or float64 on request), or
with the device's solver (:func:`device_inverse`, for a GPU); host arrays in, host
arrays out, no flag or global read.

Memory at the peak of one fit (``n = n_items``, ``m = n_users``):

* primal form (:func:`inverse_of_gram_plus_diagonal`): ONE ``n x n`` matrix (TWO with
  ``method="blas3"``). ``G`` is written into it (:func:`gram_into`, row blocks of the
  sparse product, never a dense ``users x items`` matrix), factored in place
  (``potrf``) and inverted in place (``potri``); the other triangle is filled in row
  blocks of ``_BLOCK`` rows.
* dual form (:func:`dual_inverse`, fewer users than items): ``K^-1`` ``(m, m)`` and
  ``V = S^T K^-1`` ``(n, m)``, then ``V`` and ``P`` (``m < n``: under two ``n x n``).
* the l2 sweep (:func:`choose_l2`): TWO ``n x n`` matrices in the primal form (the point
  being scored and the best so far), none in the dual form until the final ``P``.

Costs in flops (:func:`primal_flops`, :func:`dual_flops`): the primal fit is
``n^3 / 3`` (Cholesky) ``+ 2 n^3 / 3`` (``potri``; ``"blas3"``'s ``trsm`` and ``syrk``:
``2 n^3``);
the dual is ``m^3`` (``K = I + X D^-1 X^T`` inverted by ``potrf`` and ``potri``), then
``P = D^-1 - S^T K^-1 S`` (``S = X D^-1``) by sparse-times-dense products;
:func:`fit_inverse` takes the dual when ``m < n``. Sparse products (``G``, ``K``,
``S^T K^-1``, ``S^T V^T``) cost ``sum over users of (items per user)^2`` and
``nnz * (m + n)``, small beside these, and are not counted. Every Cholesky factor is
blocked (:func:`jax_vaecf.core.lapack.cholesky_in_place`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.linalg import blas, lapack

from jax_vaecf.core import lapack as lapack_lib

Progress = Optional[Callable[[str], None]]

# Rows per block when a dense matrix is filled or symmetrised piece by piece: bounds the
# temporary copies to _BLOCK * n values.
_BLOCK = 1024

# Values of G computed per sparse product in gram_into (a block's sparse result holds
# at most this many, about 12 bytes each).
_GRAM_BLOCK_VALUES = 2**24

# Rows above which inverse_of_gram_plus_diagonal's "blas3" method takes potri's route:
# OpenBLAS's threaded syrk crashed the process on a 27,572 x 4,096 operand
# (core/lapack.py), while trtri and lauum (potri's two halves) ran at 31,668 rows.
BLAS3_MAX_ROWS = 16_384

# Byte alignment of the n x n matrices this module allocates: jax's CPU client takes an
# array aligned so without copying it (jax.device_put aliases the memory), so a fitted B
# handed to a jax model is not a third matrix. NumPy alone aligns to 16 bytes.
_ALIGNMENT = 64


def _say(progress: Progress, message: str) -> None:
  if progress is not None:
    progress(message)


def _check_square(a: np.ndarray, name: str) -> None:
  if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"{name}: expected a square 2-D numpy array, got "
                     f"{type(a).__name__} of shape {getattr(a, 'shape', None)}")
  if a.dtype not in (np.float32, np.float64):
    raise ValueError(f"{name}: expected float32 or float64, got {a.dtype}")
  if not (a.flags.c_contiguous or a.flags.f_contiguous):
    raise ValueError(f"{name}: expected a contiguous array (it is factored in place)")


def _fortran(a: np.ndarray) -> np.ndarray:
  """The Fortran-ordered view LAPACK works on in place. For a C-ordered symmetric ``a``
  that is ``a.T`` (same values, same memory)."""
  return a if a.flags.f_contiguous else a.T


def _diagonal_vector(d, n: int, dtype) -> np.ndarray:
  d = np.broadcast_to(np.asarray(d, dtype=np.float64), (n,))
  if not np.all(np.isfinite(d)) or np.any(d <= 0):
    bad = np.flatnonzero(~(np.isfinite(d) & (d > 0)))
    raise ValueError(f"diag_add: every entry must be a finite number above 0 (G + D must "
                     f"be positive definite); entry {bad[0]} is {d[bad[0]]}")
  return d.astype(dtype)


def _check_csr(x, name: str = "x") -> sp.csr_matrix:
  if not sp.issparse(x):
    raise ValueError(f"{name}: expected a scipy sparse users x items matrix, got "
                     f"{type(x).__name__} (a dense one is never built for large data)")
  return sp.csr_matrix(x)


# ------------------------------------------------------------------ dense building blocks


def aligned_empty(shape: tuple[int, ...], dtype, order: str = "C") -> np.ndarray:
  """An uninitialised array of ``shape`` and ``dtype`` (C- or F-ordered) whose data
  starts on a ``_ALIGNMENT``-byte boundary, so that ``jax.device_put`` on a CPU device
  shares its memory instead of copying it (the array must then not be written to)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape, order=order)


def gram_diagonal(x) -> np.ndarray:
  """``diag(X^T X)`` float64 ``(n_items,)``: per-item sums of squares (EDLAE's diagonal
  needs it before any ``n x n`` matrix exists)."""
  x = _check_csr(x)
  return np.asarray(x.multiply(x).sum(axis=0), dtype=np.float64).ravel()


def gram_into(x, out: np.ndarray | None = None, dtype=np.float32,
              progress: Progress = None) -> np.ndarray:
  """``X^T X`` written into ``out`` (``(n_items, n_items)``, C-ordered, float32 or
  float64; allocated when ``None``) from the sparse ``(n_users, n_items)`` ``x``, in row
  blocks: the sparse product of an eighth of the item columns at a time (at most
  ``_GRAM_BLOCK_VALUES`` values), so the only temporary is one block's sparse rows. Binary data gives integer sums, exact in
  float32 up to 2^24 users."""
  x = _check_csr(x)
  n = x.shape[1]
  if out is None:
    out = aligned_empty((n, n), dtype)
  if out.shape != (n, n) or not out.flags.c_contiguous:
    raise ValueError(f"out: expected a C-ordered ({n}, {n}) array, got shape {out.shape}")
  x = x.astype(out.dtype)
  xt = x.T.tocsr()  # (n_items, n_users): its row blocks are the item blocks of G's rows
  # At most an eighth of the rows a block: its sparse result (8 bytes a value) stays
  # under a quarter of the float32 matrix.
  block = max(1, min(-(-n // 8), _GRAM_BLOCK_VALUES // max(n, 1)))
  for i0 in range(0, n, block):
    (xt[i0:i0 + block] @ x).toarray(out=out[i0:i0 + block])
  _say(progress, f"Gram matrix of {x.shape[0]:,} users x {n:,} items")
  return out


def symmetrize_from_lower(a: np.ndarray) -> np.ndarray:
  """Fills the strict upper triangle of the Fortran view of ``a`` (the one LAPACK left
  alone) from its lower triangle, in place, at most ``_BLOCK`` rows (and at most an
  eighth of them) at a time. Returns ``a``."""
  c = _fortran(a).T  # C view whose UPPER triangle holds the valid values
  n = c.shape[0]
  block = max(1, min(_BLOCK, -(-n // 8)))  # the diagonal block's temporaries: n^2 / 64
  for i0 in range(0, n, block):
    i1 = min(n, i0 + block)
    c[i0:i1, :i0] = c[:i0, i0:i1].T
    blk = c[i0:i1, i0:i1]
    blk[...] = np.triu(blk) + np.triu(blk, 1).T
  return a


def _lapack_check(info: int, routine: str, what: str) -> None:
  if info > 0:
    raise np.linalg.LinAlgError(
        f"{routine}: {what} is not positive definite (leading minor of order {info}); "
        f"the diagonal added must be above 0 and the data finite")
  if info < 0:
    raise ValueError(f"{routine}: argument {-info} had an illegal value")


def _factor_in_place(a: np.ndarray, what: str) -> np.ndarray:
  """Lower Cholesky factor of the Fortran view of ``a``, in place (other triangle 0)."""
  f = _fortran(a)
  # Blocked: OpenBLAS's threaded potrf crashes from about 28,000 rows (core/lapack.py).
  _lapack_check(lapack_lib.cholesky_in_place(f), "potrf", what)
  return f


def _inverse_from_factor_in_place(c: np.ndarray, what: str) -> None:
  """``(L L^T)^-1``'s lower triangle written over the lower factor ``L`` (Fortran-ordered
  ``c``) by LAPACK's ``potri`` (``2 n^3 / 3``, ONE matrix); the other triangle is left
  as it was (:func:`symmetrize_from_lower` completes it)."""
  potri, = lapack.get_lapack_funcs(("potri",), (c,))
  _, info = potri(c, lower=1, overwrite_c=1)
  _lapack_check(info, "potri", what)


# ---------------------------------------------------------------------- one inverse


def inverse_of_gram_plus_diagonal(g: np.ndarray, diag_add, overwrite: bool = True,
                                  progress: Progress = None, method: str = "potri"
                                  ) -> np.ndarray:
  """``P = (G + diag(diag_add))^-1``, symmetric, in ``g``'s dtype (float32 or float64).

  Args:
    g: ``(n, n)`` Gram matrix, C- or F-ordered. With ``overwrite`` (the default) it is
      consumed: ``P`` is written into its memory and returned. Without it, a copy is
      made first (one matrix more).
    diag_add: scalar or ``(n,)`` positive per-item diagonal.
    progress: optional ``progress(message)``, called between the stages.
    method: after the Cholesky factor ``L`` (``potrf``, in place):
      ``"potri"``: LAPACK's ``potri`` in place: ONE matrix, ``n^3`` flops in all; on a
      quiet 2-core machine 2x faster than ``"blas3"`` at 10,000 items
      (docs/performance.md).
      ``"blas3"``: ``L^-1`` by a triangular solve against ``I`` (``trsm``) into a second
      matrix, then ``P = L^-T L^-1`` (``syrk``) back into the first: TWO ``n x n``
      matrices at the peak, ``n^3 / 3 + 2 n^3`` flops in two large BLAS-3 calls (above
      :data:`BLAS3_MAX_ROWS` rows, ``"potri"``'s route).

  Raises ``numpy.linalg.LinAlgError`` when ``G + D`` is not positive definite.
  """
  _check_square(g, "g")
  if method not in ("blas3", "potri"):
    raise ValueError(f"method: expected 'blas3' or 'potri', got {method!r}")
  a = g if overwrite else g.copy()
  n = a.shape[0]
  d = _diagonal_vector(diag_add, n, a.dtype)
  a.ravel(order="K")[::n + 1] += d
  t0 = time.perf_counter()
  c = _factor_in_place(a, "G + D")
  _say(progress, f"Cholesky factor of {n:,} x {n:,}: {time.perf_counter() - t0:.1f}s")
  if method == "potri" or n > BLAS3_MAX_ROWS:
    _inverse_from_factor_in_place(c, "G + D")
  else:
    linv = np.eye(n, dtype=a.dtype, order="F")
    trsm, syrk = blas.get_blas_funcs(("trsm", "syrk"), (c, linv))
    linv = trsm(1.0, c, linv, side=0, lower=1, overwrite_b=1)
    out = syrk(1.0, linv, beta=0.0, c=c, trans=1, lower=1, overwrite_c=1)
    del linv
    if not np.shares_memory(out, a):
      raise RuntimeError("syrk did not work in place")
  symmetrize_from_lower(a)
  _say(progress, f"inverse of {n:,} x {n:,}: {time.perf_counter() - t0:.1f}s")
  return a


def ease_b_from_p(p: np.ndarray) -> np.ndarray:
  """EASE's ``B = I - P diag(1 / diag(P))`` (zero diagonal) written over the symmetric
  ``p`` ``(n, n)`` and returned: ``B[i, j] = -P[i, j] / P[j, j]``, ``B[j, j] = 0``. No
  second ``n x n`` matrix."""
  _check_square(p, "p")
  diag = p.diagonal().copy()
  if np.any(~(diag > 0)):
    raise ValueError("p: its diagonal must be above 0 (the inverse of a positive "
                     "definite matrix); was it symmetrised?")
  p /= -diag[None, :]
  p.ravel(order="K")[::p.shape[0] + 1] = 0
  return p


# ------------------------------------------------------------------------ dual form


def primal_flops(n_users: int, n_items: int) -> float:
  """Flops of a primal fit: Cholesky ``n^3/3``, then ``potri`` ``2 n^3 / 3``."""
  del n_users
  return float(n_items) ** 3


def dual_flops(n_users: int, n_items: int) -> float:
  """Flops of a dual fit: the inverse of the ``m x m`` system (``potrf`` ``m^3/3``,
  ``potri`` ``2 m^3 / 3``); its sparse products (``nnz * (m + n)``) are not counted."""
  del n_items
  return float(n_users) ** 3


def use_dual(n_users: int, n_items: int) -> bool:
  """Whether the users x users form is taken: fewer users than items, where it costs
  fewer flops (:func:`dual_flops` ``m^3`` under :func:`primal_flops` ``n^3``) and holds
  under two ``n x n`` matrices."""
  return n_users < n_items


def _dual_system_inverse(x: sp.csr_matrix, d: np.ndarray, dtype, progress: Progress = None
                         ) -> tuple[np.ndarray, sp.csr_matrix]:
  """``(K^-1, S^T)``: ``K^-1`` ``(m, m)`` C-ordered, symmetric, with
  ``K = I + X D^-1 X^T``, and ``S^T = (X D^-1)^T`` CSR ``(n, m)`` in ``dtype``.

  ``K`` is written in row blocks of the sparse product (:func:`gram_into` of
  ``(X D^-1/2)^T``), then inverted in place (``potrf``, ``potri``: ``m^3`` flops, ONE
  ``m x m`` matrix)."""
  t0 = time.perf_counter()
  x = x.astype(np.float64)
  half = (x @ sp.diags(1.0 / np.sqrt(d))).T.tocsr().astype(dtype)  # (n, m)
  k = gram_into(half, dtype=dtype)  # (X D^-1/2)(X D^-1/2)^T, m x m
  del half
  k.ravel()[::k.shape[0] + 1] += 1
  _inverse_from_factor_in_place(_factor_in_place(k, "I + X D^-1 X^T"), "I + X D^-1 X^T")
  symmetrize_from_lower(k)
  _say(progress, f"inverse of the {x.shape[0]:,} x {x.shape[0]:,} users system: "
       f"{time.perf_counter() - t0:.1f}s")
  st = (x @ sp.diags(1.0 / d)).T.tocsr().astype(dtype)
  return k, st


def dual_inverse(x, diag_add, dtype=np.float32, progress: Progress = None) -> np.ndarray:
  """``P = (X^T X + D)^-1`` from the users x users system (Woodbury):
  ``P = D^-1 - S^T K^-1 S`` with ``S = X D^-1`` (sparse) and ``K = I + X D^-1 X^T``.

  ``K^-1`` costs ``m^3`` flops (:func:`_dual_system_inverse`); ``V = S^T K^-1``
  ``(n, m)`` and ``P``'s column blocks ``S^T V[block]^T`` are sparse-times-dense
  products (``nnz * m`` and ``nnz * n`` multiply-adds, single-threaded SciPy).

  Args:
    x: sparse ``(m, n)`` training matrix (cheaper than the primal form when ``m`` is
      below ``n``: :func:`use_dual`).
    diag_add: scalar or ``(n,)`` positive diagonal ``d``.
    dtype: float32 or float64.

  Returns ``P`` ``(n, n)`` of ``dtype``, C-ordered. Peak: ``K^-1`` and ``V``
  (``m^2 + m n``), then ``V`` and ``P`` (``m n + n^2``).
  """
  x = _check_csr(x)
  n = x.shape[1]
  d = _diagonal_vector(diag_add, n, np.float64)
  t0 = time.perf_counter()
  kinv, st = _dual_system_inverse(x, d, dtype, progress)
  v = st @ kinv  # (n, m): S^T K^-1, so V[block]^T = K^-1 S[:, block]
  del kinv
  p = aligned_empty((n, n), dtype)
  block = max(1, min(_BLOCK, -(-n // 8)))
  for i0 in range(0, n, block):
    i1 = min(n, i0 + block)
    # (S^T K^-1 S)[:, i0:i1] as rows i0:i1 (P is symmetric).
    p[i0:i1] = (st @ np.ascontiguousarray(v[i0:i1].T)).T
  del v
  p *= -1
  p.ravel()[::n + 1] += (1.0 / d).astype(dtype)
  _say(progress, f"inverse of {n:,} x {n:,} (dual): {time.perf_counter() - t0:.1f}s")
  return p


def fit_inverse(x, diag_add, dtype=np.float32, form: str = "auto",
                progress: Progress = None, solver: str = "host", method: str = "potri"
                ) -> np.ndarray:
  """``P = (X^T X + D)^-1`` ``(n, n)`` C-ordered, by the primal form (Gram matrix, then
  :func:`inverse_of_gram_plus_diagonal`) or the dual
  (:func:`dual_inverse`); ``form`` is ``"primal"``, ``"dual"`` or ``"auto"`` (the
  cheaper by :func:`use_dual`; primal: one ``n x n`` matrix at the peak, two with
  ``method="blas3"``; dual: one plus ``m x n``). ``solver``: ``"host"`` (SciPy's
  LAPACK), ``"device"``
  (the primal form on jax's default device, float32: :func:`device_inverse`; host peak
  two matrices, the Gram matrix and the result) or ``"auto"`` (the device when jax's
  default backend is not the CPU). ``method``: the primal host inverse's
  (:func:`inverse_of_gram_plus_diagonal`)."""
  x = _check_csr(x)
  if form not in ("auto", "primal", "dual"):
    raise ValueError(f"form: expected 'auto', 'primal' or 'dual', got {form!r}")
  if solver not in ("auto", "host", "device"):
    raise ValueError(f"solver: expected 'auto', 'host' or 'device', got {solver!r}")
  if form == "dual" or (form == "auto" and use_dual(*x.shape)):
    return dual_inverse(x, diag_add, dtype, progress)
  if solver == "device" or (solver == "auto" and _accelerator_present()):
    d = _diagonal_vector(diag_add, x.shape[1], np.float32)
    return np.asarray(device_inverse(gram_into(x, progress=progress), d))
  return inverse_of_gram_plus_diagonal(gram_into(x, dtype=dtype, progress=progress),
                                       diag_add, progress=progress, method=method)


def _accelerator_present() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() != "cpu"


def ease_fit(x, l2: float, dtype=np.float32, form: str = "auto",
             progress: Progress = None) -> np.ndarray:
  """EASE's ``B`` ``(n, n)`` for one ``l2`` (:func:`fit_inverse`, then
  :func:`ease_b_from_p` in place)."""
  if not 0 < float(l2) < float("inf"):
    raise ValueError(f"l2: must be a finite number above 0, got {l2}")
  return ease_b_from_p(fit_inverse(x, float(l2), dtype, form, progress))


def device_inverse(g, diag_add):
  """``(G + D)^-1`` float32 with the device's solver (``jax``: Cholesky, a triangular
  solve against ``I`` and ``L^-T L^-1``), for a GPU, where it beats the host; ``g`` is
  donated. Holds three ``n x n`` matrices on the device. Returns a device array."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return _device_inverse_jit()(jnp.asarray(g, jnp.float32), jnp.asarray(diag_add, jnp.float32))


@functools.cache
def _device_inverse_jit():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, donate_argnums=0)
  def inv(g, d):
    n = g.shape[0]
    a = g + jnp.diag(jnp.broadcast_to(d, (n,)))
    lower = jax.lax.linalg.cholesky(a, symmetrize_input=False)
    linv = jax.lax.linalg.triangular_solve(lower, jnp.eye(n, dtype=g.dtype),
                                           left_side=True, lower=True)
    return jnp.dot(linv.T, linv, precision=jax.lax.Precision.HIGHEST)
  return inv


# ------------------------------------------------------------------------- l2 sweep


def ndcg_at_k(scores: np.ndarray, fold_in, heldout, k: int = 100) -> float:
  """Mean NDCG@k (binary gains) of ``scores`` float ``(v, n)`` over the users with
  held-out items; the sparse ``(v, n)`` ``fold_in`` items are never ranked, ``heldout``
  (sparse ``(v, n)``) are the relevant ones."""
  s = np.array(scores, dtype=np.float64)
  fold_in, heldout = _check_csr(fold_in, "fold_in"), _check_csr(heldout, "heldout")
  s[fold_in.nonzero()] = -np.inf
  k = min(k, s.shape[1])
  top = np.argpartition(-s, k - 1, axis=1)[:, :k]
  order = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1,
                                             kind="stable"), 1)
  rel = np.asarray(heldout[np.arange(s.shape[0])[:, None], order].todense()) > 0
  n_rel = np.asarray((heldout > 0).sum(axis=1)).ravel()
  discount = 1.0 / np.log2(np.arange(2, k + 2))
  ideal = np.cumsum(discount)[np.minimum(n_rel, k) - 1]
  has = n_rel > 0
  if not has.any():
    raise ValueError("heldout: no user has a held-out item")
  return float(np.mean((rel @ discount)[has] / ideal[has]))


def _primal_point(x, xv, d, work: np.ndarray, via_p: bool = False) -> np.ndarray:
  """Validation scores ``-(xv P) / diag(P)`` ``(v, n)`` for ``P = (G + D)^-1``: Cholesky
  and a triangular inverse in ``work`` (``2 n^3 / 3``), then either ``xv L^-T L^-1``
  (``v n^2``; ``L^-1`` left in ``work``'s Fortran view, the rest 0) or, with ``via_p``
  (cheaper when ``v > n / 3``), ``P = L^-T L^-1`` in ``work`` (``lauum``, ``n^3 / 3``)
  and the sparse ``xv @ P``."""
  gram_into(x, out=work)
  work.ravel()[::work.shape[0] + 1] += d
  lf = _factor_in_place(work, "G + D")
  trtri, = lapack.get_lapack_funcs(("trtri",), (lf,))
  _, info = trtri(lf, lower=1, overwrite_c=1)
  _lapack_check(info, "trtri", "the Cholesky factor")
  if via_p:
    _p_from_inverse_factor(work)
    return (xv @ work) / -work.diagonal()[None, :]
  diag_p = np.einsum("ij,ij->i", work, work)  # column norms of L^-1 (rows of work)
  y = np.asfortranarray(xv @ work)  # xv L^-T (work is L^-T in C order)
  trmm = blas.get_blas_funcs("trmm", (lf, y))
  y = trmm(1.0, lf, y, side=1, lower=1, overwrite_b=1)  # xv L^-T L^-1 = xv P
  return y / -diag_p[None, :]


def _p_from_inverse_factor(a: np.ndarray) -> np.ndarray:
  """``P = L^-T L^-1`` written over ``L^-1`` (the lower triangle of ``a``'s Fortran view),
  symmetric. ``n^3 / 3``."""
  lauum, = lapack.get_lapack_funcs(("lauum",), (a,))
  _, info = lauum(_fortran(a), lower=1, overwrite_c=1)
  _lapack_check(info, "lauum", "L^-1")
  return symmetrize_from_lower(a)


def _dual_point(x, xv, d, dtype) -> np.ndarray:
  """As :func:`_primal_point` from the users x users system, no ``n x n`` matrix:
  ``xv P = Sv - (Sv X^T) K^-1 S`` (``Sv = xv D^-1``; ``v m^2`` and ``nnz * v``) and
  ``diag(P) = 1/d - rowsum(S^T * (S^T K^-1))`` over item blocks (``nnz * m``)."""
  kinv, st = _dual_system_inverse(x, d, dtype)
  sv = (xv.astype(np.float64) @ sp.diags(1.0 / d)).astype(dtype).tocsr()
  r = (sv @ x.astype(dtype).T).toarray() @ kinv  # (v, m)
  xp = sv.toarray() - (st @ np.ascontiguousarray(r.T)).T
  del r
  n = x.shape[1]
  diag_p = (1.0 / d).astype(dtype)
  block = max(1, min(_BLOCK, -(-n // 8)))
  for i0 in range(0, n, block):
    rows = st[i0:i0 + block]
    diag_p[i0:i0 + block] -= np.asarray(rows.multiply(rows @ kinv).sum(axis=1),
                                        dtype).ravel()
  return xp / -diag_p[None, :]


def _scores_through_p(n_validation: int, n_items: int) -> bool:
  """Whether a sweep point forms ``P`` (``n^3 / 3``) to score the validation users
  rather than multiplying them through ``L^-1`` (``v n^2``)."""
  return 3 * n_validation > n_items


@dataclasses.dataclass
class Sweep:
  """What :func:`choose_l2` found: the chosen ``l2``, ``P`` ``(n, n)`` at it, the metric
  of every ``l2`` it scored (in the order scored) and the form used."""
  l2: float
  p: np.ndarray
  scored: dict
  form: str


def golden_grid_search(value: Callable[[int], float], n_points: int) -> int:
  """The index of the largest ``value(i)`` over ``0..n_points-1`` when the values rise
  then fall (unimodal): a golden-section bracket ``a < b < c`` with ``value(b)`` the
  largest seen, ``a = -1`` and ``c = n_points`` standing for minus infinity; about
  ``log(n_points + 1) / log(1.618)`` calls instead of ``n_points``."""
  a, c = -1, n_points
  b = a + max(1, round((c - a) * 0.382))
  fb = value(b)
  while c - a > 2:
    if b - a > c - b:
      x = b - max(1, round((b - a) * 0.382))
      fx = value(x)
      if fx > fb:
        b, c, fb = x, b, fx
      else:
        a = x
    else:
      x = b + max(1, round((c - b) * 0.382))
      fx = value(x)
      if fx > fb:
        a, b, fb = b, x, fx
      else:
        c = x
  return b


def _sweep_arguments(x, validation_fold_in, grid, extra_diag):
  """:func:`choose_l2`'s arguments checked: ``(x, xv, sorted grid, extra (n,))``."""
  x = _check_csr(x)
  xv = _check_csr(validation_fold_in, "validation_fold_in")
  n = x.shape[1]
  if xv.shape[1] != n:
    raise ValueError(f"validation_fold_in: {xv.shape[1]} items, the training rows {n}")
  values = sorted(set(float(v) for v in grid))
  if not values:
    raise ValueError("grid: no l2 value")
  extra = np.zeros(n) if extra_diag is None else np.asarray(extra_diag, np.float64)
  if extra.shape != (n,) or np.any(~(extra >= 0)):
    raise ValueError(f"extra_diag: expected ({n},) values >= 0")
  return x, xv, values, extra


def choose_l2(x, validation_fold_in, metric: Callable[[np.ndarray], float],
              grid: Sequence[float], *, extra_diag=None, dtype=np.float32,
              form: str = "auto", progress: Progress = None) -> Sweep:
  """The ``l2`` of ``grid`` whose ``P = (X^T X + l2 I + diag(extra_diag))^-1`` scores
  best on validation users, and that ``P``.

  Each scored ``l2`` costs a Cholesky factor and its triangular inverse (``2 n^3 / 3``,
  two thirds of a fit) plus the validation users' scores (``v n^2``); the grid is
  searched by golden section (:func:`golden_grid_search`, which assumes the metric
  rises then falls along the sorted grid: about 5 of 10 values scored), and the chosen
  ``P`` comes from its kept ``L^-1`` (``lauum``, a third of a fit; with more than
  ``n / 3`` validation users each point forms its ``P`` that way instead, and scores
  with the sparse ``xv @ P``). The Gram matrix is rebuilt from the sparse rows for
  each point rather than kept (a third matrix). With fewer users
  than items (:func:`use_dual`) each point is the users x users system, no ``n x n``
  matrix until the final ``P``. Peak: TWO ``n x n`` matrices (primal form).

  Args:
    x: sparse ``(m, n)`` training rows.
    validation_fold_in: sparse ``(v, n)`` validation users' input rows.
    metric: ``metric(scores)`` -> float, larger is better, from float ``(v, n)`` scores
      (valid on each user's unseen items; e.g. :func:`ndcg_at_k` with the fold-in items
      excluded).
    grid: the ``l2`` values (sorted here; each above 0).
    extra_diag: optional ``(n,)`` non-negative addition to the diagonal (EDLAE).
    progress: optional ``progress(message)`` after each scored value.
  """
  x, xv, values, extra = _sweep_arguments(x, validation_fold_in, grid, extra_diag)
  n = x.shape[1]
  dual = form == "dual" or (form == "auto" and use_dual(*x.shape))
  buffers = {} if dual else {"work": np.empty((n, n), dtype)}
  via_p = _scores_through_p(xv.shape[0], n)
  scored, t0 = {}, time.perf_counter()

  def value(i):
    d = _diagonal_vector(values[i] + extra, n, np.float64)
    scores = (_dual_point(x, xv, d, dtype) if dual else
              _primal_point(x, xv, d.astype(dtype), buffers["work"], via_p))
    before = max(scored.values(), default=-np.inf)
    scored[values[i]] = float(metric(scores))
    if not dual and (len(scored) == 1 or scored[values[i]] > before):  # as the search
      buffers["work"], buffers["best"] = buffers.get("best"), buffers["work"]
      if buffers["work"] is None:
        buffers["work"] = np.empty((n, n), dtype)
    _say(progress, f"l2 {values[i]:g}: validation {scored[values[i]]:.4f} "
         f"({len(scored)} scored, {time.perf_counter() - t0:.1f}s)")
    return scored[values[i]]

  best = values[golden_grid_search(value, len(values))]
  d = best + extra
  if dual:
    p = dual_inverse(x, d, dtype, progress)
  else:
    del buffers["work"]
    p = buffers.pop("best")
    if not via_p:
      _p_from_inverse_factor(p)
  return Sweep(best, p, scored, "dual" if dual else "primal")
