"""jax_vaecf.models.gram_solvers against float64 NumPy references on small random data."""

import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.models import gram_solvers as gs
from jax_vaecf.models import gram_updates as gu

import _synthetic


def _data(n_users, n_items, seed):
  return sp.csr_matrix(_synthetic.low_rank_interactions(
      n_users=n_users, n_items=n_items, n_clusters=6, per_user=10, seed=seed))


def _p_ref(x, d):
  x = x.toarray().astype(np.float64)
  g = x.T @ x
  return np.linalg.inv(g + np.diag(np.broadcast_to(np.asarray(d, float), g.shape[:1])))


def _b_ref(p):
  b = -p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b


def _close(got, want, tol):
  err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
  assert err < tol, f"max relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(scope="module")
def tall():  # more users than items: the primal form
  return _data(300, 120, seed=4)


@pytest.fixture(scope="module")
def wide():  # fewer users than items: the dual form
  return _data(60, 200, seed=5)


def test_gram_into_equals_dense_product_in_small_blocks(tall, monkeypatch):
  monkeypatch.setattr(gs, "_GRAM_BLOCK_VALUES", 7 * tall.shape[1])  # 7 rows a block
  g = gs.gram_into(tall)
  dense = tall.toarray().astype(np.float64)
  assert g.dtype == np.float32
  np.testing.assert_array_equal(g, dense.T @ dense)  # integer sums: exact


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("method", ["blas3", "potri"])
def test_inverse_in_place_equals_numpy(tall, monkeypatch, dtype, tol, order, method):
  monkeypatch.setattr(gs, "_BLOCK", 16)  # several blocks when filling the triangle
  g = np.asarray(gs.gram_into(tall, dtype=dtype), order=order)
  d = np.linspace(5.0, 50.0, g.shape[0])  # a per-item diagonal, as EDLAE's
  p = gs.inverse_of_gram_plus_diagonal(g, d, method=method)
  assert np.shares_memory(p, g)  # one n x n matrix: written over the Gram matrix
  _close(p, _p_ref(tall, d), tol)
  np.testing.assert_array_equal(p, p.T)


def test_inverse_without_overwrite_keeps_the_gram_matrix(tall):
  g = gs.gram_into(tall)
  before = g.copy()
  p = gs.inverse_of_gram_plus_diagonal(g, 30.0, overwrite=False)
  np.testing.assert_array_equal(g, before)
  _close(p, _p_ref(tall, 30.0), 1e-4)


def test_inverse_refuses_a_matrix_that_is_not_positive_definite(tall):
  g = gs.gram_into(tall)
  g[0, 0] = -1e6
  with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
    gs.inverse_of_gram_plus_diagonal(g, 1.0)
  with pytest.raises(ValueError, match="entry 3 is 0"):
    gs.inverse_of_gram_plus_diagonal(gs.gram_into(tall), np.r_[1, 1, 1, 0, np.ones(116)])
  with pytest.raises(ValueError, match="scipy sparse"):
    gs.gram_into(tall.toarray())


def test_ease_b_from_p_and_back(tall):
  p = gs.fit_inverse(tall, 20.0, form="primal")
  diag_p = p.diagonal().copy()
  b = gs.ease_b_from_p(p)
  want = _b_ref(_p_ref(tall, 20.0))
  _close(b, want, 1e-4)
  assert np.all(np.diag(b) == 0)
  _close(gu.p_from_ease_b(b, diag_p), _p_ref(tall, 20.0), 1e-4)
  _close(gs.ease_fit(tall, 20.0), want, 1e-4)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
def test_dual_form_equals_numpy(wide, dtype, tol):
  d = 10.0 + 0.5 * gs.gram_diagonal(wide)  # EDLAE-like diagonal
  p = gs.dual_inverse(wide, d, dtype)
  assert p.dtype == dtype and p.flags.c_contiguous
  _close(p, _p_ref(wide, d), tol)
  _close(p, gs.fit_inverse(wide, d, dtype, form="primal"), tol)


def test_the_cheaper_form_is_chosen():
  assert gs.use_dual(1_127, 13_048)  # a listening-count split
  assert not gs.use_dual(116_677, 20_108)  # ML-20M
  assert gs.dual_flops(900, 1000) < gs.primal_flops(900, 1000)
  assert gs.dual_flops(3000, 1000) > gs.primal_flops(3000, 1000)


def test_gram_diagonal(tall):
  dense = tall.toarray().astype(np.float64)
  np.testing.assert_array_equal(gs.gram_diagonal(tall), (dense**2).sum(0))


def _ndcg_loop(scores, fold, held, k):
  out = []
  for u in range(scores.shape[0]):
    rel = set(np.flatnonzero(held[u]))
    if not rel:
      continue
    s = np.where(fold[u] > 0, -np.inf, scores[u])
    top = np.argsort(-s, kind="stable")[:k]
    dcg = sum(1 / np.log2(r + 2) for r, j in enumerate(top) if j in rel)
    out.append(dcg / sum(1 / np.log2(r + 2) for r in range(min(k, len(rel)))))
  return np.mean(out)


