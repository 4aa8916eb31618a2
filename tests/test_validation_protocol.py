"""Model selection on the user's own data: validation in the per-user protocol, early
stopping (and its resume), anneal lengths in epochs, settings files."""

import json
import math
import os

import numpy as np
import pytest

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import run_folder
from jax_vaecf.training import checkpoint
from jax_vaecf.training import checkpoint_choice
from jax_vaecf.data import split as split_lib

import _runs
import _synthetic


def _per_user_split(n_users=60, n_items=40, seed=0):
  rng = np.random.default_rng(seed)
  n = rng.integers(1, 30, n_users)  # some users below the 5-item minimum
  rows = np.repeat(np.arange(n_users), n)
  cols = np.concatenate([rng.choice(n_items, k, replace=False) for k in n])
  train = split_lib.binary_csr(rows, cols, (n_users, n_items))
  heldout = split_lib.binary_csr(np.arange(n_users), rng.integers(0, n_items, n_users),
                                 (n_users, n_items))
  ids = np.arange(n_users) * 3 + 1
  return split_lib.Split(train=train, validation=None,
                         test=split_lib.EvalSplit(train, heldout, ids),
                         item_ids=np.arange(n_items), train_user_ids=ids,
                         protocol="per_user")


def test_validation_slice_partitions_each_training_row():
  split = _per_user_split()
  out = split_lib.hold_out_validation(split, 0.1, seed=5)
  full, fit, target = split.train.toarray(), out.train.toarray(), out.validation.heldout.toarray()
  np.testing.assert_array_equal(fit + target, full)  # disjoint, and nothing lost
  np.testing.assert_array_equal(out.validation.fold_in.toarray(), fit)
  n = full.sum(1).astype(int)
  expect = np.where(n >= split_lib.MIN_ITEMS_FOR_VALIDATION,
                    np.maximum(1, np.floor(0.1 * n + 0.5)), 0)
  np.testing.assert_array_equal(target.sum(1), expect)
  # Testing folds in the full training row; the test items are untouched.
  assert out.test is split.test
  np.testing.assert_array_equal(out.validation.user_ids, split.train_user_ids)
  # Seeded: the same seed draws the same slice, another seed another one.
  again = split_lib.hold_out_validation(split, 0.1, seed=5)
  assert (again.validation.heldout != out.validation.heldout).nnz == 0
  other = split_lib.hold_out_validation(split, 0.1, seed=6)
  assert (other.validation.heldout != out.validation.heldout).nnz > 0
  stats = out.stats()
  assert stats["interactions"] == split.train.nnz + split.test.heldout.nnz


def test_validation_slice_refuses_a_split_with_validation_users():
  split = _per_user_split()
  with pytest.raises(ValueError, match="per-user split without validation"):
    split_lib.hold_out_validation(split_lib.hold_out_validation(split, 0.1, 0), 0.1, 0)
  with pytest.raises(ValueError, match="fraction"):
    split_lib.hold_out_validation(split, 1.0, 0)


def _write_fold(folder, test_seed):
  """ml-100k's u1.base / u1.test from one low-rank matrix; ``test_seed`` picks the
  test items of each user (the training file does not depend on it)."""
  x = _synthetic.low_rank_interactions(n_users=120, n_items=130, n_clusters=4,
                                       per_user=14, seed=2)
  rng = np.random.default_rng(test_seed)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "u1.base"), "w") as base, \
       open(os.path.join(folder, "u1.test"), "w") as test:
    for u in range(x.shape[0]):
      items = np.flatnonzero(x[u])
      for i in items[:-3]:
        base.write(f"{u + 1}\t{i + 1}\t5\t0\n")
      for i in rng.choice(x.shape[1], 3, replace=False):
        test.write(f"{u + 1}\t{i + 1}\t5\t0\n")
  return folder


def _fold_config(data_dir, tmp_path, **changes):
  return _runs.small_config(data_dir, **{
      "dataset": "ml-100k", "protocol": "per_user", "fold": "u1",
      "cache_dir": str(tmp_path / "cache"), **changes})


