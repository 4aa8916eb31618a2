"""What each data set is, one entry per data set: files, reader, split defaults, source.

:func:`load.load_split`, the missing-file and download errors, the experiments' choice
of split options and the ``--dataset`` help all read these entries, so adding a data set
is one :class:`DataSet` passed to :func:`register` (below for the built-in ones), plus a
reader in :mod:`readers` when its format is new::

  register(DataSet(
      "my-set", "My clicks (a user,item file)", FILE, files=("clicks.tsv",),
      reader=readers.read_my_clicks, split_defaults=dict(threshold=None, min_uc=5),
      obtain="https://example.org/my-set"))

A data set may also be passed to ``load_split`` directly without registering it.
``print(describe())`` lists every registered set with its files and split defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from typing import Any, Callable, Mapping, Union

# Where the raw data lies relative to ``data_dir`` (which ``load_split`` is given).
FILE = "file"      # One of ``files`` in data_dir or data_dir/<subfolder>; or data_dir
                   # itself when it is a file.
FOLDER = "folder"  # data_dir holds files matching the ``files`` patterns; the reader
                   # takes the folder (or a file given as data_dir).
PAIR = "pair"      # data_dir holds ``files`` = (train, test); split as given.
GIVEN = "given"    # data_dir is the file itself (a format, not a data set: csv).
SPLIT = "split"    # data_dir is a folder holding a finished split; the reader returns
                   # the Split itself, which is never cached.
LAYOUTS = (FILE, FOLDER, PAIR, GIVEN, SPLIT)

GROUPLENS = "https://files.grouplens.org/datasets/movielens/{name}.zip"

# A function, or its name "module.function" in jax_vaecf.data (e.g. "readers.read_ml1m"),
# looked up on each load: the built-in entries name theirs, so this module imports no
# reader (configs builds --dataset's help from it cheaply) and a replaced module
# attribute is the one called.
FunctionRef = Union[Callable[..., Any], str]


def resolve(ref: FunctionRef) -> Callable[..., Any]:
  """The function ``ref`` is or names."""
  if callable(ref):
    return ref
  module, _, name = ref.rpartition(".")
  return getattr(importlib.import_module(f"jax_vaecf.data.{module}"), name)


@dataclasses.dataclass(frozen=True)
class Download:
  """A zip fetched on request (``load_split(download=True)``).

  Attributes:
    archive: the archive's name: it is saved as ``<archive>.zip`` and must unpack into
      a top-level folder of that name.
    url: where it is fetched from.
    md5: the published checksum (GroupLens publishes md5, not sha256); None for an
      archive regenerated over time (ml-latest-small), whose length alone is checked.
  """

  archive: str
  url: str
  md5: str | None


def grouplens(name: str, md5: str | None) -> Download:
  """A MovieLens archive from GroupLens."""
  return Download(name, GROUPLENS.format(name=name), md5)


@dataclasses.dataclass(frozen=True)
class DataSet:
  """One data set: everything ``load_split`` and the error messages need to know.

  Attributes:
    name: the name ``load_split`` and ``--dataset`` take.
    help: one line saying what it is (the split defaults are listed by
      :func:`describe`, from ``split_defaults``).
    layout: one of :data:`LAYOUTS`.
    files: the file names looked for in data_dir, in order (each also ``.gz``), for
      FILE; glob patterns for FOLDER; (train, test) for PAIR; empty for GIVEN and SPLIT.
    reader: path -> :class:`readers.Interactions` (:class:`split.Split` for SPLIT), a
      :data:`FunctionRef`. Its keyword parameters are options ``load_split`` passes
      through (csv's ``delimiter``, ``columns``, ...); they enter the cache key.
    split_defaults: keyword defaults of the split functions; each split function gets
      those it takes (``split_per_user`` only ``threshold`` and ``min_uc``, say).
    split: the data set's own split procedure (a :data:`FunctionRef`), used whatever
      the protocol (ml-20m_alt: :func:`preprocess.split_nvidia_alt`); None: the
      protocol's split.
    fold_files: for FILE sets that also ship official train/test pairs, their names
      with ``{fold}`` (ml-100k: ``u1.base`` / ``u1.test`` for ``fold='u1'``).
    download: the archive ``download=True`` fetches (FILE sets only), or None.
    obtain: where to get the files by hand (for sets without a download), or what the
      GIVEN file is; said by the missing-file error.
  """

  name: str
  help: str
  layout: str
  files: tuple[str, ...] = ()
  reader: FunctionRef | None = None
  split_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  split: FunctionRef | None = None
  fold_files: tuple[str, str] | None = None
  download: Download | None = None
  obtain: str = ""

  def __post_init__(self):
    # Checked here so that a bad entry fails when it is declared, not on first load.
    if self.layout not in LAYOUTS:
      raise ValueError(f"DataSet {self.name!r}: layout {self.layout!r}, expected one of "
                       f"{LAYOUTS}")
    for what in ("reader", "split"):
      ref = getattr(self, what)
      if not (callable(ref) or (isinstance(ref, str) and "." in ref)
              or (ref is None and what == "split")):
        raise ValueError(f"DataSet {self.name!r}: {what} must be a function or its name "
                         f"'module.function' in jax_vaecf.data, got {ref!r}")
    if self.layout in (FILE, FOLDER) and not self.files:
      raise ValueError(f"DataSet {self.name!r}: a {self.layout} layout needs files")
    if self.layout == PAIR and len(self.files) != 2:
      raise ValueError(f"DataSet {self.name!r}: a pair layout needs files=(train, test)")
    if self.download is not None and self.layout != FILE:
      # load_split fetches only where it looks for named files.
      raise ValueError(f"DataSet {self.name!r}: a download needs the file layout")
    if not self.help.strip() or "\n" in self.help:
      raise ValueError(f"DataSet {self.name!r}: help must be one non-empty line")
    # Read-only, so that no caller changes another's defaults through a shared entry.
    object.__setattr__(self, "files", tuple(self.files))
    object.__setattr__(self, "split_defaults",
                       types.MappingProxyType(dict(self.split_defaults)))

  @property
  def subfolder(self) -> str:
    """The folder under data_dir also searched (where an unzipped archive lands)."""
    return self.download.archive if self.download else self.name

  def read(self, path: str, **options) -> Any:
    """The reader applied to ``path``."""
    return resolve(self.reader)(path, **options)

  @property
  def split_fn(self) -> Callable[..., Any] | None:
    """The data set's own split procedure, or None."""
    return None if self.split is None else resolve(self.split)

  @property
  def reader_options(self) -> tuple[str, ...]:
    """The reader's keyword options, which ``load_split`` takes out of its options."""
    params = list(inspect.signature(resolve(self.reader)).parameters.values())[1:]
    return tuple(p.name for p in params
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


# Name -> entry, in the order names are listed. Look entries up with get().
REGISTRY: dict[str, DataSet] = {}


def register(dataset: DataSet, *, replace: bool = False) -> DataSet:
  """Adds ``dataset`` under its name (ValueError when taken, unless ``replace``)."""
  if dataset.name in REGISTRY and not replace:
    raise ValueError(f"register: a data set named {dataset.name!r} exists; pass "
                     "replace=True to replace it")
  REGISTRY[dataset.name] = dataset
  return dataset


def get(name: str) -> DataSet:
  """The entry named ``name``; ValueError listing the names when there is none."""
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown dataset {name!r}, expected one of {names()}") from None


def names() -> tuple[str, ...]:
  """Every registered name, in registration order."""
  return tuple(REGISTRY)


def downloads() -> tuple[Download, ...]:
  """The distinct archives of the registered data sets."""
  return tuple({d.archive: d for d in (s.download for s in REGISTRY.values()) if d}
               .values())


def describe() -> str:
  """A plain-text table of the registered data sets: name, files, split defaults, help."""
  rows = []
  for s in REGISTRY.values():
    files = {GIVEN: "data_dir itself", SPLIT: "the folder data_dir"}.get(
        s.layout, " + ".join(s.files) if s.layout == PAIR else " or ".join(s.files))
    if s.fold_files:
      files += f" (fold: {' + '.join(s.fold_files)})"
    split = (s.split_fn.__name__ if s.split else
             "as given" if s.layout in (PAIR, SPLIT) else "by protocol")
    defaults = ", ".join(f"{k}={v}" for k, v in s.split_defaults.items())
    rows.append((s.name, files, split + (f"; {defaults}" if defaults else ""), s.help))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}"
                   for r in rows)


