"""Is one model better than another on the same test users? ``python -m
experiments.compare SIDE_A SIDE_B [SIDE_C ...]``.

  python -m experiments.compare runs/acc_ml1m runs/acc_ml1m_recvae --out compare.json
  python -m experiments.compare runs/a_s0,runs/a_s1,runs/a_s2 runs/b_s0,runs/b_s1

Each argument is one side, one model with all its training seeds, given as:

* an ``experiments.accuracy`` root: its ``seed_N/test_users.npz``, one per seed;
* a tested run folder (its ``test_users.npz``): one seed;
* a quoted pattern of run folders, ``'ROOT/seed_*/refit'``: one seed each;
* a comma-separated list of any of these, ``runs/a_s0,runs/a_s1,runs/a_s2``.

A side's runs must be tested on the same split and users, be one model and differ in
seed; else the side is refused. Two arguments that are sibling folders differing only by a
trailing seed suffix (``runs/a_s0 runs/a_s1``) look like two seeds of one model, not two
models: they are refused unless ``--allow_seed_siblings``.

Every later side is compared with the first, on the users both counted, a user's value
being the mean over the side's seeds: the mean difference of each ``--metrics`` entry with
its 95% bootstrap interval over users (``--bootstrap`` resamples, ``--seed``), the paired
t-test and Wilcoxon p-values; with two or more seeds on each side, the difference of the
seed means with Welch's interval and p-value; and a verdict in words. What decides is
:class:`jax_vaecf.evaluation.significance.Rule` (``--correction``), stated in one line
under the table and in the JSON. Sides tested on different splits or users are refused,
naming what differs. Prints a table; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.evaluation import per_user
from jax_vaecf.evaluation import significance

FLAGS = flags.FLAGS

# A trailing seed suffix of a run folder's name: a_s0, a_seed0, a_0, a-seed_1, seed_2.
_SEED_SUFFIX = re.compile(r"(.*?)((?:^|[_-])(?:seed|s)?_?)(\d+)")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags; defined when it runs, not at import."""
  fv = flag_values
  flags.DEFINE_list("metrics", ["ndcg@100", "recall@20", "recall@50"],
                    "Per-user metrics to compare (columns of test_users.npz, e.g. "
                    "recalln@20, map@100, hitrate@10 where tested at that k).",
                    flag_values=fv)
  flags.DEFINE_integer("bootstrap", 10_000, "Bootstrap resamples of the users.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.", flag_values=fv)
  flags.DEFINE_enum("correction", significance.RULE.correction, significance.CORRECTIONS,
                    "holm: the deciding p-values of the metrics of a pair are "
                    "Holm-adjusted together; none: each metric is tested on its own.",
                    flag_values=fv)
  flags.DEFINE_bool("allow_seed_siblings", False,
                    "Compare sibling run folders that differ only by a seed suffix as "
                    "two models (by default they are refused: give a model's seeds as "
                    "one comma-separated argument).", flag_values=fv)
  flags.DEFINE_string("out", "", "Write the comparison as JSON to this file.",
                      flag_values=fv)


def _files_of(path: str) -> list[str]:
  """The test_users.npz files one entry of a side names (see the module docstring)."""
  own = os.path.join(path, per_user.FILE)
  if glob.has_magic(path):  # folders named by a pattern, one seed each
    files = sorted(glob.glob(own))
  else:
    files = ([own] if os.path.isfile(own) else
             sorted(glob.glob(os.path.join(path, "seed_*", per_user.FILE))))
  if not files:
    raise FileNotFoundError(f"{path}: no {per_user.FILE}, nor seed_*/{per_user.FILE}; "
                            "test the run (or rerun experiments.accuracy) first")
  return files


def side_files(arg: str) -> list[str]:
  """The test_users.npz files of one side: each comma-separated entry's, each once."""
  files = []
  for entry in arg.split(","):
    if not entry.strip():
      raise ValueError(f"{arg!r}: an empty entry in the comma-separated list")
    files += _files_of(entry.strip())
  seen = {}
  for f in files:
    real = os.path.realpath(f)
    if real in seen:
      also = "" if seen[real] == f else f" (also as {seen[real]})"
      raise ValueError(f"{f} is listed twice in one side{also}; a side lists each seed "
                       "once")
    seen[real] = f
  return files


