"""Is one model better than another on the same test users? ``python -m
experiments.compare RUN_A RUN_B [RUN_C ...]``.

  python -m experiments.compare runs/acc_ml1m runs/acc_ml1m_recvae --out compare.json

Each argument is a tested run folder (its ``test_users.npz``), a pattern of such folders
(``'ROOT/seed_*/refit'``, quoted), or an
``experiments.accuracy`` root (its ``seed_N/test_users.npz``, one per seed; a user's
value is then the mean over the seeds). Every later run is compared with the first, on
the users both counted: the mean difference of each ``--metrics`` entry with its 95%
bootstrap interval over users (``--bootstrap`` resamples, ``--seed``), the paired t-test
and Wilcoxon p-values, and a verdict; with several seeds on both sides, also the
difference of the seed means with Welch's interval and p-value
(:mod:`jax_vaecf.evaluation.significance`). Runs tested on different splits or users are refused,
naming what differs. Prints a table; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
from absl import app
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("metrics", ["ndcg@100", "recall@20", "recall@50"],
                    "Per-user metrics to compare (columns of test_users.npz, e.g. "
                    "recalln@20, map@100, hitrate@10 where tested at that k).")
  flags.DEFINE_integer("bootstrap", 10_000, "Bootstrap resamples of the users.")
  flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
  flags.DEFINE_string("out", "", "Write the comparison as JSON to this file.")


class Run:
  """A tested run or an accuracy root: per-user metric values averaged over its seeds."""

  def __init__(self, path: str):
    from jax_vaecf.evaluation import per_user  # pylint: disable=import-outside-toplevel
    self.path = path
    own = os.path.join(path, per_user.FILE)
    if glob.has_magic(path):  # folders named by a pattern, one seed each
      files = sorted(glob.glob(own))
    else:
      files = ([own] if os.path.isfile(own) else
               sorted(glob.glob(os.path.join(path, "seed_*", per_user.FILE))))
    if not files:
      raise FileNotFoundError(f"{path}: no {per_user.FILE}, nor seed_*/{per_user.FILE}; "
                              "test the run (or rerun experiments.accuracy) first")
    self.files = files
    self.seeds = []
    for f in files:
      columns, meta = per_user.read(f)
      self.seeds.append((f, columns, meta))
    _, first, meta0 = self.seeds[0]
    self.split = meta0["split"]
    self.user_id = first["user_id"]
    for f, columns, meta in self.seeds[1:]:
      check_same(self.split, meta["split"], self.files[0], f)
      if not np.array_equal(columns["user_id"], self.user_id):
        raise ValueError(f"{f}: other test users than {self.files[0]}")
    self.counted = np.logical_and.reduce([c["counted"] for _, c, _ in self.seeds])
    self.name = os.path.basename(os.path.normpath(path))

  def values(self, metric: str) -> np.ndarray:
    """float64 (users,): the metric per user, the mean over the seeds."""
    for f, columns, _ in self.seeds:
      if metric not in columns:
        from jax_vaecf.evaluation import per_user  # pylint: disable=import-outside-toplevel
        raise ValueError(f"{f}: no column {metric!r} (it has "
                         f"{', '.join(per_user.metric_names(columns))})")
    return np.mean([c[metric] for _, c, _ in self.seeds], axis=0)

  def seed_means(self, metric: str) -> np.ndarray:
    """float64 (seeds,): each seed's mean over the counted users."""
    return np.array([np.nanmean(c[metric][c["counted"]]) for _, c, _ in self.seeds])


def check_same(a: dict, b: dict, where_a: str, where_b: str) -> None:
  """Raises ValueError listing every key on which two runs' split identities differ."""
  if a != b:
    # A results file of an earlier version may name a data setting otherwise, or lack
    # one added since: compared in the current names.
    from jax_vaecf.training import configs  # pylint: disable=import-outside-toplevel
    a, b = configs.current_names(a, where_a), configs.current_names(b, where_b)
  keys = sorted(set(a) | set(b))
  diff = [f"{k}: {a.get(k)!r} against {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
  if diff:
    raise ValueError(f"{where_b} was tested on another split than {where_a} ("
                     + "; ".join(diff) + "); a paired comparison needs the same test users")


def compare(paths: list[str], metrics: list[str], n_boot: int, seed: int) -> list[dict]:
  """Every later run against the first: one row per run and metric."""
  from jax_vaecf.evaluation import significance  # pylint: disable=import-outside-toplevel
  runs = [Run(p) for p in paths]
  base = runs[0]
  rows = []
  for run in runs[1:]:
    check_same(base.split, run.split, base.path, run.path)
    if not np.array_equal(base.user_id, run.user_id):
      raise ValueError(f"{run.path}: other test users than {base.path}")
    both = base.counted & run.counted
    for metric in metrics:
      row = significance.paired_comparison(base.values(metric)[both],
                                           run.values(metric)[both], n_boot, seed)
      row.update(metric=metric, a_run=base.path, b_run=run.path,
                 a_seeds=len(base.seeds), b_seeds=len(run.seeds),
                 verdict=significance.verdict(row, base.name, run.name))
      seeds = significance.seed_comparison(base.seed_means(metric), run.seed_means(metric))
      if seeds is not None:
        row["seeds"] = seeds
      rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  from jax_vaecf.evaluation import metrics  # pylint: disable=import-outside-toplevel
  lines = []
  for b_run in dict.fromkeys(r["b_run"] for r in rows):
    mine = [r for r in rows if r["b_run"] == b_run]
    r0 = mine[0]
    lines += [f"{r0['b_run']} ({r0['b_seeds']} seeds) against {r0['a_run']} "
              f"({r0['a_seeds']} seeds), {r0['n_users']} test users:",
              "| metric | A | B | B - A | 95% CI (users) | p (paired t) | p (Wilcoxon) | "
              "B - A over seeds, 95% CI (Welch) | p (Welch) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in mine:
      s = r.get("seeds")
      seeds = (f"{s['diff']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] | "
               f"{s['p_welch']:.2g}" if s else "- | -")
      lines.append(f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
                   f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['p_ttest']:.2g} | "
                   f"{r['p_wilcoxon']:.2g} | {seeds} | {r['verdict']} |")
  used = dict.fromkeys(r["metric"] for r in rows)
  lines += [f"{m}: {metrics.convention(m)}" for m in used if metrics.convention(m)]
  return "\n".join(lines)


def main(argv):
  cli.start([argv[0]])
  paths = argv[1:]
  if len(paths) < 2:
    raise app.UsageError("give two or more tested run folders or accuracy roots: "
                         "the first is the baseline")
  if FLAGS.bootstrap < 100:
    raise app.UsageError(f"--bootstrap must be >= 100, got {FLAGS.bootstrap}")
  try:
    rows = compare(paths, list(FLAGS.metrics), FLAGS.bootstrap, FLAGS.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(format_table(rows))
  if FLAGS.out:
    from jax_vaecf.core import files  # pylint: disable=import-outside-toplevel
    files.write_text_atomic(FLAGS.out, json.dumps({"rows": rows, "argv": sys.argv[1:]},
                                                  indent=1) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
