"""Recommendations for new users: exclusion of seen items, exactness, unknown ids, CLI."""

import os
import re
import shutil
import subprocess
import time
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import checkpoint
from jax_vaecf.evaluation import metrics
from jax_vaecf import model as model_lib
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

import _runs
import _synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recommender(n_items=40, seed=0):
  m = model_lib.build_model("multvae", n_items, hidden_dims=(8,), latent_dim=3)
  params = train_lib.init_params(m, jax.random.PRNGKey(seed))
  ids = np.arange(n_items) * 10 + 5  # raw ids differ from columns
  return recommend.Recommender(m, params, ids), m, params, ids


def test_top_k_equals_brute_force_and_excludes_seen():
  rec, m, params, ids = _recommender()
  users = [[5, 15, 105], [395], [5, 25, 35, 45, 55, 65]]
  out = rec.recommend(users, k=7)
  for hist, items, scores in zip(users, out.items, out.scores):
    x = np.zeros((1, 40), np.float32)
    x[0, [(h - 5) // 10 for h in hist]] = 1
    logits = np.array(m.apply({"params": params}, jnp.asarray(x)).logits[0])
    logits[x[0] > 0] = -np.inf
    want = np.argsort(-logits, kind="stable")[:7]
    np.testing.assert_array_equal(items, ids[want])
    np.testing.assert_allclose(scores, logits[want], rtol=1e-5)
    assert not set(items) & set(hist)


def test_batched_equals_one_by_one():
  rec, *_ = _recommender()
  rng = np.random.default_rng(0)
  users = [list(rec.item_ids[rng.choice(40, rng.integers(1, 9), replace=False)])
           for _ in range(20)]
  together = rec.recommend(users, k=5)
  for u, items in zip(users, together.items):
    np.testing.assert_array_equal(rec.recommend([u], k=5).items[0], items)


def test_unknown_ids_are_reported_and_skipped():
  rec, *_ = _recommender()
  out = rec.recommend([[5, 999, "abc", 15]], k=3)
  assert out.unknown == [[999, "abc"]]
  np.testing.assert_array_equal(out.items[0], rec.recommend([[5, 15]], k=3).items[0])
  with pytest.raises(ValueError, match="k must be"):
    rec.recommend([[5]], k=41)


def test_user_with_fewer_unseen_items_than_k_gets_only_those():
  rec, m, params, ids = _recommender()
  unseen = [7, 31]
  history = [i for j, i in enumerate(ids) if j not in unseen]
  out = rec.recommend([history, list(ids), [5]], k=10)
  assert sorted(out.items[0].tolist()) == sorted(ids[unseen].tolist())
  assert np.all(np.isfinite(out.scores[0])) and len(out.scores[0]) == 2
  assert list(out.scores[0]) == sorted(out.scores[0], reverse=True)
  assert out.items[1].shape == (0,) and out.scores[1].shape == (0,)  # has every item
  assert len(out.items[2]) == 10
  # The jitted function keeps its fixed k: the entries past the unseen items are fillers.
  x = np.zeros((1, 40), np.float32)
  x[0, [j for j in range(40) if j not in unseen]] = 1
  scores, items = recommend.make_topk_fn(m, 10)(params, sparse_lib.from_dense(x))
  assert sorted(np.asarray(items[0, :2]).tolist()) == unseen
  assert np.all(np.asarray(items[0, 2:]) == -1)
  assert np.all(np.asarray(scores[0, 2:]) == -np.inf)


def _nan(params):
  return jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), params)


def test_nonfinite_parameters_and_scores_are_refused():
  rec, m, params, ids = _recommender()
  out = m.output_layer
  bad = dict(params, **{out: dict(params[out], bias=params[out]["bias"].at[3].set(jnp.inf))})
  with pytest.raises(metrics.NonFiniteModelError,
                     match=f"parameters are not finite \\(NaN/inf in {out}/bias\\)"):
    recommend.Recommender(m, bad, ids)
  # Parameters swapped in after the check (or logits that overflow): the scores say so.
  rec.params = _nan(params)
  with pytest.raises(metrics.NonFiniteModelError,
                     match="non-finite scores for 2 of 2 users: the model's parameters "
                           "are not finite"):
    rec.recommend([[5, 15], [25]], k=3)
  x = np.zeros((2, 40), np.float32)
  scores, _ = recommend.make_topk_fn(m, 3)(bad, sparse_lib.from_dense(x))
  assert np.isnan(np.asarray(scores)).all()  # the inf logit poisons the whole row


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return _runs.trained_workdir(tmp_path_factory, "rec", titles=True)


def test_workdir_alone_is_enough_to_serve(trained):
  rec = recommend.Recommender.from_workdir(trained)
  assert rec.model.n_items == 150 and rec.model.latent_dim == 4
  out = rec.recommend([[1, 8, 15]], k=10)
  assert len(out.items[0]) == 10
  assert set(out.items[0]) <= set(rec.item_ids.tolist())
  assert not {1, 8, 15} & set(out.items[0].tolist())


def test_serving_a_run_in_progress_leaves_its_saves_alone(trained):
  # A save in progress of the training run (orbax's temporary folder) must survive a
  # server (or test mode) opening the same workdir.
  saving = [os.path.join(trained, "checkpoints", kind, "99.orbax-checkpoint-tmp-7")
            for kind in ("best", "latest")]
  for d in saving:
    os.makedirs(d)
  try:
    recommend.Recommender.from_workdir(trained)
    time.sleep(2)  # orbax cleans up in a background thread
    assert all(os.path.isdir(d) for d in saving)
  finally:
    for d in saving:
      os.rmdir(d)


