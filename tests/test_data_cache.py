"""Cache reuse and invalidation, and downloads (no network: a fake opener)."""

import dataclasses
import errno
import hashlib
import io
import os
import re
import stat
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest

from jax_vaecf.core import files
from jax_vaecf.data import download, load_split, readers

_ROWS = "".join(f"{u}::{i}::{4 + (u + i) % 2}::0\n" for u in range(1, 41)
                for i in range(1, 13))


@pytest.fixture
def ml1m(tmp_path):
  d = tmp_path / "ml-1m"
  d.mkdir()
  (d / "ratings.dat").write_text(_ROWS)
  return str(d)


def test_cache_reuse_and_invalidation(tmp_path, ml1m, monkeypatch):
  cache = str(tmp_path / "cache")
  calls = []
  real = readers.read_ml1m
  monkeypatch.setattr(readers, "read_ml1m", lambda p: calls.append(p) or real(p))
  a = load_split("ml-1m", ml1m, cache)
  assert len(calls) == 1
  b = load_split("ml-1m", ml1m, cache)
  assert len(calls) == 1  # served from the cache, the reader not called
  assert (a.test.heldout != b.test.heldout).nnz == 0
  np.testing.assert_array_equal(a.item_ids, b.item_ids)
  load_split("ml-1m", ml1m, cache, seed=1)
  assert len(calls) == 2  # other options, other key
  files = [f for f in os.listdir(cache) if f.endswith(".npz")]
  assert len(files) == 2 and not [f for f in os.listdir(cache) if f.endswith(".tmp")]
  # A changed input file is a new key too.
  with open(os.path.join(ml1m, "ratings.dat"), "a") as f:
    f.write("41::1::5::0\n")
  load_split("ml-1m", ml1m, cache)
  assert len(calls) == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_cache_is_rebuilt(tmp_path, ml1m, monkeypatch, damage):
  cache = str(tmp_path / "cache")
  a = load_split("ml-1m", ml1m, cache)
  (path,) = [os.path.join(cache, f) for f in os.listdir(cache)]
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if damage == "truncate" else b"x" * 100)
  calls = []
  real = readers.read_ml1m
  monkeypatch.setattr(readers, "read_ml1m", lambda p: calls.append(p) or real(p))
  with pytest.warns(RuntimeWarning, match="unusable cache file"):
    b = load_split("ml-1m", ml1m, cache)
  assert len(calls) == 1 and (a.train != b.train).nnz == 0
  assert load_split("ml-1m", ml1m, cache).train.nnz == a.train.nnz  # rewritten intact


def _zip_bytes(members):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name, text in members.items():
      z.writestr(name, text)
  return buf.getvalue()


class _Resp(io.BytesIO):

  def __init__(self, data, length=None):
    super().__init__(data)
    self.headers = {"Content-Length": str(len(data) if length is None else length)}


def test_fetch_movielens_with_fake_opener(tmp_path, monkeypatch, capsys):
  payload = _zip_bytes({"ml-1m/ratings.dat": _ROWS})
  monkeypatch.setitem(download.MD5, "ml-1m", hashlib.md5(payload).hexdigest())
  urls = []
  opener = lambda url: urls.append(url) or _Resp(payload)
  folder = download.fetch_movielens("ml-1m", tmp_path, opener=opener)
  assert urls == ["https://files.grouplens.org/datasets/movielens/ml-1m.zip"]
  assert open(os.path.join(folder, "ratings.dat")).read() == _ROWS
  assert "MB" in capsys.readouterr().err  # progress bar on stderr
  assert download.fetch_movielens("ml-1m", tmp_path, opener=None) == folder  # no refetch


def test_download_checksum_and_truncation(tmp_path):
  payload = b"0123456789" * 1000
  dest = str(tmp_path / "f.zip")
  with pytest.raises(ValueError, match="does not match the published"):
    download.download("u://x", dest, "0" * 32, lambda u: _Resp(payload), progress=False)
  with pytest.raises(ValueError, match="truncated download"):
    download.download("u://x", dest, None, lambda u: _Resp(payload, len(payload) + 5),
                      progress=False)
  assert os.listdir(tmp_path) == []  # nothing half-written
  old = os.umask(0o022)
  try:
    download.download("u://x", dest, None, lambda u: _Resp(payload), progress=False)
  finally:
    os.umask(old)
  assert open(dest, "rb").read() == payload
  assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644  # not mkstemp's 0600


def test_zip_slip_refused(tmp_path):
  archive = tmp_path / "evil.zip"
  archive.write_bytes(_zip_bytes({"../outside.txt": "x"}))
  with pytest.raises(ValueError, match="outside"):
    download.safe_extract(str(archive), str(tmp_path / "cache"))
  assert not (tmp_path / "outside.txt").exists()


