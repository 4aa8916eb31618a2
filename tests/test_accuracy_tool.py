"""The multi-seed accuracy tool: it runs exactly what ``train`` runs with the same flags
(one run per seed), and its mean / standard error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parses the command line once with both tools' flags, then records the Config and workdir
# each tool hands to loop.run (stubbed: no data, no training), so the two can be compared
# field by field. A subprocess, because the flags are process-wide.
_DRIVER = r"""
import dataclasses, json, os, sys
from absl import app, flags
from experiments import accuracy, cli, train
from jax_vaecf.training import engine as loop
from jax_vaecf.core import distributed

runs = []
def fake_run(cfg, workdir, report=None):
  assert report is not None  # both tools print what the run reports
  runs.append({"cfg": dataclasses.asdict(cfg), "workdir": workdir})
  return {"test": {"ndcg@100": 0.40 + cfg.seed / 100, "recall@20": 0.3, "recall@50": 0.5}}
loop.run = fake_run
distributed.initialize = lambda *args, **kwargs: None

accuracy.define_flags()
train.define_flags()  # the same Config flags again: only --workdir is new
FLAGS = flags.FLAGS
FLAGS(sys.argv)
out = {"has_set_flag": "set" in FLAGS}
accuracy.main(["accuracy"])
out["accuracy"], runs[:] = list(runs), []
for seed in [int(s) for s in FLAGS.seeds]:
  FLAGS.seed = seed
  FLAGS.workdir = os.path.join(FLAGS.root, f"seed_{seed}")
  train.main(["train"])
out["train"], runs[:] = list(runs), []
out["errors"] = []
FLAGS.seed = None
for bad in ({"seed": 1}, {"test": False}):  # one bad setting at a time
  for name, value in bad.items():
    FLAGS[name].value = value
  try:
    accuracy.main(["accuracy"])
    out["errors"].append(None)
  except app.UsageError as e:
    out["errors"].append(str(e))
  for name in bad:
    FLAGS[name].value = None
print(json.dumps(out))
"""


def test_accuracy_runs_what_train_runs_with_the_same_flags(tmp_path):
  root = tmp_path / "acc"
  flags_ = ["--config=ml1m", "--data_dir=/nowhere", "--hidden_dims=600", "--ema_decay=0",
            "--lr=0.002", "--use_tf_amp", "--number_of_gpus=2", "--nodownload"]
  proc = subprocess.run([sys.executable, "-c", _DRIVER, *flags_, f"--root={root}",
                         "--seeds=3,7"], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not out["has_set_flag"]  # --set=a=b is gone: the setting flags replace it
  acc, train = out["accuracy"], out["train"]
  assert [r["cfg"] for r in acc] == [r["cfg"] for r in train]
  assert [r["workdir"] for r in acc] == [str(root / "seed_3"), str(root / "seed_7")]
  assert [r["workdir"] for r in acc] == [r["workdir"] for r in train]
  cfg = acc[0]["cfg"]
  assert [r["cfg"]["seed"] for r in acc] == [3, 7]
  assert cfg["dataset"] == "ml-1m" and cfg["batch_size_train"] == 250  # the preset
  assert cfg["model_settings"]["hidden_dims"] == [600] and cfg["ema_decay"] == 0 and cfg["lr"] == 0.002
  assert cfg["precision"] == "bf16" and cfg["number_of_devices"] == 2  # reference flags
  assert "| ml-1m | multvae | bf16 | 2 seeds | 0.4500 ± 0.0200 |" in proc.stdout
  (line,) = (root / "summary.jsonl").read_text().splitlines()
  summary = json.loads(line)
  assert summary["config"] == "ml1m" and summary["seeds"] == [3, 7]
  assert summary["settings"]["hidden_dims"] == "(600,)"
  assert summary["settings"]["precision"] == "bf16"
  assert summary["ndcg@100"] == pytest.approx(0.45)
  # A fixed --seed would make every run the same; --notest leaves nothing to report.
  assert out["errors"] == ["--seed: accuracy trains one run per seed of --seeds",
                           "--notest: accuracy reports each seed's test metrics"]


def test_summarize_mean_and_standard_error():
  runs = [{"ndcg@100": v, "recall@20": 2 * v} for v in (0.40, 0.41, 0.42)]
  s = accuracy.summarize(runs)
  assert s["n_seeds"] == 3
  assert s["ndcg@100"] == pytest.approx(0.41)
  assert s["ndcg@100_se"] == pytest.approx(np.std([0.40, 0.41, 0.42], ddof=1) / np.sqrt(3))
  assert s["recall@20"] == pytest.approx(0.82)
  assert "recall@50" not in s
