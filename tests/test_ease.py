"""EASE: the closed-form fit against a float64 NumPy EASE, the l2 sweep from one
eigendecomposition, and the whole run (checkpoint, test, Recommender, export) through the
same interface as the VAEs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import reporting
from jax_vaecf import data as data_lib
from jax_vaecf.models import ease
from jax_vaecf.models import gram_solvers
from jax_vaecf import model as model_lib
from jax_vaecf.serving import recommender as recommend

import _runs
import _synthetic
from test_export import _ISOLATED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def matrix():
  return sp.csr_matrix(_synthetic.low_rank_interactions(n_users=300, n_items=120, seed=4))


def _gram(x):
  batcher = data_lib.TrainBatcher(x, 64, seed=0)
  return ease.gram_matrix(batcher.epoch_batches(0), x.shape[1])


def _scores(x, b):
  """float64 scores of the rows ``x`` under ``b``, the users' own items at -inf."""
  dense = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
  s = dense.astype(np.float64) @ np.asarray(b, np.float64)
  return np.where(dense > 0, -np.inf, s)


def _top(scores, k):
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_gram_matrix_from_the_batches_is_exact(matrix):
  got = np.asarray(_gram(matrix))
  want = (matrix.T @ matrix).toarray()
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("l2", [5.0, 50.0, 500.0])
def test_fit_equals_float64_numpy_ease(matrix, l2):
  b = np.asarray(ease.fit(_gram(matrix), jnp.float32(l2)))
  want = ease.numpy_ease(matrix, l2)
  assert b.dtype == np.float32 and b.shape == (120, 120)
  np.testing.assert_array_equal(np.diag(b), 0.0)
  scale = np.abs(want).max()
  np.testing.assert_allclose(b, want, rtol=0, atol=2e-5 * scale)
  got_s, want_s = _scores(matrix, b), _scores(matrix, want)
  finite = np.isfinite(want_s)
  np.testing.assert_allclose(got_s[finite], want_s[finite], rtol=0,
                             atol=2e-5 * np.abs(want_s[finite]).max())
  np.testing.assert_array_equal(_top(got_s, 10), _top(want_s, 10))


def test_the_numpy_reference_is_the_papers_formula():
  # Worked by hand: X = [[1, 1], [1, 0]], G = [[2, 1], [1, 1]], l2 = 1:
  # G + I = [[3, 1], [1, 2]], P = [[2, -1], [-1, 3]] / 5, B_01 = -P_01 / P_11 = 1/3,
  # B_10 = -P_10 / P_00 = 1/2.
  b = ease.numpy_ease(np.array([[1, 1], [1, 0]]), 1.0)
  np.testing.assert_allclose(b, [[0.0, 1 / 3], [0.5, 0.0]], rtol=1e-12)


@pytest.mark.parametrize("l2", [10.0, 200.0])
def test_sweep_scores_equal_the_fitted_models_on_unseen_items(matrix, l2):
  s, v = ease.spectrum(_gram(matrix))
  b = np.asarray(ease.fit_from_spectrum(s, v, jnp.float32(l2)))
  want = ease.numpy_ease(matrix, l2)
  np.testing.assert_allclose(b, want, rtol=0, atol=2e-5 * np.abs(want).max())
  # The sweep's model: (x V) (diag(d) V^T / -diag(P)), through the module as evaluated.
  params = ease.sweep_params(s, v, jnp.float32(l2))
  spectral = ease.Spectral(120)
  rows = matrix[:40]
  logits = np.asarray(spectral.apply({"params": params}, jnp.asarray(rows.toarray()))
                      .logits)
  unseen = rows.toarray() == 0
  want_s = _scores(rows, want)
  np.testing.assert_allclose(logits[unseen], want_s[unseen], rtol=0,
                             atol=2e-5 * np.abs(want_s[unseen]).max())