def test_per_user_protocol_chooses_the_epoch_on_validation_items_only(tmp_path):
  runs = {}
  for test_seed in (0, 1):
    data_dir = _write_fold(str(tmp_path / f"data{test_seed}"), test_seed)
    workdir = str(tmp_path / f"run{test_seed}")
    runs[test_seed] = (loop.run(_fold_config(data_dir, tmp_path), workdir),
                       _runs.records(workdir))
  (res0, log0), (res1, log1) = runs[0], runs[1]
  curve0 = [r["val_ndcg@100"] for r in log0 if r["split"] == "train"]
  assert len(curve0) == 4 and all(np.isfinite(curve0))
  # Other test items change neither the validation curve nor the chosen epoch ...
  assert curve0 == [r["val_ndcg@100"] for r in log1 if r["split"] == "train"]
  assert res0["test"]["epoch"] == res1["test"]["epoch"] == int(np.argmax(curve0)) + 1
  # ... only the test metrics.
  assert res0["test"]["ndcg@10"] != res1["test"]["ndcg@10"]
  # The tested model folded in each user's full training row: the test users are all
  # 120 users, not only those with validation items.
  assert res0["test"]["n_users"] + res0["test"]["n_excluded"] == 120


def test_per_user_protocol_without_validation_tests_the_last_epoch(tmp_path):
  data_dir = _write_fold(str(tmp_path / "data"), 0)
  res = loop.run(_fold_config(data_dir, tmp_path, validation_fraction=0.0,
                              number_of_epochs=2), str(tmp_path / "run"))
  assert res["test"]["epoch"] == 2
  assert "val_ndcg@100" not in _runs.records(str(tmp_path / "run"))[0]


_EVALUATE = loop.evaluate


def _scripted_validation(monkeypatch, values):
  """Validation NDCG@100 of successive validations, as scripted."""
  seq = iter(values)

  def evaluate(steps, params, split, batch_size):
    out = _EVALUATE(steps, params, split, batch_size)
    if split is not None and split.n_users and "ndcg@100" in out:
      out = dict(out, **{"ndcg@100": next(seq)})
    return out
  monkeypatch.setattr(checkpoint_choice, "evaluate", evaluate)


CURVE = [0.10, 0.20, 0.15, 0.18, 0.30, 0.31, 0.29, 0.28, 0.27, 0.26]


def test_early_stopping_stops_after_n_validations_without_improvement(
    tmp_path, monkeypatch):
  data_dir = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data_dir, cache_dir=str(tmp_path / "cache"),
                           number_of_epochs=10, early_stopping=2, test=False)
  _scripted_validation(monkeypatch, CURVE)
  workdir = str(tmp_path / "run")
  res = loop.run(cfg, workdir)
  log = [r for r in _runs.records(workdir) if r["split"] == "train"]
  # 0.15 and 0.18 do not beat 0.20: two validations without improvement after epoch 2.
  assert [r["epoch"] for r in log] == [1, 2, 3, 4]
  assert "early_stopping" in log[-1]["stopped"] and log[-1]["checkpointed"]
  assert "stopped" not in log[-2]
  assert res["train"]["best_epoch"] == 2
  assert res["train"]["best_validation"]["ndcg@100"] == 0.20
  # Rerun: nothing left to train.
  _scripted_validation(monkeypatch, [])
  loop.run(cfg, workdir)
  assert len([r for r in _runs.records(workdir) if r["split"] == "train"]) == 4
  # More patience (a resumable change) continues from epoch 4: 0.30 at epoch 5 is best,
  # then three validations without improvement.
  _scripted_validation(monkeypatch, CURVE[4:])
  res = loop.run(cfg.replace(early_stopping=3), workdir)
  log = [r for r in _runs.records(workdir) if r["split"] == "train"]
  assert [r["epoch"] for r in log] == list(range(1, 10))
  assert res["train"]["best_epoch"] == 6 and "early_stopping" in log[-1]["stopped"]


def test_early_stopping_resumes_with_its_count(tmp_path, monkeypatch):
  data_dir = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data_dir, cache_dir=str(tmp_path / "cache"),
                           number_of_epochs=10, early_stopping=2, test=False)
  # Killed after epoch 3 (one validation without improvement already counted).
  workdir = str(tmp_path / "cut")
  _scripted_validation(monkeypatch, CURVE)
  split = loop.load_data(cfg)
  built = loop.build(cfg, split.n_items, split.train.shape[0])
  ck = checkpoint.RunCheckpoints(workdir, run_folder.identity(cfg, split))
  loop.train_and_validate(cfg, workdir, split, ck, built, stop_after_epochs=3)
  ck.close()
  _scripted_validation(monkeypatch, CURVE[3:])
  res = loop.run(cfg, workdir)
  log = [r for r in _runs.records(workdir) if r["split"] == "train"]
  assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # not 5: the count was kept
  assert res["train"]["best_epoch"] == 2
  assert res["train"]["best_validation"]["ndcg@100"] == 0.20


