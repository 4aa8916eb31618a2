"""Test accuracy over several training seeds: ``python -m experiments.accuracy``.

  python -m experiments.accuracy --config=ml1m --data_dir=DIR --seeds=0,1,2,3,4 \
      --root=runs/acc_ml1m [--model=multdae] [--precision=bf16] [--number_of_devices=4]

Trains (or resumes) one run per seed under ``ROOT/seed_N``, each keeping its best
checkpoint by validation NDCG@100, scores it on the test users, and prints the mean and
standard error over seeds of NDCG@100, Recall@20 and Recall@50 as a markdown row. The
split is the same for every seed (``--split_seed``); only initialisation, batch order,
dropout and noise change. Results are appended as JSON lines to ``ROOT/summary.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from experiments import configs
from experiments import loop

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "ml1m", "Preset name.")
flags.DEFINE_string("root", None, "Folder for the per-seed workdirs and summary.jsonl.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds.")
flags.DEFINE_list("set", [], "Overrides field=value, e.g. --set=lr=0.002,dropout_rate=0.6.")
flags.DEFINE_string("data_dir", None, "Overrides the preset's data_dir.")
flags.DEFINE_string("model", None, "multvae or multdae.")
flags.DEFINE_string("precision", None, "fp32, bf16 or fp16.")
flags.DEFINE_integer("number_of_devices", None, "Devices (0 = all).")
flags.DEFINE_string("protocol", None, "heldout_users or per_user.")
flags.DEFINE_string("dataset", None, "Overrides the preset's dataset.")
flags.DEFINE_string("fold", None, "ml-100k official split (per_user), e.g. u1.")

METRICS = ("ndcg@100", "recall@20", "recall@50", "ndcg@20", "recalln@20")


def parse_overrides(items: list[str], cfg: configs.Config) -> dict:
  """``['lr=0.002', 'hidden_dims=600;200']`` -> typed changes for ``cfg``."""
  changes = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set: expected field=value, got {item!r}")
    name, value = item.split("=", 1)
    if not hasattr(cfg, name):
      raise ValueError(f"--set: unknown field {name!r}")
    old = getattr(cfg, name)
    if isinstance(old, bool):
      changes[name] = value.lower() in ("1", "true", "yes")
    elif isinstance(old, tuple):
      changes[name] = tuple(int(v) for v in value.split(";") if v)
    else:
      changes[name] = type(old)(value)
  return changes


def summarize(results: list[dict]) -> dict:
  """Mean and standard error over seeds of each metric's per-run value."""
  out = {"n_seeds": len(results)}
  for k in METRICS:
    vals = np.array([r[k] for r in results if k in r], np.float64)
    if vals.size:
      out[k] = float(vals.mean())
      out[k + "_se"] = float(vals.std(ddof=1) / np.sqrt(vals.size)) if vals.size > 1 else 0.0
  return out


def main(argv):
  cli.start(argv, required=("root",))
  try:
    cfg = configs.get_config(FLAGS.config)
    changes = parse_overrides(FLAGS.set, cfg)
    for name in ("data_dir", "model", "precision", "number_of_devices", "protocol",
                 "dataset", "fold"):
      if getattr(FLAGS, name) is not None:
        changes[name] = getattr(FLAGS, name)
    cfg = cfg.replace(train=True, test=True, **changes)
    configs.validate(cfg)
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  results = []
  for seed in seeds:
    workdir = os.path.join(FLAGS.root, f"seed_{seed}")
    print(f"== seed {seed}: {workdir}", flush=True)
    try:
      res = loop.run(cfg.replace(seed=seed), workdir)["test"]
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    results.append(res)
  s = summarize(results)
  cells = " | ".join(f"{s[k]:.4f} ± {s[k + '_se']:.4f}" for k in METRICS[:3])
  print(f"| {cfg.dataset} | {cfg.model} | {cfg.precision} | {len(seeds)} seeds | {cells} |")
  os.makedirs(FLAGS.root, exist_ok=True)
  with open(os.path.join(FLAGS.root, "summary.jsonl"), "a") as f:
    f.write(json.dumps({"config": FLAGS.config, "overrides": FLAGS.set,
                        "settings": {k: str(v) for k, v in changes.items()},
                        "seeds": seeds, **s,
                        "per_seed": [{k: r[k] for k in METRICS if k in r}
                                     for r in results]}) + "\n")


if __name__ == "__main__":
  cli.run(main)
