"""Every setting of a run (:class:`Config`, its validation) and the named presets.

A preset is a :class:`Config` (``get_config(NAME)``; ``--config=NAME`` on the command
line, where every field can be overridden by the flag of the same name). Each preset's
docstring gives its exact command and what to expect.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax_vaecf
from jax_vaecf import model as model_lib
from jax_vaecf.training import parallel as parallel_lib
from jax_vaecf.core import precision as precision_lib
from jax_vaecf.core import schedules
from jax_vaecf.training import steps as train_lib
from jax_vaecf.data import readers
from jax_vaecf.data import split as split_lib

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(jax_vaecf.__file__)), "demo_data",
                         "ml-latest-small")


# What a setting is, declared on it (``tags``), so that every list of settings of one
# kind is read from the fields:
TAGS = {
    "data": "decides the split (a partitioned folder and a per-user results file record "
            "these)",
    "resumable": "may change when a run resumes: it does not alter what the checkpoints "
                 "were trained on or how (data location, run length, evaluation and "
                 "checkpoint cadence, devices, the layout of the same math)",
    "synthetic": "read by a run on synthetic data (experiments.benchmark)",
    "split_file": "shapes the split of a MovieLens ratings file (experiments.bench_data)",
}


def setting(default, help: str, *, element: type = int, tags: tuple[str, ...] = ()):
  """A :class:`Config` field: its default and its one-line help, declared together; every
  tool's flags take both from here. A tuple field holds values of type ``element``;
  ``tags`` say what kind of setting it is (:data:`TAGS`)."""
  unknown = sorted(set(tags) - set(TAGS))
  if unknown:
    raise ValueError(f"setting: unknown tags {unknown}; expected some of {sorted(TAGS)}")
  return dataclasses.field(default=default, metadata={"help": help, "element": element,
                                                      "tags": frozenset(tags)})


def tagged(tag: str) -> tuple[str, ...]:
  """The :class:`Config` fields tagged ``tag`` (:data:`TAGS`), in declaration order."""
  if tag not in TAGS:
    raise ValueError(f"unknown tag {tag!r}; expected one of {sorted(TAGS)}")
  return tuple(f.name for f in dataclasses.fields(Config) if tag in f.metadata["tags"])


def _model_fields(name: str) -> list[tuple[str, dataclasses.Field]]:
  """``(model, field)`` for each registered model whose settings have ``name``."""
  out = []
  for model in model_lib.names():
    fields = model_lib.model_entry(model).settings.__dataclass_fields__
    if name in fields:
      out.append((model, fields[name]))
  return out


def _owners(name: str) -> list[str]:
  """The models that have the setting ``name``."""
  return [model for model, _ in _model_fields(name)]


def model_setting_names() -> tuple[str, ...]:
  """Every registered model's own settings by name (each once, in registry order)."""
  out: dict[str, None] = {}
  for model in model_lib.names():
    for f in model_lib.setting_fields(model_lib.model_entry(model).settings):
      out[f.name] = None
  return tuple(out)


def setting_names() -> tuple[str, ...]:
  """Every setting given by name (a flag, a settings file): the run's :class:`Config`
  fields, then the models' own settings."""
  return tuple(f.name for f in dataclasses.fields(Config)
               if f.name != "model_settings") + model_setting_names()


def _field(name: str) -> dataclasses.Field:
  if name in Config.__dataclass_fields__:
    return Config.__dataclass_fields__[name]
  found = _model_fields(name)
  if not found:
    raise KeyError(f"no setting {name!r}")
  return found[0][1]


def element_of(name: str) -> type:
  """The type of each value of the tuple setting ``name`` (``int`` or ``float``)."""
  return _field(name).metadata["element"]


def default_of(name: str):
  """The default of the setting ``name`` (a model's own: its first owner's)."""
  return _field(name).default


def flag_type(name: str) -> type:
  """The Python type of the setting ``name`` (``tuple`` for a list)."""
  default = default_of(name)
  return tuple if isinstance(default, tuple) else type(default)


