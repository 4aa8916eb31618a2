"""Export a trained run as a scorer artefact that needs no project code.

  python -m experiments.export --workdir runs/demo --out exported/demo --k 100

Writes the folder ``--out`` (``manifest.json``, ``scorer.jax``, ``params.npz``,
``item_ids.npy``, ``serve.py``; ``docs/serving.md``) from the best checkpoint of
``--workdir``: its served weights only (the weight average when the run keeps one), the
fold-in top-k program serialised with ``jax.export`` for any number of users, and the
checkpoint's validation and test metrics. Load it with ``import serve;
serve.load(DIR).recommend(histories)``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf import export as export_lib
from jax_vaecf import recommend as recommend_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_string("out", None, "The artefact folder to create (new or empty).")
flags.DEFINE_integer("k", 100, "Recommendations per user the artefact returns (at most; "
                     "callers may ask for fewer).")
flags.DEFINE_list("platforms", ["cpu"], "Backends to lower the program for, e.g. "
                  "cpu,cuda.")


def checkpoint_metrics(workdir: str, epoch: int | None) -> dict:
  """The validation record of ``epoch`` and the last test record in the run's log."""
  out: dict = {"epoch": epoch}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if r.get("split") == "train" and r.get("epoch") == epoch:
        out["validation"] = {k[4:]: v for k, v in r.items() if k.startswith("val_")
                             and not k.endswith("time_s")}
      elif r.get("split") == "test" and r.get("epoch") == epoch:
        out["test"] = {k: v for k, v in r.items() if k != "split"}
  return out


def main(argv):
  cli.start(argv, required=("workdir", "out"))
  if FLAGS.k < 1:
    raise app.UsageError(f"--k must be >= 1, got {FLAGS.k}")
  try:
    rec = recommend_lib.Recommender.from_workdir(FLAGS.workdir)
    if FLAGS.k > rec.model.n_items:
      raise app.UsageError(f"--k={FLAGS.k} exceeds the {rec.model.n_items} items")
    ident = rec.checkpoint_meta["identity"]
    manifest = export_lib.write_artifact(
        FLAGS.out, rec.model, rec.params, rec.item_ids, FLAGS.k,
        model_info={key: ident[key] for key in ("model", "hidden_dims", "latent_dim",
                                                "dataset") if key in ident}
        | {"weights": "weight average" if ident.get("weight_average") else "weights"},
        metrics=checkpoint_metrics(FLAGS.workdir, rec.checkpoint_meta.get("epoch")),
        platforms=FLAGS.platforms)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"wrote {FLAGS.out}: {manifest['model']['model']} over {manifest['n_items']:,} "
        f"items, top {manifest['k']}, {size / 1e6:.1f} MB, platforms "
        f"{','.join(manifest['platforms'])}")


if __name__ == "__main__":
  cli.run(main)
