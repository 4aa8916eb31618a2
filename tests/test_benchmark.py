"""The benchmark's synthetic data has the asked-for shape, the benchmark runs end to end
(one device and a batch split over two) and reports what it promises, and it takes its
settings as ``train`` does (``--config`` and the setting flags)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import synthetic

import _tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_data_has_the_requested_shape():
  train, split = synthetic.make_dataset(n_users=3000, n_items=800, n_eval_users=400,
                                        mean_per_user=30, seed=1)
  assert train.shape == (3000, 800) and split.fold_in.shape == (400, 800)
  per_user = np.diff(train.indptr)
  assert per_user.min() >= 5
  assert 27 <= per_user.mean() <= 31
  assert per_user.max() > 3 * per_user.mean()  # heavy-tailed activity
  # Binary, no repeated item inside a row (CSR rows are sorted and strictly increasing).
  assert set(np.unique(train.data)) == {1.0}
  for u in range(0, 3000, 97):
    cols = train.indices[train.indptr[u]:train.indptr[u + 1]]
    assert np.all(np.diff(cols) > 0)
  pop = np.sort(np.bincount(train.indices, minlength=800))[::-1]
  assert pop[0] > 10 * np.median(pop)  # Zipf-like popularity
  # Fold-in and held-out are disjoint, held-out is ~20% of an evaluation user's items.
  assert split.fold_in.multiply(split.heldout).nnz == 0
  share = split.heldout.nnz / (split.heldout.nnz + split.fold_in.nnz)
  assert 0.15 < share < 0.21
  # The same seed gives the same data.
  again, _ = synthetic.make_dataset(n_users=3000, n_items=800, n_eval_users=400,
                                    mean_per_user=30, seed=1)
  assert (again != train).nnz == 0


_SHAPE = ["--n_users=400", "--n_items=300", "--mean_per_user=12"]


def _benchmark(*args, timeout=300):
  cmd = [sys.executable, "-m", "experiments.benchmark", *_SHAPE, *args]
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("devices", [1, 2])
def test_benchmark_runs_and_reports(tmp_path, devices):
  out = tmp_path / "bench.jsonl"
  proc = _benchmark("--batch_size_train=100", "--steps=2", "--eval_users=60",
                    "--batch_size_validation=40", f"--number_of_devices={devices}",
                    f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| items | batch |" in proc.stdout  # the table
  record = json.loads(out.read_text().splitlines()[-1])
  (r,) = record["results"]
  assert r["timed_steps"] == 2 and r["steps_per_epoch"] == 4 and r["extrapolated"]
  # Both are rounded in the record (epoch_s to 10 ms).
  assert r["epoch_s"] == pytest.approx(r["step_ms"] * 4 / 1000, rel=0.01, abs=0.006)
  assert r["number_of_devices"] == devices and r["input_format"] == "sparse"
  assert np.isfinite(r["final_loss"]) and r["final_loss"] > 0
  assert r["eval_users"] == 60 and r["eval_users_per_s"] > 0
  assert r["peak_host_gb"] > 0
  # XLA's operation count of the step, summed over the devices, against the dense
  # products of the paper's Mult-VAE (300 -> 600 -> 2 x 200, 200 -> 600 -> 300 items):
  # forward, input and kernel gradients, 2 flops per multiply-add, at batch 100. The
  # rest (sparse first layer, softmax, Adam) adds a few percent at this shape.
  dense = 3 * 2 * 100 * (600 * 400 + 200 * 600 + 600 * 300)
  assert dense <= r["xla_gflop_per_step"] * 1e9 <= 1.2 * dense
  # The tool rounds the rate to 0.1 GFLOP/s (0.05 off at most: 1.4% of the 3.6 GFLOP/s
  # of a loaded 2-core machine) and its inputs to 3 and 2 decimals.
  implied = r["xla_gflop_per_step"] / r["step_ms"] * 1e3
  assert abs(r["xla_gflop_per_s"] - implied) <= 0.05 + 0.01 * implied, (r, implied)
  for key in ("jax", "jaxlib", "flax", "optax", "numpy", "python", "cpu_model"):
    assert record["versions"][key]


def test_benchmark_takes_the_preset_and_the_old_flag_names(tmp_path):
  out = tmp_path / "bench.jsonl"
  # ml1m's preset: batch 250, hidden layer 1,200, moving average 0.995; --batch_size and
  # --eval_batch_size are the deprecated names of the batch sizes.
  proc = _benchmark("--config=ml1m", "--batch_size=100", "--eval_batch_size=40",
                    "--steps=1", "--eval_users=60", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  (r,) = json.loads(out.read_text().splitlines()[-1])["results"]
  assert r["batch_size"] == 100 and r["steps_per_epoch"] == 4
  assert r["ema_decay"] == 0.995 and r["model"] == "multvae"
  assert np.isfinite(r["final_loss"]) and r["eval_users_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--number_of_epochs=3", "--data_dir=x"],
     "--data_dir, --number_of_epochs: not used by the benchmark (synthetic data"),
    (["--batch_size=100", "--batch_size_train=200"],
     "--batch_size is --batch_size_train: give one of them"),
    (["--parallel=pmap"], "--parallel: the benchmark times the sharded mode only"),
])
def test_benchmark_refuses_settings_it_would_ignore(args, message):
  proc = _tools.run("experiments.benchmark", *_SHAPE, *args, "--steps=1",
                    "--eval_users=0")
  assert proc.returncode == 2
  error, hint = proc.stderr.splitlines()  # one line and the hint, before any work
  assert error.startswith(f"error: {message}") and hint.startswith("hint: ")


def test_benchmark_refuses_a_nonsense_data_shape():
  # The shape flags are declared once (experiments.synthetic) for the benchmark and the
  # PyTorch baseline; a shape below 1 is refused when the flags are parsed.
  proc = _tools.run("experiments.benchmark", *_SHAPE, "--n_users=0")
  assert proc.returncode != 0
  assert "--n_users=0: 0 is not a positive integer" in proc.stderr


def test_benchmark_counts_a_recvae_round_against_a_multvae_epoch(tmp_path):
  out = tmp_path / "bench.jsonl"
  # One batch of all 200 users: few nnz buckets to compile.
  proc = _benchmark("--model=recvae", "--n_users=200", "--batch_size_train=200",
                    "--steps=1", "--eval_users=0", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  base, r = json.loads(out.read_text().splitlines()[-1])["results"]
  assert (base["model"], r["model"]) == ("multvae", "recvae")
  assert r["passes_per_epoch"] == 4 and base["passes_per_epoch"] == 1
  # The dense products of a round, per step of a pass (batch 200, widths 600, latent
  # 200, 300 items): an encoder step runs 4 dense 600 x 600 layers and the 600 -> 2 x 200
  # heads forward and backward, the frozen prior encoder forward, and the output layer
  # forward with its input gradient; a decoder step runs the encoder forward, and the
  # output layer forward with its kernel gradient. Three encoder steps and one decoder.
  body = 4 * 600 * 600 + 600 * 400
  encoder = 2 * 200 * (3 * body + body + 2 * 200 * 300)
  decoder = 2 * 200 * (body + 2 * 200 * 300)
  per_step = (3 * encoder + decoder) / 4
  assert per_step <= r["xla_gflop_per_step"] * 1e9 <= 1.2 * per_step
  phases = r["xla_phases"]
  assert set(phases) == {"encoder", "decoder"}
  assert encoder <= phases["encoder"]["gflop"] * 1e9 <= 1.2 * encoder
  assert decoder <= phases["decoder"]["gflop"] * 1e9 <= 1.2 * decoder
  assert r["xla_gflop_per_step"] == pytest.approx(
      (3 * phases["encoder"]["gflop"] + phases["decoder"]["gflop"]) / 4, rel=0.01)
  assert r["vs_multvae_epoch_gflop"] == pytest.approx(
      4 * r["xla_gflop_per_step"] / base["xla_gflop_per_step"], rel=0.01)
  assert "its floating-point operations" in proc.stdout
