"""Train, test and benchmark Mult-VAE / Mult-DAE: ``python -m experiments.train``.

  python -m experiments.train --config=demo --workdir=runs/demo
  python -m experiments.train --config=ml20m --data_dir=data/ml-20m --workdir=runs/ml20m
  python -m experiments.train --config=ml20m --workdir=runs/ml20m --notrain --test

``--config`` picks a preset (``jax_vaecf/training/configs.py``, default ``ml20m``); every field of
the preset can be overridden by the flag of the same name (``--help`` lists them). The
reference's ``--use_tf_amp`` means ``--precision=bf16`` and ``--number_of_gpus`` means
``--number_of_devices``. ``experiments.accuracy`` and ``experiments.benchmark`` take the
same flags (:mod:`experiments.cli`). Rerunning with the same ``--workdir`` resumes.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import cli
from jax_vaecf.training import engine as loop
from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.core import distributed
from jax_vaecf.training import reporting

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's command line: its own flags and the Config flags (:mod:`experiments.cli`).
  Defined when it runs, not at import: other tools have flags of the same names."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, config.",
                      flag_values=fv)
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-node: host:port of process 0 (with --num_processes and "
                      "--process_id; leave all three out under SLURM).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Multi-node: number of processes.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Multi-node: this process's index.",
                       flag_values=fv)
  cli.define_config_flags(fv)


def main(argv):
  cli.start(argv, required=("workdir",), flag_values=FLAGS)
  cfg = cli.config_from_flags(FLAGS)
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, environ=os.environ)
    loop.run(cfg, FLAGS.workdir, report=reporting.print_record)
  except (ValueError, FileNotFoundError, MemoryError, loop.TrainingDivergedError,
          checkpoint_lib.CheckpointSaveError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
