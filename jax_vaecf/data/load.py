"""One entry point: :func:`load_split` reads, splits and caches a named data set.

Defaults per data set (every one can be overridden by keyword):

=================  =================================  ===================================
dataset            file(s) looked for in data_dir      split
=================  =================================  ===================================
ml-20m             ratings.csv                         paper; H=10,000; rating > 3.5
ml-20m_alt         ratings.csv                         :func:`split_nvidia_alt`
netflix            training_set/ or combined_data_*    paper; H=40,000; rating > 3.5
msd                train_triplets.txt                  paper; H=50,000; min_sc=200,
                                                       min_uc=20; every row positive
lastfm             usersha1-artmbid-artname-plays.tsv  paper; 10% / 10%; every row positive
pinterest          pinterest-20.train.rating           paper; 10% / 10%; every row positive
ml-latest-small    ratings.csv                         paper; 10% / 10%; rating > 3.5
ml-1m              ratings.dat(.gz)                    paper; 10% / 10%; rating > 3.5
ml-100k            u.data (or u1..u5/ua/ub .base/.test paper; 10% / 10%; rating > 3.5
                   with ``fold='u1'``)
csv                the file ``data_dir``               paper unless ``protocol='per_user'``;
                                                       rating > 3.5; every row positive
                                                       without a rating column
ngcf               train.txt + test.txt (or .gz)       per-user (given files)
vaecf_dir          the paper's output folder           as written (never cached)
=================  =================================  ===================================

``protocol='per_user'`` switches any single-file set to :func:`split_per_user`
(``test_prop``, ``by_time``, ``seed``, ``threshold``, ``min_uc``).

``csv`` reads ``user,item[,rating[,time]]`` files with :func:`readers.read_delimited`
(options ``delimiter``, ``columns``, ``header``, ``string_ids``); ``threshold=None``
makes every row a positive (play counts, clicks), as does a file without a rating
column, whatever the threshold.
"""

from __future__ import annotations

import glob
import os
from typing import Callable

from jax_vaecf.data import cache as cache_lib
from jax_vaecf.data import download as download_lib
from jax_vaecf.data import paper_files, preprocess, readers
from jax_vaecf.data.split import Split

DATASETS = ("ml-20m", "ml-20m_alt", "netflix", "lastfm", "pinterest", "msd",
            "ml-latest-small", "ml-1m", "ml-100k", "csv", "ngcf", "vaecf_dir")

_MOVIELENS = {"ml-20m": "ml-20m", "ml-20m_alt": "ml-20m", "ml-latest-small":
              "ml-latest-small", "ml-1m": "ml-1m", "ml-100k": "ml-100k"}

_FILES = {
    "ml-20m": ("ratings.csv",), "ml-20m_alt": ("ratings.csv",),
    "ml-latest-small": ("ratings.csv",), "ml-1m": ("ratings.dat",),
    "ml-100k": ("u.data",), "msd": ("train_triplets.txt",),
    "lastfm": ("usersha1-artmbid-artname-plays.tsv",),
    "pinterest": ("pinterest-20.train.rating",),
}

_SPLIT_DEFAULTS = {
    "ml-20m": dict(n_heldout_users=10_000, threshold=3.5, min_uc=5),
    "netflix": dict(n_heldout_users=40_000, threshold=3.5, min_uc=5),
    "msd": dict(n_heldout_users=50_000, threshold=None, min_uc=20, min_sc=200),
    "lastfm": dict(threshold=None, min_uc=5),
    "pinterest": dict(threshold=None, min_uc=5),
    "ml-latest-small": dict(threshold=3.5, min_uc=5),
    "ml-1m": dict(threshold=3.5, min_uc=5),
    "ml-100k": dict(threshold=3.5, min_uc=5),
    "csv": dict(threshold=3.5, min_uc=5),
}

_READER_OPTIONS = ("delimiter", "columns", "header", "string_ids")


