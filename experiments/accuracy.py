"""Test accuracy over several training seeds: ``python -m experiments.accuracy``.

  python -m experiments.accuracy --config=ml1m --data_dir=DIR --seeds=0,1,2,3,4 \
      --root=runs/acc_ml1m [--model=multdae] [--precision=bf16] [--number_of_devices=4]

Takes exactly ``experiments.train``'s settings (``--config=PRESET``, default ``ml20m``,
and the flag of any Config field, e.g. ``--hidden_dims=600 --ema_decay=0``; ``--help``
lists them) and runs, for each seed of ``--seeds``, what ``train`` runs with those flags
and ``--seed=N --workdir=ROOT/seed_N``: it trains (or resumes) the run, keeping its best
checkpoint by validation NDCG@100, and scores it on the test users. It then prints the
mean and standard error over seeds of NDCG@100, Recall@20 and Recall@50 as a markdown
row. The split is the same for every seed (``--split_seed``); only initialisation, batch
order, dropout and noise change. Results are appended as JSON lines to
``ROOT/summary.jsonl``. A model fitted in closed form (EASE) has no seed: it runs once,
with the first seed. With ``--refit`` each seed's refit (``seed_N/refit``) is tested too
and summarised in a second row; ``python -m experiments.compare 'ROOT/seed_*'
'ROOT/seed_*/refit'`` compares the two user by user.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.training import engine as loop
from jax_vaecf.training import reporting

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's command line: its own flags and the Config flags (:mod:`experiments.cli`).
  Defined when it runs, not at import: ``--root`` is also ``experiments.tune``'s."""
  flags.DEFINE_string("root", None, "Folder for the per-seed workdirs and summary.jsonl.",
                      flag_values=flag_values)
  flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"],
                    "Training seeds: one run per seed, each as --seed.",
                    flag_values=flag_values)
  cli.define_config_flags(flag_values)


METRICS = ("ndcg@100", "recall@20", "recall@50", "ndcg@20", "recalln@20")
# The literature's other conventions and the catalogue metrics, summarised too (a second
# table row) when the runs report them.
MORE_METRICS = ("precision@20", "hitrate@20", "mrr@20", "map@20", "coverage@20",
                "avgpop@20", "tail@20", "gini@20", "novelty@20")


def summarize(results: list[dict]) -> dict:
  """Mean and standard error over seeds of each metric's per-run value."""
  out = {"n_seeds": len(results)}
  for k in METRICS + MORE_METRICS:
    vals = np.array([r[k] for r in results if k in r], np.float64)
    if vals.size:
      out[k] = float(vals.mean())
      out[k + "_se"] = float(vals.std(ddof=1) / np.sqrt(vals.size)) if vals.size > 1 else 0.0
  return out


def _seeds() -> list[int]:
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise app.UsageError(f"--seeds: expected comma-separated integers, got "
                         f"{','.join(FLAGS.seeds)!r}") from None
  if not seeds:
    raise app.UsageError("--seeds is empty")
  return seeds


def main(argv):
  cli.start(argv, required=("root",), flag_values=FLAGS)
  cfg = cli.config_from_flags(FLAGS)
  given = cli.config_overrides(FLAGS)
  # The seed is what varies between the runs; a fixed one would make them all the same.
  if "seed" in given:
    raise app.UsageError("--seed: accuracy trains one run per seed of --seeds")
  if not cfg.test:
    raise app.UsageError("--notest: accuracy reports each seed's test metrics")
  seeds = _seeds()
  if loop.build_model(cfg, 1).closed_form and len(seeds) > 1:
    # A closed-form fit (EASE) draws nothing at random: every seed gives the same model.
    print(f"{cfg.model} is fitted in closed form and has no seed: one run "
          f"(seed {seeds[0]}) instead of {len(seeds)}", flush=True)
    seeds = seeds[:1]
  results, refits = [], []
  for seed in seeds:
    workdir = os.path.join(FLAGS.root, f"seed_{seed}")
    print(f"== seed {seed}: {workdir}", flush=True)
    try:
      run = loop.run(cfg.replace(seed=seed), workdir, report=reporting.print_record)
    except (ValueError, FileNotFoundError, MemoryError, loop.TrainingDivergedError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    results.append(run["test"])
    if "refit" in run:
      refits.append(run["refit"]["test"])
  s = summarize(results)
  rows = [("", s)] + ([(" (refit)", summarize(refits))] if refits else [])
  for label, row in rows:
    cells = " | ".join(f"{row[k]:.4f} ± {row[k + '_se']:.4f}" for k in METRICS[:3])
    print(f"| {cfg.dataset} | {cfg.model}{label} | {cfg.precision} | {len(seeds)} seeds | "
          f"{cells} |")
  for label, row in rows:
    more = [k for k in METRICS[3:] + MORE_METRICS if k in row]
    if more:
      print("| " + " | ".join(more) + " |")
      print("| " + " | ".join(f"{row[k]:.4g} ± {row[k + '_se']:.2g}" for k in more)
            + f" |{label}")
  from jax_vaecf.evaluation import metrics  # pylint: disable=import-outside-toplevel
  for k in dict.fromkeys(METRICS + MORE_METRICS):
    if k in s and metrics.convention(k):
      print(f"{k}: {metrics.convention(k)}")
  os.makedirs(FLAGS.root, exist_ok=True)
  with open(os.path.join(FLAGS.root, "summary.jsonl"), "a") as f:
    f.write(json.dumps({"config": FLAGS.config,
                        "settings": {k: str(v) for k, v in given.items()},
                        "seeds": seeds, **s,
                        "per_seed": [{k: r[k] for k in METRICS + MORE_METRICS if k in r}
                                     for r in results]}
                       | ({"refit": summarize(refits)} if refits else {})) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
