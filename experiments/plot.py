"""Draws a run's curves, or two tested runs side by side: ``python -m experiments.plot``.

  python -m experiments.plot --workdir DIR
  python -m experiments.plot --runs=RUN_A,RUN_B [--metric=ndcg@100] [--k=20] --out_dir=D

``--workdir`` reads ``DIR/metrics.jsonl`` and writes ``DIR/curves.png`` (or ``--out``).
``--runs`` takes tested run folders or ``experiments.accuracy`` roots (as
``experiments.compare`` does) and writes two PNGs to ``--out_dir``: ``per_user.png``, the
distribution of ``--metric`` over the test users of each run (a user's mean over its
seeds), and ``popularity.png``, the share of each run's top-``--k`` slots taken by items
ranked by training popularity, beside the catalogue's own share of training
interactions. Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags; defined when it runs, not at import (other tools have flags of
  the same names)."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.",
                      flag_values=fv)
  flags.DEFINE_string("out", "", "PNG to write ('' = <workdir>/curves.png).",
                      flag_values=fv)
  flags.DEFINE_string("title", "", "Figure title ('' = the workdir's name).",
                      flag_values=fv)
  flags.DEFINE_list("runs", [], "Tested run folders or accuracy roots to draw side by "
                    "side (instead of --workdir).", flag_values=fv)
  flags.DEFINE_string("metric", "ndcg@100", "--runs: the per-user metric to draw.",
                      flag_values=fv)
  flags.DEFINE_integer("k", 20, "--runs: the cut-off of the recommended lists.",
                       flag_values=fv)
  flags.DEFINE_string("out_dir", "", "--runs: folder for per_user.png and popularity.png.",
                      flag_values=fv)


def read_records(workdir: str) -> list[dict]:
  from jax_vaecf.training import run_folder  # pylint: disable=g-import-not-at-top
  log = run_folder.MetricsLog(workdir)
  path = log.path
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir!r} a training run's workdir?")
  records = log.records()
  train = [r for r in records if r.get("split") == "train"]
  if not train:
    raise ValueError(f"{path}: no training records to plot")
  sweep = [r for r in records if r.get("split") == "sweep"]
  if "loss" not in train[0]:
    # A closed-form fit: no loss curve, its validation metrics by swept setting instead.
    if not sweep:
      raise ValueError(f"{path}: a closed-form fit of one setting: no curve to plot")
    return sweep
  return train


def sweep_axes(records: list[dict]) -> tuple[str, list[str]]:
  """The swept setting drawn along x (the one with the most values) and the others,
  whose values name one line each."""
  swept = list(records[0]["swept"])
  counts = {k: len({r["swept"][k] for r in records}) for k in swept}
  x = max(swept, key=lambda k: counts[k])
  return x, [k for k in swept if k != x]


def plot_sweep(records: list[dict], out: str, title: str) -> None:
  """A closed-form fit's validation metrics against its swept setting (log scale),
  one line per value of the other swept settings."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  x, others = sweep_axes(records)
  groups: dict = {}
  for r in records:
    groups.setdefault(tuple(r["swept"][k] for k in others), []).append(r)
  keys = ("val_ndcg@100",) if len(groups) > 1 else (
      "val_ndcg@100", "val_recall@20", "val_recall@50")
  fig, ax = plt.subplots(figsize=(6, 4))
  for group, rows in groups.items():
    rows = sorted(rows, key=lambda r: r["swept"][x])
    name = ", ".join(f"{k} {v:g}" for k, v in zip(others, group))
    for key in keys:
      ax.plot([r["swept"][x] for r in rows], [r[key] for r in rows], marker=".",
              label=" ".join(filter(None, (key[4:], name))))
  ax.set_xscale("log")
  ax.set_xlabel(x)
  ax.set_ylabel("validation metric")
  ax.legend(loc="lower right", fontsize="small")
  ax.grid(alpha=0.3)
  fig.suptitle(title)
  _save(fig, out)