def help_of(name: str) -> str:
  """The help line of the setting ``name`` (a model's own: each owner's, by title)."""
  if name in Config.__dataclass_fields__:
    return Config.__dataclass_fields__[name].metadata["help"]
  helps: dict[str, list[str]] = {}
  for model, f in _model_fields(name):
    helps.setdefault(f.metadata["help"], []).append(model_lib.model_entry(model).title)
  return " ".join(f"{', '.join(titles)}: {text}" for text, titles in helps.items())


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a run. Field names follow the reference's flags where it had one."""

  # Data.
  dataset: str = setting("ml-20m", "Data set: one of " + ", ".join(
      jax_vaecf.data.registry.names()) + " (each is an entry of jax_vaecf/data/registry.py).",
                         tags=("data", "split_file"))
  data_dir: str = setting("data/ml-20m", "Folder holding the raw files (or the file itself "
                                         "for csv).", tags=("resumable",))
  cache_dir: str = setting("", "Where processed splits and downloads go ('' = "
                               "~/.cache/jax_vaecf).", tags=("resumable",))
  download: bool = setting(False, "Fetch a missing MovieLens archive from GroupLens.",
                           tags=("resumable",))
  protocol: str = setting("heldout_users", "heldout_users (the paper's) or per_user.",
                          tags=("data",))
  fold: str = setting("", "ml-100k official split, e.g. u1 (with --protocol=per_user).",
                      tags=("data",))
  n_heldout_users: int = setting(0, "Validation and test users each (0 = the data set's "
                                    "default).", tags=("data", "split_file"))
  heldout_users_fraction: float = setting(
      0.1, "--protocol=heldout_users: fraction of the users held out for validation, and "
           "the same fraction again for test (0.1: 10% and 10%, 80% train), when no "
           "count is given (--n_heldout_users 0 and none in the data set's entry).",
      tags=("data", "split_file"))
  heldout_items_fraction: float = setting(
      0.2, "Fraction of each held-out user's items hidden as the targets to predict: "
           "of each validation and test user (--protocol=heldout_users; the rest is "
           "the fold-in the model reads; the paper's 0.2), or of each user, as test "
           "items (--protocol=per_user; a given train/test pair, such as --fold=u1, "
           "keeps its own).",
      tags=("data", "split_file"))
  split_seed: int = setting(98765, "Seed of the user permutation and fold-in split (paper: "
                                   "98765).", tags=("data", "split_file"))
  validation_fraction: float = setting(0.1, "--protocol=per_user: fraction of each user's "
                                            "TRAINING items (not of the users, not of the "
                                            "test items) taken out of training, drawn "
                                            "with --split_seed, as that user's validation "
                                            "targets to choose the best epoch; users with "
                                            "fewer than 5 training items give none; 0 = "
                                            "no validation, the last epoch is tested.",
                                       tags=("data",))
  # --dataset=csv: a user,item[,rating[,time]] file.
  csv_delimiter: str = setting(",", "--dataset=csv: field separator, one or more "
                                    "characters (tab or \\t for a tab).", tags=("data",))
  csv_columns: str = setting("", "--dataset=csv: the user,item[,rating[,time]] columns as "
                                 "0-based indices or header names, e.g. "
                                 "userId,movieId,rating,timestamp or 1,0 (an empty entry "
                                 "leaves rating or time out); '' = by position.",
                             tags=("data",))
  csv_header: str = setting("auto", "--dataset=csv: whether line 1 is a header: auto, yes "
                                    "or no.", tags=("data",))
  csv_threshold: float = setting(3.5, "--dataset=csv: a row is a positive when its rating "
                                      "is above this (ignored for a file without a rating "
                                      "column).", tags=("data",))
  csv_all_positive: bool = setting(False, "--dataset=csv: every row is a positive (play "
                                          "counts, clicks), whatever its rating.",
                                   tags=("data",))
  partitioned_data: str = setting("", "A folder written by python -m experiments.partition "
                                      "for as many processes as the run has: each process "
                                      "reads only its part (memory-mapped) and batches "
                                      "follow the block order (docs/parallel.md); '' = read "
                                      "the data set whole.")
  # Model.
  model: str = setting("multvae", "The model: one of " + ", ".join(model_lib.names()) +
                       " (each is an entry of jax_vaecf.model's registry, which declares "
                       "its own settings).", tags=("synthetic",))
  dropout_rate: float = setting(0.5, "Input dropout rate.", tags=("synthetic",))
  model_settings: object = dataclasses.field(default=None, metadata={
      "help": "The model's own settings: an instance of its entry's settings type "
              "(jax_vaecf.model.ModelEntry.settings; None = its defaults). Each is read "
              "and set by its own name, as a flag too (cfg.hidden_dims, --l2=500).",
      "element": None, "tags": frozenset(("synthetic",))})
  # Optimisation.
  number_of_epochs: int = setting(200, "Training epochs.", tags=("resumable",))
  batch_size_train: int = setting(500, "Users per training batch (global, over all "
                                       "devices).", tags=("synthetic",))
  batch_size_validation: int = setting(2000, "Users per validation / test batch.",
                                       tags=("resumable", "synthetic"))
  lr: float = setting(1e-3, "Adam learning rate.", tags=("synthetic",))
  adam_b1: float = setting(0.9, "Adam beta1.", tags=("synthetic",))
  adam_b2: float = setting(0.999, "Adam beta2.", tags=("synthetic",))
  lam: float = setting(0.0, "L2 weight on the weight matrices (lam * sum ||W||^2).",
                       tags=("synthetic",))
  anneal_schedule: str = setting("linear", "KL weight schedule: linear, constant or "
                                           "cyclical.", tags=("synthetic",))
  total_anneal_steps: int = setting(200_000, "Steps for beta to reach 1 (capped at "
                                             "--anneal_cap).", tags=("synthetic",))
  anneal_cap: float = setting(0.2, "Largest KL weight.", tags=("synthetic",))
  anneal_cycle_steps: int = setting(0, "Cycle length of the cyclical schedule (0 = "
                                       "total_anneal_steps).", tags=("synthetic",))
  anneal_epochs: float = setting(0.0, "Above 0: the anneal length in epochs instead of "
                                      "steps (total_anneal_steps = anneal_epochs x steps "
                                      "per epoch, and the cycle of the cyclical schedule "
                                      "with it), so a setting keeps its meaning on a data "
                                      "set of another size; 0 = total_anneal_steps.")
  kl_gamma: float = setting(0.0, "Above 0: weigh each user's KL term by kl_gamma times "
                                 "the user's number of items (RecVAE's rule) instead of "
                                 "the beta schedule; 0 = the schedule.",
                            tags=("synthetic",))
  ema_decay: float = setting(0.0, "Above 0: validate, test and serve the exponential "
                                  "moving average of the weights with this decay per step "
                                  "(bias-corrected); 0 = the weights.",
                             tags=("synthetic",))
  seed: int = setting(0, "Seed of initialisation, batch order, dropout and noise.",
                      tags=("synthetic",))
  # Evaluation and checkpoints.
  validation_step: int = setting(1, "Validate every n epochs.", tags=("resumable",))
  early_stopping: int = setting(0, "Above 0: stop after this many validations in a row "
                                   "without a better validation NDCG@100 (recorded in "
                                   "metrics.jsonl); 0 = run every epoch.",
                                tags=("resumable",))
  refit: bool = setting(False, "--protocol=per_user: once validation has chosen the "
                        "epoch, train again on every training item (the validation "
                        "targets too) for that many epochs, same seed and schedule, in "
                        "WORKDIR/refit; that model is tested and served.",
                        tags=("resumable",))
  test_ks: tuple = setting((20, 50, 100), "Cut-offs reported in test mode, comma "
                                          "separated.", tags=("resumable",))
  checkpoint_every: int = setting(1, "Epochs between resumable checkpoints.",
                                  tags=("resumable",))
  keep_best: int = setting(1, "How many best checkpoints (by validation NDCG@100) to keep.",
                           tags=("resumable",))
  # Modes (combinable, as the reference's --train / --test / --benchmark).
  train: bool = setting(True, "Train (resuming from --workdir).", tags=("resumable",))
  test: bool = setting(True, "Score the best checkpoint of --workdir on the test users.",
                       tags=("resumable",))
  benchmark: bool = setting(False, "Report mean epoch time, training users/s and "
                                   "validation time.", tags=("resumable",))
  warm_up_epochs: int = setting(1, "Epochs left out of the benchmark averages.",
                                tags=("resumable",))
  # System.
  precision: str = setting("fp32", "fp32, bf16 or fp16 (matmuls; loss and parameters stay "
                                   "float32), or auto: bf16 when the step's large "
                                   "products measure >= 1.2x faster in it on the run's "
                                   "device, else fp32 (the choice is recorded in "
                                   "config.json).", tags=("synthetic",))
  input_format: str = setting("sparse", "sparse (gather-and-sum first layer, fused output "
                                        "layer and loss; the fastest measured) or dense "
                                        "(plain matmuls and autodiff: the check).",
                              tags=("resumable", "synthetic"))
  output_chunk_size: int = setting(1024, "Users per chunk of the output layer in training "
                                         "and evaluation (sparse path): bounds memory at "
                                         "any batch size.",
                                   tags=("resumable", "synthetic"))
  parallel: str = setting("sharded", "Data-parallel mode: sharded (jit over a mesh) or "
                                     "pmap.", tags=("resumable", "synthetic"))
  number_of_devices: int = setting(1, "Local devices to train on (0 = all).",
                                   tags=("resumable", "synthetic"))
  mesh: str = setting("", "Device mesh DATAxMODEL, e.g. 2x4: the batch split over DATA "
                          "rows, the item layers (and their Adam moments) over MODEL "
                          "devices; Nx1 is data parallelism. Uses DATA*MODEL devices "
                          "over all processes, instead of --number_of_devices; empty = "
                          "--number_of_devices data-parallel.",
                      tags=("resumable", "synthetic"))
  gpu_number: int = setting(-1, "Use only this local device (-1 = the first).",
                            tags=("resumable", "synthetic"))
  prefetch: int = setting(2, "Batches copied to the device ahead of the step.",
                          tags=("resumable", "synthetic"))

  def __post_init__(self):
    settings = self.model_settings
    if settings is None or isinstance(settings, dict):
      settings = model_lib.make_settings(self.model, settings, source="model_settings")
    elif not isinstance(settings, model_lib.model_entry(self.model).settings):
      raise ValueError(f"model_settings: a {type(settings).__name__} is not the settings "
                       f"of --model={self.model}")
    object.__setattr__(self, "model_settings", settings)

  def __getattr__(self, name: str):
    # A model's own setting read by its name (cfg.hidden_dims); called only for names
    # that are not fields.
    if name.startswith("__") or name == "model_settings":
      raise AttributeError(name)
    settings = self.__dict__.get("model_settings")
    if settings is not None and name in settings.__dataclass_fields__:
      return getattr(settings, name)
    owners = _owners(name)
    if owners:
      raise AttributeError(f"{name} is a setting of --model={' or '.join(owners)}, not of "
                           f"{self.model}")
    raise AttributeError(f"Config has no setting {name!r}")

  def _carried_to(self, model: str):
    """The settings of ``model`` when a run switches to it: its defaults, with each
    setting it shares with the current model that was changed from that model's
    default (``hidden_dims=(16,)`` stays; Mult-VAE's default widths do not become
    RecVAE's)."""
    old = self.model_settings
    default = type(old)()
    fields = model_lib.model_entry(model).settings.__dataclass_fields__
    carried = {f.name: getattr(old, f.name) for f in model_lib.setting_fields(type(old))
               if f.name in fields and getattr(old, f.name) != getattr(default, f.name)}
    return model_lib.make_settings(model, carried, source=f"--model={model}")

  def replace(self, **changes) -> "Config":
    """A copy with ``changes``: fields of the run, or the model's own settings by name
    (over the current model's settings, or those a new ``model`` takes from them:
    :meth:`_carried_to`; another model's setting at its default is passed over; an empty
    list of a setting declared ``empty_means_default`` means its default, as a flag).
    ``ValueError`` for a setting the model does not have."""
    fields = Config.__dataclass_fields__
    own = {k: changes.pop(k) for k in list(changes) if k not in fields}
    model = changes.get("model", self.model)
    if "model_settings" not in changes:
      changes["model_settings"] = (self.model_settings if model == self.model
                                   else self._carried_to(model))
    for name in list(own):
      if name not in model_setting_names():
        raise ValueError(f"bad setting: Config has no setting {name!r}" + (
            f" (its new name is {RENAMED[name]})" if name in RENAMED else ""))
      owners = _owners(name)
      if model not in owners:
        # Another model's setting at its default says nothing (as in a settings file
        # of the flat layout); changed from it, it would be silently unused.
        value = list(own[name]) if isinstance(own[name], tuple) else own[name]
        if not _another_models_default(name, value):
          raise ValueError(f"bad setting: {name} is a setting of --model="
                           f"{' or '.join(owners)}, not of {model}")
        del own[name]
    if own:
      base = changes["model_settings"]
      if isinstance(base, dict):
        base = model_lib.make_settings(model, base, source="model_settings")
      changes["model_settings"] = model_lib.make_settings(
          model, own, source="bad setting", flat=True, base=base)
    return dataclasses.replace(self, **changes)


