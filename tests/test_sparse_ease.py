"""Sparse EASE against an independent float64 NumPy EASE on small fixtures."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.models import sparse_ease


def _dense_ease(x: sp.spmatrix, l2: float) -> np.ndarray:
  """Steck's closed form in float64 with numpy.linalg.inv (independent of the module)."""
  xd = x.toarray().astype(np.float64)
  p = np.linalg.inv(xd.T @ xd + l2 * np.eye(xd.shape[1]))
  b = -p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b


def _clustered(n_users=400, n_items=120, n_groups=6, seed=0) -> sp.csr_matrix:
  """Binary users x items with item groups: each user mostly picks from one group, so
  EASE has real neighbours to find (uniform noise would have none)."""
  rng = np.random.default_rng(seed)
  group_of_item = np.arange(n_items) % n_groups
  rows = []
  for u in range(n_users):
    g = u % n_groups
    p = np.where(group_of_item == g, 0.25, 0.02)
    rows.append((rng.random(n_items) < p).astype(np.float32))
  return sp.csr_matrix(np.array(rows))


@pytest.mark.parametrize("ordering", ["colamd", "mmd"])
def test_full_density_equals_dense_ease(ordering):
  x = _clustered()
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=20.0, target_density=1.0,
                                              ordering=ordering))
  ref = _dense_ease(x, 20.0)
  assert f.rows.shape == f.encode.shape == f.decode.shape == (120, 120)
  assert f.rows.dtype == np.int32 and f.encode.dtype == f.decode.dtype == np.float32
  # float32 storage of the factors' float64 values: rounding is about 1e-7 relative.
  np.testing.assert_allclose(f.dense_b(), ref, rtol=0, atol=1e-6)


def test_full_density_equals_dense_ease_with_counts_and_a_cold_item():
  rng = np.random.default_rng(1)
  x = sp.random(60, 30, density=0.2, random_state=3, format="lil")
  x[:, 7] = 0  # an item nobody has: its column of B is all zero in EASE too
  x = sp.csr_matrix(x)
  x.data = rng.integers(1, 5, x.nnz).astype(np.float32)
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=3.0, target_density=1.0))
  np.testing.assert_allclose(f.dense_b(), _dense_ease(x, 3.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [0.05, 0.2])
def test_pruned_factors_have_the_stated_entries_and_b_no_diagonal(density):
  x = _clustered()
  n = x.shape[1]
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=20.0, target_density=density))
  k = sparse_ease.per_column(density, 1.0, n)
  assert k == round(density * n)
  assert f.rows.shape == f.encode.shape == f.decode.shape == (k, n)
  m, w = f.matrices()
  # Each column of M keeps at most k entries; K ~ L^-1 is triangular, so the column at
  # the factor's position p holds at most n - p: up to k columns may hold fewer. W has
  # the same pattern; B = I + M^T W has a zero diagonal up to float32 rounding.
  counts = np.diff(m.indptr)
  assert counts.max() == k and counts.min() >= 1 and np.sum(counts < k) <= k
  np.testing.assert_array_equal(m.indices, w.indices)
  np.testing.assert_allclose(np.diag(f.dense_b()), 0.0, atol=1e-6)
  assert np.isfinite(f.encode).all() and np.isfinite(f.decode).all()


def test_pruned_top10_mostly_agrees_with_dense_ease():
  # At 20% density each factor keeps 24 entries per column out of 120; in this data a
  # user's unseen items score mainly from the ~20 items of the user's own group, so the
  # ranking mostly survives: 84% of each top-10 is dense EASE's on average here (5%
  # density: 69%; 1%, one entry per column, the factor's diagonal alone: 10%, as random
  # rankings, about 9%). We require 75%, the margin for rounding differences between
  # SciPy builds.
  x = _clustered()
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=20.0, target_density=0.2))
  ref = _dense_ease(x, 20.0)
  rows = x[:100]
  seen = rows.toarray() > 0
  ours = np.where(seen, -np.inf, sparse_ease.score(f, rows))
  theirs = np.where(seen, -np.inf, rows.toarray() @ ref)
  top_ours = np.argsort(-ours, axis=1)[:, :10]
  top_ref = np.argsort(-theirs, axis=1)[:, :10]
  overlap = np.mean([len(set(a) & set(r)) / 10 for a, r in zip(top_ours, top_ref)])
  assert overlap >= 0.75, overlap


