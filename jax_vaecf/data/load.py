"""One entry point: :func:`load_split` reads, splits and caches a data set.

What each data set is (the files looked for, the reader, the split defaults, where to
get it) is its entry in :mod:`registry`; ``print(registry.describe())`` lists them.
Every default can be overridden by keyword.

The split: ``protocol='heldout_users'`` (the paper's, :func:`split_heldout_users`) or
``'per_user'`` (:func:`split_per_user`: ``heldout_items_fraction``, ``by_time``, ``seed``,
``threshold``, ``min_uc``), unless the data set has its own procedure (ml-20m_alt:
:func:`split_nvidia_alt`), is a given train/test pair (ngcf; ml-100k with ``fold``:
:func:`split_from_files`) or a finished split (vaecf_dir, read as written and never
cached). A reader that yields no ratings (a ``csv`` file without a rating column) lists
positives: every row is kept, whatever the threshold.

``csv`` reads ``user,item[,rating[,time]]`` files with :func:`readers.read_delimited`
(options ``delimiter``, ``columns``, ``header``, ``string_ids``); ``threshold=None``
makes every row a positive (play counts, clicks).
"""

from __future__ import annotations

import glob
import inspect
import os
from typing import Callable

from jax_vaecf.data import cache as cache_lib
from jax_vaecf.data import download as download_lib
from jax_vaecf.data import preprocess, registry
from jax_vaecf.data.split import DUPLICATE_RULE, Split

# The built-in data sets (registry.names() also lists any registered since).
DATASETS = registry.names()

# A run's split settings, passed by callers (the experiments) to the split functions
# that take them: see split_options.
RUN_SPLIT_OPTIONS = ("seed", "heldout_users_fraction", "heldout_items_fraction",
                     "n_heldout_users")


def _entry(dataset: str | registry.DataSet) -> registry.DataSet:
  if isinstance(dataset, registry.DataSet):
    return dataset
  try:
    return registry.get(dataset)
  except ValueError as e:
    raise ValueError(f"load_split: {e}") from None


def _pair_names(entry: registry.DataSet, fold: str | None) -> tuple[str, ...] | None:
  """The (train, test) file names when the split is a given pair, else None."""
  if entry.layout == registry.PAIR:
    return entry.files
  if fold is not None and entry.fold_files:
    return tuple(name.format(fold=fold) for name in entry.fold_files)
  return None


def split_function(dataset: str | registry.DataSet, protocol: str = "heldout_users",
                   fold: str | None = None) -> Callable[..., Split] | None:
  """The function :func:`load_split` splits ``dataset`` with.

  Args:
    dataset: a registered name or a :class:`registry.DataSet`.
    protocol: ``"heldout_users"`` or ``"per_user"``.
    fold: an official train/test pair's name (ml-100k: ``"u1"``..``"u5"``, ``"ua"``,
      ``"ub"``), or ``None``.

  Returns:
    The split function (``Interactions -> Split``), or ``None`` for a finished split
    (vaecf_dir).

  Raises:
    ValueError: an unknown data set or protocol.
  """
  entry = _entry(dataset)
  if entry.layout == registry.SPLIT:
    return None
  if _pair_names(entry, fold) is not None:
    return preprocess.split_from_files
  if entry.split is not None:
    return entry.split_fn
  if protocol == "per_user":
    return preprocess.split_per_user
  if protocol == "heldout_users":
    return preprocess.split_heldout_users
  raise ValueError(f"load_split: unknown protocol {protocol!r}, expected "
                   "'heldout_users' or 'per_user'")


def _parameters(fn: Callable) -> set[str]:
  return set(inspect.signature(fn).parameters)


