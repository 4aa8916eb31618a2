"""Draws a run's loss and validation curves: ``python -m experiments.plot --workdir DIR``.

Reads ``DIR/metrics.jsonl`` and writes ``DIR/curves.png`` (or ``--out``). Needs
matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
flags.DEFINE_string("out", "", "PNG to write ('' = <workdir>/curves.png).")
flags.DEFINE_string("title", "", "Figure title ('' = the workdir's name).")


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir!r} a training run's workdir?")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = [r for r in records if r.get("split") == "train"]
  if not train:
    raise ValueError(f"{path}: no training records to plot")
  return train


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
                label=key[4:].replace("@", "@"))
  ax_val.set_xlabel("epoch")
  ax_val.set_ylabel("validation metric")
  ax_val.legend(loc="lower right")
  ax_val.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  tmp = out + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, out)
  plt.close(fig)


def main(argv):
  cli.start(argv, required=("workdir",))
  try:
    records = read_records(FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "curves.png")
  plot(records, out, FLAGS.title or os.path.basename(os.path.abspath(FLAGS.workdir)))
  print(out)


if __name__ == "__main__":
  cli.run(main)