def test_the_model_scores_dense_and_sparse_rows_as_x_times_b(matrix):
  model = model_lib.build_model("ease", 120)
  b = ease.fit(_gram(matrix), jnp.float32(50.0))
  params = ease.params_of(b, 50.0)
  rows = matrix[:16]
  dense = model.apply({"params": params}, jnp.asarray(rows.toarray())).logits
  batch = data_lib.make_batch(matrix, np.arange(16), 16, (4096,))
  sparse = model.apply({"params": params}, jax.tree_util.tree_map(jnp.asarray, batch)
                       ).logits
  want = rows.toarray() @ np.asarray(b)
  np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(sparse))


def test_l2_values_and_settings_are_checked():
  assert ease.l2_values(()) == ease.DEFAULT_L2_GRID
  assert ease.l2_values((500, 100.0, 500)) == (100.0, 500.0)
  for bad in ((0.0,), (-1.0,), (float("nan"),), (float("inf"),)):
    with pytest.raises(ValueError, match=r"^l2 must be in \[1, 1e\+06\]"):
      ease.l2_values(bad)
  base = configs.get_config("ml1m_ease")
  configs.validate(base)
  for changes, message in [
      (dict(l2=(-5.0,)), r"EASE: l2 must be in \[1, 1e\+06\]"),
      (dict(ema_decay=0.9), "no weights to average"),
      (dict(mesh="1x2"), "keeps its item-item matrix whole"),
      (dict(partitioned_data="parts"), "--partitioned_data does not apply"),
      (dict(hidden_dims=(16,)), "hidden_dims is a setting of --model=multvae or multdae "
                                "or recvae, not of ease"),
  ]:
    with pytest.raises(ValueError, match=message):
      configs.validate(base.replace(**changes))
  with pytest.raises(ValueError, match="l2 is a setting of --model=ease or edlae or "
                                      "sparse_ease, not of multvae"):
    configs.validate(configs.get_config("ml1m").replace(l2=(100.0,)))


