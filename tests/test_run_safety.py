"""Runs that must stop or refuse instead of passing quietly: divergence, workdirs that
cannot hold a run, changed settings on resume, lost or damaged checkpoints, usage errors,
and the permissions of the files a run writes."""

import glob
import json
import os
import stat
import subprocess
import sys

import pytest

from jax_vaecf.training import epochs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import run_folder
from jax_vaecf.training import checkpoint
from jax_vaecf.core import files as files_lib

import _tools
import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _runs.movielens_dir(tmp_path_factory, "mls")


def _cfg(data_dir, tmp_path, **kw):
  return _runs.small_config(data_dir, **{"cache_dir": os.path.join(data_dir, "cache"),
                                         "number_of_epochs": 2, **kw})


_records = _runs.records


def _steps(workdir, kind):
  d = os.path.join(workdir, "checkpoints", kind)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _cli(args, timeout=120):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------- divergence


def test_a_diverged_run_stops_saves_nothing_and_exits_non_zero(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.TrainingDivergedError, match=r"diverged in epoch 1: the loss is nan"):
    loop.run(_cfg(data_dir, tmp_path, lr=1e30), workdir)
  assert _steps(workdir, "best") == [] and _steps(workdir, "latest") == []
  records = _records(workdir)
  assert [r["split"] for r in records] == ["diverged"]  # no validation, no test line
  assert "lower --lr (now 1e+30)" in records[0]["message"]


def test_divergence_after_good_epochs_keeps_the_good_checkpoints(data_dir, tmp_path,
                                                                  monkeypatch):
  workdir = str(tmp_path / "late")
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=2, test=False)
  loop.run(cfg, workdir)
  best = _steps(workdir, "best")
  # The parameters turn non-finite in epoch 3: what an overflow would do.
  real = loop.check_finite

  def poisoned(cfg, state, host_metrics, epoch, last_saved_epoch):
    import jax
    import jax.numpy as jnp
    params = jax.tree_util.tree_map(lambda a: a * jnp.nan, state.params)
    return real(cfg, state.replace(params=params), host_metrics, epoch, last_saved_epoch)

  monkeypatch.setattr(epochs, "check_finite", poisoned)
  with pytest.raises(loop.TrainingDivergedError, match="the last checkpoint is epoch 2"):
    loop.run(cfg.replace(number_of_epochs=3), workdir)
  assert _steps(workdir, "best") == best  # never becomes best
  assert [r["epoch"] for r in _records(workdir) if r["split"] == "train"] == [1, 2]


def test_diverged_cli_exits_non_zero_with_one_error_line(data_dir, tmp_path):
  r = _cli(["--config=ml-latest-small", f"--data_dir={data_dir}",
            f"--cache_dir={tmp_path / 'cache'}", "--number_of_epochs=1", "--lr=1e30",
            "--hidden_dims=16", "--latent_dim=4", f"--workdir={tmp_path / 'w'}"])
  assert r.returncode == 1
  assert "error: training diverged" in r.stderr and "Traceback" not in r.stderr
  assert "test (" not in r.stdout and "val ndcg" not in r.stdout


# ------------------------------------------------------------------------- workdirs


def test_workdir_that_is_a_file_fails_before_any_data_work(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  cfg = _cfg(str(tmp_path / "no_data"), tmp_path)  # the data is missing too
  with pytest.raises(ValueError, match="this is a file, expected a folder"):
    loop.run(cfg, str(f))


def test_unwritable_workdir_fails_before_any_data_work(tmp_path, monkeypatch):
  # Root ignores permission bits, so the refusal of the file system is simulated.
  def refuse(path, mode="wb", **kw):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(files_lib, "atomic_write", refuse)
  cfg = _cfg(str(tmp_path / "no_data"), tmp_path)
  with pytest.raises(ValueError, match="cannot write there \\(Permission denied\\)"):
    loop.run(cfg, str(tmp_path / "ro"))


def test_test_mode_leaves_the_run_record_alone(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=1)
  loop.run(cfg, workdir)
  path = os.path.join(workdir, "config.json")
  before = open(path).read()
  loop.run(cfg.replace(train=False, batch_size_validation=32, test_ks=(7,)), workdir)
  assert open(path).read() == before


def test_resume_with_other_training_settings_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=1, test=False)
  loop.run(cfg, workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  log_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  for change in ({"lr": 0.01}, {"seed": 1}, {"total_anneal_steps": 10},
                 {"anneal_schedule": "constant"}):
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"--{name}: the run has .*, this command asks"):
      loop.run(cfg.replace(number_of_epochs=2, **change), workdir)
    assert open(os.path.join(workdir, "config.json")).read() == config_before
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == log_before


