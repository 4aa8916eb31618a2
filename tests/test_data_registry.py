"""The data-set registry: one entry per set, read by load_split, the errors and the CLI."""

import inspect
import os

import numpy as np
import pytest

from jax_vaecf import data
from jax_vaecf.data import download, preprocess, readers, registry
from jax_vaecf.data.load import load_split, split_function, split_options

_PROTOCOL_SPLITS = (preprocess.split_heldout_users, preprocess.split_per_user)


def _rows(n_users=30, n_items=12):
  """user|item|score lines: every user scores every item, half of them above 2."""
  return "".join(f"{u}|{i}|{1 + (u + i) % 4}\n" for u in range(n_users)
                 for i in range(n_items))


def read_pipes(path, scale=1.0):
  """A tiny format of this test's own: ``user|item|score`` lines; ``scale`` multiplies
  the scores (a reader option, passed through load_split)."""
  rows = np.array([line.split("|") for line in open(path).read().split()], dtype=np.int64)
  return readers.Interactions(users=rows[:, 0], items=rows[:, 1],
                              ratings=(rows[:, 2] * scale).astype(np.float32),
                              source=os.fspath(path))


_PIPES = registry.DataSet(
    "pipes", "A test's own user|item|score file.", registry.FILE, ("events.psv",),
    read_pipes, dict(threshold=2, min_uc=3), obtain="the test's own writer")


@pytest.fixture
def scratch_registry(monkeypatch):
  """A copy of the registry that the test may add to; the original comes back after."""
  monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
  return registry


def test_names_are_the_built_in_data_sets():
  assert registry.names() == data.DATASETS
  assert len(set(data.DATASETS)) == len(data.DATASETS)


@pytest.mark.parametrize("name", data.DATASETS)
def test_every_entry_is_loadable_in_principle(name):
  s = registry.get(name)
  assert s.name == name
  assert s.help.strip() and "\n" not in s.help
  assert s.layout in registry.LAYOUTS
  assert s.files or s.layout in (registry.GIVEN, registry.SPLIT)
  assert callable(registry.resolve(s.reader))  # a name that still resolves
  if s.split is not None:
    assert callable(s.split_fn)
  if s.layout in (registry.FILE, registry.FOLDER):
    # The missing-file error can say how to get the files.
    assert s.download is not None or s.obtain
  if s.download is not None:
    assert s.download.url.endswith(f"/{s.download.archive}.zip")
    assert download.MD5[s.download.archive] == s.download.md5
  # Every split default is a keyword of some split the set can use.
  takes = set()
  for fn in (s.split_fn,) if s.split else _PROTOCOL_SPLITS:
    takes |= set(inspect.signature(fn).parameters)
  assert set(s.split_defaults) <= takes
  assert s.reader_options == (("delimiter", "columns", "header", "string_ids")
                              if name == "csv" else ())


def test_entries_are_checked_when_declared_and_names_are_unique(scratch_registry):
  with pytest.raises(ValueError, match="layout 'zip'"):
    registry.DataSet("x", "X.", "zip", ("a",), read_pipes)
  with pytest.raises(ValueError, match="needs files"):
    registry.DataSet("x", "X.", registry.FILE, (), read_pipes)
  with pytest.raises(ValueError, match="reader must be a function"):
    registry.DataSet("x", "X.", registry.FILE, ("a",), "read_pipes")
  with pytest.raises(ValueError, match="help must be one"):
    registry.DataSet("x", "", registry.FILE, ("a",), read_pipes)
  with pytest.raises(ValueError, match="exists"):
    registry.register(registry.get("ml-1m"))
  with pytest.raises(ValueError, match=r"load_split: unknown dataset 'nope', expected one "
                                       r"of \('ml-20m'"):
    load_split("nope", "/nonexistent")
  with pytest.raises(TypeError):
    _PIPES.split_defaults["min_uc"] = 1  # shared entries are read-only


def test_a_data_set_registered_at_run_time_loads_through_load_split(tmp_path,
                                                                    scratch_registry):
  folder = tmp_path / "raw" / "pipes"  # the set's own subfolder is searched too
  folder.mkdir(parents=True)
  (folder / "events.psv").write_text(_rows())
  registry.register(_PIPES)
  assert "pipes" in registry.names() and "pipes" not in data.DATASETS
  assert "pipes" in registry.describe()
  cache = tmp_path / "cache"
  messages = []
  split = load_split("pipes", tmp_path / "raw", cache, n_heldout_users=5, seed=1,
                     progress=messages.append)
  assert any("events.psv" in m for m in messages)
  assert split.train.shape[0] == 20 and split.test.fold_in.shape[0] == 5
  # Scores 3 and 4 are above the entry's threshold of 2: half of each user's items.
  assert split.train.sum() == 20 * 6 and split.n_items == 12
  # The same call comes from the cache; a reader option is a new key.
  messages.clear()
  again = load_split("pipes", tmp_path / "raw", cache, n_heldout_users=5, seed=1,
                     progress=messages.append)
  assert messages == [] and (again.train != split.train).nnz == 0
  doubled = load_split("pipes", tmp_path / "raw", cache, n_heldout_users=5, seed=1,
                       scale=2.0, progress=messages.append)
  assert messages and doubled.train.sum() == 20 * 9  # scores 4, 6 and 8 now pass
  assert len(os.listdir(cache)) == 2
  # The per-user protocol takes the defaults split_per_user has, and the run's seed.
  per_user = load_split("pipes", tmp_path / "raw", None, protocol="per_user")
  assert per_user.protocol == "per_user"
  assert split_function("pipes", "per_user") is preprocess.split_per_user
  assert split_options("pipes", "per_user") == ("seed", "heldout_items_fraction")
  assert split_options("pipes") == ("seed", "heldout_users_fraction", "heldout_items_fraction",
                                    "n_heldout_users")