def test_thresholded_gram_stays_positive_definite():
  # Plain thresholding of this Gram matrix leaves a negative eigenvalue below -l2 (checked
  # below), which is how ML-1M's incomplete factorisation met non-positive pivots.
  x = _clustered(n_users=300, n_items=60, n_groups=3)
  xc = sp.csc_matrix(x, dtype=np.float64)
  g = (xc.T @ xc).toarray()
  a = sparse_ease.gram_plus_ridge(xc, 1.0, keep=5 * 60, block_size=16).toarray()
  np.testing.assert_array_equal(a, a.T)
  kept = (a != 0) & ~np.eye(60, dtype=bool)
  assert 0 < kept.sum() < 0.3 * 60 * 59
  np.testing.assert_array_equal(a[kept], g[kept])
  plain = np.where(kept | np.eye(60, dtype=bool), g, 0.0) + np.eye(60)
  assert np.linalg.eigvalsh(plain).min() < 0
  assert np.linalg.eigvalsh(a).min() >= 1.0 - 1e-9


def test_score_is_x_times_b():
  x = _clustered(n_users=50, n_items=40)
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=5.0, target_density=0.3))
  scores = sparse_ease.score(f, x[:7])
  assert scores.dtype == np.float32 and scores.shape == (7, 40)
  np.testing.assert_allclose(scores, x[:7].toarray() @ f.dense_b(), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"rows must be \(batch, 40\)"):
    sparse_ease.score(f, x[:7, :39])


def test_keep_top_per_column_matches_a_sort():
  rng = np.random.default_rng(2)
  m = sp.random(30, 20, density=0.5, random_state=4, format="csc")
  m.data = rng.normal(size=m.nnz)
  out = sparse_ease.keep_top_per_column(m, 3, keep_diagonal=True).toarray()
  dense = m.toarray()
  for j in range(20):
    col = dense[:, j].copy()
    want = set()
    if col[j] != 0:
      want.add(j)
      col[j] = 0
    order = [i for i in np.argsort(-np.abs(col), kind="stable") if col[i] != 0]
    want |= set(order[:3 - len(want)])
    assert set(np.flatnonzero(out[:, j])) == want, j
    np.testing.assert_array_equal(out[list(want), j], dense[list(want), j])


@pytest.mark.parametrize("keep_diagonal", [False, True])
def test_keep_top_per_column_breaks_ties_by_the_lower_row_as_a_full_sort(keep_diagonal):
  # Small integer values tie often (co-occurrence counts do); a tiny chunk forces several
  # groups of columns in the partition.
  rng = np.random.default_rng(3)
  m = sp.random(300, 90, density=0.4, random_state=6, format="csc")
  m.data = rng.integers(-4, 5, m.nnz).astype(np.float64)
  m.eliminate_zeros()
  m.sort_indices()
  counts = np.diff(m.indptr)
  col = np.repeat(np.arange(90), counts)
  mag = np.abs(m.data)
  if keep_diagonal:
    mag = np.where(m.indices == col + 7, np.inf, mag)
  order = np.lexsort((-mag, col))
  rank = np.arange(order.size) - m.indptr[col[order]]
  want = np.sort(order[rank < 11])
  got = sparse_ease.keep_top_per_column(m, 11, keep_diagonal=keep_diagonal,
                                        diagonal_offset=7)
  np.testing.assert_array_equal(np.diff(got.indptr), np.minimum(counts, 11))
  np.testing.assert_array_equal(got.indices, m.indices[want])
  np.testing.assert_array_equal(got.data, m.data[want])
  long = np.flatnonzero(counts > 11)
  np.testing.assert_array_equal(
      sparse_ease._kth_largest(mag, m.indptr, long, 11, chunk=500),
      [np.sort(mag[m.indptr[j]:m.indptr[j + 1]])[-11] for j in long])