def ml20m() -> Config:
  """ML-20M with the paper's hyperparameters (Liang et al. 2018).

  Command: ``python -m experiments.train --config=ml20m --data_dir=DIR --workdir=runs/ml20m``
  (``DIR`` holds MovieLens-20M's ``ratings.csv``; add ``--download`` to fetch it).
  Batch 500, Adam lr 1e-3, 200 epochs, KL cap 0.2 over 200,000 steps, the model with
  the best validation NDCG@100 kept. Paper's test result: Recall@20 0.395, Recall@50
  0.537, NDCG@100 0.426.
  """
  return Config()


def ml20m_large_batch() -> Config:
  """ML-20M with large batches for full GPU speed (NVIDIA's final release settings).

  Command: ``python -m experiments.train --config=ml20m_large_batch --data_dir=DIR
  --workdir=runs/ml20m_lb --precision=bf16 --number_of_devices=0``.
  Batch 24,576, lr 0.004, Adam beta2 0.9, KL cap 0.1 over 15,000 steps, 400 epochs.
  NVIDIA reported validation NDCG@100 of about 0.430 with these settings.
  """
  return ml20m().replace(batch_size_train=24_576, lr=0.004, adam_b2=0.9,
                                anneal_cap=0.1, total_anneal_steps=15_000,
                                number_of_epochs=400, batch_size_validation=10_000)