def test_missing_files_messages(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    load_split("msd", str(tmp_path))
  assert "train_triplets.txt" in str(e.value) and "millionsongdataset" in str(e.value)
  with pytest.raises(FileNotFoundError, match="download=True"):
    load_split("ml-20m", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="Netflix"):
    load_split("netflix", str(tmp_path))


# Atomic writes (jax_vaecf.core.files), used for every file the project writes.


def _plain_open_mode(folder):
  p = os.path.join(folder, "plain")
  with open(p, "w") as f:
    f.write("x")
  mode = stat.S_IMODE(os.stat(p).st_mode)
  os.remove(p)
  return mode


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_has_normal_permissions(tmp_path, mask):
  old = os.umask(mask)
  try:
    expected = _plain_open_mode(tmp_path)
    files.write_text_atomic(tmp_path / "a.txt", "héllo\n")
    with files.atomic_write(tmp_path / "b.bin") as f:
      f.write(b"\x00\x01")
  finally:
    os.umask(old)
  assert expected == 0o666 & ~mask
  for name in ("a.txt", "b.bin"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected
  assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
  p = tmp_path / "f.txt"
  p.write_text("old\n")
  with pytest.raises(RuntimeError, match="boom"):
    with files.atomic_write(p, "w") as f:
      f.write("new, half written")
      names = os.listdir(tmp_path)
      assert len(names) == 2 and any(files.is_temp_name(n) for n in names)
      raise RuntimeError("boom")
  assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["f.txt"]
  # A failure at the end (a full disk found by fsync) is cleaned up the same way.
  def no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(files.os, "fsync", no_space)
  with pytest.raises(OSError, match="No space left"):
    files.write_text_atomic(p, "new\n")
  assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["f.txt"]
  with pytest.raises(ValueError, match="mode must be"):
    with files.atomic_write(p, "a"):
      pass


def test_remove_stale_temps(tmp_path):
  now = time.time()
  stale = tmp_path / ".x.npz.123.0123abcd.tmp"
  fresh = tmp_path / ".x.npz.456.89abcdef.tmp"
  other = tmp_path / "notes.tmp"  # not ours: never touched
  for p in (stale, fresh, other):
    p.write_bytes(b"partial")
  os.utime(stale, (now - 2 * 3600, now - 2 * 3600))
  os.utime(other, (now - 2 * 3600, now - 2 * 3600))
  assert files.remove_stale_temps(tmp_path) == [str(stale)]
  assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, other.name])
  assert files.remove_stale_temps(tmp_path / "missing") == []



# Cache robustness: corrupt files, killed writers, unwritable folders.


def _counting_reader(monkeypatch):
  calls = []
  real = readers.read_ml1m
  monkeypatch.setattr(readers, "read_ml1m", lambda p: calls.append(p) or real(p))
  return calls


def _deflate_start(path, member):
  """Offset of the first byte of ``member``'s compressed data in a zip file."""
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(member)
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    header = f.read(30)
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def test_cache_with_corrupt_deflate_stream_is_rebuilt(tmp_path, ml1m, monkeypatch):
  cache = str(tmp_path / "cache")
  a = load_split("ml-1m", ml1m, cache)
  (path,) = [os.path.join(cache, f) for f in os.listdir(cache)]
  data = bytearray(open(path, "rb").read())
  # 0xFF opens a final deflate block of the reserved type 3: "invalid block type".
  data[_deflate_start(path, "train.indices.npy")] = 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(zlib.error):  # what numpy lets through: not an OSError
    np.load(path)["train.indices"]
  calls = _counting_reader(monkeypatch)
  with pytest.warns(RuntimeWarning, match=f"{re.escape(path)}: unusable cache file "
                    r"\(error: .*invalid block type"):
    b = load_split("ml-1m", ml1m, cache)
  assert len(calls) == 1 and (a.train != b.train).nnz == 0
  assert os.listdir(cache) == [os.path.basename(path)]
  np.testing.assert_array_equal(np.load(path)["train.indices"], a.train.indices)
  load_split("ml-1m", ml1m, cache)
  assert len(calls) == 1  # the replaced file is served


def test_stale_temp_files_removed_on_next_use(tmp_path, ml1m):
  cache = tmp_path / "cache"
  cache.mkdir()
  old = time.time() - 2 * 3600
  stale = cache / ".ml-1m-0123456789abcdef0123.npz.4242.0123abcd.tmp"
  legacy = cache / "tmpk3j_x9a1.npz.tmp"  # named by the mkstemp of earlier versions
  busy = cache / ".ml-1m-0123456789abcdef0123.npz.4243.89abcdef.tmp"  # being written
  for p in (stale, legacy, busy):
    p.write_bytes(b"PK partial")
  os.utime(stale, (old, old))
  os.utime(legacy, (old, old))
  load_split("ml-1m", ml1m, str(cache))
  names = os.listdir(cache)
  assert busy.name in names and stale.name not in names and legacy.name not in names
  assert len([n for n in names if n.endswith(".npz")]) == 1