def test_kth_largest_over_columns_of_very_unequal_lengths():
  # A few long columns among short ones (popular items), in shuffled order: grouped by
  # length, each column's k-th largest is still its own, in the caller's order.
  rng = np.random.default_rng(5)
  lengths = rng.permutation(np.concatenate([np.full(60, 12), [40, 150, 299, 300]]))
  indptr = np.concatenate([[0], np.cumsum(lengths)])
  mag = rng.random(indptr[-1])
  cols = np.flatnonzero(lengths > 11)
  for chunk in (1, 300, 500, 1 << 24):
    np.testing.assert_array_equal(
        sparse_ease._kth_largest(mag, indptr, cols, 11, chunk=chunk),
        [np.sort(mag[indptr[j]:indptr[j + 1]])[-11] for j in cols])


@pytest.mark.parametrize("l2, density, match", [
    (-1.0, 0.1, "l2 must be a finite number above 0"),
    (0.0, 0.1, "l2 must be a finite number above 0"),
    (math.nan, 0.1, "l2 must be a finite number above 0"),
    (math.inf, 0.1, "l2 must be a finite number above 0"),
    (10.0, 0.0, r"target_density must lie in \(0, 1\]"),
    (10.0, 1.5, r"target_density must lie in \(0, 1\]"),
    (10.0, math.nan, r"target_density must lie in \(0, 1\]"),
    ("ten", 0.1, "l2 must be a finite number above 0"),
])
def test_bad_settings_are_refused(l2, density, match):
  x = _clustered(n_users=20, n_items=12)
  with pytest.raises(ValueError, match=match):
    sparse_ease.fit(x, sparse_ease.Settings(l2=l2, target_density=density))


def test_numpy_scalar_settings_are_accepted():
  x = _clustered(n_users=40, n_items=20)
  a = sparse_ease.fit(x, sparse_ease.Settings(l2=np.float32(5.0), target_density=np.float64(0.5)))
  b = sparse_ease.fit(x, sparse_ease.Settings(l2=5.0, target_density=0.5))
  for got, want in zip(a, b):
    np.testing.assert_array_equal(got, want)


def test_bad_matrices_are_refused():
  settings = sparse_ease.Settings(l2=10.0, target_density=0.5)
  with pytest.raises(ValueError, match="x is empty"):
    sparse_ease.fit(sp.csr_matrix((5, 8), dtype=np.float32), settings)
  with pytest.raises(ValueError, match="x is empty"):
    sparse_ease.fit(sp.csr_matrix((0, 8), dtype=np.float32), settings)
  with pytest.raises(ValueError, match="scipy sparse"):
    sparse_ease.fit(np.ones((4, 4), np.float32), settings)
  bad = sp.csr_matrix(np.eye(4, dtype=np.float32))
  bad.data[1] = np.nan
  with pytest.raises(ValueError, match="NaN or infinite"):
    sparse_ease.fit(bad, settings)


# ------------------------------------------------------ the model through the registry


