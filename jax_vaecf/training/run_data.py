"""The split a run's settings ask for: a registered data set read (from the cache when it
can), a partitioned folder's part, or interactions given in Python, with the per-user
protocol's validation targets cut from the training rows."""

from __future__ import annotations

import inspect
import os
import time
from typing import Any, Callable

import jax

from jax_vaecf.training import configs
from jax_vaecf import data as data_lib

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jax_vaecf")

# The Config fields load_data builds the split from (data_dir, cache_dir and download
# say only where the files are): a partitioned folder records them and a run reading it
# must give the same.
DATA_SETTINGS = configs.tagged("data")


def data_settings(cfg: configs.Config) -> dict:
  """The config's :data:`DATA_SETTINGS`, as JSON values."""
  return {name: getattr(cfg, name) for name in DATA_SETTINGS}


def _part_settings(cfg: configs.Config) -> dict:
  """The run's data settings in the terms of its partitioned folder: a folder written
  before a setting was renamed or added (:data:`configs.RENAMED`, :data:`configs.ADDED`)
  records the same split under the old names, and is read as it is."""
  settings = data_settings(cfg)
  try:
    recorded = data_lib.partition.read_manifest(cfg.partitioned_data)["settings"]
    same = configs.current_names(recorded, cfg.partitioned_data) == settings
  except (OSError, ValueError, KeyError, TypeError):
    return settings  # open_part says what is wrong with the folder
  return recorded if same else settings


IN_MEMORY = "in_memory"  # the data set of a run given its data in Python (jax_vaecf.api)


def _split_settings(cfg: configs.Config, dataset: str) -> dict[str, Any]:
  """The run's split settings that the split of ``dataset`` takes: the data set's
  registry entry decides (a given train/test pair, the paper's folder and ml-20m_alt's
  own procedure take none)."""
  settings = {"seed": cfg.split_seed, "heldout_users_fraction": cfg.heldout_users_fraction,
              "heldout_items_fraction": cfg.heldout_items_fraction}
  if cfg.n_heldout_users:  # 0 leaves the data set's default
    settings["n_heldout_users"] = cfg.n_heldout_users
  takes = data_lib.split_options(dataset, cfg.protocol, cfg.fold or None)
  return {k: v for k, v in settings.items() if k in takes}


def with_validation(cfg: configs.Config, split: data_lib.Split) -> data_lib.Split:
  """The per-user protocol's split with its validation targets cut from the training
  rows (``validation_fraction``, seeded by ``split_seed``); any other split as it is."""
  if (split.protocol == "per_user" and split.validation is None
      and cfg.validation_fraction > 0):
    # Validation targets come out of the training rows; the test fold-in stays the
    # user's full training row and the test items are never read.
    split = data_lib.hold_out_validation(split, cfg.validation_fraction, cfg.split_seed)
  return split


def split_interactions(cfg: configs.Config, inter: data_lib.Interactions
                       ) -> data_lib.Split:
  """The config's split of in-memory interactions (:func:`jax_vaecf.data.from_columns`),
  made as a ``--dataset=csv`` file's: the same split function, defaults and split
  settings; ratings above ``csv_threshold`` are positives (every row without ratings,
  or with ``csv_all_positive``). The per-user protocol's validation targets are cut
  when a run takes the split (:func:`jax_vaecf.training.engine.run`), as :func:`load_data` cuts them."""
  entry = data_lib.registry.get("csv")
  fn = data_lib.split_function(entry, cfg.protocol)
  takes = set(inspect.signature(fn).parameters)
  kwargs = {k: v for k, v in entry.split_defaults.items() if k in takes}
  kwargs.update(_split_settings(cfg, "csv"))
  if "threshold" in takes:
    kwargs["threshold"] = (None if inter.ratings is None or cfg.csv_all_positive
                           else cfg.csv_threshold)
  return fn(inter, **kwargs)


def load_data(cfg: configs.Config, report: Callable[[dict], None] | None = None
              ) -> data_lib.Split:
  """The split the config asks for, from the cache when it is there; with
  ``--partitioned_data``, this process's part of that folder
  (:class:`jax_vaecf.data.PartSplit`, memory-mapped). Each preprocessing stage goes to
  ``report`` as ``{"event": "preprocessing", "dataset", "stage", "seconds"}`` (seconds
  since the call)."""
  if cfg.partitioned_data:
    return data_lib.open_part(cfg.partitioned_data, jax.process_index(),
                              jax.process_count(), settings=_part_settings(cfg))
  if cfg.dataset == IN_MEMORY:
    raise ValueError(f"the run's data was given in Python (--dataset={IN_MEMORY}): "
                     "give it again (jax_vaecf.api.fit), or a data set and --data_dir")
  options = _split_settings(cfg, cfg.dataset)
  if cfg.dataset == "csv":
    options.update(csv_reader_options(cfg))
  if not os.path.exists(cfg.data_dir) and not cfg.download:
    raise FileNotFoundError(
        f"--data_dir={cfg.data_dir!r} does not exist; point it at the folder holding the "
        f"{cfg.dataset} files" + (" or add --download"
                                  if data_lib.registry.get(cfg.dataset).download else ""))
  t0 = time.perf_counter()

  def stage_done(stage: str) -> None:
    if report is not None:
      report({"event": "preprocessing", "dataset": cfg.dataset, "stage": stage,
              "seconds": time.perf_counter() - t0})

  split = data_lib.load_split(cfg.dataset, cfg.data_dir,
                              cache_dir=cfg.cache_dir or DEFAULT_CACHE,
                              download=cfg.download, protocol=cfg.protocol,
                              fold=cfg.fold or None, progress=stage_done, **options)
  return with_validation(cfg, split)


def csv_reader_options(cfg: configs.Config) -> dict[str, Any]:
  """The ``csv_*`` settings in :func:`jax_vaecf.data.read_delimited`'s terms (their
  text forms were checked by ``configs.validate``), with the positive threshold."""
  columns = [c.strip() for c in cfg.csv_columns.split(",")] if cfg.csv_columns else None
  return dict(
      delimiter=data_lib.readers.delimiter_of(cfg.csv_delimiter),
      columns=None if columns is None else tuple(
          int(c) if c.isdigit() else (c or None) for c in columns),
      header=data_lib.readers.HEADER_CHOICES[cfg.csv_header],
      threshold=None if cfg.csv_all_positive else cfg.csv_threshold)

