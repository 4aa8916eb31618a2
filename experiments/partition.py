"""Write a data set as one part per process, for multi-host runs that read only their own.

  python -m experiments.partition --config=ml20m --data_dir=DIR --processes=4 --out=PARTS

Loads the split once, exactly as training would (``loop.load_data``: the same cache,
protocol and validation hold-out), and writes the new folder ``--out``
(``jax_vaecf.data.partition``): ``manifest.json``, ``item_ids.npy``, every part's row
lengths, and ``part-0000p-of-0000P/`` with block ``p`` of the training, validation and
test users as CSR ``.npy`` arrays. Train on it with the same data settings and
``--partitioned_data=PARTS`` in each of the ``P`` processes (docs/parallel.md).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.training import engine as loop
from jax_vaecf.training import reporting
from jax_vaecf.data import partition

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's command line: its own flags and the Config flags (:mod:`experiments.cli`).
  Defined when it runs, not at import: other tools have flags of the same names."""
  flags.DEFINE_integer("processes", None, "Processes of the runs that will read it (one "
                       "part each).", flag_values=flag_values)
  flags.DEFINE_string("out", None, "The folder to create (must not exist).",
                      flag_values=flag_values)
  cli.define_config_flags(flag_values)


def main(argv):
  cli.start(argv, required=("processes", "out"), flag_values=FLAGS)
  if FLAGS.processes < 1:
    raise app.UsageError(f"--processes must be >= 1, got {FLAGS.processes}")
  if os.path.lexists(FLAGS.out):
    raise app.UsageError(f"--out={FLAGS.out} already exists; choose a new folder")
  cfg = cli.config_from_flags(FLAGS)
  if cfg.partitioned_data:
    raise app.UsageError("--partitioned_data is for training; this command reads the data "
                         "set itself")
  try:
    split = loop.load_data(cfg, reporting.print_record)
    manifest = partition.write_partitions(
        split, FLAGS.out, FLAGS.processes, settings=loop.data_settings(cfg),
        info={"data_dir": os.path.abspath(cfg.data_dir)})
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"wrote {FLAGS.out}: {FLAGS.processes} parts of {split.n_train_users:,} training "
        f"users and {split.n_items:,} items, {size / 1e6:.1f} MB; train with "
        f"--partitioned_data={FLAGS.out} in each of {FLAGS.processes} processes")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