def ml20m_alt() -> Config:
  """ML-20M with NVIDIA's alternative processing (``jax_vaecf.data.split_nvidia_alt``).

  Command: ``python -m experiments.train --config=ml20m_alt --data_dir=DIR
  --workdir=runs/ml20m_alt``. Same training settings as ``ml20m``.
  """
  return ml20m().replace(dataset="ml-20m_alt")


def netflix() -> Config:
  """Netflix Prize with the paper's protocol (40,000 validation and test users).

  Command: ``python -m experiments.train --config=netflix --data_dir=DIR
  --workdir=runs/netflix`` (``DIR`` holds ``training_set/mv_*.txt`` or
  ``combined_data_*.txt``). Paper: Recall@20 0.351, Recall@50 0.444, NDCG@100 0.386.
  """
  return ml20m().replace(dataset="netflix", data_dir="data/netflix")


def msd() -> Config:
  """Million Song Dataset taste profile with the paper's protocol (50,000 held out).

  Command: ``python -m experiments.train --config=msd --data_dir=DIR --workdir=runs/msd``
  (``DIR`` holds ``train_triplets.txt``). Paper: Recall@20 0.266, Recall@50 0.364,
  NDCG@100 0.316.
  """
  return ml20m().replace(dataset="msd", data_dir="data/msd")


def lastfm() -> Config:
  """Last.fm 360K (295,041 artists), every play a positive, 10% / 10% users held out.

  Command: ``python -m experiments.train --config=lastfm --data_dir=DIR
  --workdir=runs/lastfm`` (``DIR`` holds ``usersha1-artmbid-artname-plays.tsv``).
  """
  return ml20m().replace(dataset="lastfm", data_dir="data/lastfm",
                                batch_size_validation=500)


def pinterest() -> Config:
  """NCF's pinterest-20 (boards as users, pins as items), 10% / 10% users held out.

  Command: ``python -m experiments.train --config=pinterest --data_dir=DIR
  --workdir=runs/pinterest`` (``DIR`` holds ``pinterest-20.train.rating``).
  """
  return ml20m().replace(dataset="pinterest", data_dir="data/pinterest",
                                batch_size_validation=500)


def ml1m() -> Config:
  """MovieLens-1M, the paper's protocol: ratings > 3.5, users with >= 5, 603 / 603 users
  held out, 80/20 fold-in.

  Command: ``python -m experiments.train --config=ml1m --data_dir=DIR --workdir=runs/ml1m``
  (``DIR`` holds ``ratings.dat`` or ``ratings.dat.gz``); for the mean over five seeds,
  ``python -m experiments.accuracy --config=ml1m --data_dir=DIR --root=runs/acc_ml1m``.
  Tuned on the validation users only (``experiments/results/ml1m_tuning.md``): hidden
  layers of 1,200 (latent 200), input dropout 0.7, batch 250, KL cap 0.2 reached after
  10,000 steps, 100 epochs, validation every epoch, and the weights evaluated, kept and
  served as their moving average (``ema_decay`` 0.995). The README's results table gives
  the test metrics this preset reached.
  """
  return ml20m().replace(dataset="ml-1m", data_dir="data/ml-1m",
                                number_of_epochs=100, batch_size_train=250,
                                hidden_dims=(1200,), dropout_rate=0.7,
                                total_anneal_steps=10_000, ema_decay=0.995,
                                batch_size_validation=1000)


def ml1m_dae() -> Config:
  """Mult-DAE on MovieLens-1M (the ``ml1m`` split) with the paper code's DAE settings.

  Command: ``python -m experiments.accuracy --config=ml1m_dae --data_dir=DIR
  --root=runs/acc_ml1m_dae``. Hidden layer 200 (tanh), input dropout 0.5, weight decay
  ``lam = 0.01 / batch size`` (4e-5 at batch 250), batch 250, 150 epochs, the best epoch
  by validation NDCG@100; not tuned further. The README's results table gives its test
  metrics.
  """
  return ml20m().replace(dataset="ml-1m", data_dir="data/ml-1m", model="multdae",
                                number_of_epochs=150, batch_size_train=250,
                                dropout_rate=0.5, lam=0.00004, batch_size_validation=1000)


def ml20m_recvae() -> Config:
  """RecVAE (Shenbin et al. 2020) on ML-20M with the paper's settings (the authors' code's
  defaults).

  Command: ``python -m experiments.train --config=ml20m_recvae --data_dir=DIR
  --workdir=runs/ml20m_recvae``. Encoder of five densely connected layers of 600 with
  LayerNorm, latent 200, input dropout 0.5, the composite prior, KL weight
  ``0.005 * |x_u|`` per user, Adam lr 5e-4, batch 500, 50 epochs, each a round of 3
  encoder passes and 1 decoder pass. The paper's test result: NDCG@100 0.442, Recall@20
  0.414, Recall@50 0.553 (Mult-VAE in the same table: 0.426 / 0.395 / 0.537).
  """
  return ml20m().replace(model="recvae", lr=5e-4, kl_gamma=0.005, number_of_epochs=50,
                         encoder_epochs=3, decoder_epochs=1)


def netflix_recvae() -> Config:
  """RecVAE on Netflix Prize with the paper's protocol and the ``ml20m_recvae`` settings.

  Command: ``python -m experiments.train --config=netflix_recvae --data_dir=DIR
  --workdir=runs/netflix_recvae``. The paper's test result: NDCG@100 0.394, Recall@20
  0.361, Recall@50 0.452. The authors' public code has one set of defaults (those of
  ``ml20m_recvae``), used here unchanged.
  """
  return ml20m_recvae().replace(dataset="netflix", data_dir="data/netflix")


