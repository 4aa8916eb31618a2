"""Add new interactions to a trained run without a full retrain, as a new run folder.

  python -m experiments.update --workdir runs/ease --data new.csv
  python -m experiments.update --workdir runs/vae --data new.csv --out runs/vae-2 --steps 50

``--data`` is a ``user,item[,rating]`` file (the run's ``--csv_*`` settings read it:
delimiter, columns, header, rating threshold): new items of known users, new users and,
for EASE and EDLAE, new items. ``--workdir`` is only read; the new run goes to ``--out``
(default ``<workdir>-update-<N>``), a run folder every tool takes (``recommend``,
``export``, ``update`` again). EASE is changed exactly (a low-rank update of its inverse,
or a refit with the same l2 when that is cheaper), EDLAE refitted with its chosen
settings, a VAE trained on from its best checkpoint (weights and Adam state) for
``--steps`` steps on the changed users and ``--replay`` times as many others
(:mod:`jax_vaecf.training.update`). Prints what was done and the new run's test line.
"""

from __future__ import annotations

import sys

from absl import flags

from experiments import cli
from jax_vaecf import data as data_lib
from jax_vaecf.training import engine
from jax_vaecf.training import reporting
from jax_vaecf.training import run_folder
from jax_vaecf.training import update as update_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags; defined when it runs, not at import."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "The trained run's folder (only read).",
                      flag_values=fv)
  flags.DEFINE_string("data", None, "A user,item[,rating] file of the interactions to "
                      "add (read with the run's --csv_* settings).", flag_values=fv)
  flags.DEFINE_string("out", "", "The new run folder, new or empty ('' = "
                      "<workdir>-update-<N>).", flag_values=fv)
  flags.DEFINE_integer("steps", None, "A VAE's training steps on the changed users "
                       "(default: one pass over them and the replayed users).",
                       flag_values=fv)
  flags.DEFINE_enum("header", "", ["", *data_lib.readers.HEADER_CHOICES], "Whether "
                    "line 1 of --data is a header ('' = the run's --csv_header).",
                    flag_values=fv)
  flags.DEFINE_float("replay", 1.0, "A VAE's unchanged training users drawn per changed "
                     "user and trained on with them.", flag_values=fv)


def main(argv):
  cli.start(argv, required=("workdir", "data"), flag_values=FLAGS)
  try:
    cfg = run_folder.run_config(FLAGS.workdir)
    options = engine.csv_reader_options(cfg)
    options.pop("threshold")  # update_lib.positives applies the run's rule
    if FLAGS.header:
      options["header"] = data_lib.readers.HEADER_CHOICES[FLAGS.header]
    inter = data_lib.read_delimited(FLAGS.data, **options)
    users, items = update_lib.positives(inter, cfg)
    out = FLAGS.out or update_lib.next_version(FLAGS.workdir)
    cfg, split, results = update_lib.update_run(
        cfg, FLAGS.workdir, users, items, out, n_steps=FLAGS.steps, replay=FLAGS.replay,
        report=reporting.print_record)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  train = results["train"]
  print(f"wrote {out}: {cfg.model} {train.get('how', 'refit')} with {len(users):,} "
        f"interactions given; {split.n_train_users:,} training users x "
        f"{split.n_items:,} items")
  if results.get("test"):
    reporting.print_record({"event": "test", "result": results["test"],
                            "ks": cfg.test_ks})


if __name__ == "__main__":
  define_flags()
  cli.run(main)