def test_l2_is_a_list_of_numbers_in_json_and_flags():
  cfg = configs.from_json({"model": "ease", "l2": [100, 250.5]}, "best.json")
  assert cfg.l2 == (100.0, 250.5) and all(isinstance(v, float) for v in cfg.l2)
  with pytest.raises(ValueError, match=r"l2 = \['x'\], expected a list of float"):
    configs.from_json({"model": "ease", "l2": ["x"]}, "best.json")
  with pytest.raises(ValueError, match="test_ks = \\[5.5\\], expected a list of int"):
    configs.from_json({"test_ks": [5.5]}, "best.json")
  from absl import flags
  from experiments import cli
  fv = flags.FlagValues()
  cli.define_config_flags(fv)
  fv(["prog", "--config=ml1m_ease", "--l2=50,2.5e2"])
  assert cli.config_from_flags(fv).l2 == (50.0, 250.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = _runs.movielens_dir(tmp_path_factory, "ease")
  cfg = _runs.small_config(d, cache_dir=os.path.join(d, "cache"), model="ease",
                           hidden_dims=(), l2=(3.0, 30.0, 300.0), number_of_epochs=1)
  workdir = os.path.join(d, "run")
  results = loop.run(cfg, workdir)
  return cfg, workdir, results


def test_a_run_sweeps_l2_on_validation_and_keeps_the_best(run):
  cfg, workdir, results = run
  recs = _runs.records(workdir)
  sweep = [r for r in recs if r["split"] == "sweep"]
  # The golden-section search over the sorted grid, replayed on the recorded metrics,
  # scores the same values in the same order (30 first: the middle of three).
  grid, order = [3.0, 30.0, 300.0], []
  recorded = {r["swept"]["l2"]: r["val_ndcg@100"] for r in sweep}

  def value(i):
    order.append(grid[i])
    return recorded[grid[i]]

  chosen = grid[gram_solvers.golden_grid_search(value, len(grid))]
  assert [r["swept"] for r in sweep] == [{"l2": v} for v in order] and order[0] == 30.0
  best = max(sweep, key=lambda r: r["val_ndcg@100"])
  assert results["train"]["chosen"] == {"l2": [best["swept"]["l2"]]} == {"l2": [chosen]}
  (train,) = [r for r in recs if r["split"] == "train"]
  # The kept model (fitted again) scores as the sweep said.
  assert train["val_ndcg@100"] == pytest.approx(best["val_ndcg@100"], abs=1e-6)
  (test,) = [r for r in recs if r["split"] == "test"]
  assert test["epoch"] == 1 and 0.0 < test["ndcg@100"] <= 1.0


def test_the_run_serves_float64_eases_items_by_raw_id(run):
  cfg, workdir, results = run
  split = loop.load_data(cfg)
  rec = recommend.Recommender.from_workdir(workdir)
  (l2,) = results["train"]["chosen"]["l2"]
  assert rec.checkpoint_meta["chosen"] == {"l2": [l2]}
  assert float(rec.params["l2"]) == l2
  want_b = ease.numpy_ease(split.train, l2)
  fold_in = split.test.fold_in
  histories = [[str(split.item_ids[j]) for j in fold_in[u].indices] for u in range(20)]
  got = rec.recommend(histories, k=10)
  want = _top(_scores(fold_in[:20], want_b), 10)
  for u in range(20):
    assert [str(i) for i in got.items[u]] == [str(split.item_ids[j]) for j in want[u]]
    assert not set(map(str, got.items[u])) & set(histories[u])


def test_a_second_run_fits_nothing_again(run, capsys):
  cfg, workdir, _ = run
  before = _runs.records(workdir)
  loop.run(cfg.replace(test=False), workdir, report=reporting.print_record)
  assert "was fitted already" in capsys.readouterr().out
  assert _runs.records(workdir) == before


def test_the_exported_artefact_serves_the_same_items_without_the_project(run, tmp_path):
  _, workdir, _ = run
  out = str(tmp_path / "artefact")
  r = subprocess.run([sys.executable, "-m", "experiments.export", "--workdir", workdir,
                      "--out", out, "--k", "10"], cwd=REPO, capture_output=True, text=True,
                     timeout=180)
  assert r.returncode == 0, r.stderr[-2000:]
  rec = recommend.Recommender.from_workdir(workdir)
  ids = [str(i) for i in rec.item_ids.tolist()]
  rng = np.random.default_rng(1)
  histories = [[ids[j] for j in rng.choice(len(ids), rng.integers(0, 30), replace=False)]
               for _ in range(50)] + [["unknown-id"], []]
  (tmp_path / "h.json").write_text(json.dumps(histories))
  r = subprocess.run([sys.executable, "-c", _ISOLATED, REPO, out, str(tmp_path / "h.json"),
                      "10"], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout)
  want = rec.recommend(histories, k=10)
  for g, items in zip(got, want.items):
    assert g["items"] == [str(i) for i in items.tolist()]


def test_a_catalogue_too_big_for_the_device_is_refused_before_any_work(tmp_path,
                                                                       monkeypatch):
  d = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(d, cache_dir=str(tmp_path / "cache"), model="ease",
                           hidden_dims=(), l2=(30.0,), number_of_epochs=1)
  monkeypatch.setattr(ease, "device_memory_bytes", lambda device: 100_000)
  workdir = str(tmp_path / "run")
  with pytest.raises(MemoryError, match=r"EASE on 150 items needs about 0\.0 GiB .*2 "
                                        r"matrices of 150 x 150 float32.*has 0\.0 GiB"):
    loop.run(cfg, workdir)
  assert not os.path.exists(workdir)  # nothing written: the run claimed and released it


def test_several_l2_without_validation_data_is_refused(tmp_path):
  d = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(d, cache_dir=str(tmp_path / "cache"), model="ease",
                           hidden_dims=(), l2=(3.0, 30.0), number_of_epochs=1,
                           protocol="per_user", validation_fraction=0.0)
  with pytest.raises(ValueError, match="2 settings to choose from \\(l2\\) but the split "
                                       "has no validation data"):
    loop.run(cfg, str(tmp_path / "run"))
  # One value needs no validation: the fitted model is the one tested.
  results = loop.run(cfg.replace(l2=(30.0,)), str(tmp_path / "run1"))
  assert results["train"]["chosen"] == {"l2": [30.0]} and 0.0 < results["test"]["ndcg@100"] <= 1.0


def test_plot_draws_the_sweep_of_a_closed_form_run(run, tmp_path):
  pytest.importorskip("matplotlib")
  import _tools
  _, workdir, _ = run
  out = str(tmp_path / "sweep.png")
  r = _tools.run("experiments.plot", f"--workdir={workdir}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == out
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------- the host's solvers against jax's


def _problem(x, validation=None, batch_size=64, log=None):
  """A closed-form problem over the sparse rows ``x`` on the first CPU device; with
  ``validation`` rows (dense), a scorer of their NDCG@10 (as ``ndcg@100``) on a fifth of
  each one's items held out."""
  log = [] if log is None else log
  batcher = data_lib.TrainBatcher(sp.csr_matrix(x), batch_size, seed=0)
  score = None
  if validation is not None:
    fold_in, held = (sp.csr_matrix(a) for a in _synthetic.fold_in_split(validation))

    def score(model, params):
      logits = model.apply({"params": params}, jnp.asarray(fold_in.toarray())).logits
      ndcg = gram_solvers.ndcg_at_k(np.asarray(logits), fold_in, held, k=10)
      return {"ndcg@100": ndcg, "recall@20": 0.0, "recall@50": 0.0}
  return model_lib.ClosedFormProblem(
      lambda: batcher.epoch_batches(0), x.shape[1], x.shape[0], jax.devices()[0], score,
      log.append, progress=log.append)


def _factor_rows(n_users, n_validation, n_items=120, rank=4, seed=0, offset=3.0):
  """Training and validation rows drawn from one rank-``rank`` logistic model (about 20
  items a user at 120 items), whose validation NDCG rises then falls along a log grid
  of l2; a larger ``offset`` gives fewer items a user."""
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(n_items, rank))

  def rows(n):
    u = rng.normal(size=(n, rank))
    p = 1.0 / (1.0 + np.exp(-(3.0 * u @ v.T / np.sqrt(rank) - offset)))
    return (rng.random(p.shape) < p).astype(np.float32)
  return sp.csr_matrix(rows(n_users)), rows(n_validation)


@pytest.mark.parametrize("n_users,form", [(300, "primal"), (40, "dual")])
def test_the_host_fit_equals_the_jax_fit(matrix, n_users, form):
  x = matrix[:n_users]
  log = []
  host = ease.fit_on_host((50.0,), _problem(x, log=log))
  device = ease.fit_on_device((50.0,), _problem(x))
  assert log[0].startswith(f"{form} form for {n_users:,} users x 120 items")
  assert any("inverse of 120 x 120" in line for line in log)
  got, want = (np.asarray(f.params["output"]["kernel"]) for f in (host, device))
  assert got.dtype == np.float32 and got.shape == (120, 120)
  np.testing.assert_array_equal(np.diag(got), 0.0)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  np.testing.assert_allclose(got, ease.numpy_ease(x, 50.0), rtol=0,
                             atol=2e-5 * np.abs(want).max())
  assert host.chosen == device.chosen == {"l2": (50.0,)}
  assert float(host.params["l2"]) == 50.0


@pytest.mark.parametrize("n_users,form", [(300, "primal"), (80, "dual")])
def test_the_host_sweep_chooses_as_the_jax_sweep(n_users, form):
  x, validation = _factor_rows(n_users, 500)
  grid = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
  host_log, device_log = [], []
  host = ease.fit_on_host(grid, _problem(x, validation, log=host_log))
  device = ease.fit_on_device(grid, _problem(x, validation, log=device_log))
  assert host_log[0].startswith(f"{form} form")
  host_swept = {r["swept"]["l2"]: r["val_ndcg@100"] for r in host_log
                if isinstance(r, dict)}
  device_swept = {r["swept"]["l2"]: r["val_ndcg@100"] for r in device_log}
  assert sorted(device_swept) == list(grid)  # the jax path scores every value
  assert 3 <= len(host_swept) <= 6  # golden section: fewer
  for l2, ndcg in host_swept.items():  # the same scores, up to float32 rounding
    assert ndcg == pytest.approx(device_swept[l2], abs=1e-4)
  # The validation curve rises then falls, so the search finds the exhaustive grid's best.
  curve = np.array([device_swept[l2] for l2 in grid])
  peak = int(np.argmax(curve))
  assert np.all(np.diff(curve[:peak + 1]) > 0) and np.all(np.diff(curve[peak:]) < 0)
  assert host.chosen == device.chosen == {"l2": (grid[peak],)}
  assert grid[peak] in host_swept
  want = ease.numpy_ease(x, grid[peak])
  np.testing.assert_allclose(np.asarray(host.params["output"]["kernel"]), want, rtol=0,
                             atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("free_gib", [None, 1e-6])
def test_a_dual_sweep_keeps_the_best_b_when_the_memory_allows(monkeypatch, free_gib):
  x, validation = _factor_rows(80, 500)
  grid = (10.0, 100.0, 1000.0, 10000.0)
  if free_gib is not None:  # too little memory for a second B: the best is fitted again
    monkeypatch.setattr(ease, "host_memory_bytes", lambda: int(free_gib * 2**30))
  log = []
  host = ease.fit_on_host(grid, _problem(x, validation, log=log))
  scored = [r for r in log if isinstance(r, dict)]
  fits = sum(1 for line in log if isinstance(line, str) and "inverse of 120 x 120" in line)
  kept = free_gib is None
  assert any(isinstance(line, str) and line.startswith(
      "the best B so far is " + ("kept beside each fit" if kept else "not kept"))
      for line in log)
  assert fits == len(scored) + (0 if kept else 1)
  assert host.summary.endswith(f"({fits} dual fits on the host)")
  want = ease.numpy_ease(x, host.chosen["l2"][0])
  np.testing.assert_allclose(np.asarray(host.params["output"]["kernel"]), want, rtol=0,
                             atol=2e-5 * np.abs(want).max())


def test_keeping_the_best_b_counts_one_matrix_beside_a_dual_fit(monkeypatch):
  m, n = 30_000, 38_000
  need = (ease.dual_bytes_at_peak(m, n) + 3 * 4 * n * n) * 1.1
  assert ease.dual_bytes_at_peak(m, n) == 4 * (n * m + n * n)
  assert ease.keeps_best_b("primal", (m, n))  # a one-matrix fit beside it
  for have, keep in ((need, True), (need - 1, False), (None, False)):
    monkeypatch.setattr(ease, "host_memory_bytes", lambda have=have: have)
    assert ease.keeps_best_b("dual", (m, n)) is keep


def test_training_rows_are_the_batches_rows_without_empty_ones(matrix):
  x = matrix.tolil()
  x[7] = 0  # a user without items adds nothing to the Gram matrix
  x = x.tocsr()
  for shards in (None, 4):
    batcher = data_lib.TrainBatcher(x, 64, seed=3, num_shards=shards)
    got = ease.training_rows(batcher.epoch_batches(0), 120)
    assert got.shape == (299, 120) and got.dtype == np.float32
    np.testing.assert_array_equal((got.T @ got).toarray(), (x.T @ x).toarray())
    assert sorted(map(tuple, got.toarray().tolist())) == sorted(
        tuple(r) for r in x.toarray().tolist() if any(r))


@pytest.mark.parametrize("grid", [(100.0,), (10.0, 100.0, 1000.0, 10000.0)])
def test_a_fit_on_the_host_holds_one_matrix_and_a_sweep_two(grid):
  import tracemalloc
  x, validation = _factor_rows(1800, 40, n_items=1500, rank=8, offset=7.0)
  assert 10 < x.nnz / 1800 < 40  # items a user: sparse rows, as real data
  problem = _problem(x, validation, batch_size=600)
  matrix_bytes = 4 * 1500**2
  tracemalloc.start()
  try:
    ease.fit_on_host((100.0,), problem)  # warm-up: jax's compilations
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fitted = ease.fit_on_host(grid, problem)
    peak = tracemalloc.get_traced_memory()[1] - before
  finally:
    tracemalloc.stop()
  assert ease.HOST_MATRICES_AT_PEAK == 2
  # B shares its memory with jax (tracemalloc still counts it): one matrix (factored
  # and inverted in place by potri), in a sweep the kept B beside it; plus the Gram
  # blocks (an eighth of the rows at a time: up to a quarter matrix at this size, at
  # most 2^24 values for a large catalogue) and the validation users' scores.
  low, high = (0.9, 1.4) if len(grid) == 1 else (1.9, 2.4)
  assert low * matrix_bytes < peak <= high * matrix_bytes, peak / matrix_bytes
  assert fitted.params["output"]["kernel"].shape == (1500, 1500)


def test_a_matrix_singular_in_float32_names_the_setting():
  x = sp.csr_matrix(np.ones((20_000, 2), np.float32))  # two items with the same users
  with pytest.raises(np.linalg.LinAlgError, match="the fit with l2 1e-06 failed in "
                                                  "float32 .*give a larger l2"):
    ease.host_b(x, 1e-6, "primal", "l2 1e-06")


def test_the_memory_check_counts_two_matrices_on_a_cpu_and_five_elsewhere():
  class Device:
    def __init__(self, platform):
      self.platform = platform
  assert ease.device_bytes_needed(1000, Device("cpu")) == 2 * 4 * 1000**2
  assert ease.device_bytes_needed(1000, Device("gpu")) == 5 * 4 * 1000**2


def test_sparse_rows_are_scored_by_gathers_when_items_far_outnumber_entries():
  # 400 items, 3 items a row: 133 items per stored entry, above GATHER_ITEMS_PER_ENTRY.
  rng = np.random.default_rng(5)
  n, users = 400, 24
  rows = np.repeat(np.arange(users), 3)
  cols = np.concatenate([rng.choice(n, 3, replace=False) for _ in range(users)])
  x = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(users, n))
  batch = jax.tree_util.tree_map(
      jnp.asarray, data_lib.make_batch(x, np.arange(users), users, (rows.size,)))
  assert ease.gathers_cheaper(batch, n)
  assert not ease.gathers_cheaper(batch, ease.GATHER_ITEMS_PER_ENTRY * 3)
  assert not ease.gathers_cheaper(jnp.zeros((users, n)), n)  # dense rows stay dense
  # An exported program's batch has symbolic sizes: the dense product, whatever they are.
  from jax_vaecf.core import sparse as sparse_lib  # pylint: disable=g-import-not-at-top
  b, = jax.export.symbolic_shape("b")
  spec = lambda size, dtype: jax.ShapeDtypeStruct((size,), dtype)
  symbolic = sparse_lib.SparseBatch(spec(3 * b, jnp.int32), spec(3 * b, jnp.int32),
                                    spec(3 * b, jnp.float32), spec(b, jnp.float32))
  assert not ease.gathers_cheaper(symbolic, n)
  model = model_lib.build_model("ease", n)
  b = rng.standard_normal((n, n)).astype(np.float32)
  np.fill_diagonal(b, 0)
  params = ease.params_of(jnp.asarray(b), 10.0)
  got = model.apply({"params": params}, batch).logits
  np.testing.assert_allclose(np.asarray(got), x.toarray() @ b, rtol=1e-5, atol=1e-5)
  dense = model.apply({"params": params}, jnp.asarray(x.toarray())).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-5, atol=1e-5)