def ml1m_recvae() -> Config:
  """RecVAE on MovieLens-1M (the ``ml1m`` split), chosen on the validation users only.

  Command: ``python -m experiments.accuracy --config=ml1m_recvae --data_dir=DIR
  --root=runs/acc_ml1m_recvae``. The paper's settings (``ml20m_recvae``) with two
  departures: the weights are validated, kept and served as their moving average
  (``ema_decay`` 0.995) and the run lasts 100 epochs instead of 50, the best by
  validation NDCG@100 kept (validation peaked near epoch 70 and fell after). The
  README's results table gives the test metrics this preset reached.
  """
  return ml20m_recvae().replace(dataset="ml-1m", data_dir="data/ml-1m",
                                number_of_epochs=100, ema_decay=0.995,
                                batch_size_validation=1000)


def ml20m_ease() -> Config:
  """EASE (Steck, WWW 2019) on ML-20M, the paper's split, with the EASE paper's l2 = 500.

  Command: ``python -m experiments.train --config=ml20m_ease --data_dir=DIR
  --workdir=runs/ml20m_ease``. One fit, no epochs: the Gram matrix of the 116,677
  training users over 20,108 items, then ``B`` (about 8 GB of device memory at the
  peak). The EASE paper reports test Recall@20 0.391, Recall@50 0.521, NDCG@100 0.420.
  """
  return ml20m().replace(model="ease", l2=(500.0,), number_of_epochs=1)


def netflix_ease() -> Config:
  """EASE on Netflix, the paper's split, with the EASE paper's l2 = 1,000.

  Command: ``python -m experiments.train --config=netflix_ease --data_dir=DIR
  --workdir=runs/netflix_ease``. The EASE paper reports test Recall@20 0.362, Recall@50
  0.445, NDCG@100 0.393 (17,769 items: about 6.3 GB of device memory at the peak).
  """
  return ml20m_ease().replace(dataset="netflix", data_dir="data/netflix", l2=(1000.0,))


def msd_ease() -> Config:
  """EASE on the Million Song Dataset, the paper's split, with the EASE paper's l2 = 200.

  Command: ``python -m experiments.train --config=msd_ease --data_dir=DIR
  --workdir=runs/msd_ease``. The EASE paper reports test Recall@20 0.333, Recall@50
  0.428, NDCG@100 0.389. 41,140 items: on a CPU two 6.3 GiB float32 matrices at the
  peak (the blocked Cholesky factor and LAPACK's potri ran at this size, 2-core AMD
  EPYC: 692 s and 585 s, the machine shared); on an accelerator five, about 34 GB (a
  machine with less is refused before any work, with the figures).
  """
  return ml20m_ease().replace(dataset="msd", data_dir="data/msd", l2=(200.0,))


def ml1m_ease() -> Config:
  """EASE on MovieLens-1M (the ``ml1m`` split), l2 chosen on the validation users.

  Command: ``python -m experiments.train --config=ml1m_ease --data_dir=DIR
  --workdir=runs/ml1m_ease``. The default grid (10 to 10,000) is searched on the
  validation users (on a CPU by golden section, one host fit per value scored; on a GPU
  from one eigendecomposition) and the best kept. EASE has no seed: the split's is the ``ml1m``
  preset's. Expected (README's results table, 2-core AMD EPYC): l2 = 500 chosen, test
  NDCG@100 0.4161, Recall@20 0.3476, Recall@50 0.4654, about 20 s on a CPU.
  """
  return ml20m_ease().replace(dataset="ml-1m", data_dir="data/ml-1m", l2=(),
                              batch_size_validation=1000)


def ml1m_edlae() -> Config:
  """EDLAE (Steck, NeurIPS 2020) on MovieLens-1M (the ``ml1m`` split), its dropout
  probability p and l2 chosen on the validation users.

  Command: ``python -m experiments.train --config=ml1m_edlae --data_dir=DIR
  --workdir=runs/ml1m_edlae``. Every pair of p in 0.1, 0.25, 0.5 and l2 in 100, 300,
  1,000, 3,000 is fitted from one Gram matrix and scored on the validation users; the
  best is kept. Expected (docs/results.md, 2-core AMD EPYC): p = 0.5, l2 = 300 chosen
  (validation NDCG@100 0.4339), test NDCG@100 0.4206, Recall@20 0.3530, Recall@50
  0.4752; about 12 min on a busy 2-core CPU (a Cholesky fit per pair).
  """
  return ml1m_ease().replace(model="edlae")


def yelp2018() -> Config:
  """Mult-VAE on an NGCF / LightGCN ``train.txt`` + ``test.txt`` pair (Yelp2018, Gowalla,
  Amazon-Book as those papers split them): the per-user protocol, Recall@20 as hits / n.

  Command: ``python -m experiments.train --config=yelp2018 --data_dir=DIR
  --workdir=runs/yelp2018`` (``DIR`` holds the two files). The paper's model and
  optimiser (``ml20m``) with two changes measured on Yelp2018's validation targets
  (docs/results.md): the KL weight reaches its cap of 0.2 after 20 epochs
  (``anneal_epochs`` 100) instead of never (200,000 steps are 3,100 epochs of this
  data's 64 batches), and the epoch is chosen on validation targets cut from 10% of
  each user's training items, then the model is trained again on the full rows for
  that many epochs (``refit``) and tested. Expected on Yelp2018 (2-core AMD EPYC): the
  best validation epoch 20 of 28, test Recall@20 (hits / n) 0.0612 and NDCG@20 0.0489
  (seeds 1 and 2 refit for 20 epochs: 0.0619 / 0.0491, 0.0607 / 0.0484), where the
  LightGCN paper reports 0.0584 / 0.0450 for Mult-VAE.
  """
  return ml20m().replace(dataset="ngcf", data_dir="data/yelp2018", protocol="per_user",
                         anneal_epochs=100.0, number_of_epochs=80, validation_step=2,
                         early_stopping=4, refit=True, test_ks=(20, 50, 100))


def yelp2018_edlae() -> Config:
  """EDLAE on an NGCF / LightGCN pair: on Yelp2018 the best model of docs/results.md.

  Command: ``python -m experiments.train --config=yelp2018_edlae --data_dir=DIR
  --workdir=runs/yelp2018_edlae``. The ``yelp2018`` preset's protocol (per-user, 10% of
  each user's training items as validation targets, refit on the full rows, Recall@20
  as hits / n) with EDLAE, every pair of p in 0.25, 0.5 and l2 in 100, 300 scored on the
  validation targets. Expected on Yelp2018 (2-core AMD EPYC): p = 0.5, l2 = 300 chosen
  (validation NDCG@100 0.1102), the refit's test Recall@20 0.0666 and NDCG@20 0.0560
  (the published EASE: 0.0657 / 0.0552); five users x users fits of 200 to 300 s and
  the refit's, 30 minutes in all, 21.7 GB peak resident memory.
  """
  return yelp2018().replace(model="edlae", dropout_p=(0.25, 0.5), l2=(100.0, 300.0))