# The built-in data sets. Split defaults follow the paper (Liang et al. 2018): its three
# sets keep ratings above 3.5 (ML-20M, Netflix) or every play (MSD, whose users and
# songs must have >= 20 and >= 200 plays) and hold out a fixed number of users; the
# others hold out 10% of users twice (heldout_users_fraction).
_ML20M = grouplens("ml-20m", "cd245b17a1ae2cc31bb14903e1204af3")
_RATED = dict(threshold=3.5, min_uc=5)
_IMPLICIT = dict(threshold=None, min_uc=5)

for _entry in (
    DataSet("ml-20m", "MovieLens 20M ratings (the paper's main set).", FILE,
            ("ratings.csv",), "readers.read_movielens_csv",
            dict(n_heldout_users=10_000, **_RATED), download=_ML20M),
    DataSet("ml-20m_alt", "MovieLens 20M with NVIDIA's alternative processing.", FILE,
            ("ratings.csv",), "readers.read_movielens_csv",
            split="preprocess.split_nvidia_alt", download=_ML20M),
    DataSet("netflix", "Netflix Prize ratings (the paper's second set).", FOLDER,
            ("training_set/mv_*.txt", "mv_*.txt", "combined_data_*.txt"),
            "readers.read_netflix", dict(n_heldout_users=40_000, **_RATED),
            obtain="the Netflix Prize data set (e.g. "
                   "https://archive.org/details/nf_prize_dataset.tar or Kaggle "
                   "'netflix-prize-data')"),
    DataSet("lastfm", "Last.fm 360K artist play counts.", FILE,
            ("usersha1-artmbid-artname-plays.tsv",), "readers.read_lastfm", _IMPLICIT,
            obtain="Last.fm Dataset 360K, "
                   "http://ocelma.net/MusicRecommendationDataset/lastfm-360K.html"),
    DataSet("pinterest", "NCF's Pinterest pins (every row a positive).", FILE,
            ("pinterest-20.train.rating",), "readers.read_pinterest", _IMPLICIT,
            obtain="the NCF repository, "
                   "https://github.com/hexiangnan/neural_collaborative_filtering (Data/)"),
    DataSet("msd", "Million Song Dataset taste profile play counts (the paper's third "
            "set).", FILE, ("train_triplets.txt",), "readers.read_msd",
            dict(n_heldout_users=50_000, threshold=None, min_uc=20, min_sc=200),
            obtain="the Echo Nest Taste Profile subset, "
                   "http://millionsongdataset.com/tasteprofile/"),
    DataSet("ml-latest-small", "MovieLens latest-small ratings (a copy ships in "
            "jax_vaecf/demo_data).", FILE, ("ratings.csv",), "readers.read_movielens_csv",
            _RATED, download=grouplens("ml-latest-small", None)),
    DataSet("ml-1m", "MovieLens 1M ratings.", FILE, ("ratings.dat",), "readers.read_ml1m",
            _RATED, download=grouplens("ml-1m", "c4d9eecfca2ab87c1945afe126590906")),
    DataSet("ml-100k", "MovieLens 100K ratings; fold=u1..u5, ua or ub reads that "
            "official train/test pair.", FILE, ("u.data",), "readers.read_ml100k", _RATED,
            fold_files=("{fold}.base", "{fold}.test"),
            download=grouplens("ml-100k", "0e33842e24a9c977be4e0107933c0723")),
    DataSet("csv", "Your own user,item[,rating[,time]] delimited file, given as data_dir "
            "(a row without a rating is a positive).", GIVEN,
            reader="readers.read_delimited", split_defaults=_RATED,
            obtain="a delimited user,item[,rating[,time]] file"),
    DataSet("ngcf", "An NGCF / LightGCN train.txt + test.txt pair (one line per user).",
            PAIR, ("train.txt", "test.txt"), "readers.read_user_lines",
            obtain="the NGCF or LightGCN repository's Data/<set>/ folder"),
    DataSet("vaecf_dir", "The paper's preprocessing output folder (train.csv, ..., "
            "unique_sid.txt), read as written.", SPLIT,
            reader="paper_files.read_vaecf_dir"),
):
  register(_entry)
del _entry
