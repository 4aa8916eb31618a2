"""End to end on CPU: train -> checkpoint -> test, resume after a kill, bad flags."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import run_folder
from jax_vaecf.training import checkpoint
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.training import reporting

import _tools
import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _runs.movielens_dir(tmp_path_factory, "mls")


def _cfg(data_dir, tmp_path, **kw):
  return _runs.small_config(data_dir, **{"cache_dir": str(tmp_path / "cache"), **kw})


_records = _runs.records


def test_train_then_test_mode_reloads_the_best_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _cfg(data_dir, tmp_path)
  res = loop.run(cfg, workdir)
  train_records = [r for r in _records(workdir) if r["split"] == "train"]
  assert [r["epoch"] for r in train_records] == [1, 2, 3, 4]  # one record per epoch
  assert all("val_ndcg@100" in r and "loss" in r for r in train_records)
  best_epoch = int(np.argmax([r["val_ndcg@100"] for r in train_records])) + 1
  assert res["test"]["epoch"] == best_epoch
  # Test mode alone, from the workdir, gives the same numbers.
  again = loop.run(cfg.replace(train=False), workdir)
  for k in ("ndcg@100", "recall@20", "recall@50", "ndcg@5", "n_users"):
    assert again["test"][k] == res["test"][k]
  assert os.path.exists(os.path.join(workdir, "item_ids.npy"))
  assert json.load(open(os.path.join(workdir, "config.json")))["model_settings"]["latent_dim"] == 4


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_after_interruption_matches_one_run(data_dir, tmp_path, ema_decay):
  # With a weight average the checkpoint must carry it: a resumed run that restarted
  # the average would validate and test other weights.
  cfg = _cfg(data_dir, tmp_path, ema_decay=ema_decay)
  full = loop.run(cfg, str(tmp_path / "full"))
  # Interrupted: stop after two epochs (their checkpoint complete), as a kill would.
  workdir = str(tmp_path / "cut")
  split = loop.load_data(cfg)
  built = loop.build(cfg, split.n_items)
  ck = checkpoint.RunCheckpoints(workdir, run_folder.identity(cfg, split))
  loop.train_and_validate(cfg, workdir, split, ck, built, stop_after_epochs=2)
  ck.close()
  # A save killed half-way leaves a temporary folder; it must be ignored.
  os.makedirs(os.path.join(workdir, "checkpoints", "latest", "99.orbax-checkpoint-tmp-1"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"split": "train", "epoch": 3, "lo')  # a line cut by the kill
  resumed = loop.run(cfg, workdir)
  assert resumed["test"]["ndcg@100"] == full["test"]["ndcg@100"]
  assert resumed["test"]["recall@20"] == full["test"]["recall@20"]
  epochs = [r["epoch"] for r in _records(workdir) if r["split"] == "train"]
  assert epochs == [1, 2, 3, 4]
  for key in ("loss", "val_ndcg@100"):  # validation scores the average when one is kept
    a = [r[key] for r in _records(str(tmp_path / "full")) if r["split"] == "train"]
    b = [r[key] for r in _records(workdir) if r["split"] == "train"]
    assert a == b


def test_workdir_of_another_model_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  loop.run(_cfg(data_dir, tmp_path, number_of_epochs=1, test=False), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest")))
  with pytest.raises(ValueError, match="--latent_dim: the run has 4, this command asks 5"):
    loop.run(_cfg(data_dir, tmp_path, number_of_epochs=1, latent_dim=5), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == before


def test_benchmark_mode_reports_timings(data_dir, tmp_path, capsys):
  cfg = _cfg(data_dir, tmp_path, train=False, test=False, benchmark=True,
             number_of_epochs=3, warm_up_epochs=1)
  res = loop.run(cfg, str(tmp_path / "bench"), report=reporting.print_record)
  s = res["train"]
  assert s["measured_epochs"] == 2 and s["train_users_per_s"] > 0
  assert "mean_validation_time_s" in s
  assert "training users/s" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "bench" / "checkpoints")  # benchmark writes nothing


def _cli(args, timeout=120):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=nope"], "unknown config"),
    (["--number_of_epochs=-1"], "number_of_epochs must be >= 0"),
    (["--batch_size_train=0"], "batch_size_train must be >= 1"),
    (["--anneal_cap=1.5"], "anneal_cap must be in [0, 1]"),
    (["--ema_decay=1"], "ema_decay must be in [0, 1)"),
    (["--test_ks=5,x"], "expected comma-separated integers"),
    (["--precision=fp8"], "precision must be"),
    (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
])
def test_bad_flags_fail_fast(args, message, tmp_path):
  r = _tools.run("experiments.train", "--workdir", str(tmp_path / "w"), *args)
  assert r.returncode != 0
  assert message in r.stderr + r.stdout
  assert not os.path.exists(tmp_path / "w")  # nothing was started


def test_validate_names_the_bad_setting():
  with pytest.raises(ValueError, match="output_chunk_size must be >= 1"):
    configs.validate(configs.get_config("ml1m").replace(output_chunk_size=0))
  for name in configs.PRESETS:  # every preset is a valid setting
    configs.validate(configs.get_config(name))


def test_missing_data_dir_and_large_k_fail_before_work(data_dir, tmp_path):
  r = _tools.run("experiments.train", "--config=ml-latest-small", "--data_dir",
                 str(tmp_path / "none"), "--workdir", str(tmp_path / "w"))
  assert r.returncode != 0 and "does not exist" in r.stderr
  with pytest.raises(ValueError, match=r"test_ks \[500\] exceed the \d+ items"):
    loop.run(_cfg(data_dir, tmp_path, test_ks=(500,)), str(tmp_path / "w2"))
  assert not os.path.exists(tmp_path / "w2" / "checkpoints")


def test_sigkill_and_restart_ends_like_an_uninterrupted_run(data_dir, tmp_path):
  args = ["--config=ml-latest-small", f"--data_dir={data_dir}",
          f"--cache_dir={tmp_path / 'cache'}", "--number_of_epochs=6",
          "--batch_size_train=64", "--batch_size_validation=64", "--hidden_dims=16",
          "--latent_dim=4", "--total_anneal_steps=50", "--test_ks=5,10"]
  full = _cli(args + [f"--workdir={tmp_path / 'full'}"])
  assert full.returncode == 0, full.stderr[-2000:]
  workdir = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args,
                           f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  log = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and log.read_text().count("\n") >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  again = _cli(args + [f"--workdir={workdir}"])
  assert again.returncode == 0, again.stderr[-2000:]
  test_line = lambda out: [l for l in out.splitlines() if l.startswith("test (")][0]
  assert test_line(again.stdout) == test_line(full.stdout)


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_four_devices_give_the_one_device_result(data_dir, tmp_path, mode):
  # 60 users per batch over 4 devices: 15 each; 100 over 4 with padding in the last batch.
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=2, batch_size_train=60)
  one = loop.run(cfg, str(tmp_path / "one"))
  four = loop.run(cfg.replace(number_of_devices=4, parallel=mode), str(tmp_path / "four"))
  for k in ("ndcg@100", "recall@20", "recall@50"):
    assert four["test"][k] == pytest.approx(one["test"][k], abs=1e-5)
  a = [r["loss"] for r in _records(str(tmp_path / "one")) if r["split"] == "train"]
  b = [r["loss"] for r in _records(str(tmp_path / "four")) if r["split"] == "train"]
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_batch_not_dividing_over_devices_is_padded(data_dir, tmp_path):
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=1, batch_size_train=62, test=False)
  one = loop.run(cfg, str(tmp_path / "one"))
  four = loop.run(cfg.replace(number_of_devices=4), str(tmp_path / "four"))
  assert four["train"]["best_validation"]["ndcg@100"] == pytest.approx(
      one["train"]["best_validation"]["ndcg@100"], abs=1e-5)


def test_more_devices_than_exist_fails_fast(data_dir, tmp_path):
  with pytest.raises(ValueError, match="asked for 9 devices"):
    loop.run(_cfg(data_dir, tmp_path, number_of_devices=9), str(tmp_path / "w"))


def test_preprocessing_reports_its_stages_then_uses_the_cache(data_dir, tmp_path, capsys):
  cfg = _cfg(data_dir, tmp_path, cache_dir=str(tmp_path / "fresh_cache"))
  loop.load_data(cfg, reporting.print_record)
  err = capsys.readouterr().err
  assert "preprocessing ml-latest-small: reading" in err and "splitting" in err
  loop.load_data(cfg, reporting.print_record)
  assert "preprocessing" not in capsys.readouterr().err  # from the cache: nothing to do


def test_weight_average_is_tested_served_and_part_of_the_run_identity(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _cfg(data_dir, tmp_path, number_of_epochs=2, ema_decay=0.9)
  res = loop.run(cfg, workdir)
  # The best checkpoint's average is what test mode scored and what a server loads.
  split = loop.load_data(cfg)
  built = loop.build(cfg, split.n_items)
  steps = built.steps
  ck = checkpoint.RunCheckpoints(workdir, run_folder.identity(cfg, split))
  state, _ = ck.restore_best(loop.fresh_state(cfg, built))
  ck.close()
  of_average = loop.evaluate(steps, state.ema_params, split.test, 64)
  of_weights = loop.evaluate(steps, state.params, split.test, 64)
  assert res["test"]["ndcg@100"] == of_average["ndcg@100"]
  assert of_weights["ndcg@100"] != of_average["ndcg@100"]
  rec = recommend.Recommender.from_workdir(workdir)
  for a, b in zip(jax.tree_util.tree_leaves(rec.params),
                  jax.tree_util.tree_leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Resuming that workdir without the average is refused before anything is written.
  with pytest.raises(ValueError, match="--ema_decay: the run has 0.9, this command asks 0.0"):
    loop.run(cfg.replace(ema_decay=0.0, number_of_epochs=3), workdir)


def test_every_setting_has_one_help_line_that_the_cli_shows():
  import re
  names = configs.setting_names()  # the run's and every model's own
  assert all(configs.help_of(name).strip() for name in names)
  r = subprocess.run([sys.executable, "-m", "experiments.train", "--helpfull"], cwd=REPO,
                     capture_output=True, text=True, timeout=60)
  text = re.sub(r"\s+", " ", r.stdout + r.stderr)
  for name in names:
    words = " ".join(configs.help_of(name).split()[:4])
    assert re.search(rf"--(\[no\])?{name}: {re.escape(words)}", text), name
