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

import sys

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.serving import export as export_lib
from jax_vaecf.serving import recommender as recommend_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags; defined when it runs, not at import (``experiments.recommend``
  has flags of the same names)."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=fv)
  flags.DEFINE_string("out", None, "The artefact folder to create (new or empty).",
                      flag_values=fv)
  flags.DEFINE_integer("k", 100, "Recommendations per user the artefact returns (at "
                       "most; callers may ask for fewer).", flag_values=fv)
  flags.DEFINE_list("platforms", ["cpu"], "Backends to lower the program for, e.g. "
                    "cpu,cuda.", flag_values=fv)
  flags.DEFINE_bool("benchmark", False, "After exporting, time the Recommender and the "
                    "loaded artefact at batch 1 and batch 10,000 on this machine.",
                    flag_values=fv)

def main(argv):
  cli.start(argv, required=("workdir", "out"), flag_values=FLAGS)
  if FLAGS.k < 1:
    raise app.UsageError(f"--k must be >= 1, got {FLAGS.k}")
  try:
    rec = recommend_lib.Recommender.from_workdir(FLAGS.workdir)
    if FLAGS.k > rec.model.n_items:
      raise app.UsageError(f"--k={FLAGS.k} exceeds the {rec.model.n_items} items")
    manifest = export_lib.export_run(FLAGS.workdir, FLAGS.out, FLAGS.k,
                                     platforms=FLAGS.platforms, recommender=rec)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"wrote {FLAGS.out}: {manifest['model']['model']} over {manifest['n_items']:,} "
        f"items, top {manifest['k']}, {size / 1e6:.1f} MB, platforms "
        f"{','.join(manifest['platforms'])}")
  if FLAGS.benchmark:
    from experiments import serve_bench  # pylint: disable=g-import-not-at-top
    print(serve_bench.format_paths(serve_bench.time_paths(rec, FLAGS.out,
                                                          min(10, FLAGS.k))))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