def test_an_unregistered_entry_loads_when_passed_directly(tmp_path):
  (tmp_path / "events.psv").write_text(_rows())
  pair = registry.DataSet("pipes-pair", "Pipes as a train/test pair.", registry.PAIR,
                          ("a.psv", "b.psv"), read_pipes)
  (tmp_path / "a.psv").write_text(_rows(6, 8))
  (tmp_path / "b.psv").write_text(_rows(6, 10))
  assert "pipes-pair" not in registry.names()
  split = load_split(pair, tmp_path, tmp_path / "cache")
  assert split.protocol == "per_user" and split.train.shape == (6, 8)
  assert split_options(pair) == ()
  direct = load_split(_PIPES, tmp_path / "events.psv", None, n_heldout_users=5)
  assert direct.train.shape[0] == 20


def test_missing_file_errors_name_the_files_and_the_folder(tmp_path):
  empty = str(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    load_split(_PIPES, empty)
  message = str(e.value)
  assert os.path.join(empty, "events.psv") in message  # the file, where it goes
  assert os.path.join(empty, "pipes") in message  # the other folder looked in
  assert "the test's own writer" in message
  with pytest.raises(FileNotFoundError) as e:
    load_split("msd", empty)
  assert (f"put it at {os.path.join(empty, 'train_triplets.txt')}" in str(e.value)
          and "millionsongdataset.com" in str(e.value))
  with pytest.raises(FileNotFoundError) as e:
    load_split("ml-1m", empty, tmp_path / "cache")
  assert (os.path.join(empty, "ratings.dat") in str(e.value)
          and "download=True" in str(e.value) and "ml-1m.zip" in str(e.value))
  with pytest.raises(FileNotFoundError) as e:
    load_split("netflix", empty)
  assert (f"{empty}: no training_set/mv_*.txt or mv_*.txt or combined_data_*.txt"
          in str(e.value) and f"put them in {empty}" in str(e.value))
  (tmp_path / "train.txt").write_text("0 1 2\n")
  with pytest.raises(FileNotFoundError) as e:
    load_split("ngcf", empty)
  assert str(e.value).startswith(f"{os.path.join(empty, 'test.txt')}: not found")
  assert f"train.txt and test.txt in {empty}" in str(e.value)
  with pytest.raises(FileNotFoundError) as e:
    load_split("ml-100k", empty, fold="u3")
  assert f"u3.base and u3.test in {empty}" in str(e.value)
  with pytest.raises(FileNotFoundError, match="expected a delimited"):
    load_split("csv", os.path.join(empty, "x.csv"))


_HELDOUT_USERS_OPTIONS = ("seed", "heldout_users_fraction", "heldout_items_fraction",
                          "n_heldout_users")


@pytest.mark.parametrize("name,protocol,fold,expected", [
    # The split settings the experiments passed before the registry, data set by data set,
    # and the share of each held-out user's items, which both protocols' draws take.
    ("ml-20m", "heldout_users", None, _HELDOUT_USERS_OPTIONS),
    ("msd", "per_user", None, ("seed", "heldout_items_fraction")),
    ("csv", "heldout_users", None, _HELDOUT_USERS_OPTIONS),
    ("ml-100k", "per_user", None, ("seed", "heldout_items_fraction")),
    ("ml-100k", "per_user", "u1", ()),
    ("ngcf", "heldout_users", None, ()),
    ("ml-20m_alt", "heldout_users", None, ()),
    ("ml-20m_alt", "per_user", None, ()),
    ("vaecf_dir", "heldout_users", None, ()),
])
def test_split_options_follow_the_split_function(name, protocol, fold, expected):
  assert split_options(name, protocol, fold) == expected


def test_a_name_and_its_entry_give_the_same_split(tmp_path):
  demo = os.path.join(os.path.dirname(data.__file__), "..", "demo_data", "ml-latest-small")
  a = load_split("ml-latest-small", demo, None)
  b = load_split(registry.get("ml-latest-small"), demo, None)
  assert (a.train != b.train).nnz == 0 and np.array_equal(a.item_ids, b.item_ids)


def test_download_fetches_the_entrys_archive_into_the_cache(tmp_path, monkeypatch):
  asked = []

  def fake_fetch(archive, cache_dir):
    # What download.fetch leaves behind: the archive's top-level folder, unpacked.
    asked.append((archive, cache_dir))
    folder = os.path.join(cache_dir, archive.archive)
    os.makedirs(folder)
    with open(os.path.join(folder, "ratings.dat"), "w") as f:
      f.write("".join(f"{u}::{i}::5::0\n" for u in range(1, 31) for i in range(1, 9)))
    return folder

  monkeypatch.setattr(download, "fetch", fake_fetch)
  cache = str(tmp_path / "cache")
  split = load_split("ml-1m", tmp_path / "empty", cache, download=True, n_heldout_users=5)
  assert asked == [(registry.get("ml-1m").download, cache)]
  assert split.train.shape == (20, 8)
