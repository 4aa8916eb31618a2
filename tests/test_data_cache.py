"""Cache reuse and invalidation, and downloads (no network: a fake opener)."""

import errno
import hashlib
import io
import os
import stat
import time
import zipfile

import numpy as np
import pytest

from jax_vaecf import files
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


# Atomic writes (jax_vaecf.files), used for every file the project writes.


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