def test_on_validation_stops_the_run_with_its_reason(tmp_path):
  data_dir = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data_dir, cache_dir=str(tmp_path / "cache"),
                           number_of_epochs=5, test=False)
  seen = []

  def on_validation(epoch, record):
    seen.append((epoch, record["val_ndcg@100"]))
    return "pruned" if epoch == 2 else None
  workdir = str(tmp_path / "run")
  loop.run(cfg, workdir, on_validation=on_validation)
  log = [r for r in _runs.records(workdir) if r["split"] == "train"]
  assert [e for e, _ in seen] == [1, 2]
  assert [r["val_ndcg@100"] for r in log] == [v for _, v in seen]
  assert log[-1]["stopped"] == "pruned" and log[-1]["epoch"] == 2


@pytest.mark.parametrize("model, passes", [("multvae", 1), ("recvae", 4)])
def test_anneal_epochs_counts_every_step_of_an_epoch(model, passes):
  cfg = configs.Config(model=model, batch_size_train=100, anneal_epochs=2.5,
                       anneal_cap=1.0, total_anneal_steps=7, anneal_schedule="cyclical",
                       anneal_cycle_steps=3)
  per_epoch = loop.steps_per_epoch(cfg, 1001)
  assert per_epoch == passes * 11
  assert loop.anneal_steps(cfg, per_epoch) == (round(2.5 * per_epoch),) * 2
  plain = cfg.replace(anneal_epochs=0.0)
  assert loop.anneal_steps(plain, per_epoch) == (7, 3)
  linear = cfg.replace(anneal_schedule="linear", anneal_cap=0.2)
  beta = loop.step_options(linear, 1001).beta_schedule
  total = round(2.5 * per_epoch)
  assert math.isclose(float(beta(total // 2)), min(0.2, (total // 2) / total), rel_tol=1e-6)
  with pytest.raises(ValueError, match="training users"):
    loop.step_options(linear)


def test_anneal_epochs_in_a_run_log(tmp_path):
  data_dir = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data_dir, cache_dir=str(tmp_path / "cache"),
                           number_of_epochs=1, anneal_epochs=4.0, anneal_cap=1.0,
                           test=False)
  loop.run(cfg, str(tmp_path / "run"))
  (rec,) = _runs.records(str(tmp_path / "run"))
  # The last step of epoch 1 of a 4-epoch anneal: beta = (steps - 1) / (4 * steps).
  steps = rec["step"]
  assert math.isclose(rec["beta"], (steps - 1) / (4 * steps), rel_tol=1e-5)


def test_settings_file_round_trip_and_errors(tmp_path):
  cfg = configs.get_config("ml1m").replace(hidden_dims=(300, 100), lr=0.002, seed=4)
  path = tmp_path / "best.json"
  path.write_text(json.dumps(configs.to_json(cfg)))
  assert configs.get_config(str(path)) == cfg
  # A run's config.json is such a file too.
  path.write_text(json.dumps({"model": "multdae", "lam": 1e-4}))
  got = configs.get_config(str(path))
  assert got.model == "multdae" and got.lam == 1e-4 and got.lr == configs.Config().lr
  path.write_text(json.dumps({"modle": "multdae"}))
  with pytest.raises(ValueError, match=r"unknown settings \['modle'\]"):
    configs.get_config(str(path))
  path.write_text(json.dumps({"number_of_epochs": "ten"}))
  with pytest.raises(ValueError, match="number_of_epochs = 'ten', expected int"):
    configs.get_config(str(path))
  path.write_text("{not json")
  with pytest.raises(ValueError, match="unreadable"):
    configs.get_config(str(path))
  with pytest.raises(ValueError, match="no such file"):
    configs.get_config(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="unknown config 'nope'"):
    configs.get_config("nope")


@pytest.mark.parametrize("name, value", [("validation_fraction", 1.0),
                                         ("validation_fraction", -0.1),
                                         ("early_stopping", -1),
                                         ("anneal_epochs", -2.0)])
def test_bad_selection_settings_are_refused(name, value):
  with pytest.raises(ValueError, match=f"bad setting: {name}"):
    configs.validate(configs.Config().replace(**{name: value}))


# A whole per-user run with validation (12 s); test_anneal_epochs_in_a_run_log keeps a run in the fast tier.
SLOW_TESTS = ['test_per_user_protocol_chooses_the_epoch_on_validation_items_only']


# A second whole per-user run (12 s).
SLOW_TESTS += ['test_per_user_protocol_without_validation_tests_the_last_epoch']