def test_cli_prints_titles_and_unknown_ids(trained):
  r = subprocess.run([sys.executable, "-m", "experiments.recommend", "--workdir", trained,
                      "--items", "1,8,nope", "--k", "3"], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "unknown item ids, skipped: nope" in r.stdout
  ranked = [l for l in r.stdout.splitlines() if l.strip()[:2] in ("1.", "2.", "3.")]
  assert len(ranked) == 3 and all("Movie " in l for l in ranked)


def test_cli_never_recommends_the_history(trained):
  ids = np.load(os.path.join(trained, "item_ids.npy")).tolist()
  unseen = [str(ids[3]), str(ids[77])]
  history = [str(i) for i in ids if str(i) not in unseen]
  r = subprocess.run([sys.executable, "-m", "experiments.recommend", "--workdir", trained,
                      "--items", ",".join(history), "--k", "10"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  ranked = [l.split()[1] for l in r.stdout.splitlines() if re.match(r"\s*\d+\. ", l)]
  assert sorted(ranked) == sorted(unseen)
  assert "only 2 of the 150 items are not in the history" in r.stdout


def test_workdir_with_nonfinite_parameters_is_refused(trained, tmp_path):
  ident = checkpoint.read_best_meta(trained)["identity"]
  workdir = str(tmp_path / "diverged")
  os.makedirs(workdir)
  shutil.copy(os.path.join(trained, "item_ids.npy"), workdir)
  m = model_lib.build_model(ident["model"], int(ident["n_items"]),
                            hidden_dims=tuple(ident["hidden_dims"]),
                            latent_dim=int(ident["latent_dim"]))
  # A run with weight averaging (any ema_decay above 0) stores ema_params too.
  options = train_lib.StepOptions(
      ema_decay=0.9 if bool(ident.get("weight_average", False)) else 0.0)
  state = train_lib.create_train_state(
      m, train_lib.make_optimizer(), jax.random.PRNGKey(0), options)
  state = state.replace(params=_nan(state.params))
  if state.ema_params is not None:
    state = state.replace(ema_params=_nan(state.ema_params))
  ck = checkpoint.RunCheckpoints(workdir, ident)
  ck.save_best(1, state, {"epoch": 1}, {"ndcg@100": 0.1})
  ck.close()
  with pytest.raises(metrics.NonFiniteModelError,
                     match=f"the best checkpoint of '{workdir}': the model's parameters "
                           "are not finite"):
    recommend.Recommender.from_workdir(workdir)
  r = subprocess.run([sys.executable, "-m", "experiments.recommend", "--workdir", workdir,
                      "--items", "1"], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0
  assert r.stderr.startswith("error: the best checkpoint of") and "Traceback" not in r.stderr


def _unfinished_run(root):
  """A workdir whose training was stopped before its first validation."""
  workdir = root / "unfinished"
  (workdir / "checkpoints" / "best" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  return workdir


def test_workdir_without_a_finished_checkpoint_is_refused_untouched(tmp_path):
  workdir = _unfinished_run(tmp_path)
  with pytest.raises(FileNotFoundError, match="holds no finished save"):
    recommend.Recommender.from_workdir(str(workdir))
  # A save in progress (a run training into the workdir right now) is not removed.
  assert os.listdir(workdir / "checkpoints" / "best") == ["5.orbax-checkpoint-tmp-1"]
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    recommend.Recommender.from_workdir(str(tmp_path / "nothing"))


@pytest.mark.parametrize("kind", ["empty", "unfinished"])
def test_cli_without_a_run_fails_with_one_clean_line(tmp_path, kind):
  workdir = tmp_path if kind == "empty" else _unfinished_run(tmp_path)
  r = subprocess.run([sys.executable, "-m", "experiments.recommend", "--workdir",
                      str(workdir), "--items", "1"], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: no checkpoint in"), r.stderr


def test_raw_ids_survive_to_item_ids_and_recommendations(tmp_path):
  # Item ids that float64 would merge (2**53, 2**53 + 1) or wrap (2**63), hashes and
  # SKUs, in a two-column csv (every row positive): each must come back as written.
  x = _synthetic.low_rank_interactions(n_users=300, n_items=150, n_clusters=4,
                                       per_user=10, seed=3)
  special = [str(2**53), str(2**53 + 1), str(2**63), "9f86d081884c7d659a2feaa0c55ad015",
             "SKU-00012", "007", "7"]
  names = special + [f"item-{j}" for j in range(len(special), 150)]
  u, i = np.nonzero(x)
  path = tmp_path / "clicks.csv"
  path.write_text("".join(f"user-{a},{names[b]}\n" for a, b in zip(u, i)))
  cfg = configs.get_config("ml-latest-small").replace(
      dataset="csv", data_dir=str(path), cache_dir=str(tmp_path / "cache"),
      csv_header="no", number_of_epochs=1, batch_size_train=64, batch_size_validation=64,
      hidden_dims=(16,), latent_dim=4, test=False)
  workdir = str(tmp_path / "run")
  loop.run(cfg, workdir)
  saved = np.load(os.path.join(workdir, "item_ids.npy"), allow_pickle=False)
  assert sorted(saved.tolist()) == sorted(names)  # all 150 distinct, none altered
  rec = recommend.Recommender.from_workdir(workdir)
  out = rec.recommend([special[:3]], k=len(names))
  assert not out.unknown[0]
  assert sorted(out.items[0].tolist() + special[:3]) == sorted(names)