def ml1m_sparse_ease() -> Config:
  """Sparse EASE (SANSA-style, :mod:`jax_vaecf.models.sparse_ease`) on MovieLens-1M (the
  ``ml1m`` split) with ``ml1m_ease``'s chosen ``l2`` (500).

  Command: ``python -m experiments.train --config=ml1m_sparse_ease --data_dir=DIR
  --workdir=runs/ml1m_sparse_ease``. One sparse fit on the host, each factor keeping 5%
  of its entries, from the whole Gram matrix (``gram_ratio`` 1000 keeps every entry at
  this width) in the minimum-degree order (more accurate here than COLAMD). Expected (docs/results.md, 2-core AMD EPYC): test NDCG@100 0.4144, 0.41%
  below dense EASE's 0.4161, in about 20 s.
  """
  return ml1m_ease().replace(model="sparse_ease", l2=(500.0,), target_density=0.05,
                             gram_ratio=1000.0, ordering="mmd")


def ml_latest_small() -> Config:
  """MovieLens latest-small, the paper's protocol with 10% / 10% users held out.

  Command: ``python -m experiments.train --config=ml-latest-small --data_dir=DIR
  --workdir=runs/mls``.
  """
  return ml20m().replace(dataset="ml-latest-small", data_dir="data/ml-latest-small",
                                number_of_epochs=100, batch_size_train=100,
                                total_anneal_steps=2_000, batch_size_validation=1000)


def ml100k() -> Config:
  """MovieLens-100K, the paper's protocol with 10% / 10% users held out.

  Command: ``python -m experiments.train --config=ml100k --data_dir=DIR
  --workdir=runs/ml100k``. Add ``--protocol=per_user --fold=u1`` for the official
  ``u1.base`` / ``u1.test`` split.
  """
  return ml20m().replace(dataset="ml-100k", data_dir="data/ml-100k",
                                number_of_epochs=100, batch_size_train=100,
                                total_anneal_steps=2_000, batch_size_validation=1000)


def demo() -> Config:
  """A two-minute run on the MovieLens latest-small set shipped inside the package.

  Command: ``python -m experiments.train --config=demo --workdir=runs/demo``. Needs no
  network; trains Mult-VAE for 30 epochs and prints test NDCG@100 / Recall@20 / Recall@50.
  """
  return ml_latest_small().replace(data_dir=DEMO_DATA, number_of_epochs=30,
                                   total_anneal_steps=1_000, validation_step=2)


PRESETS: dict[str, Callable[[], Config]] = {
    "ml20m": ml20m,
    "ml20m_large_batch": ml20m_large_batch,
    "ml20m_alt": ml20m_alt,
    "netflix": netflix,
    "lastfm": lastfm,
    "pinterest": pinterest,
    "msd": msd,
    "ml1m": ml1m,
    "ml1m_dae": ml1m_dae,
    "ml20m_recvae": ml20m_recvae,
    "netflix_recvae": netflix_recvae,
    "ml1m_recvae": ml1m_recvae,
    "ml20m_ease": ml20m_ease,
    "netflix_ease": netflix_ease,
    "msd_ease": msd_ease,
    "ml1m_ease": ml1m_ease,
    "ml1m_edlae": ml1m_edlae,
    "ml1m_sparse_ease": ml1m_sparse_ease,
    "ml-latest-small": ml_latest_small,
    "ml100k": ml100k,
    "yelp2018": yelp2018,
    "yelp2018_edlae": yelp2018_edlae,
    "demo": demo,
}


def get_config(name: str) -> Config:
  """The preset called ``name``, or the settings in the JSON file ``name`` (a run's
  ``config.json``, or the ``best.json`` that ``experiments.tune`` writes)."""
  if name in PRESETS:
    return PRESETS[name]()
  if name.endswith(".json") or os.path.isfile(name):
    try:
      obj = read_settings_file(name)
    except FileNotFoundError:
      raise ValueError(f"--config={name}: no such file") from None
    except ValueError as e:
      raise ValueError(f"--config={e}") from None
    return from_json(obj, name)
  raise ValueError(f"unknown config {name!r}: expected one of {sorted(PRESETS)} or a "
                   "JSON file of settings")