def test_cache_file_has_normal_permissions(tmp_path, ml1m):
  old = os.umask(0o022)
  try:
    load_split("ml-1m", ml1m, str(tmp_path / "cache"))
  finally:
    os.umask(old)
  (name,) = os.listdir(tmp_path / "cache")
  assert stat.S_IMODE(os.stat(tmp_path / "cache" / name).st_mode) == 0o644


def test_full_disk_carries_on_uncached(tmp_path, ml1m, monkeypatch):
  cache = tmp_path / "cache"
  expected = load_split("ml-1m", ml1m)
  real = np.savez_compressed

  def full_disk(f, **arrays):
    f.write(b"PK\x03\x04 a few bytes before the disk fills")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez_compressed", full_disk)
  with pytest.warns(RuntimeWarning) as record:
    s = load_split("ml-1m", ml1m, str(cache))
  assert len(record) == 1
  msg = str(record[0].message)
  assert str(cache) in msg and ".npz" in msg and "No space left on device" in msg
  assert (s.train != expected.train).nnz == 0
  assert os.listdir(cache) == []  # no partial file, no temporary file
  monkeypatch.setattr(np, "savez_compressed", real)
  load_split("ml-1m", ml1m, str(cache))
  assert len(os.listdir(cache)) == 1  # space again: cached as usual


def test_cache_dir_that_is_a_file(tmp_path, ml1m):
  not_a_dir = tmp_path / "cache"
  not_a_dir.write_text("precious\n")
  with pytest.warns(RuntimeWarning, match=f"{re.escape(str(not_a_dir))} is not a folder"):
    s = load_split("ml-1m", ml1m, str(not_a_dir))
  assert (s.train != load_split("ml-1m", ml1m).train).nnz == 0
  assert not_a_dir.read_text() == "precious\n"
  assert sorted(os.listdir(tmp_path)) == ["cache", "ml-1m"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_read_only_cache_dir(tmp_path, ml1m):
  cache = tmp_path / "cache"
  cache.mkdir()
  cache.chmod(0o500)
  try:
    with pytest.warns(RuntimeWarning, match="Permission denied"):
      s = load_split("ml-1m", ml1m, str(cache))
    assert s.train.nnz and os.listdir(cache) == []
  finally:
    cache.chmod(0o700)


def test_cache_stores_extra_scalar_fields(tmp_path, monkeypatch):
  """A field added to Split (e.g. a count kept by preprocessing) is stored; a cache
  file written before the field existed is rebuilt, not served without it."""
  from jax_vaecf.data import cache as cache_lib
  from jax_vaecf.data.split import EvalSplit, Split, binary_csr

  @dataclasses.dataclass(frozen=True)
  class NewerSplit(Split):  # names no real Split field will take
    later_count: int = 0
    later_note: str | None = None

  m = binary_csr(np.array([0, 1, 1]), np.array([0, 1, 2]), (2, 3))
  ev = EvalSplit(fold_in=m, heldout=m, user_ids=np.array([5, 6]))
  plain = Split(train=m, validation=None, test=ev, item_ids=np.array([7, 8, 9]),
                train_user_ids=np.array([1, 2]))
  src = tmp_path / "in.txt"
  src.write_text("x")
  args = (str(tmp_path / "cache"), "toy", {"a": 1}, [str(src)])
  cache_lib.cached(lambda: plain, *args)  # the older layout: no such field
  newer = NewerSplit(**{f.name: getattr(plain, f.name)
                        for f in dataclasses.fields(Split)}, later_count=3)
  monkeypatch.setattr(cache_lib, "Split", NewerSplit)
  calls = []
  with pytest.warns(RuntimeWarning, match="no stored split field later_count, later_note"):
    cache_lib.cached(lambda: calls.append(1) or newer, *args)
  back = cache_lib.cached(lambda: calls.append(1) or newer, *args)
  assert len(calls) == 1
  assert isinstance(back, NewerSplit)
  assert back.later_count == 3 and back.later_note is None
  assert (back.test.heldout != m).nnz == 0


def test_cache_keeps_every_scalar_field_of_split(tmp_path, monkeypatch):
  """Today's Split fields (e.g. collapsed_duplicates) come back from the cache as built."""
  from jax_vaecf.data import cache as cache_lib
  from jax_vaecf.data.split import Split
  d = tmp_path / "ml-1m"
  d.mkdir()
  (d / "ratings.dat").write_text(_ROWS + "1::1::5::0\n2::3::4::0\n")  # two repeats
  built = load_split("ml-1m", str(d), str(tmp_path / "cache"))
  calls = _counting_reader(monkeypatch)
  back = load_split("ml-1m", str(d), str(tmp_path / "cache"))
  assert calls == []
  extras = cache_lib._extra_fields(Split, cache_lib._SPLIT_ARRAYS)
  for name in extras:
    assert getattr(back, name) == getattr(built, name), name
  if "collapsed_duplicates" in extras:
    assert back.collapsed_duplicates == 2