def split_options(dataset: str | registry.DataSet, protocol: str = "heldout_users",
                  fold: str | None = None) -> tuple[str, ...]:
  """Which of a run's split settings (:data:`RUN_SPLIT_OPTIONS`) the split of
  ``dataset`` takes.

  Args:
    dataset: a registered name or a :class:`registry.DataSet`.
    protocol: ``"heldout_users"`` or ``"per_user"``.
    fold: an official train/test pair's name, or ``None``.

  Returns:
    The names the protocol's split function has (``seed``, ``heldout_users_fraction``,
    ``heldout_items_fraction`` and ``n_heldout_users`` for heldout_users; ``seed`` and
    ``heldout_items_fraction`` for per_user); ``()`` for a data set
    with its own procedure (ml-20m_alt stays the reference's fixed processing), a given
    train/test pair or a finished split.

  Raises:
    ValueError: an unknown data set or protocol.
  """
  entry = _entry(dataset)
  fn = split_function(entry, protocol, fold)
  if fn is None or entry.split is not None:
    return ()
  return tuple(k for k in RUN_SPLIT_OPTIONS if k in _parameters(fn))


def _gz(path: str) -> str | None:
  """``path`` or its gzipped copy (read by content, like every file), if either exists."""
  return next((p for p in (path, path + ".gz") if os.path.isfile(p)), None)


def _find_file(entry: registry.DataSet, data_dir: str, cache_dir: str | None,
               download: bool) -> str:
  if os.path.isfile(data_dir):
    return data_dir
  for folder in (data_dir, os.path.join(data_dir, entry.subfolder)):
    for name in entry.files:
      found = _gz(os.path.join(folder, name))
      if found:
        return found
  if entry.download is not None and download:
    folder = download_lib.fetch(entry.download, cache_dir or data_dir)
    return _find_file(entry, folder, cache_dir, False)
  raise download_lib.missing_files_error(entry, data_dir, cache_dir)


def _find_folder(entry: registry.DataSet, data_dir: str, cache_dir: str | None) -> str:
  # A file given as data_dir is read as is; a folder must hold files of a pattern.
  if os.path.isfile(data_dir) or (os.path.isdir(data_dir) and any(
      glob.glob(os.path.join(data_dir, pattern + "*")) for pattern in entry.files)):
    return data_dir
  raise download_lib.missing_files_error(entry, data_dir, cache_dir)


def _reported(split: Split, report: Callable[[str], None]) -> Split:
  if split.collapsed_duplicates:
    report(f"collapsed {split.collapsed_duplicates:,} repeated (user, item) rows: "
           f"{DUPLICATE_RULE}")
  return split


def load_split(dataset: str | registry.DataSet, data_dir: str | os.PathLike,
               cache_dir: str | os.PathLike | None = None, *, download: bool = False,
               protocol: str = "heldout_users", fold: str | None = None,
               progress: Callable[[str], None] | None = None, **options) -> Split:
  """Reads, splits and (with ``cache_dir``) caches a data set.

  Args:
    dataset: a registered name (:func:`registry.names`; the built-in ones are
      :data:`DATASETS`) or a :class:`registry.DataSet`.
    data_dir: the folder holding the raw file(s), or the file itself.
    cache_dir: where processed splits (and downloads) are kept; None disables caching.
    download: fetch a missing archive (the MovieLens sets) into ``cache_dir``.
    protocol: ``"heldout_users"`` (paper) or ``"per_user"``.
    fold: for a data set with official train/test pairs (ml-100k: ``"u1"``..``"u5"``,
      ``"ua"``, ``"ub"``), reads that pair (per-user protocol).
    progress: called with a short message as each stage of a rebuild starts (reading
      a file, splitting) and with the number of duplicate (user, item) rows collapsed
      when there were any; not called when the split comes from the cache.
    **options: the reader's options (``csv``: ``delimiter``, ``columns``, ``header``,
      ``string_ids``) and the options of the split function used.

  Returns:
    The :class:`Split`: CSR float32 0/1 matrices with int32 indices, ``(n_users,
    n_items)``, and the raw ids of their rows and columns. ``split.stats()`` gives its
    statistics.

  Raises:
    ValueError: an unknown data set or protocol, a malformed file (naming its file and
      line), or a split that leaves no user.
    TypeError: an option that neither the reader nor the split function takes.
    FileNotFoundError: the data set's files are not in ``data_dir`` (the message says
      where to get them).
  """
  entry = _entry(dataset)
  data_dir = os.fspath(data_dir)
  report = progress or (lambda message: None)
  if entry.layout == registry.SPLIT:
    return entry.read(data_dir)
  reader_options = {k: options.pop(k) for k in entry.reader_options if k in options}
  pair_names = _pair_names(entry, fold)
  if pair_names is not None:
    pair = _pair_paths(entry, data_dir, pair_names)
    return _cached_pair_split(entry, pair, cache_dir, fold, options, report)
  path = _raw_path(entry, data_dir, cache_dir, download)
  return _cached_split(entry, path, cache_dir, protocol, fold, reader_options, options,
                       report)