def test_the_model_scores_dense_and_sparse_rows_as_x_times_b():
  import jax.numpy as jnp
  from jax_vaecf import model as model_lib
  from jax_vaecf.core import sparse as sparse_lib
  x = _clustered(n_users=60, n_items=40)
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=5.0, target_density=0.25))
  model = model_lib.build_model("sparse_ease", 40, target_density=0.25)
  assert model.per_column == 10 and model.closed_form
  params = sparse_ease.params_of(f, 5.0)
  assert params["output"]["rows"].shape == (10, 40) and params["output"]["rows"].dtype == np.int32
  rows = x[:9].toarray()
  want = rows.astype(np.float64) @ f.dense_b()
  dense = np.asarray(model.apply({"params": params}, rows).logits)
  sparse = np.asarray(model.apply({"params": params}, sparse_lib.from_dense(rows)).logits)
  h = model.apply({"params": params}, rows, method="features").logits
  assert h.shape == (9, 80)
  outside = np.asarray(model.output_logits(params, h))
  for got in (dense, sparse, outside):
    assert got.dtype == np.float32 and got.shape == (9, 40)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_to_columns_keeps_every_entry_and_refuses_a_column_past_its_density():
  b = sp.random(12, 12, density=0.3, random_state=5, format="csc", dtype=np.float32)
  k = int(np.diff(b.indptr).max())
  rows, vals = sparse_ease.to_columns(b, k + 2)
  assert rows.shape == vals.shape == (k + 2, 12)
  back = sp.csc_matrix((vals.ravel(), (rows.ravel(), np.tile(np.arange(12), k + 2))),
                       shape=(12, 12))
  np.testing.assert_array_equal(back.toarray(), b.toarray())
  with pytest.raises(ValueError, match=f"holds {k} entries, more than the {k - 1}"):
    sparse_ease.to_columns(b, k - 1)


@pytest.mark.parametrize("values, match", [
    ({"target_density": 0.0}, r"target_density must lie in \(0, 1\]"),
    ({"target_density": 1.5}, r"target_density must lie in \(0, 1\]"),
    ({"l2": []}, "needs at least one l2"),
    ({"l2": [0.5]}, r"l2 must be in \[1, 1e\+06\]"),
    ({"gram_ratio": 0.5}, "gram_ratio must be a finite number >= 1"),
    ({"drop_tol": -1.0}, "drop_tol must be >= 0"),
    ({"inverse_steps": 0}, "inverse_steps and block_size must be >= 1"),
    ({"target_density": "0.1"}, "target_density = '0.1', expected float"),
    ({"ordering": "amd"}, r"ordering must be one of \['colamd', 'mmd'\], got 'amd'"),
])
def test_bad_model_settings_are_refused_by_name(values, match):
  from jax_vaecf import model as model_lib
  with pytest.raises(ValueError, match=match):
    model_lib.make_settings("sparse_ease", values, source="flags")


def test_target_density_shapes_the_parameters_and_l2_does_not():
  from jax_vaecf import model as model_lib
  from jax_vaecf.training import configs
  assert model_lib.model_entry("sparse_ease").shape == ("target_density",)
  cfg = configs.get_config("ml1m_sparse_ease")
  assert cfg.model == "sparse_ease" and cfg.l2 == (500.0,)
  assert configs.get_config("ml1m_ease").replace(model="sparse_ease").l2 == (500.0,)


def test_a_fit_that_cannot_fit_the_host_is_refused_before_any_work(monkeypatch):
  from jax_vaecf.models import ease
  monkeypatch.setattr(ease, "host_memory_bytes", lambda: 10_000_000)
  settings = sparse_ease.Settings(l2=10.0, target_density=0.01)
  need = sparse_ease.fit_bytes_floor(5_000, settings)
  # k = 50 per column: Gram 200, K twice 100 each (12 bytes an entry), the factors'
  # three (50, 5000) arrays on the host and on the device (24 bytes a column entry).
  assert need == 12 * 5_000 * (200 + 200) + 24 * 5_000 * 50
  with pytest.raises(MemoryError, match=r"5,000 items at target_density 0\.01 needs at "
                                        r"least 0\.0 GiB"):
    sparse_ease.check_host_memory(5_000, settings)
  sparse_ease.check_host_memory(100, settings)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  import os
  import _runs
  from jax_vaecf.training import engine as loop
  d = _runs.movielens_dir(tmp_path_factory, "sparse_ease")
  cfg = _runs.small_config(d, cache_dir=os.path.join(d, "cache"), model="sparse_ease",
                           hidden_dims=(), l2=(3.0, 30.0, 300.0), target_density=0.2,
                           number_of_epochs=1)
  workdir = os.path.join(d, "run")
  return cfg, workdir, loop.run(cfg, workdir)


