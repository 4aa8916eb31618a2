"""An update against a full retrain: what a model loses by taking new data late.

  python -m experiments.bench_update --config=ml1m --data_dir=DIR --number_of_epochs=20 \
      --root=runs/bench_update [--steps=20,100] [--fraction=0.1] [--users_fraction=1]

From the config's split, ``--fraction`` of each training user's items (of a
``--users_fraction`` share of them, drawn with the split seed) are held back. It fits
the config on the rest (the "90 %" model), updates that model with the held-back
interactions (``FittedModel.update``; a VAE once per ``--steps`` value, each from the
90 % model) and fits the config again on every item (the full retrain), then prints a
table of each model's test NDCG@100 and Recall@20 (the held-out test users, the same for
every row) and its time (the fit's or the update's wall clock, validation and test
included). ``--out`` writes the rows as JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import scipy.sparse as sp
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags, defined when it runs (importing it defines none)."""
  fv = flag_values
  cli.define_config_flags(fv)
  flags.DEFINE_string("root", None, "A new folder for the three runs.", flag_values=fv)
  flags.DEFINE_list("steps", [], "A VAE's update steps, one update each ('' = one pass "
                    "over the changed users).", flag_values=fv)
  flags.DEFINE_float("fraction", 0.1, "Share of each chosen user's items held back.",
                     flag_values=fv)
  flags.DEFINE_float("users_fraction", 1.0, "Share of the training users whose items "
                     "are held back.", flag_values=fv)
  flags.DEFINE_string("out", "", "A JSON-lines file for the rows ('' = none).",
                      flag_values=fv)


def held_back(train: sp.csr_matrix, fraction: float, users_fraction: float, seed: int
              ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
  """``(kept rows, rows, columns)``: ``round(fraction * n_u)`` (at least 1, at most
  ``n_u - 1``) random items of each chosen user (``users_fraction`` of the rows) taken
  out of the CSR ``train`` and returned as ``(rows, columns)`` int64 arrays."""
  rng = np.random.default_rng(seed)
  train = sp.csr_matrix(train)
  chosen = rng.random(train.shape[0]) < users_fraction
  keep = np.ones(train.nnz, bool)
  for r in np.flatnonzero(chosen):
    lo, hi = train.indptr[r], train.indptr[r + 1]
    n = hi - lo
    take = min(n - 1, max(1, int(round(fraction * n))))
    if take > 0:
      keep[lo + rng.choice(n, size=take, replace=False)] = False
  rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
  kept = sp.csr_matrix((train.data[keep], (rows[keep], train.indices[keep])),
                       shape=train.shape, dtype=np.float32)
  return kept, rows[~keep], train.indices[~keep]


def _row(name: str, model, seconds: float, extra: str = "") -> dict:
  test = model.results["test"]
  return {"model": name, "ndcg@100": test["ndcg@100"], "recall@20": test["recall@20"],
          "seconds": seconds, "how": extra, "n_users": test["n_users"]}


def _fit(cfg, split, workdir):
  import jax_vaecf  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  model = jax_vaecf.fit(split, cfg, workdir=workdir)
  return model, time.perf_counter() - t0


def main(argv):
  cli.start(argv, required=("root",), flag_values=FLAGS)
  from jax_vaecf.training import engine  # pylint: disable=import-outside-toplevel
  cfg = cli.config_from_flags(FLAGS)
  split = engine.load_data(cfg)
  kept, rows, cols = held_back(split.train, FLAGS.fraction, FLAGS.users_fraction,
                               cfg.split_seed)
  print(f"{cfg.model} on {cfg.dataset}: {rows.size:,} of {split.train.nnz:,} training "
        f"interactions held back from {np.unique(rows).size:,} users")
  out = []
  partial, seconds = _fit(cfg, dataclasses.replace(split, train=kept),
                          os.path.join(FLAGS.root, "partial"))
  out.append(_row(f"{1 - FLAGS.fraction:.0%} of the items, fitted", partial, seconds))
  users = split.train_user_ids[rows]
  items = split.item_ids[cols]
  for steps in (FLAGS.steps or [""]):
    t0 = time.perf_counter()
    new = partial.update((users, items), out=os.path.join(FLAGS.root, f"update{steps}"),
                         steps=int(steps) if steps else None)
    record = new.results["train"]
    what = record["how"] + (f", {record['update_steps']} steps" if "update_steps" in record
                            else "")
    out.append(_row("+ the rest, updated", new, time.perf_counter() - t0, what))
  full, seconds = _fit(cfg, split, os.path.join(FLAGS.root, "full"))
  out.append(_row("every item, fitted again", full, seconds))
  print(f"\n| model | how | test NDCG@100 | test Recall@20 | seconds |\n|---|---|---|---|---|")
  for r in out:
    print(f"| {r['model']} | {r['how']} | {r['ndcg@100']:.4f} | {r['recall@20']:.4f} | "
          f"{r['seconds']:.1f} |")
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      for r in out:
        f.write(json.dumps({**r, "config": FLAGS.config, "dataset": cfg.dataset,
                            "epochs": cfg.number_of_epochs}) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