def _side_name(arg: str) -> str:
  """A side's short name: a folder's own name, or the stem shared by a list's seeds."""
  names = [os.path.basename(os.path.normpath(p.strip())) for p in arg.split(",")]
  if len(names) == 1:
    return names[0]
  stems = {m.group(1) if m else None for m in map(_SEED_SUFFIX.fullmatch, names)}
  if len(stems) == 1 and None not in stems and "" not in stems:
    return stems.pop()
  return f"{names[0]}+{len(names) - 1}"


class Run:
  """One side: a model's tested seeds, per-user metric values averaged over them.

  Args:
    path: the side as given on the command line (see the module docstring).
  """

  def __init__(self, path: str):
    self.path = path
    self.files = side_files(path)
    self.seeds = [(f, *per_user.read(f)) for f in self.files]
    _check_one_model(self.seeds)
    _, first, meta0 = self.seeds[0]
    self.split = meta0["split"]
    self.user_id = first["user_id"]
    self.counted = np.logical_and.reduce([c["counted"] for _, c, _ in self.seeds])
    self.name = _side_name(path)

  def values(self, metric: str) -> np.ndarray:
    """float64 (users,): the metric per user, the mean over the seeds."""
    for f, columns, _ in self.seeds:
      if metric not in columns:
        raise ValueError(f"{f}: no column {metric!r} (it has "
                         f"{', '.join(per_user.metric_names(columns))})")
    return np.mean([c[metric] for _, c, _ in self.seeds], axis=0)

  def seed_means(self, metric: str, users: np.ndarray) -> np.ndarray:
    """float64 (seeds,): each seed's mean over ``users`` (bool, (users,))."""
    return np.array([np.mean(c[metric][users]) for _, c, _ in self.seeds])


def _check_one_model(seeds: list) -> None:
  """Raises ValueError unless a side's runs share split and users and differ in seed."""
  f0, first, meta0 = seeds[0]
  model0 = (meta0.get("run") or {}).get("model")
  taken = {}
  for f, columns, meta in seeds:
    check_same(meta0["split"], meta["split"], f0, f)
    if not np.array_equal(columns["user_id"], first["user_id"]):
      raise ValueError(f"{f}: other test users than {f0}")
    run = meta.get("run") or {}
    if None not in (model0, run.get("model")) and run["model"] != model0:
      raise ValueError(f"{f}: model {run['model']!r}, but {f0} is {model0!r}; a side is "
                       "one model's seeds")
    if "seed" in run:
      if run["seed"] in taken:
        raise ValueError(f"{f}: seed {run['seed']}, as {taken[run['seed']]}; a side's "
                         "runs must be different training seeds")
      taken[run["seed"]] = f


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
                     + "; ".join(diff)
                     + "); a paired comparison needs the same test users")


def check_not_seed_siblings(paths: list[str]) -> None:
  """Raises ValueError if two single-folder arguments differ only by a seed suffix."""
  seen = {}
  for p in paths:
    if "," in p or glob.has_magic(p):
      continue
    parent, name = os.path.split(os.path.normpath(p))
    m = _SEED_SUFFIX.fullmatch(name)
    if m:
      key = (os.path.realpath(parent or "."), m.group(1), m.group(2))
      if key in seen:
        raise ValueError(
            f"{seen[key]} and {p} differ only by a seed suffix: two seeds of one model, "
            f"not two models; give a model's seeds as one argument, comma-separated "
            f"({seen[key]},{p}), or pass --allow_seed_siblings")
      seen[key] = p


def _check_pair(base: Run, run: Run) -> None:
  check_same(base.split, run.split, base.path, run.path)
  if not np.array_equal(base.user_id, run.user_id):
    raise ValueError(f"{run.path}: other test users than {base.path}")
  shared = {os.path.realpath(f) for f in base.files} & {
      os.path.realpath(f) for f in run.files}
  if shared:
    raise ValueError(f"{run.path} and {base.path} share {sorted(shared)[0]}; the two "
                     "sides must be separate runs")