def test_a_run_scores_every_l2_on_validation_and_tests_the_best(run):
  import _runs
  cfg, workdir, results = run
  recs = _runs.records(workdir)
  sweep = [r for r in recs if r["split"] == "sweep"]
  assert [r["swept"] for r in sweep] == [{"l2": 3.0}, {"l2": 30.0}, {"l2": 300.0}]
  best = max(sweep, key=lambda r: r["val_ndcg@100"])
  assert results["train"]["chosen"]["l2"] == [best["swept"]["l2"]]
  assert results["train"]["chosen"]["target_density"] == 0.2
  (train,) = [r for r in recs if r["split"] == "train"]
  assert train["val_ndcg@100"] == pytest.approx(best["val_ndcg@100"], abs=1e-6)
  (test,) = [r for r in recs if r["split"] == "test"]
  assert 0.0 < test["ndcg@100"] <= 1.0


def test_the_run_serves_the_sparse_fit_of_its_training_rows(run):
  from jax_vaecf.serving import recommender as recommend
  from jax_vaecf.training import engine as loop
  cfg, workdir, results = run
  split = loop.load_data(cfg)
  rec = recommend.Recommender.from_workdir(workdir)
  (l2,) = results["train"]["chosen"]["l2"]
  n = split.n_items
  assert float(rec.params["l2"]) == l2
  assert rec.params["output"]["decode"].shape == (round(0.2 * n), n)
  f = sparse_ease.fit(split.train, sparse_ease.Settings(l2=l2, target_density=0.2))
  fold_in = split.test.fold_in[:20]
  scores = np.where(fold_in.toarray() > 0, -np.inf,
                    fold_in.toarray().astype(np.float64) @ f.dense_b())
  histories = [[str(split.item_ids[j]) for j in fold_in[u].indices] for u in range(20)]
  got = rec.recommend(histories, k=10)
  for u in range(20):
    want = np.argsort(-scores[u], kind="stable")[:10]
    np.testing.assert_allclose(np.sort(got.scores[u])[::-1], scores[u][want], rtol=1e-5,
                               atol=1e-6)
    assert not set(map(str, got.items[u])) & set(histories[u])


def test_a_second_run_fits_nothing_again(run, capsys):
  import _runs
  from jax_vaecf.training import engine as loop
  from jax_vaecf.training import reporting
  cfg, workdir, _ = run
  before = _runs.records(workdir)
  loop.run(cfg.replace(test=False), workdir, report=reporting.print_record)
  assert "was fitted already" in capsys.readouterr().out
  assert _runs.records(workdir) == before


def test_another_density_in_the_run_folder_is_refused(run):
  import _runs
  from jax_vaecf.training import engine as loop
  cfg, workdir, _ = run
  before = _runs.records(workdir)
  with pytest.raises(ValueError, match="target_density"):
    loop.run(cfg.replace(target_density=0.1), workdir)
  assert _runs.records(workdir) == before


def test_the_exported_artefact_holds_b_sparse_and_serves_the_same_items(run, tmp_path):
  import json
  from jax_vaecf.serving import artefact
  from jax_vaecf.serving import export
  from jax_vaecf.serving import recommender as recommend
  _, workdir, _ = run
  out = str(tmp_path / "artefact")
  export.export_run(workdir, out, k=10)
  rec = recommend.Recommender.from_workdir(workdir)
  n = len(rec.item_ids)
  with open(f"{out}/manifest.json") as f:
    shapes = json.load(f)["param_shapes"]
  k = round(0.2 * n)
  assert shapes["output/rows"] == [[k, n], "int32"]
  assert shapes["output/encode"] == shapes["output/decode"] == [[k, n], "float32"]
  ids = [str(i) for i in rec.item_ids.tolist()]
  rng = np.random.default_rng(1)
  histories = [[ids[j] for j in rng.choice(n, rng.integers(0, 30), replace=False)]
               for _ in range(30)] + [["unknown-id"], []]
  got = artefact.load(out).recommend(histories, k=10)
  want = rec.recommend(histories, k=10)
  for g, items in zip(got, want.items):
    assert [str(i) for i in g["items"]] == [str(i) for i in items.tolist()]