def _pair_paths(entry: registry.DataSet, data_dir: str,
                pair_names: tuple[str, ...]) -> list[str]:
  """The paths of a given (train, test) pair's files in ``data_dir`` (each plain or
  gzipped); ``FileNotFoundError`` naming the first one missing."""
  pair = []
  for file_name in pair_names:
    found = _gz(os.path.join(data_dir, file_name))
    if not found:
      raise download_lib.missing_pair_error(entry, data_dir, pair_names, file_name)
    pair.append(found)
  return pair


def _cached_pair_split(entry: registry.DataSet, pair: list[str], cache_dir: str | None,
                       fold: str | None, options: dict,
                       report: Callable[[str], None]) -> Split:
  """The :class:`Split` of a given (train, test) pair of files, from the cache when its
  files and ``options`` (the split's) are unchanged, else read and cached."""
  def build_pair():
    report(f"reading {pair[0]} and {pair[1]}")
    tr, te = entry.read(pair[0]), entry.read(pair[1])
    report("splitting")
    return _reported(preprocess.split_from_files(tr, te, **options), report)
  return cache_lib.cached(build_pair, cache_dir, entry.name,
                          {"dataset": entry.name, "fold": fold, **options}, pair)


def _raw_path(entry: registry.DataSet, data_dir: str, cache_dir: str | None,
              download: bool) -> str:
  """The raw file (or, for a folder layout, the folder) to read the data set from, as
  its layout finds it; ``FileNotFoundError`` when it is not there."""
  if entry.layout == registry.FOLDER:
    return _find_folder(entry, data_dir, cache_dir)
  if entry.layout == registry.GIVEN:
    if not os.path.isfile(data_dir):
      raise download_lib.missing_files_error(entry, data_dir, cache_dir)
    return data_dir
  return _find_file(entry, data_dir, cache_dir, download)


def _cached_split(entry: registry.DataSet, path: str, cache_dir: str | None, protocol: str,
                  fold: str | None, reader_options: dict, options: dict,
                  report: Callable[[str], None]) -> Split:
  """The :class:`Split` of the raw data at ``path`` by the protocol's split function (the
  data set's defaults overridden by ``options``), from the cache when the file and every
  setting are unchanged, else read, split and cached."""
  split_fn = split_function(entry, protocol, fold)
  takes = _parameters(split_fn)
  kwargs = {k: v for k, v in entry.split_defaults.items() if k in takes}
  kwargs.update(options)
  def build():
    report(f"reading {path}")
    inter = entry.read(path, **reader_options)
    split_kwargs = dict(kwargs)
    if inter.ratings is None and "threshold" in takes:
      # Nothing to threshold: a file of bare (user, item) pairs lists positives.
      split_kwargs["threshold"] = None
    report(f"splitting {len(inter):,} interactions ({split_fn.__name__})")
    return _reported(split_fn(inter, **split_kwargs), report)
  key_options = {"dataset": entry.name, "protocol": protocol, "split": split_fn.__name__,
                 "reader": reader_options, **kwargs}
  return cache_lib.cached(build, cache_dir, entry.name, key_options, [path])