def _find(dataset: str, data_dir: str, cache_dir, download: bool) -> str:
  if os.path.isfile(data_dir):
    return data_dir
  names = _FILES[dataset]
  for folder in (data_dir, os.path.join(data_dir, _MOVIELENS.get(dataset, dataset))):
    for name in names:
      for cand in (name, name + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
          return p
  expected = os.path.join(data_dir, names[0])
  if dataset in _MOVIELENS:
    name = _MOVIELENS[dataset]
    if download:
      folder = download_lib.fetch_movielens(name, cache_dir or data_dir)
      return _find(dataset, folder, cache_dir, False)
    raise FileNotFoundError(
        f"{expected}: not found. Pass download=True to fetch "
        f"{download_lib.GROUPLENS.format(name=name)} into {cache_dir or data_dir}, or "
        "unzip it there yourself.")
  raise download_lib.missing_file_error(dataset, expected)


def _read(dataset: str, path: str, reader_options: dict) -> readers.Interactions:
  if dataset in ("ml-20m", "ml-20m_alt", "ml-latest-small"):
    return readers.read_movielens_csv(path)
  if dataset == "ml-1m":
    return readers.read_ml1m(path)
  if dataset == "ml-100k":
    return readers.read_ml100k(path)
  if dataset == "netflix":
    return readers.read_netflix(path)
  if dataset == "lastfm":
    return readers.read_lastfm(path)
  if dataset == "msd":
    return readers.read_msd(path)
  if dataset == "pinterest":
    return readers.read_pinterest(path)
  if dataset == "csv":
    return readers.read_delimited(path, **reader_options)
  raise AssertionError(dataset)


def _reported(split: Split, report: Callable[[str], None]) -> Split:
  if split.collapsed_duplicates:
    report(f"collapsed {split.collapsed_duplicates:,} duplicate (user, item) rows into "
           "their first occurrence")
  return split


def load_split(dataset: str, data_dir: str | os.PathLike,
               cache_dir: str | os.PathLike | None = None, *, download: bool = False,
               protocol: str = "heldout_users", fold: str | None = None,
               progress: Callable[[str], None] | None = None, **options) -> Split:
  """Reads, splits and (with ``cache_dir``) caches a data set.

  Args:
    dataset: one of :data:`DATASETS`.
    data_dir: the folder holding the raw file(s), or the file itself.
    cache_dir: where processed splits (and downloads) are kept; None disables caching.
    download: fetch a missing MovieLens archive from GroupLens into ``cache_dir``.
    protocol: ``"heldout_users"`` (paper) or ``"per_user"``.
    fold: ml-100k only: ``"u1"``..``"u5"``, ``"ua"``, ``"ub"`` uses the official
      ``.base``/``.test`` pair (per-user protocol).
    progress: called with a short message as each stage of a rebuild starts (reading
      a file, splitting) and with the number of duplicate (user, item) rows collapsed
      when there were any; not called when the split comes from the cache.
    **options: reader options for ``csv`` (``delimiter``, ``columns``, ``header``,
      ``string_ids``) and the options of the split function used.

  Returns:
    The :class:`Split`. Call ``split.stats()`` for its statistics.
  """
  if dataset not in DATASETS:
    raise ValueError(f"load_split: unknown dataset {dataset!r}, expected one of {DATASETS}")
  data_dir = os.fspath(data_dir)
  report = progress or (lambda message: None)
  if dataset == "vaecf_dir":
    return paper_files.read_vaecf_dir(data_dir)
  reader_options = {k: options.pop(k) for k in _READER_OPTIONS if k in options}
  if dataset == "ngcf" or (dataset == "ml-100k" and fold is not None):
    if dataset == "ngcf":
      names = ("train.txt", "test.txt")
      read = readers.read_user_lines
    else:
      names = (f"{fold}.base", f"{fold}.test")
      read = readers.read_ml100k
    pair = []
    for name in names:
      p = os.path.join(data_dir, name)
      # Gzipped copies are read too (by content), as for every other data set.
      found = [c for c in (p, p + ".gz") if os.path.isfile(c)]
      if not found:
        raise FileNotFoundError(f"{p}: not found (nor {name}.gz), expected the {dataset} "
                                "train/test pair")
      pair.append(found[0])
    def build():
      report(f"reading {pair[0]} and {pair[1]}")
      tr, te = read(pair[0]), read(pair[1])
      report("splitting")
      return _reported(preprocess.split_from_files(tr, te, **options), report)
    return cache_lib.cached(build, cache_dir, dataset,
                            {"dataset": dataset, "fold": fold, **options}, pair)
  if dataset == "netflix":
    path = data_dir
    if not os.path.exists(path) or (os.path.isdir(path) and not (
        glob.glob(os.path.join(path, "training_set", "mv_*"))
        or glob.glob(os.path.join(path, "mv_*"))
        or glob.glob(os.path.join(path, "combined_data_*")))):
      raise download_lib.missing_file_error("netflix", os.path.join(path, "training_set"))
  else:
    if dataset == "csv" and not os.path.isfile(data_dir):
      raise FileNotFoundError(f"{data_dir}: not found, expected a delimited file")
    path = data_dir if dataset == "csv" else _find(dataset, data_dir, cache_dir, download)
  if dataset == "ml-20m_alt":
    split_fn = preprocess.split_nvidia_alt
    kwargs = dict(options)
  elif protocol == "per_user":
    split_fn = preprocess.split_per_user
    kwargs = {k: v for k, v in _SPLIT_DEFAULTS.get(dataset, {}).items()
              if k in ("threshold", "min_uc")}
    kwargs.update(options)
  elif protocol == "heldout_users":
    split_fn = preprocess.split_heldout_users
    kwargs = dict(_SPLIT_DEFAULTS.get(dataset, {}))
    kwargs.update(options)
  else:
    raise ValueError(f"load_split: unknown protocol {protocol!r}, expected "
                     "'heldout_users' or 'per_user'")
  def build():
    report(f"reading {path}")
    inter = _read(dataset, path, reader_options)
    split_kwargs = dict(kwargs)
    if dataset == "csv" and inter.ratings is None:
      # Nothing to threshold: a file of bare (user, item) pairs lists positives.
      split_kwargs["threshold"] = None
    report(f"splitting {len(inter):,} interactions ({split_fn.__name__})")
    return _reported(split_fn(inter, **split_kwargs), report)
  key_options = {"dataset": dataset, "protocol": protocol, "split": split_fn.__name__,
                 "reader": reader_options, **kwargs}
  return cache_lib.cached(build, cache_dir, dataset, key_options, [path])