def plot(records: list[dict], out: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  epochs = [r["epoch"] for r in records]
  fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot(epochs, [r["loss"] for r in records], label="loss (-ELBO)")
  ax_loss.plot(epochs, [r["nll"] for r in records], label="multinomial NLL", alpha=0.7)
  ax_loss.set_xlabel("epoch")
  ax_loss.set_ylabel("per-user loss")
  ax_beta = ax_loss.twinx()
  ax_beta.plot(epochs, [r["beta"] for r in records], color="gray", ls=":", label="beta")
  ax_beta.set_ylabel("KL weight beta")
  ax_loss.legend(loc="upper right")
  val = [r for r in records if "val_ndcg@100" in r]
  for key in ("val_ndcg@100", "val_recall@20", "val_recall@50"):
    ax_val.plot([r["epoch"] for r in val], [r[key] for r in val], marker=".",
                label=key[4:])
  ax_val.set_xlabel("epoch")
  ax_val.set_ylabel("validation metric")
  ax_val.legend(loc="lower right")
  ax_val.grid(alpha=0.3)
  fig.suptitle(title)
  _save(fig, out)


def _save(fig, out: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  tmp = out + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, out)
  plt.close(fig)


def plot_runs(runs, metric: str, k: int, out_dir: str) -> list[str]:
  """The two figures of ``--runs`` (:class:`experiments.compare.Run` each); their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for run in runs:
    v = np.sort(run.values(metric)[run.counted])
    seeds = f"{len(run.seeds)} seed" + ("s" if len(run.seeds) > 1 else "")
    ax.plot(v, np.arange(1, v.size + 1) / v.size, drawstyle="steps-post",
            label=f"{run.name} (mean {v.mean():.4f}, {seeds})")
  ax.set_xlabel(f"test {metric} of a user")
  ax.set_ylabel("share of test users with at most this value")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  per_user_png = os.path.join(out_dir, "per_user.png")
  _save(fig, per_user_png)

  fig, ax = plt.subplots(figsize=(6.5, 4))
  columns = runs[0].seeds[0][1]
  pop = columns["popularity"].astype(np.float64)
  order = np.lexsort((np.arange(pop.size), -pop))  # most popular first
  rank = np.arange(1, pop.size + 1)
  ax.plot(rank, np.cumsum(pop[order]) / pop.sum(), color="gray", ls="--",
          label="catalogue: training interactions")
  for run in runs:
    top = np.concatenate([c["top"][:, :k] for _, c, _ in run.seeds])
    if top.shape[1] < k:
      raise ValueError(f"{run.path}: tested up to k={top.shape[1]}, not {k}")
    counts = np.bincount(top.ravel(), minlength=pop.size).astype(np.float64)
    ax.plot(rank, np.cumsum(counts[order]) / counts.sum(),
            label=f"{run.name}: top-{k} slots")
  ax.set_xscale("log")
  ax.set_xlabel("items by training popularity (rank, most popular first)")
  ax.set_ylabel("cumulative share")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  popularity_png = os.path.join(out_dir, "popularity.png")
  _save(fig, popularity_png)
  return [per_user_png, popularity_png]


def main(argv):
  if FLAGS.runs:
    cli.start(argv, required=("out_dir",), flag_values=FLAGS)
    from experiments import compare  # pylint: disable=g-import-not-at-top
    try:
      runs = [compare.Run(p) for p in FLAGS.runs]
      for run in runs[1:]:
        compare.check_same(runs[0].split, run.split, runs[0].path, run.path)
      for out in plot_runs(runs, FLAGS.metric, FLAGS.k, FLAGS.out_dir):
        print(out)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    return
  cli.start(argv, required=("workdir",), flag_values=FLAGS)
  try:
    records = read_records(FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "curves.png")
  draw = plot_sweep if records[0].get("split") == "sweep" else plot
  draw(records, out, FLAGS.title or os.path.basename(os.path.abspath(FLAGS.workdir)))
  print(out)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
