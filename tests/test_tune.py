"""The hyperparameter search (``experiments.tune``): reproducible from its seed, resumed
exactly after an interruption or a killed process, parallel trials through Optuna's
``n_jobs``, blind to the test users, its best settings loadable, diverged trials failed,
bad flags refused in one line.

Every trial of these searches compiles its own programs (the learning rate, dropout and
KL settings are constants of the jitted step), so the tests share searches through
module fixtures and repeat parameter values that the session's compilation cache
(conftest.py) already holds.
"""

import ast
import json
import os
import threading

import numpy as np
import pytest
import scipy.sparse as sp

optuna = pytest.importorskip("optuna")
# Heartbeats, the retry callback and TPE's options are marked experimental by Optuna.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
from jax_vaecf.training import engine as loop
from jax_vaecf.tuning import search as tune
from jax_vaecf.tuning import space as tune_space
from jax_vaecf.data import paper_files
from jax_vaecf.data.split import EvalSplit, Split

import _tools
import _runs
import _synthetic

SPACE = ("lr", "dropout_rate", "anneal_cap", "anneal_epochs")


def _write_data(folder, *, other_test_targets=False):
  """A finished split in the paper's folder format: 240 training users, 30 validation
  and 30 test users, 120 items. ``other_test_targets``: the same folder except that
  the test users' held-out items (test_te.csv) are other items."""
  x = _synthetic.low_rank_interactions(n_users=300, n_items=120, n_clusters=6,
                                       per_user=10, seed=0)
  vf, vh = _synthetic.fold_in_split(x[240:270], seed=1)
  tf, th = _synthetic.fold_in_split(x[270:], seed=2)
  if other_test_targets:
    rng = np.random.default_rng(7)
    th = np.zeros_like(th)
    for u in range(th.shape[0]):
      th[u, rng.choice(np.flatnonzero(tf[u] == 0), size=3, replace=False)] = 1
  c = sp.csr_matrix
  split = Split(train=c(x[:240]),
                validation=EvalSplit(c(vf), c(vh), np.arange(240, 270)),
                test=EvalSplit(c(tf), c(th), np.arange(270, 300)),
                item_ids=np.arange(120) * 3 + 5, train_user_ids=np.arange(240))
  paper_files.write_vaecf_dir(split, folder)
  return str(folder)


def _base(data_dir, cache_dir, **changes):
  return _runs.small_config(
      data_dir, dataset="vaecf_dir", cache_dir=str(cache_dir), number_of_epochs=3,
      total_anneal_steps=40).replace(**changes)


def _settings(**changes):
  # Pruning from epoch 2 once one trial completed, so the tiny searches can prune.
  return tune.Settings(**{"trials": 3, "space": SPACE, "prune_warmup_epochs": 2,
                          "prune_startup_trials": 1, **changes})


def _search(base, root, settings, report=None):
  return tune.search(base, str(root), settings,
                     report=report or (lambda line: None)).rows


def _key(rows):
  """What must repeat: each trial's parameters, outcome and value."""
  return [(r["trial"], r["params"], r["state"], r["value"], r["best_epoch"], r["epochs"])
          for r in rows]


def _trials(root):
  """The study's stored trials (every attempt), by Optuna number."""
  return sorted(tune.open_study(str(root)).get_trials(), key=lambda t: t.number)


REAL_RUN = loop.run


