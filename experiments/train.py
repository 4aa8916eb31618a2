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

_HELP = {
    "dataset": "Data set name (ml-20m, ml-20m_alt, netflix, lastfm, pinterest, msd, "
               "ml-latest-small, ml-1m, ml-100k, csv, ngcf, vaecf_dir).",
    "data_dir": "Folder holding the raw files (or the file itself for csv).",
    "cache_dir": "Where processed splits and downloads go ('' = ~/.cache/jax_vaecf).",
    "download": "Fetch a missing MovieLens archive from GroupLens.",
    "protocol": "heldout_users (the paper's) or per_user.",
    "fold": "ml-100k official split, e.g. u1 (with --protocol=per_user).",
    "n_heldout_users": "Validation and test users each (0 = the data set's default).",
    "heldout_fraction": "Fraction of users held out for validation and for test when "
                        "no count is given.",
    "split_seed": "Seed of the user permutation and fold-in split (paper: 98765).",
    "csv_delimiter": "--dataset=csv: field separator, one or more characters (tab or \\t "
                     "for a tab).",
    "csv_columns": "--dataset=csv: the user,item[,rating[,time]] columns as 0-based "
                   "indices or header names, e.g. userId,movieId,rating,timestamp or 1,0 "
                   "(an empty entry leaves rating or time out); '' = by position.",
    "csv_header": "--dataset=csv: whether line 1 is a header: auto, yes or no.",
    "csv_threshold": "--dataset=csv: a row is a positive when its rating is above this "
                     "(ignored for a file without a rating column).",
    "csv_all_positive": "--dataset=csv: every row is a positive (play counts, clicks), "
                        "whatever its rating.",
    "model": "multvae or multdae.",
    "hidden_dims": "Encoder hidden widths, comma separated ('' = the paper's).",
    "latent_dim": "Latent width of Mult-VAE.",
    "dropout_rate": "Input dropout rate.",
    "number_of_epochs": "Training epochs.",
    "batch_size_train": "Users per training batch (global, over all devices).",
    "batch_size_validation": "Users per validation / test batch.",
    "lr": "Adam learning rate.",
    "adam_b1": "Adam beta1.",
    "adam_b2": "Adam beta2.",
    "lam": "L2 weight on the weight matrices (lam * sum ||W||^2).",
    "anneal_schedule": "KL weight schedule: linear, constant or cyclical.",
    "total_anneal_steps": "Steps for beta to reach 1 (capped at --anneal_cap).",
    "anneal_cap": "Largest KL weight.",
    "anneal_cycle_steps": "Cycle length of the cyclical schedule (0 = total_anneal_steps).",
    "ema_decay": "Above 0: validate, test and serve the exponential moving average of the "
                 "weights with this decay per step (bias-corrected); 0 = the weights.",
    "seed": "Seed of initialisation, batch order, dropout and noise.",
    "validation_step": "Validate every n epochs.",
    "test_ks": "Cut-offs reported in test mode, comma separated.",
    "checkpoint_every": "Epochs between resumable checkpoints.",
    "keep_best": "How many best checkpoints (by validation NDCG@100) to keep.",
    "train": "Train (resuming from --workdir).",
    "test": "Score the best checkpoint of --workdir on the test users.",
    "benchmark": "Report mean epoch time, training users/s and validation time.",
    "warm_up_epochs": "Epochs left out of the benchmark averages.",
    "precision": "fp32, bf16 or fp16 (matmuls; loss and parameters stay float32).",
    "input_format": "auto, sparse or dense first layer and loss.",
    "output_chunk_size": "Users per chunk of the output layer in training and evaluation (sparse "
                         "path): bounds memory at any batch size.",
    "parallel": "Data-parallel mode: sharded (jit over a mesh) or pmap.",
    "number_of_devices": "Local devices to train on (0 = all).",
    "gpu_number": "Use only this local device (-1 = the first).",
    "prefetch": "Batches copied to the device ahead of the step.",
}


def _define_config_flags() -> None:
  hints = typing.get_type_hints(configs.Config)
  for field in dataclasses.fields(configs.Config):
    help_text = _HELP.get(field.name, field.name)
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