def test_ndcg_at_k_equals_a_plain_loop():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(20, 40))
  fold = (rng.random((20, 40)) < 0.2).astype(float)
  held = ((rng.random((20, 40)) < 0.15) & (fold == 0)).astype(float)
  held[3] = 0  # a user without held-out items is skipped
  got = gs.ndcg_at_k(scores, sp.csr_matrix(fold), sp.csr_matrix(held), k=10)
  assert got == pytest.approx(_ndcg_loop(scores, fold, held, 10), abs=1e-12)


@pytest.mark.parametrize("n", range(1, 13))
def test_golden_search_finds_every_peak(n):
  for peak in range(n):
    calls = []

    def value(i):
      calls.append(i)
      return -abs(i - peak)

    assert gs.golden_grid_search(value, n) == peak
    assert len(calls) <= max(1, int(np.ceil(np.log(n + 1) / np.log(1.618))) + 1)


GRID = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def _sweep_fixture(n_users, n_items, seed):
  x = _synthetic.low_rank_interactions(n_users=n_users + 300, n_items=n_items,
                                       n_clusters=6, per_user=10, seed=seed)
  fold, held = _synthetic.fold_in_split(x[n_users:], seed=seed)
  return sp.csr_matrix(x[:n_users]), sp.csr_matrix(fold), sp.csr_matrix(held)


@pytest.mark.parametrize("form,shape,seed,via_p", [("primal", (300, 120), 3, True),
                                                   ("primal", (300, 120), 3, False),
                                                   ("dual", (70, 150), 0, None)])
def test_sweep_chooses_the_exhaustive_grids_l2(form, shape, seed, via_p, monkeypatch):
  # Scored through P (as for many validation users) or through L^-1 (as for few).
  monkeypatch.setattr(gs, "_scores_through_p", lambda v, n: via_p)
  x, fold, held = _sweep_fixture(*shape, seed=seed)
  metric = lambda s: gs.ndcg_at_k(s, fold, held, k=20)
  fold64 = fold.toarray().astype(np.float64)
  exhaustive = [metric(fold64 @ _b_ref(_p_ref(x, l2))) for l2 in GRID]
  best = int(np.argmax(exhaustive))
  # The search assumes the metric rises then falls along the grid: true here.
  assert all(np.diff(exhaustive[:best + 1]) >= 0) and all(np.diff(exhaustive[best:]) <= 0)
  assert 0 < best < len(GRID) - 1  # an interior optimum, so the search has work to do
  messages = []
  sweep = gs.choose_l2(x, fold, metric, GRID, form=form, progress=messages.append)
  assert sweep.form == form and sweep.l2 == GRID[best]
  assert len(sweep.scored) < len(GRID)
  _close(sweep.p, _p_ref(x, GRID[best]), 1e-4)
  assert len(messages) >= len(sweep.scored)


@pytest.mark.parametrize("point", ["primal", "primal_via_p", "dual"])
def test_sweep_points_score_as_x_times_b(point):
  x, fold, _ = _sweep_fixture(70, 150, seed=0)
  d = 20.0 + 0.3 * gs.gram_diagonal(x)
  if point.startswith("primal"):
    got = gs._primal_point(x, fold, d.astype(np.float32), np.empty((150, 150), np.float32),
                           via_p=point == "primal_via_p")
  else:
    got = gs._dual_point(x, fold, d, np.float32)
  want = fold.toarray() @ _b_ref(_p_ref(x, d))
  unseen = fold.toarray() == 0  # the only items ranked
  _close(got[unseen], want[unseen], 1e-4)


def test_sweep_with_an_extra_diagonal_gives_edlaes_p():
  x, fold, held = _sweep_fixture(300, 120, seed=3)
  extra = 0.25 * gs.gram_diagonal(x)
  metric = lambda s: gs.ndcg_at_k(s, fold, held, k=20)
  edlae = gs.choose_l2(x, fold, metric, GRID[:4], extra_diag=extra)
  _close(edlae.p, _p_ref(x, edlae.l2 + extra), 1e-4)


def _changed(x, rng, n_changed, n_new_users, n_new_items=0):
  """(old rows, new rows, union) after changing some users' rows and adding users."""
  m, n = x.shape
  users = rng.choice(m, n_changed, replace=False)
  width = n + n_new_items
  union = sp.lil_matrix(sp.hstack([x, sp.csr_matrix((m, n_new_items))]))
  for u in users:  # each changed user gains two items and loses one
    have = np.flatnonzero(union[u].toarray())
    union[u, rng.choice(have)] = 0
    union[u, rng.choice(width, 2, replace=False)] = 1
  added = sp.csr_matrix((rng.random((n_new_users, width)) < 0.08).astype(np.float32))
  union = sp.vstack([union.tocsr(), added]).tocsr()
  union.eliminate_zeros()
  old = sp.vstack([x[users], sp.csr_matrix((n_new_users, n))]).tocsr()
  new = sp.vstack([union[users], added]).tocsr()
  return old, new, union