def compare(paths: list[str], metrics: list[str], n_boot: int, seed: int,
            rule: significance.Rule = significance.RULE) -> list[dict]:
  """Every later side against the first: one row per side and metric
  (:func:`jax_vaecf.evaluation.significance.compare_users`, corrected per pair by
  :func:`~jax_vaecf.evaluation.significance.compare_metrics`)."""
  runs = [Run(p) for p in paths]
  base = runs[0]
  rows = []
  for run in runs[1:]:
    _check_pair(base, run)
    both = base.counted & run.counted
    name_a, name_b = ((base.name, run.name) if base.name != run.name else ("A", "B"))
    pair = [significance.compare_users(
        base.values(m)[both], run.values(m)[both], base.seed_means(m, both),
        run.seed_means(m, both), name_a=name_a, name_b=name_b, n_boot=n_boot, seed=seed,
        rule=rule) for m in metrics]
    for metric, row in zip(metrics, significance.compare_metrics(pair, name_a, name_b,
                                                                 rule)):
      rows.append(dict(row, metric=metric, a_run=base.path, b_run=run.path))
  return rows


def _seeds(n: int) -> str:
  return f"{n} seed" + ("s" if n != 1 else "")


def _p_text(p: float, adjusted: float | None) -> str:
  return f"{p:.2g}" if adjusted is None else f"{p:.2g} (Holm {adjusted:.2g})"


def _row_line(r: dict) -> str:
  s = r["seeds"]
  seeds = (f"{s['diff']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] | "
           f"{_p_text(s['p_welch'], s.get('p_welch_adjusted'))}" if s else
           f"{r['seed_rule']} | -")
  return (f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
          f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
          f"{_p_text(r['p_ttest'], r.get('p_ttest_adjusted'))} | {r['p_wilcoxon']:.2g} | "
          f"{seeds} | {r['verdict']} |")


def format_table(rows: list[dict], rule_line: str) -> str:
  """The markdown table of :func:`compare`'s rows, one per pair; the rule line under
  it."""
  from jax_vaecf.evaluation import metrics  # pylint: disable=import-outside-toplevel
  lines = []
  for b_run in dict.fromkeys(r["b_run"] for r in rows):
    mine = [r for r in rows if r["b_run"] == b_run]
    r0 = mine[0]
    lines += [f"B = {r0['b_run']} ({_seeds(r0['b_seeds'])}) against A = {r0['a_run']} "
              f"({_seeds(r0['a_seeds'])}), {r0['n_users']} test users:",
              "| metric | A | B | B - A | 95% CI (users) | p (paired t) | p (Wilcoxon) | "
              "B - A over seeds, 95% CI (Welch) | p (Welch) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_line(r) for r in mine]
  lines.append(rule_line)
  used = dict.fromkeys(r["metric"] for r in rows)
  lines += [f"{m}: {metrics.convention(m)}" for m in used if metrics.convention(m)]
  return "\n".join(lines)


def main(argv):
  cli.start([argv[0]])
  paths = argv[1:]
  if len(paths) < 2:
    raise app.UsageError("give two or more sides (run folders, accuracy roots, patterns "
                         "or comma-separated lists of them): the first is the baseline")
  if FLAGS.bootstrap < 100:
    raise app.UsageError(f"--bootstrap must be >= 100, got {FLAGS.bootstrap}")
  rule = significance.Rule(correction=FLAGS.correction)
  rule_line = rule.statement(len(FLAGS.metrics))
  try:
    if not FLAGS.allow_seed_siblings:
      check_not_seed_siblings(paths)
    rows = compare(paths, list(FLAGS.metrics), FLAGS.bootstrap, FLAGS.seed, rule)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(format_table(rows, rule_line))
  if FLAGS.out:
    from jax_vaecf.core import files  # pylint: disable=import-outside-toplevel
    record = {"rule": rule_line, "rule_settings": dataclasses.asdict(rule), "rows": rows,
              "argv": sys.argv[1:]}
    files.write_text_atomic(FLAGS.out, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