def read_settings_file(path: str) -> dict:
  """The JSON object of a settings file (a run's ``config.json``, a ``best.json``).
  ``FileNotFoundError`` when there is none; ``ValueError`` naming ``path`` when it
  cannot be read or parsed (``"PATH: unreadable (...)"``)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None


# Settings renamed since a run folder, a settings file or a command line could give them,
# old name -> name: read under the old name everywhere (--heldout_fraction counted users,
# which its name did not say).
RENAMED = {"heldout_fraction": "heldout_users_fraction"}

# Settings added since runs recorded their data settings, with the value a record made
# before one existed was made with (the split then hid a fixed 20% of each held-out
# user's items).
ADDED = {"heldout_items_fraction": 0.2}


def current_names(obj: dict, source: str) -> dict:
  """A settings JSON object (a ``config.json``, a settings file, the data settings a
  partitioned folder or a per-user results file records) in the current names:
  each :data:`RENAMED` setting under its new name, each :data:`ADDED` one that it lacks
  with the value it was made with. ``ValueError`` naming ``source`` when it gives a
  setting under both names."""
  out = dict(obj)
  for old, name in RENAMED.items():
    if old in out:
      if name in out:
        raise ValueError(f"{source}: gives both {old} and {name} (its new name); "
                         f"keep {name}")
      out[name] = out.pop(old)
  for name, value in ADDED.items():
    out.setdefault(name, value)
  return out


def to_json(cfg: Config) -> dict:
  """The settings as a JSON object (tuples as lists): the form of ``config.json``."""
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def flat_json(obj: dict) -> dict:
  """A settings JSON object with the model's settings by name beside the run's (the
  layout flags use; ``model_settings`` spread out)."""
  nested = obj.get("model_settings")
  flat = {k: v for k, v in obj.items() if k != "model_settings"}
  return flat | (nested if isinstance(nested, dict) else {})


def from_json(obj, source: str, *, ignore_unknown: bool = False) -> Config:
  """The :class:`Config` of a JSON object written by :func:`to_json` (the model's
  settings nested under ``model_settings``) or of the flat layout (the model's settings
  by name beside the run's, as flags are given); a setting it lacks keeps its default.
  ``ValueError`` naming ``source`` for an unknown setting (unless ``ignore_unknown``: a
  run folder of a newer version read for what this one knows), a value of the wrong
  type, or a model's setting the model does not have."""
  if not isinstance(obj, dict):
    raise ValueError(f"{source}: expected a JSON object of settings")
  obj = current_names(obj, source)
  fields = Config.__dataclass_fields__
  model = obj.get("model", Config.model)
  if model not in model_lib.names():
    raise ValueError(f"{source}: model = {model!r}, expected one of {model_lib.names()}")
  own_names = {f.name for f in model_lib.setting_fields(
      model_lib.model_entry(model).settings)}
  nested = obj.get("model_settings")
  if nested is not None and not isinstance(nested, dict):
    raise ValueError(f"{source}: model_settings must be a JSON object")
  flat = {k: v for k, v in obj.items() if k not in fields and k in own_names}
  # The flat layout of earlier versions wrote every model's settings: another model's
  # left at its default says nothing and is passed over.
  unknown = sorted(k for k in set(obj) - set(fields) - set(flat)
                   if not _another_models_default(k, obj[k]))
  if unknown and not ignore_unknown:
    raise ValueError(f"{source}: unknown settings {unknown}" + "".join(
        f" ({k} is a setting of --model={' or '.join(_owners(k))}, not of {model})"
        for k in unknown if _owners(k)))
  settings = model_lib.make_settings(model, nested, source=f"{source}: model_settings")
  if flat:
    settings = model_lib.make_settings(model, flat, source=source, flat=True,
                                       base=settings)
  changes = {"model_settings": settings}
  for name, value in obj.items():
    if name in fields and name != "model_settings":
      changes[name] = _typed_json(name, value, source)
  return dataclasses.replace(Config(), **changes)


def _another_models_default(name: str, value) -> bool:
  """Whether ``value`` (JSON) is the default of a model's setting ``name`` (an empty
  list: of a setting where it means the default)."""
  for _, f in _model_fields(name):
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    if value == default or (value == [] and f.metadata["empty_means_default"]):
      return True
  return False


def _typed_json(name: str, value, source: str):
  """The JSON ``value`` of the run's setting ``name`` as :class:`Config` holds it."""
  default = Config.__dataclass_fields__[name].default
  if isinstance(default, tuple):
    element = element_of(name)
    kinds = (int, float) if element is float else (int,)
    ok = isinstance(value, list) and all(
        isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    value = tuple(element(v) for v in value) if ok else value
  elif isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  else:
    ok = isinstance(value, type(default)) and not isinstance(value, bool)
  if not ok:
    expected = (f"a list of {element_of(name).__name__}" if isinstance(default, tuple)
                else type(default).__name__)
    raise ValueError(f"{source}: {name} = {value!r}, expected {expected}")
  return value


# Settings a resumed run may change (tagged "resumable"); any other change is refused on
# resume.
RESUMABLE_FIELDS = frozenset(tagged("resumable"))


# The precision policies, and "auto" (resolved by measurement before a run starts:
# jax_vaecf.training.engine.resolve_precision).
AUTO_PRECISION = "auto"
PRECISIONS = tuple(precision_lib.POLICIES) + (AUTO_PRECISION,)


def _mesh_model_axis(text: str) -> int | None:
  """The model axis of ``--mesh`` (1 when empty), ``None`` when it does not parse."""
  if not text:
    return 1
  try:
    return parallel_lib.parse_mesh(text)[1]
  except ValueError:
    return None


def validate(cfg: Config) -> None:
  """Raises ``ValueError`` naming the first nonsensical setting, before any work.

  The checks run in one fixed order (training, devices, annealing and split, CSV input,
  task), so that of several bad settings the same one is always named."""
  checks = [*_training_checks(cfg), *_device_checks(cfg), *_schedule_and_split_checks(cfg),
            *_csv_checks(cfg), *_task_checks(cfg)]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"bad setting: {message}")
  _check_model_settings(cfg)


def _training_checks(cfg: Config) -> list[tuple[bool, str]]:
  """The checks, as (passed, message) pairs, of the numbers that shape training and its
  evaluation: epochs, batch sizes, rates, early stopping, checkpoints, the held-out split,
  the model's name."""
  return [
      (cfg.number_of_epochs >= 0, "number_of_epochs must be >= 0"),
      (cfg.number_of_epochs >= 1 or not cfg.train,
       "number_of_epochs=0 with --train trains nothing: give at least 1, or --notrain "
       "--test to test the run in --workdir"),
      (cfg.batch_size_train >= 1, "batch_size_train must be >= 1"),
      (cfg.batch_size_validation >= 1, "batch_size_validation must be >= 1"),
      (cfg.lr > 0, "lr must be > 0"),
      (0.0 <= cfg.anneal_cap <= 1.0, "anneal_cap must be in [0, 1]"),
      (cfg.total_anneal_steps >= 0, "total_anneal_steps must be >= 0"),
      (cfg.lam >= 0, "lam must be >= 0"),
      (0.0 <= cfg.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
      (0.0 <= cfg.dropout_rate < 1.0, "dropout_rate must be in [0, 1)"),
      (0.0 <= cfg.validation_fraction < 1.0, "validation_fraction must be in [0, 1)"),
      (cfg.early_stopping >= 0, "early_stopping must be >= 0"),
      (cfg.anneal_epochs >= 0, "anneal_epochs must be >= 0"),
      (cfg.validation_step >= 1, "validation_step must be >= 1"),
      (cfg.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
      (cfg.keep_best >= 1, "keep_best must be >= 1"),
      (cfg.warm_up_epochs >= 0, "warm_up_epochs must be >= 0"),
      (cfg.number_of_devices >= 0, "number_of_devices must be >= 0"),
      (all(int(k) >= 1 for k in cfg.test_ks) and cfg.test_ks, "test_ks must be positive"),
      (0.0 < cfg.heldout_users_fraction < 0.5, "heldout_users_fraction must be in (0, 0.5)"),
      (0.0 < cfg.heldout_items_fraction < 1.0, "heldout_items_fraction must be in (0, 1)"),
      (cfg.n_heldout_users >= 0, "n_heldout_users must be >= 0"),
      (cfg.model in model_lib.names(), f"model must be one of {model_lib.names()}"),
      (cfg.kl_gamma >= 0, "kl_gamma must be >= 0"),
  ]


def _device_checks(cfg: Config) -> list[tuple[bool, str]]:
  """The checks, as (passed, message) pairs, of how the run is laid out on the devices:
  precision, input format, output chunks, the parallel mode and the mesh."""
  model_axis = _mesh_model_axis(cfg.mesh)
  return [
      (cfg.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
      (cfg.input_format in train_lib.INPUT_FORMATS,
       f"input_format must be one of {train_lib.INPUT_FORMATS}"),
      (cfg.output_chunk_size >= 1, "output_chunk_size must be >= 1"),
      (cfg.parallel in parallel_lib.MODES, f"parallel must be one of {parallel_lib.MODES}"),
      (model_axis is not None, f"mesh must be DATAxMODEL with positive integers, e.g. "
                               f"2x4, got {cfg.mesh!r}"),
      (not cfg.mesh or cfg.gpu_number < 0, "give --mesh or --gpu_number, not both"),
      (model_axis in (None, 1) or cfg.input_format == "sparse",
       "a mesh with a model axis above 1 needs --input_format=sparse"),
      (model_axis in (None, 1) or cfg.parallel == "sharded",
       "a mesh with a model axis above 1 needs --parallel=sharded"),
  ]


def _schedule_and_split_checks(cfg: Config) -> list[tuple[bool, str]]:
  """The checks, as (passed, message) pairs, of the annealing schedule's and the split
  protocol's names."""
  return [
      (cfg.anneal_schedule in schedules.SCHEDULES,
       f"anneal_schedule must be one of {schedules.SCHEDULES}"),
      (cfg.protocol in split_lib.PROTOCOLS, f"protocol must be one of {split_lib.PROTOCOLS}"),
      (cfg.protocol != "per_user" or (
          cfg.n_heldout_users == 0
          and cfg.heldout_users_fraction == default_of("heldout_users_fraction")),
       f"n_heldout_users={cfg.n_heldout_users}, heldout_users_fraction="
       f"{cfg.heldout_users_fraction:g}: --protocol=per_user holds out no users (each "
       "user's items are split: --heldout_items_fraction for test, "
       "--validation_fraction for validation); leave both at their defaults"),
  ]


def _csv_checks(cfg: Config) -> list[tuple[bool, str]]:
  """The checks, as (passed, message) pairs, of how a CSV file is read: delimiter,
  columns, header, rating threshold."""
  csv_columns = [c.strip() for c in cfg.csv_columns.split(",")] if cfg.csv_columns else []
  csv_named = [c for c in csv_columns if c]
  return [
      (cfg.csv_delimiter != "" and "\n" not in cfg.csv_delimiter
       and "\r" not in cfg.csv_delimiter,
       "csv_delimiter must be one or more characters other than a line break "
       "(tab or \\t for a tab)"),
      (not csv_columns or (2 <= len(csv_columns) <= 4 and all(csv_columns[:2])),
       f"csv_columns={cfg.csv_columns!r}: expected '' or user,item[,rating[,time]] as "
       "0-based indices or header names (an empty entry leaves rating or time out)"),
      (len(set(csv_named)) == len(csv_named),
       f"csv_columns={cfg.csv_columns!r} names one column twice"),
      (cfg.csv_header in readers.HEADER_CHOICES,
       f"csv_header must be {', '.join(list(readers.HEADER_CHOICES)[:-1])} or "
       f"{list(readers.HEADER_CHOICES)[-1]}"),
      (cfg.csv_header != "no" or all(c.isdigit() for c in csv_named),
       f"csv_columns={cfg.csv_columns!r} names header columns but csv_header=no"),
      (-float("inf") < cfg.csv_threshold < float("inf"),
       "csv_threshold must be a finite number"),
  ]


def _task_checks(cfg: Config) -> list[tuple[bool, str]]:
  """The checks, as (passed, message) pairs, of what the run is asked to do: train, test,
  benchmark, refit."""
  return [
      (cfg.train or cfg.test or cfg.benchmark, "nothing to do: give --train, --test or --benchmark"),
      (not cfg.refit or (cfg.protocol == "per_user" and cfg.validation_fraction > 0),
       "refit retrains on the validation targets cut from the training rows: it needs "
       "--protocol=per_user with --validation_fraction above 0 (the held-out-user "
       "protocol trains on every training user already)"),
      (not cfg.refit or cfg.train, "refit follows training: give --train"),
  ]


def _check_model_settings(cfg: Config) -> None:
  """The model is built once (on one item), so that its own checks run before any data
  work (its settings were checked when the Config was made)."""
  entry = model_lib.model_entry(cfg.model)
  try:
    model = model_lib.build_model(cfg.model, 1, settings=cfg.model_settings,
                                  dropout_rate=cfg.dropout_rate)
  except ValueError as e:
    raise ValueError(f"bad setting: {e}") from None
  if entry.fit is not None or model.closed_form:
    # Fitted in one process on one device's copy of the item-item matrix: no
    # optimiser steps to average, no item split of its two item axes.
    title = entry.title
    for ok, message in (
        (cfg.ema_decay == 0, f"{title} is fitted in closed form: no weights to average "
                             "(leave ema_decay at 0)"),
        (_mesh_model_axis(cfg.mesh) in (None, 1),
         f"{title} keeps its item-item matrix whole: a mesh with a model axis above 1 "
         "does not apply"),
        (not cfg.partitioned_data, f"{title} is fitted from every training row in one "
                                   "process: --partitioned_data does not apply")):
      if not ok:
        raise ValueError(f"bad setting: {message}")