def test_woodbury_update_equals_a_refit(tall):
  rng = np.random.default_rng(0)
  old, new, union = _changed(tall, rng, n_changed=5, n_new_users=3)
  p = gs.fit_inverse(tall, 15.0, form="primal")
  got = gu.woodbury_update(p, old, new)
  assert np.shares_memory(got, p)
  _close(got, _p_ref(union, 15.0), 1e-4)
  _close(gs.ease_b_from_p(got), _b_ref(_p_ref(union, 15.0)), 1e-4)


def test_ease_update_with_new_items_equals_a_refit(tall):
  rng = np.random.default_rng(1)
  old, new, union = _changed(tall, rng, n_changed=6, n_new_users=4, n_new_items=5)
  p = gs.fit_inverse(tall, 15.0)
  got, how = gu.ease_update(p, old, new, 15.0, union)
  assert how == "update" and got.shape == (125, 125)
  _close(got, _p_ref(union, 15.0), 1e-4)
  _close(gs.ease_b_from_p(got), _b_ref(_p_ref(union, 15.0)), 1e-4)


def test_ease_update_refits_when_that_is_cheaper(tall):
  rng = np.random.default_rng(2)
  old, new, union = _changed(tall, rng, n_changed=100, n_new_users=0)
  got, how = gu.ease_update(gs.fit_inverse(tall, 15.0), old, new, 15.0, union)
  assert how == "refit"  # 200 rank-one terms on 120 items: refitting is cheaper
  _close(got, _p_ref(union, 15.0), 1e-4)


def test_device_solver_equals_numpy(tall):
  got = gs.fit_inverse(tall, 25.0, form="primal", solver="device")
  assert isinstance(got, np.ndarray) and got.shape == (120, 120)
  _close(got, _p_ref(tall, 25.0), 1e-3)
  with pytest.raises(ValueError, match="solver: expected"):
    gs.fit_inverse(tall, 25.0, solver="gpu")


@pytest.mark.parametrize("method,matrices", [("blas3", 2), ("potri", 1)])
def test_a_primal_fit_holds_at_most_its_stated_matrices(method, matrices):
  import tracemalloc
  x = _data(500, 400, seed=6)
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    p = gs.inverse_of_gram_plus_diagonal(gs.gram_into(x), 10.0, method=method)
    gs.ease_b_from_p(p)
    peak = tracemalloc.get_traced_memory()[1] - before
  finally:
    tracemalloc.stop()
  matrix = 4 * 400**2
  # The stated matrices, plus at most a quarter matrix of blocks (Gram rows, triangle).
  assert peak <= (matrices + 0.25) * matrix, f"peak {peak / matrix:.2f} matrices"


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_a_fitted_matrix_is_handed_to_jax_without_a_copy(tall, form):
  import jax
  p = gs.fit_inverse(tall, 25.0, form=form)
  assert p.ctypes.data % 64 == 0 and p.flags.c_contiguous
  b = gs.ease_b_from_p(p)
  want = b.copy()
  on_device = jax.device_put(b, jax.devices("cpu")[0])
  # The CPU client shares the memory of a 64-byte aligned array (NumPy's own 16-byte
  # alignment makes it copy): B is not a third matrix beside the Gram matrix and L^-1.
  assert on_device.unsafe_buffer_pointer() == b.ctypes.data
  del b, p
  np.testing.assert_array_equal(np.asarray(on_device), want)


@pytest.mark.parametrize("order", ["C", "F"])
def test_aligned_empty(order):
  for shape, dtype in (((7, 5), np.float32), ((3, 1, 9), np.float64)):
    a = gs.aligned_empty(shape, dtype, order)
    assert a.shape == shape and a.dtype == dtype and a.ctypes.data % 64 == 0
    assert a.flags.c_contiguous if order == "C" else a.flags.f_contiguous


def test_a_large_blas3_inverse_takes_potris_route(monkeypatch):
  x = _data(500, 400, seed=8)
  want = _p_ref(x, 15.0)
  monkeypatch.setattr(gs, "BLAS3_MAX_ROWS", 100)  # 400 rows: "large"
  tracemalloc = __import__("tracemalloc")
  g = gs.gram_into(x)
  tracemalloc.start()
  try:
    p = gs.inverse_of_gram_plus_diagonal(g, 15.0, method="blas3")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 0.5 * g.nbytes  # no second matrix (L^-1) was made
  _close(p, want, 1e-4)
