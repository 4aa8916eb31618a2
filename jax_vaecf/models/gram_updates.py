"""Exact updates of ``P = (X^T X + D)^-1`` when training rows change or items are added,
without a refit (EASE's :meth:`FittedModel.update`): changed or new users by a
rank-``2k`` Woodbury correction of ``P`` in place, new items by a border (Schur
complement) update, a refit when its flops are fewer (:func:`ease_update`). Host numpy
arrays in and out, as :mod:`jax_vaecf.models.gram_solvers`."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.linalg import blas

from jax_vaecf.models import gram_solvers as gs


def p_from_ease_b(b: np.ndarray, diag_p) -> np.ndarray:
  """Inverse of :func:`jax_vaecf.models.gram_solvers.ease_b_from_p`, in place: ``P = (I - B) diag(diag_p)`` written over
  ``b`` (so a model that keeps ``B`` and ``diag(P)`` ``(n,)`` can be updated exactly)."""
  gs._check_square(b, "b")
  diag_p = np.asarray(diag_p, b.dtype)
  b *= -diag_p[None, :]
  b.ravel(order="K")[::b.shape[0] + 1] = diag_p
  return b


def woodbury_flops(n_changed_rows: int, n_items: int) -> float:
  """Flops of :func:`woodbury_update` for ``k`` changed rows: the rank-``2k`` correction
  of ``P`` (``2 * 2k * n^2``; the sparse ``U P`` and the ``2k x 2k`` solve are smaller)."""
  return 4.0 * n_changed_rows * float(n_items) ** 2


def woodbury_update(p: np.ndarray, old_rows, new_rows, progress: gs.Progress = None
                    ) -> np.ndarray:
  """``P' = (G' + D)^-1`` written over ``p = (G + D)^-1`` ``(n, n)`` (symmetric), where
  ``G' = G - old^T old + new^T new``: the users whose rows change from ``old_rows`` to
  ``new_rows`` (both sparse ``(k, n)``; a new user's old row is empty, a removed user's
  new row is empty). Woodbury with ``U = [new; old]``, ``C = diag(+1, -1)``:
  ``P' = P - Z^T (C + U Z^T)^-1 Z``, ``Z = U P`` (the ``2k x 2k`` system in float64).
  Cost :func:`woodbury_flops`; no second ``n x n`` matrix."""
  gs._check_square(p, "p")
  old_rows, new_rows = gs._check_csr(old_rows, "old_rows"), gs._check_csr(new_rows, "new_rows")
  n = p.shape[0]
  if old_rows.shape != new_rows.shape or old_rows.shape[1] != n:
    raise ValueError(f"old_rows {old_rows.shape} and new_rows {new_rows.shape}: expected "
                     f"the same shape (k, {n})")
  u = sp.vstack([new_rows, old_rows]).tocsr().astype(np.float64)
  sign = np.concatenate([np.ones(new_rows.shape[0]), -np.ones(old_rows.shape[0])])
  keep = np.diff(u.indptr) > 0  # an empty row adds nothing
  u, sign = u[keep], sign[keep]
  if not u.shape[0]:
    return p
  z = np.asarray(u @ p, dtype=np.float64)  # (r, n)
  s = np.diag(sign) + np.asarray(u @ z.T)
  y = np.linalg.solve(s, z).astype(p.dtype)
  f = gs._fortran(p)
  gemm = blas.get_blas_funcs("gemm", (f,))
  out = gemm(-1.0, z.astype(p.dtype), y, beta=1.0, c=f, trans_a=1, overwrite_c=1)
  if not np.shares_memory(out, p):
    raise RuntimeError("gemm did not work in place")
  gs._say(progress, f"rank-{u.shape[0]} update of {n:,} x {n:,}")
  return p


def grow_inverse(p: np.ndarray, rows, diag_new) -> np.ndarray:
  """``(G' + D')^-1`` ``(n + q, n + q)`` from ``p = (G_11 + D)^-1`` ``(n, n)`` when ``q``
  new items join (a border update through the Schur complement, ``O(n^2 q)``; peak: the
  old and the new matrix).

  Args:
    p: the inverse over the old items (after :func:`woodbury_update` for any change).
    rows: sparse ``(k, n + q)``: every user who has a new item (only they add to the new
      rows and columns of ``G'``), their whole rows.
    diag_new: scalar or ``(q,)`` positive diagonal of the new items.
  """
  gs._check_square(p, "p")
  rows = gs._check_csr(rows, "rows").astype(np.float64)
  n = p.shape[0]
  q = rows.shape[1] - n
  if q <= 0:
    raise ValueError(f"rows: {rows.shape[1]} items, expected more than p's {n}")
  old, new = rows[:, :n], rows[:, n:]
  b = np.asarray((old.T @ new).toarray())  # (n, q)
  c = (new.T @ new).toarray() + np.diag(gs._diagonal_vector(diag_new, q, np.float64))
  pb = np.asarray(p @ b, dtype=np.float64)  # (n, q)
  s_inv = np.linalg.inv(c - b.T @ pb)  # the Schur complement's inverse (q, q)
  pbs = pb @ s_inv
  out = np.empty((n + q, n + q), p.dtype)
  out[:n, :n] = p
  for i0 in range(0, n, gs._BLOCK):  # P + P b S^-1 b^T P, a row block at a time
    i1 = min(n, i0 + gs._BLOCK)
    out[i0:i1, :n] += (pbs[i0:i1] @ pb.T).astype(p.dtype)
  out[:n, n:] = -pbs
  out[n:, :n] = -pbs.T
  out[n:, n:] = s_inv
  return out


def ease_update(p: np.ndarray, old_rows, new_rows, l2: float, x_union,
                dtype=np.float32, progress: gs.Progress = None) -> tuple[np.ndarray, str]:
  """EASE's ``P`` after the rows change (and maybe new items join), equal to a refit on
  ``x_union`` (the sparse ``(m', n + q)`` training rows after the change).

  ``old_rows`` is sparse ``(k, n)``, ``new_rows`` ``(k, n + q)``. Exact updates
  (:func:`woodbury_update` over the old items, then :func:`grow_inverse` for the ``q``
  new ones) when their flops are under a refit's (:func:`gs.fit_inverse`, the cheaper form);
  else a refit. ``p`` may be overwritten. Returns ``(P', "update" or "refit")``.
  """
  gs._check_square(p, "p")
  x_union, new_rows = gs._check_csr(x_union, "x_union"), gs._check_csr(new_rows, "new_rows")
  n, width = p.shape[0], new_rows.shape[1]
  if x_union.shape[1] != width:
    raise ValueError(f"x_union: {x_union.shape[1]} items, new_rows {width}")
  q = width - n
  update = woodbury_flops(new_rows.shape[0], n) + 4.0 * q * width**2
  refit = min(gs.primal_flops(*x_union.shape), gs.dual_flops(*x_union.shape))
  if update >= refit:
    return gs.fit_inverse(x_union, l2, dtype, progress=progress), "refit"
  p = woodbury_update(p, old_rows, new_rows[:, :n], progress)
  if q > 0:
    with_new = np.flatnonzero(np.diff(new_rows[:, n:].tocsr().indptr) > 0)
    p = grow_inverse(p, new_rows[with_new], l2)
  return p, "update"