def test_the_python_api_fits_recommends_and_reloads(tmp_path):
  import jax_vaecf
  x = _clustered(n_users=200, n_items=120)
  model = jax_vaecf.fit(x, "ml-latest-small", workdir=str(tmp_path / "run"),
                        model="sparse_ease", l2=(20.0,), target_density=0.1,
                        batch_size_validation=64, test_ks=(5, 10))
  assert model.results["train"]["chosen"]["l2"] == [20.0]
  got = model.recommend(items=[[0, 6, 12], [1]], k=5)
  assert not {0, 6, 12} & set(np.asarray(got.items[0]).tolist())
  loaded = jax_vaecf.load(str(tmp_path / "run"))
  again = loaded.recommend(items=[[0, 6, 12], [1]], k=5)
  assert [list(a) for a in again.items] == [list(b) for b in got.items]


def test_the_train_tool_takes_the_model_by_name(tmp_path):
  import _runs
  import _tools
  d = _runs.movielens_dir_plain(tmp_path)
  r = _tools.run("experiments.train", "--config=ml-latest-small", f"--data_dir={d}",
                 f"--cache_dir={tmp_path / 'cache'}", f"--workdir={tmp_path / 'run'}",
                 "--model=sparse_ease", "--l2=30", "--target_density=0.1",
                 "--batch_size_validation=64", "--test_ks=5,10")
  assert r.returncode == 0, r.stderr[-2000:]
  # 150 items, 15 entries per column of each factor.
  assert "fitting sparse_ease: l2 30: factors of 15 x 150 in" in r.stderr
  assert "test (" in r.stdout


def test_the_tuner_searches_l2_and_a_refit_keeps_the_chosen_settings(run):
  from jax_vaecf.training import configs
  from jax_vaecf.training import engine as loop
  from jax_vaecf.tuning import search as tune
  base = configs.get_config("ml1m_sparse_ease")
  space = tune.make_space(base, n_train_users=lambda: 100)
  assert {p.name for p in space.params} == {"l2"}
  assert space.base_values == {"l2": 500.0}
  trial = space.trial_config(base, {"l2": 80.0})
  assert trial.l2 == (80.0,) and trial.target_density == base.target_density
  cfg, _, results = run
  refit = loop.refit_config(cfg, results["train"])
  assert refit.l2 == tuple(results["train"]["chosen"]["l2"]) and refit.target_density == 0.2


def test_a_failed_factorisation_is_retried_with_a_raised_diagonal(monkeypatch):
  real, seen = sparse_ease.ldl_factor, []

  def fails_twice(a, drop_tol, fill_factor, ordering):
    seen.append(a.diagonal().copy())
    if len(seen) <= 2:
      raise sparse_ease.NotPositiveDefinite("test")
    return real(a, drop_tol, fill_factor, ordering)

  monkeypatch.setattr(sparse_ease, "ldl_factor", fails_twice)
  x = _clustered(n_users=80, n_items=30)
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=5.0, target_density=0.3))
  # Tried as is, then + 0.1% and + 0.2% of the diagonal; the last one factored.
  assert f.shift == 2e-3 and len(seen) == 3
  np.testing.assert_allclose(seen[1], seen[0] * 1.001)
  np.testing.assert_allclose(seen[2], seen[0] * 1.002)
  monkeypatch.setattr(sparse_ease, "ldl_factor", lambda *a: (_ for _ in ()).throw(
      sparse_ease.NotPositiveDefinite("never")))
  with pytest.raises(ValueError, match="never"):
    sparse_ease.fit(x, sparse_ease.Settings(l2=5.0, target_density=0.3))
  # The exact fit (density 1) is never shifted: it fails instead.
  with pytest.raises(ValueError, match="never"):
    sparse_ease.fit(x, sparse_ease.Settings(l2=5.0, target_density=1.0))
