"""EDLAE: the closed-form fit against an independent float64 NumPy solution (each column
a ridge regression on the other items, no inverse of the full matrix), its settings,
and a whole run through the tools: the (p, l2) sweep on validation, resume, the
recommender and the tuner's space, with nothing but its file and registry line."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.models import ease
from jax_vaecf.models import edlae
from jax_vaecf.models import gram_solvers
from jax_vaecf.training import engine as loop
from jax_vaecf.training import reporting
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.tuning import search as tune

import _runs
import _synthetic


@pytest.fixture(scope="module")
def matrix():
  return sp.csr_matrix(_synthetic.low_rank_interactions(n_users=300, n_items=60, seed=5))


def _by_columns(x, dropout_p, l2):
  """float64 EDLAE from its objective, one column at a time: with the dropout's penalty
  ``Lambda = p/(1-p) diag(G) + l2``, column ``j`` minimises ``||X_j - X_{-j} b||^2 +
  sum_i Lambda_i b_i^2`` over the other items (``B_jj = 0``)."""
  x = x.toarray().astype(np.float64)
  g = x.T @ x
  weight = dropout_p / (1.0 - dropout_p) * np.diag(g) + l2
  n = g.shape[0]
  b = np.zeros((n, n))
  for j in range(n):
    rest = np.arange(n) != j
    design = np.vstack([x[:, rest], np.diag(np.sqrt(weight[rest]))])
    target = np.concatenate([x[:, j], np.zeros(n - 1)])
    b[rest, j] = np.linalg.lstsq(design, target, rcond=None)[0]
  return b


def _gram(x):
  return ease.gram_matrix(data_lib.TrainBatcher(x, 64, seed=0).epoch_batches(0),
                          x.shape[1])


@pytest.mark.parametrize("dropout_p,l2", [(0.25, 1.0), (0.5, 10.0), (0.0, 30.0)])
def test_fit_equals_the_float64_column_by_column_solution(matrix, dropout_p, l2):
  got = np.asarray(edlae.fit(_gram(matrix), jnp.float32(dropout_p), jnp.float32(l2)))
  want = _by_columns(matrix, dropout_p, l2)
  assert np.all(np.diag(got) == 0.0)
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
  np.testing.assert_allclose(edlae.numpy_edlae(matrix, dropout_p, l2), want, atol=1e-10)


def test_no_dropout_is_ease(matrix):
  np.testing.assert_allclose(edlae.numpy_edlae(matrix, 0.0, 20.0),
                             ease.numpy_ease(matrix, 20.0), atol=1e-12)


def test_its_settings_are_checked_and_read_by_name():
  base = configs.get_config("ml1m_edlae")
  configs.validate(base)
  assert base.model_settings == edlae.EDLAESettings()
  assert len(base.model_settings.grid()) == len(edlae.DEFAULT_DROPOUT_P) * len(
      edlae.DEFAULT_L2)
  for changes, message in [(dict(dropout_p=(1.0,)), "dropout_p must be in \\[0, 1\\)"),
                           (dict(l2=(0.0,)), "EDLAE's l2 must be in"),
                           (dict(ema_decay=0.9), "no weights to average")]:
    with pytest.raises(ValueError, match=message):
      configs.validate(base.replace(**changes))
  with pytest.raises(ValueError, match="dropout_p is a setting of --model=edlae, not of "
                                       "ease"):
    configs.get_config("ml1m_ease").replace(dropout_p=(0.3,))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = _runs.movielens_dir(tmp_path_factory, "edlae")
  cfg = _runs.small_config(d, cache_dir=os.path.join(d, "cache"), model="edlae",
                           dropout_p=(0.1, 0.5), l2=(3.0, 30.0), number_of_epochs=1)
  workdir = os.path.join(d, "run")
  return cfg, workdir, loop.run(cfg, workdir)


def test_a_run_sweeps_p_and_l2_and_serves_the_best_as_numpy_does(run):
  cfg, workdir, results = run
  sweep = [r for r in _runs.records(workdir) if r["split"] == "sweep"]
  assert [tuple(r["swept"].values()) for r in sweep] == [
      (0.1, 3.0), (0.1, 30.0), (0.5, 3.0), (0.5, 30.0)]
  best = max(sweep, key=lambda r: r["val_ndcg@100"])["swept"]
  chosen = results["train"]["chosen"]
  assert chosen == {"dropout_p": [best["dropout_p"]], "l2": [best["l2"]]}
  split = loop.load_data(cfg)
  rec = recommend.Recommender.from_workdir(workdir)
  assert float(rec.params["dropout_p"]) == pytest.approx(best["dropout_p"])
  want_b = edlae.numpy_edlae(split.train, best["dropout_p"], best["l2"])
  fold_in = split.test.fold_in
  histories = [[str(split.item_ids[j]) for j in fold_in[u].indices] for u in range(20)]
  got = rec.recommend(histories, k=10)
  dense = fold_in[:20].toarray().astype(np.float64)
  want = np.argsort(-np.where(dense > 0, -np.inf, dense @ want_b), axis=1,
                    kind="stable")[:, :10]
  for u in range(20):
    assert [str(i) for i in got.items[u]] == [str(split.item_ids[j]) for j in want[u]]


def test_a_second_run_fits_nothing_and_a_refit_keeps_the_choice(run, capsys):
  cfg, workdir, results = run
  before = _runs.records(workdir)
  again = loop.run(cfg.replace(test=False), workdir, report=reporting.print_record)
  assert "was fitted already" in capsys.readouterr().out
  assert _runs.records(workdir) == before
  assert again["train"]["chosen"] == results["train"]["chosen"]
  refit = loop.refit_config(cfg, results["train"])
  assert refit.model_settings == edlae.EDLAESettings(
      **{k: tuple(v) for k, v in results["train"]["chosen"].items()})


def test_the_tuner_searches_its_own_settings():
  base = configs.get_config("ml1m_edlae").replace(dropout_p=(0.3,), l2=(20.0,))
  space = tune.make_space(base, n_train_users=lambda: 100)
  assert {p.name for p in space.params} == {"dropout_p", "l2"}
  assert space.base_values == {"dropout_p": 0.3, "l2": 20.0}
  trial = space.trial_config(base, {"dropout_p": 0.4, "l2": 20.0})
  assert trial.model_settings == edlae.EDLAESettings(dropout_p=(0.4,), l2=(20.0,))
  with pytest.raises(tune.TuneError, match="cannot start from the base"):
    tune.make_space(configs.get_config("ml1m_edlae"), ("l2",), n_train_users=lambda: 1)


def _held_out_gap(logits, fold_in, held):
  """The mean logit of held-out items less that of the other unranked items, averaged
  over users: float ``()``."""
  logits = np.asarray(logits, np.float64)
  held, other = held.toarray() > 0, (fold_in.toarray() + held.toarray()) == 0
  return float(np.mean((logits * held).sum(1) / np.maximum(held.sum(1), 1)
                       - (logits * other).sum(1) / np.maximum(other.sum(1), 1)))


@pytest.mark.parametrize("n_users,form", [(300, "primal"), (30, "dual")])
def test_the_host_fit_equals_the_jax_fit_and_chooses_alike(matrix, n_users, form):
  import jax
  from jax_vaecf import model as model_lib
  x = matrix[:n_users]
  rows = _synthetic.low_rank_interactions(n_users=200, n_items=60, seed=8)
  fold_in, held = (sp.csr_matrix(a) for a in _synthetic.fold_in_split(rows))

  def problem(log, scored):
    batcher = data_lib.TrainBatcher(x, 64, seed=0)

    def score(model, params):
      logits = np.asarray(model.apply({"params": params},
                                      jnp.asarray(fold_in.toarray())).logits)
      scored.append(np.where(fold_in.toarray() > 0, 0.0, logits))  # the ranked ones
      # A smooth score: with 30 training users many items never co-occur, their logits
      # tie at 0 up to rounding, and a ranking metric would break those ties by it.
      gap = _held_out_gap(logits, fold_in, held)
      return {"ndcg@100": gap, "recall@20": 0.0, "recall@50": 0.0}
    return model_lib.ClosedFormProblem(lambda: batcher.epoch_batches(0), 60, n_users,
                                       jax.devices()[0], score, log.append, log.append)

  grid = edlae.EDLAESettings(dropout_p=(0.1, 0.5), l2=(3.0, 30.0)).grid()
  host_log, device_log, host_scores, device_scores = [], [], [], []
  host = edlae.fit_on_host(grid, problem(host_log, host_scores))
  device = edlae.fit_on_device(grid, problem(device_log, device_scores))
  assert host_log[0].startswith(f"{form} form for {n_users} users x 60 items")
  host_swept = [r for r in host_log if isinstance(r, dict)]
  assert [r["swept"] for r in host_swept] == [r["swept"] for r in device_log] == grid
  for h, d in zip(host_scores, device_scores):  # every candidate scores alike
    np.testing.assert_allclose(h, d, rtol=0, atol=2e-5 * np.abs(d).max())
  assert host.chosen == device.chosen
  (p,), (l2,) = host.chosen["dropout_p"], host.chosen["l2"]
  got, want = (np.asarray(f.params["output"]["kernel"]) for f in (host, device))
  reference = edlae.numpy_edlae(x, p, l2)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(reference).max())
  np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5 * np.abs(reference).max())
  assert float(host.params["dropout_p"]) == pytest.approx(p)
  assert host.summary.endswith(f"({len(grid)} {form} fits on the host)")  # best kept