def test_resume_may_extend_the_run_and_the_change_is_logged(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=1, test=False)
  loop.run(cfg, workdir)
  loop.run(cfg.replace(number_of_epochs=2), workdir)
  records = _records(workdir)
  changes = [r for r in records if r["split"] == "config"]
  assert changes == [{"split": "config", "epoch": 1,
                      "changes": {"number_of_epochs": {"from": 1, "to": 2}}}]
  assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2]
  assert json.load(open(os.path.join(workdir, "config.json")))["number_of_epochs"] == 2


# ---------------------------------------------------------------------- checkpoints


def _test_line(res):
  return {k: res["test"][k] for k in ("ndcg@100", "recall@20", "recall@50", "epoch")}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """The test line of a 2-epoch run that was never stopped."""
  tmp = tmp_path_factory.mktemp("full")
  return _test_line(loop.run(_cfg(data_dir, tmp, number_of_epochs=2), str(tmp / "run")))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path,
                                                                  uninterrupted):
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=2)
  workdir = str(tmp_path / "cut")
  loop.run(cfg.replace(test=False), workdir)
  first, newest = _steps(workdir, "latest")  # two kept: one to fall back on
  state_dir = os.path.join(workdir, "checkpoints", "latest", str(newest), "state")
  victim = max(glob.glob(os.path.join(state_dir, "**", "d", "*"), recursive=True),
               key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(7)
  with pytest.warns(RuntimeWarning, match=f"{os.path.basename(victim)}: 7 bytes, the "
                    "checkpoint wrote \\d+ \\(truncated"):
    resumed = loop.run(cfg, workdir)  # epoch 2 is trained again from epoch 1's state
  assert _test_line(resumed) == uninterrupted
  assert [r["epoch"] for r in _records(workdir) if r["split"] == "train"] == [1, 2]


def test_lost_latest_checkpoints_resume_from_the_best_or_refuse(data_dir, tmp_path,
                                                                uninterrupted):
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=2)
  workdir = str(tmp_path / "cut")
  loop.run(cfg.replace(number_of_epochs=1, test=False), workdir)
  import shutil
  shutil.rmtree(os.path.join(workdir, "checkpoints", "latest"))
  with pytest.warns(RuntimeWarning, match="resuming from the best checkpoint's state"):
    resumed = loop.run(cfg, workdir)
  assert _test_line(resumed) == uninterrupted
  # With every checkpoint gone the log is not silently overwritten from epoch 0.
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  log_before = open(os.path.join(workdir, "metrics.jsonl")).read()
  with pytest.raises(ValueError, match="metrics.jsonl records a checkpoint at epoch 2 but "
                     "none can be resumed"):
    loop.run(cfg.replace(number_of_epochs=3), workdir)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == log_before


def test_a_run_killed_before_its_first_checkpoint_starts_over(data_dir, tmp_path):
  # checkpoint_every=5: epochs 1-2 were logged without a checkpoint, so epoch 0 is right.
  workdir = str(tmp_path / "run")
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=6, checkpoint_every=5, test=False)
  split, ck, built = _pieces(cfg, workdir)
  loop.train_and_validate(cfg, workdir, split, ck, built, stop_after_epochs=2)
  ck.close()
  assert [r["checkpointed"] for r in _records(workdir)] == [False, False]
  loop.run(cfg.replace(number_of_epochs=2), workdir)
  assert [r["epoch"] for r in _records(workdir) if r["split"] == "train"] == [1, 2]


def _pieces(cfg, workdir):
  split = loop.load_data(cfg)
  built = loop.build(cfg, split.n_items)
  os.makedirs(workdir, exist_ok=True)
  ck = checkpoint.RunCheckpoints(workdir, run_folder.identity(cfg, split))
  return split, ck, built


# ---------------------------------------------------------------- usage and files


@pytest.mark.parametrize("args, message", [
    (["--number_of_epochs=-1"], "error: bad setting: number_of_epochs must be >= 0"),
    (["--config=nope"], "error: unknown config 'nope'"),
    (["extra_argument"], "error: unexpected arguments: extra_argument"),
])
def test_usage_errors_print_the_message_and_one_hint(args, message, tmp_path):
  r = _tools.run("experiments.train", f"--workdir={tmp_path / 'w'}", *args)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert lines == [message + lines[0][len(message):],
                   "hint: python -m experiments.train --help lists every flag"]
  assert lines[0].startswith(message)


def test_run_files_get_the_users_normal_permissions(data_dir, tmp_path):
  old = os.umask(0o022)
  try:
    workdir = str(tmp_path / "run")
    loop.run(_cfg(data_dir, tmp_path, number_of_epochs=1), workdir)
  finally:
    os.umask(old)
  for name in ("config.json", "item_ids.npy", "metrics.jsonl"):
    assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) == 0o644, name