def _runs_of(calls):
  """``loop.run`` wrapped to note the workdir of each call in ``calls``."""
  return lambda cfg, workdir, **kw: (calls.append(os.path.basename(workdir)),
                                     REAL_RUN(cfg, workdir, **kw))[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("tune_data")
  return {"a": _write_data(d / "a"),
          "b": _write_data(d / "b", other_test_targets=True), "cache": str(d / "cache")}


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
  """Seed 0, three trials, uninterrupted."""
  root = tmp_path_factory.mktemp("full") / "tune"
  return root, _search(_base(data["a"], data["cache"]), root, _settings())


@pytest.fixture(scope="module")
def two(data, tmp_path_factory):
  """Seed 0, two trials, in a fresh folder."""
  root = tmp_path_factory.mktemp("two") / "tune"
  return root, _search(_base(data["a"], data["cache"]), root, _settings(trials=2))


def test_the_seed_decides_the_trials(data, full, two, tmp_path, monkeypatch):
  _, rows = full
  assert [r["trial"] for r in rows] == [0, 1, 2]
  assert all(r["state"] in ("complete", "pruned") for r in rows)
  # Trial 0 is the base's own settings; the step-count anneal (40 steps of 4 per
  # epoch) is expressed in epochs.
  assert rows[0]["params"] == {"lr": 1e-3, "dropout_rate": 0.5, "anneal_cap": 0.2,
                               "anneal_epochs": 10.0}
  # A fresh search with the same seed asks the same trials and gets the same values.
  assert _key(two[1]) == _key(rows[:2])
  # Another seed: the same base trial, then other trials. (Its trial 1 is stopped
  # before it trains, by Ctrl-C: its parameters are chosen when it is asked.)
  
  def stop_at_trial_1(cfg, workdir, **kw):
    if os.path.basename(workdir) == "0001":
      raise KeyboardInterrupt
    return REAL_RUN(cfg, workdir, **kw)

  monkeypatch.setattr(loop, "run", stop_at_trial_1)
  with pytest.raises(KeyboardInterrupt):
    _search(_base(data["a"], data["cache"]), tmp_path / "seed1",
            _settings(trials=2, tune_seed=1))
  other = _trials(tmp_path / "seed1")
  assert list(tune.positions(other).values()) == [0, 1]
  assert other[0].params == rows[0]["params"] and other[0].value == rows[0]["value"]
  assert other[1].params != rows[1]["params"]
  assert other[1].params != rows[2]["params"]


def test_resume_runs_only_new_trials_and_reruns_an_interrupted_one(data, full, tmp_path,
                                                                   monkeypatch):
  base = _base(data["a"], data["cache"])
  root = tmp_path / "tune"
  _search(base, root, _settings(trials=1))
  calls = []

  def interrupted_in_trial_2(cfg, workdir, *, on_validation=None):
    calls.append(os.path.basename(workdir))

    def hook(epoch, record):
      if os.path.basename(workdir) == "0002" and epoch == 2:
        raise KeyboardInterrupt  # Ctrl-C after epoch 1's checkpoint
      return on_validation(epoch, record)

    return REAL_RUN(cfg, workdir, on_validation=hook)

  monkeypatch.setattr(loop, "run", interrupted_in_trial_2)
  with pytest.raises(KeyboardInterrupt):
    _search(base, root, _settings(trials=3))
  (stopped,) = [t for t in _trials(root) if t.state == optuna.trial.TrialState.FAIL]
  assert tune.positions(_trials(root))[stopped.number] == 2
  assert stopped.user_attrs["interrupted"] is True
  calls_before = len(calls)
  monkeypatch.setattr(loop, "run", _runs_of(calls))
  lines = []
  rows = _search(base, root, _settings(trials=3), report=lines.append)
  # The finished trials never ran again: trials 1 and 2 are the two new ones, and the
  # interrupted trial 2 resumed its own workdir once.
  assert calls[:calls_before] == ["0001", "0002"] and calls[calls_before:] == ["0002"]
  assert any(line.startswith("trial 2 was interrupted") for line in lines), lines
  _assert_resumed(os.path.join(root, "trials", "0002"))
  # The interrupted attempt is kept as failed, with the parameters run again.
  assert stopped.params == rows[2]["params"]
  # The whole search is the uninterrupted one.
  assert _key(rows) == _key(full[1])
  # Once done, the same command runs nothing.
  calls_before = len(calls)
  assert _key(_search(base, root, _settings(trials=3))) == _key(rows)
  assert len(calls) == calls_before


def _assert_resumed(workdir):
  """The run resumed its checkpoint: each epoch trained once, in order."""
  train = [r for r in _runs.records(workdir) if r["split"] == "train"]
  assert [r["epoch"] for r in train] == list(range(1, len(train) + 1))


def test_a_dead_process_trial_is_found_by_its_heartbeat_and_run_again(data, two, tmp_path,
                                                                      monkeypatch):
  # A process killed in trial 1 leaves it running in the study, its heartbeat silent.
  # (SystemExit is what Optuna does not catch: the trial stays RUNNING, as on a kill.)
  base, root = _base(data["a"], data["cache"]), tmp_path / "tune"
  settings = _settings(trials=2, heartbeat_seconds=1)
  
  def killed_in_trial_1(cfg, workdir, *, on_validation=None):

    def hook(epoch, record):
      if os.path.basename(workdir) == "0001" and epoch == 2:
        raise SystemExit(9)
      return on_validation(epoch, record)

    return REAL_RUN(cfg, workdir, on_validation=hook)

  monkeypatch.setattr(loop, "run", killed_in_trial_1)
  with pytest.raises(SystemExit):
    _search(base, root, settings)
  (running,) = [t for t in _trials(root) if t.state == optuna.trial.TrialState.RUNNING]
  assert "interrupted" not in running.user_attrs or not running.user_attrs["interrupted"]
  calls, lines = [], []
  monkeypatch.setattr(loop, "run", _runs_of(calls))
  rows = _search(base, root, settings, report=lines.append)
  # Optuna failed it once its heartbeat was stale and queued it again (its retry
  # callback); it resumed its own workdir, and the search is the uninterrupted one.
  assert calls == ["0001"]
  assert any(line.startswith("trial 1 was interrupted") for line in lines), lines
  stored = _trials(root)
  assert [t.state for t in stored if t.number == running.number] == [
      optuna.trial.TrialState.FAIL]
  retry = [t for t in stored if t.system_attrs.get("failed_trial") == running.number]
  assert len(retry) == 1 and retry[0].params == running.params
  _assert_resumed(os.path.join(root, "trials", "0001"))
  assert _key(rows) == _key(two[1])


def test_parallel_trials_run_at_once_on_their_own_devices(data, full, tmp_path,
                                                          monkeypatch):
  # Trials 0 and 1 must be running at the same time (each waits for the other at its
  # start), each on a device of its own.
  root, rows = full
  assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
  both_started, devices = threading.Barrier(2, timeout=120), {}

  def together(cfg, workdir, **kw):
    devices[os.path.basename(workdir)] = cfg.gpu_number
    if os.path.basename(workdir) in ("0000", "0001"):
      both_started.wait()
    return REAL_RUN(cfg, workdir, **kw)

  monkeypatch.setattr(loop, "run", together)
  par = _search(_base(data["a"], data["cache"]), tmp_path / "tune",
                _settings(parallel_trials=2))
  assert devices["0000"] != devices["0001"] and {devices["0000"], devices["0001"]} <= {0, 1}
  # Before TPE's start-up count, each trial draws from its own seed: the same
  # parameters as one at a time, and the same curve for as long as both ran. Trial 0,
  # the base, is never pruned; whether another trial is depends on which trials had
  # completed when it validated.
  assert [r["params"] for r in par] == [r["params"] for r in rows]
  assert _key(par[:1]) == _key(rows[:1])
  one, two_at_once = _curves(root), _curves(tmp_path / "tune")
  for position, curve in two_at_once.items():
    common = set(curve) & set(one[position])
    assert common and all(curve[e] == one[position][e] for e in common)
  for a, b in zip(rows, par):
    if a["state"] == b["state"] == "complete":
      assert a["value"] == b["value"]
  config = json.load(open(os.path.join(tmp_path, "tune", "best.json")))
  assert config["gpu_number"] == -1  # the device was the trial's, not the setting's


def test_trial_0_is_the_base_without_a_queue_two_threads_could_both_take(data, tmp_path):
  # Optuna's pop of a waiting trial is not atomic on SQLite: an enqueued trial 0 could be
  # taken by two threads at once. Nothing waits; the sampler gives trial 0 the base.
  base = _base(data["a"], data["cache"])
  study, space = tune._prepare(base, str(tmp_path), _settings(), lambda line: None)  # pylint: disable=protected-access
  assert study.get_trials(states=(optuna.trial.TrialState.WAITING,)) == []
  first, second = study.ask(), study.ask()  # as two threads starting at once would
  assert space.suggest(first) == space.base_values
  assert space.suggest(second) != space.base_values


def test_two_threads_never_both_take_one_queued_trial(tmp_path, monkeypatch):
  # A trial queued again after an interruption waits in Optuna's queue; two trial
  # threads may read it as waiting at the same moment (made certain here: each waits
  # for the other after its read). One takes it, the other is told it is gone.
  from optuna.storages._rdb import models  # pylint: disable=g-import-not-at-top
  study = tune.open_study(str(tmp_path), create=True)
  study.enqueue_trial({"lr": 0.001})
  (waiting,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
  find, barrier = models.TrialModel.find_or_raise_by_id, threading.Barrier(2, timeout=2)

  def find_then_wait(trial_id, session, for_update=False):
    row = find(trial_id, session, for_update=for_update)
    try:
      barrier.wait()
    except threading.BrokenBarrierError:
      pass
    return row

  monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id",
                      staticmethod(find_then_wait))
  storage, taken = study._storage, []  # pylint: disable=protected-access
  threads = [threading.Thread(target=lambda: taken.append(storage.set_trial_state_values(
      waiting._trial_id, optuna.trial.TrialState.RUNNING)))  # pylint: disable=protected-access
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(taken) == [False, True]


def _curves(root):
  """The search's trial -> its best-so-far validation NDCG@100 by epoch."""
  at = tune.positions(_trials(root))
  return {at[t.number]: t.intermediate_values for t in _trials(root)}


def test_tune_is_built_on_public_optuna_alone():
  # Optuna's private names (Study._storage, Trial._trial_id, private modules) change
  # between releases; the search runs in Optuna's optimize, with no process pool or
  # interpreter of its own and nothing printed (it reports through a callback).
  for module in (tune, tune_space):
    source = open(module.__file__).read()
    tree = ast.parse(source)
    private = [ast.unparse(n) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__")]
    private += [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                and n.value in ("_storage", "_trial_id", "_study_id")]  # getattr
    imported = []
    for n in ast.walk(tree):
      if isinstance(n, (ast.Import, ast.ImportFrom)):
        imported += [a.name for a in n.names] + (
            [n.module] if getattr(n, "module", None) else [])
    private += [m for m in imported if any(p.startswith("_") for p in m.split("."))
                and m != "__future__"]
    assert private == []
    assert not {"subprocess", "multiprocessing", "concurrent.futures"} & set(imported)
    assert "PYTHONPATH" not in source
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name) and n.func.id == "print"]


def test_resume_with_other_settings_is_refused(full, data, tmp_path):
  root, _ = full
  base = _base(data["a"], data["cache"], lam=0.01)
  with pytest.raises(tune.TuneError, match="--lam: the study has 0.0, this command 0.01"):
    _search(base, root, _settings())
  with pytest.raises(tune.TuneError, match="--tune_seed"):
    _search(_base(data["a"], data["cache"]), root, _settings(tune_seed=3))
  # A study of the earlier tool (its own batches, no format) is refused, not mixed.
  old = optuna.create_study(storage=tune.storage_url(str(tmp_path)),
                            study_name=tune.STUDY_NAME, direction="maximize")
  old.set_user_attr("settings", {"tune_seed": 0})
  with pytest.raises(tune.TuneError, match="an earlier version of this tool"):
    _search(_base(data["a"], data["cache"]), tmp_path, _settings())


def test_test_users_are_never_read_for_a_decision(data, two, tmp_path):
  # The same search on data whose only difference is the test users' held-out items.
  root = tmp_path / "tune"
  rows = _search(_base(data["b"], data["cache"]), root, _settings(trials=2))
  assert _key(rows) == _key(two[1])
  a = json.load(open(os.path.join(two[0], "best.json")))
  b = json.load(open(os.path.join(root, "best.json")))
  assert a["data_dir"] != b["data_dir"]
  assert {**a, "data_dir": ""} == {**b, "data_dir": ""}
  for trial in os.listdir(os.path.join(root, "trials")):  # no trial was tested
    workdir = os.path.join(root, "trials", trial)
    assert all(r["split"] != "test" for r in _runs.records(workdir))
    assert json.load(open(os.path.join(workdir, "config.json")))["test"] is False


def test_best_json_is_the_best_complete_trial(full):
  root, rows = full
  best = max((r for r in rows if r["state"] == "complete"), key=lambda r: r["value"])
  cfg = configs.get_config(os.path.join(root, "best.json"))
  assert cfg.train and cfg.test
  assert cfg.lr == best["params"]["lr"]
  assert cfg.dropout_rate == best["params"]["dropout_rate"]
  assert cfg.anneal_cap == best["params"]["anneal_cap"]
  if best["trial"] == 0:
    assert cfg.anneal_epochs == 0 and cfg.total_anneal_steps == 40  # the base's own
  else:
    assert cfg.anneal_epochs == best["params"]["anneal_epochs"]
  assert cfg.dataset == "vaecf_dir" and cfg.number_of_epochs == 3
  table = open(os.path.join(root, "results.md")).read()
  assert f"Best: trial {best['trial']} " in table
  assert table.count("\n| ") == 1 + len(rows)  # header and one row per trial


def test_a_diverged_trial_fails_and_is_not_chosen(data, tmp_path):
  root = tmp_path / "tune"
  base = _base(data["a"], data["cache"], lr=100.0)  # NaN in the first epoch
  rows = _search(base, root, _settings(trials=1, space=("lr",)))
  assert rows[0]["state"] == "fail" and rows[0]["value"] is None
  assert "training diverged in epoch 1" in rows[0]["error"]
  assert not os.path.exists(os.path.join(root, "best.json"))
  assert "training diverged" in open(os.path.join(root, "results.md")).read()
  assert tune.best_row(rows) is None


def test_space_follows_the_model():
  ml1m = configs.get_config("ml1m")
  space = tune_space.make_space(ml1m, n_train_users=lambda: 4839)
  # The run-level parameters, then the model's own.
  assert [p.name for p in space.params] == [
      "lr", "dropout_rate", "anneal_cap", "anneal_epochs", "ema_decay",
      "batch_size_train", "hidden_dims"]  # the run's, then the model entry's
  assert space.base_values["hidden_dims"] == 1200
  # Trial 0 is the preset itself, its step-count anneal included.
  assert space.trial_config(ml1m, space.base_values) == ml1m.replace(test=False)
  assert space.base_values["anneal_epochs"] == 10_000 / 20  # 20 steps of 250 users
  # The anneal range is 0.2x to 5x the run's 100 epochs.
  dist = space.distributions["anneal_epochs"]
  assert (dist.low, dist.high) == (20.0, 500.0)
  # The paper's 200,000-step anneal is 10,000 epochs here: trial 0 runs it, the range is
  # not widened to hold it, and the note says so.
  notes = []
  paper = ml1m.replace(total_anneal_steps=200_000)
  wide = tune_space.make_space(paper, n_train_users=lambda: 4839, note=notes.append)
  assert wide.base_values["anneal_epochs"] == 10_000
  dist = wide.distributions["anneal_epochs"]
  assert (dist.low, dist.high) == (20.0, 500.0)
  assert any("anneal_epochs=10000, outside the searched range 20 to 500" in n
             for n in notes)
  assert wide.trial_config(paper, wide.base_values) == paper.replace(test=False)
  dae = tune_space.make_space(configs.get_config("ml1m_dae"), n_train_users=lambda: 4839)
  assert "anneal_cap" not in [p.name for p in dae.params]  # no KL term
  rec = tune_space.make_space(configs.get_config("ml1m_recvae"), n_train_users=lambda: 4839)
  names = [p.name for p in rec.params]
  assert "kl_gamma" in names and "anneal_cap" not in names
  cfg = rec.trial_config(configs.get_config("ml1m_recvae"),
                         {**rec.base_values, "hidden_dims": 400, "ema_decay": 0.0})
  assert cfg.hidden_dims == (400,) * 5 and cfg.ema_decay == 0.0 and not cfg.test
  with pytest.raises(tune.TuneError, match="anneal_cap does not apply"):
    tune_space.make_space(configs.get_config("ml1m_dae"), ("anneal_cap",))


def test_unknown_space_name_is_a_one_line_usage_error(tmp_path):
  proc = _tools.run("experiments.tune", f"--root={tmp_path / 'tune'}",
                    "--config=ml1m", "--data_dir=/nowhere", "--space=lr,bogus")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[0].startswith("error: --space: unknown parameter 'bogus'; expected names "
                             "from lr, dropout_rate"), lines
  assert lines[1].startswith("hint: ") and len(lines) == 2
  assert not os.path.exists(tmp_path / "tune" / "study.db")


def test_a_young_weight_average_is_not_pruned():
  cfg = configs.Config().replace(number_of_epochs=50, ema_decay=0.99)
  assert not tune.may_prune(cfg, 10, {"step": 99})   # the average spans 100 steps
  assert tune.may_prune(cfg, 10, {"step": 100})
  assert not tune.may_prune(cfg, 50, {"step": 10_000})  # the last epoch: complete
  plain = cfg.replace(ema_decay=0.0)
  assert tune.may_prune(plain, 1, {"step": 1})
  slow = cfg.replace(ema_decay=0.999)
  assert not tune.may_prune(slow, 40, {"step": 999})


def test_ease_searches_l2_and_nothing_of_the_trained_models(data, tmp_path):
  base = configs.get_config("ml1m_ease")
  with pytest.raises(tune.TuneError, match="l2 cannot start from the base: the base "
                                           "gives no values"):
    tune_space.make_space(base, ("l2",))
  with pytest.raises(tune.TuneError, match="lr does not apply to --model=ease"):
    tune_space.make_space(base.replace(l2=(500.0,)), ("lr",))
  space = tune_space.make_space(base.replace(l2=(500.0,)))
  assert [p.name for p in space.params] == ["l2"]
  assert "l2" not in [p.name for p in tune_space.make_space(
      configs.get_config("ml1m"), n_train_users=lambda: 4839).params]
  # A search: trial 0 fits the base's l2, later trials one sampled value each; the best
  # trial's value is the one with the best validation NDCG@100, and best.json holds it.
  ease_base = _base(data["a"], data["cache"], model="ease", hidden_dims=(), l2=(30.0,),
                    number_of_epochs=1)
  root = tmp_path / "tune"
  rows = _search(ease_base, root, _settings(trials=3, space=("l2",)))
  assert [r["state"] for r in rows] == ["complete"] * 3
  assert rows[0]["params"] == {"l2": 30.0}
  assert len({r["params"]["l2"] for r in rows}) == 3
  best = max(rows, key=lambda r: r["value"])
  cfg = configs.get_config(os.path.join(root, "best.json"))
  assert cfg.model == "ease" and cfg.l2 == (best["params"]["l2"],)
  fitted = loop.run(cfg.replace(test=False), str(tmp_path / "again"))
  assert fitted["train"]["best_validation"]["ndcg@100"] == pytest.approx(best["value"],
                                                                         abs=1e-6)


def test_only_the_best_and_the_interrupted_trials_keep_their_checkpoints(tmp_path):
  root = str(tmp_path)
  rows = [{"trial": 0, "state": "complete", "value": 0.30},
          {"trial": 1, "state": "complete", "value": 0.35},   # the best
          {"trial": 2, "state": "pruned", "value": None},
          {"trial": 3, "state": "fail", "value": None, "error": "training diverged"},
          {"trial": 4, "state": "fail", "value": None},        # interrupted: resumes
          {"trial": 5, "state": "running", "value": None}]
  for r in rows:
    os.makedirs(os.path.join(tune.trial_dir(root, r["trial"]), "checkpoints", "latest"))
    open(os.path.join(tune.trial_dir(root, r["trial"]), "metrics.jsonl"), "w").close()
  assert tune.drop_spent_checkpoints(root, rows) == [0, 2, 3]
  kept = [r["trial"] for r in rows
          if os.path.isdir(os.path.join(tune.trial_dir(root, r["trial"]), "checkpoints"))]
  assert kept == [1, 4, 5]
  # The logs stay: a finished trial's curve is still read from them.
  assert all(os.path.exists(os.path.join(tune.trial_dir(root, r["trial"]), "metrics.jsonl"))
             for r in rows)
  assert tune.drop_spent_checkpoints(root, rows) == []  # nothing left to remove
