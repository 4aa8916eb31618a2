"""Train, test and benchmark Mult-VAE / Mult-DAE: ``python -m experiments.train``.

  python -m experiments.train --config=demo --workdir=runs/demo
  python -m experiments.train --config=ml20m --data_dir=data/ml-20m --workdir=runs/ml20m
  python -m experiments.train --config=ml20m --workdir=runs/ml20m --notrain --test

``--config`` picks a preset (``experiments/configs.py``); every field of the preset can be
overridden by the flag of the same name (``--help`` lists them). The reference's
``--use_tf_amp`` means ``--precision=bf16`` and ``--number_of_gpus`` means
``--number_of_devices``. Rerunning with the same ``--workdir`` resumes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

from absl import app
from absl import flags

from experiments import cli
from experiments import configs
from experiments import loop
from jax_vaecf import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "ml20m", f"Preset: one of {sorted(configs.PRESETS)}.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, config.")
flags.DEFINE_bool("use_tf_amp", None, "Reference flag: same as --precision=bf16.")
flags.DEFINE_integer("number_of_gpus", None,
                     "Reference flag: same as --number_of_devices (0 = all).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-node: host:port of process 0 (with --num_processes and "
                    "--process_id; leave all three out under SLURM).")
flags.DEFINE_integer("num_processes", None, "Multi-node: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-node: this process's index.")

def _define_config_flags() -> None:
  hints = typing.get_type_hints(configs.Config)
  for field in dataclasses.fields(configs.Config):
    help_text = field.metadata["help"]
    kind = hints[field.name]
    if kind is bool:
      flags.DEFINE_bool(field.name, None, help_text)
    elif kind is int:
      flags.DEFINE_integer(field.name, None, help_text)
    elif kind is float:
      flags.DEFINE_float(field.name, None, help_text)
    elif kind is tuple:
      flags.DEFINE_list(field.name, None, help_text)
    else:
      flags.DEFINE_string(field.name, None, help_text)


_define_config_flags()


def config_from_flags() -> configs.Config:
  """The preset named by ``--config`` with every flag that was given applied."""
  cfg = configs.get_config(FLAGS.config)
  changes = {}
  for field in dataclasses.fields(configs.Config):
    value = getattr(FLAGS, field.name)
    if value is None:
      continue
    if isinstance(getattr(cfg, field.name), tuple):
      try:
        value = tuple(int(v) for v in value if str(v).strip())
      except ValueError:
        raise ValueError(f"--{field.name}: expected comma-separated integers, got "
                         f"{','.join(value)!r}") from None
    changes[field.name] = value
  if FLAGS.use_tf_amp:
    if FLAGS.precision not in (None, "bf16"):
      raise ValueError("--use_tf_amp means --precision=bf16; do not give both")
    changes["precision"] = "bf16"
  if FLAGS.number_of_gpus is not None:
    changes["number_of_devices"] = FLAGS.number_of_gpus
  cfg = cfg.replace(**changes)
  configs.validate(cfg)
  return cfg


def main(argv):
  cli.start(argv, required=("workdir",))
  try:
    cfg = config_from_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, environ=os.environ)
    loop.run(cfg, FLAGS.workdir)
  except (ValueError, FileNotFoundError, loop.TrainingDivergedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
