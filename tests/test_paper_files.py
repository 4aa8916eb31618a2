"""The paper's folder format: round trips, and errors on damaged folders that name the
file and line."""

import errno
import os
import stat

import numpy as np
import pytest

from jax_vaecf.core import files
from jax_vaecf.data import paper_files, read_user_lines
from jax_vaecf.data.split import EvalSplit, Split, binary_csr

_PARTS = ("train.csv", "validation_tr.csv", "validation_te.csv", "test_tr.csv",
          "test_te.csv", "unique_sid.txt", "unique_uid.txt")


def _m(rows, cols, n_rows, n_items=4):
  return binary_csr(np.array(rows, np.int64), np.array(cols, np.int64), (n_rows, n_items))


def _tiny_split(item_ids=("10", "11", "12", "13")):
  """3 training users (uids 0-2), 3 validation users (3-5; uid 4 has no rows, as a
  held-out user whose items are all outside training has in the paper's output) and
  2 test users (6-7)."""
  return Split(
      train=_m([0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 3], 3),
      validation=EvalSplit(fold_in=_m([0, 0, 2], [0, 3, 1], 3),
                           heldout=_m([0, 2], [2, 3], 3),
                           user_ids=np.array(["v0", "v1", "v2"])),
      test=EvalSplit(fold_in=_m([0, 1, 1], [1, 0, 2], 2), heldout=_m([0, 1], [3, 1], 2),
                     user_ids=np.array(["t0", "t1"])),
      item_ids=np.array(item_ids), train_user_ids=np.array(["u0", "u1", "u2"]))


def _same(a, b):
  return a.shape == b.shape and (a != b).nnz == 0


@pytest.fixture
def folder(tmp_path):
  d = tmp_path / "pro_sg"
  paper_files.write_vaecf_dir(_tiny_split(), d)
  return d


def _lines(path):
  return path.read_text().splitlines()


def test_round_trip_with_gap_and_normal_permissions(tmp_path):
  s = _tiny_split(item_ids=("a b", "c", "d e f", "g"))  # ids may hold spaces
  old = os.umask(0o022)
  try:
    paper_files.write_vaecf_dir(s, tmp_path / "d")
  finally:
    os.umask(old)
  assert sorted(os.listdir(tmp_path / "d")) == sorted(_PARTS)  # no temporary files
  for name in _PARTS:
    assert stat.S_IMODE(os.stat(tmp_path / "d" / name).st_mode) == 0o644
  r = paper_files.read_vaecf_dir(tmp_path / "d")
  for a, b in ((s.train, r.train), (s.validation.fold_in, r.validation.fold_in),
               (s.validation.heldout, r.validation.heldout),
               (s.test.fold_in, r.test.fold_in), (s.test.heldout, r.test.heldout)):
    assert _same(a, b)
  np.testing.assert_array_equal(r.item_ids, s.item_ids)
  np.testing.assert_array_equal(r.validation.user_ids, s.validation.user_ids)
  np.testing.assert_array_equal(r.test.user_ids, s.test.user_ids)
  # The paper's own output has no unique_uid.txt: the gap at uid 4 is still accepted.
  os.remove(tmp_path / "d" / "unique_uid.txt")
  r = paper_files.read_vaecf_dir(tmp_path / "d")
  assert _same(r.validation.fold_in, s.validation.fold_in)
  np.testing.assert_array_equal(r.test.user_ids, [6, 7])


def test_uid_far_beyond_the_users_is_refused(folder):
  os.remove(folder / "unique_uid.txt")
  train = folder / "train.csv"
  n = len(_lines(train))
  with open(train, "a") as f:
    f.write("1000000000,1\n")
  with pytest.raises(ValueError, match=rf"train.csv, line {n + 1}: uid 1000000000 is far "
                     "beyond the 8 distinct uids"):
    paper_files.read_vaecf_dir(folder)
  # A modest gap (uids nobody uses below the largest) is what held-out users without
  # rows produce; it is accepted.
  train.write_text("uid,sid\n0,0\n1,1\n2,2\n")
  with open(folder / "test_te.csv", "a") as f:
    f.write("500,1\n")
  assert paper_files.read_vaecf_dir(folder).test.n_users == 500 - 6 + 1


def test_uid_beyond_unique_uid_is_refused(folder):
  p = folder / "test_te.csv"
  p.write_text("uid,sid\n6,3\n1000000000,1\n")
  with pytest.raises(ValueError, match=r"test_te.csv, line 3: uid 1000000000 is out of "
                     r"range: .*unique_uid.txt lists 8 users"):
    paper_files.read_vaecf_dir(folder)


def test_header_only_train_is_refused(folder):
  (folder / "train.csv").write_text("uid,sid\n")
  with pytest.raises(ValueError, match=r"train.csv: no rows after the header"):
    paper_files.read_vaecf_dir(folder)


@pytest.mark.parametrize("row, what", [("-3,1", "uid"), ("6,-1", "sid"),
                                       ("-1e30,1", "uid")])
def test_negative_id_names_file_and_line(folder, row, what):
  p = folder / "test_tr.csv"
  lines = _lines(p)
  p.write_text("\n".join(lines[:2] + [row] + lines[2:]) + "\n")
  with pytest.raises(ValueError, match=rf"test_tr.csv, line 3: expected a {what} in "
                     r"\[0, 2\*\*53\), got -"):
    paper_files.read_vaecf_dir(folder)


def test_sid_beyond_unique_sid_names_the_line(folder):
  with open(folder / "validation_te.csv", "a") as f:
    f.write("3,4\n")
  with pytest.raises(ValueError, match=r"validation_te.csv, line 4: sid 4 is out of "
                     r"range: .*unique_sid.txt lists 4 items"):
    paper_files.read_vaecf_dir(folder)


def test_unique_sid_blank_or_empty(folder):
  p = folder / "unique_sid.txt"
  p.write_text("10\n\n12\n13\n")
  with pytest.raises(ValueError, match=r"unique_sid.txt, line 2: blank line"):
    paper_files.read_vaecf_dir(folder)
  p.write_text("\n")
  with pytest.raises(ValueError, match=r"unique_sid.txt: empty file"):
    paper_files.read_vaecf_dir(folder)


@pytest.mark.parametrize("name", ["unique_sid.txt", "unique_uid.txt"])
def test_id_files_name_a_carriage_return_that_ends_no_line(folder, name):
  p = folder / name
  ids = p.read_bytes().split(b"\n")[:-1]
  p.write_bytes(b"\r\n".join(ids) + b"\r\n")  # CRLF line ends read as LF ones
  assert _same(paper_files.read_vaecf_dir(folder).train, _tiny_split().train)
  # A stray CR glued two ids into one: refused with its line, not read as "1011".
  p.write_bytes(b"\n".join(ids[:1] + [ids[1] + b"\r" + ids[2]] + ids[3:]) + b"\n")
  with pytest.raises(ValueError, match=f"{name}, line 2: holds a carriage return"):
    paper_files.read_vaecf_dir(folder)
  p.write_bytes(b"\r".join(ids) + b"\r")
  with pytest.raises(ValueError, match=f"{name}: has CR-only line endings"):
    paper_files.read_vaecf_dir(folder)


def test_failed_write_keeps_old_files_and_no_temporaries(folder, monkeypatch):
  before = {n: (folder / n).read_bytes() for n in _PARTS}
  real = np.savetxt
  calls = []

  def full_disk(f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # validation_tr.csv
      f.write("6,0\n")
      raise OSError(errno.ENOSPC, "No space left on device")
    real(f, *args, **kwargs)

  monkeypatch.setattr(np, "savetxt", full_disk)
  s = _tiny_split()
  with pytest.raises(OSError, match="No space left"):
    paper_files.write_vaecf_dir(s, folder)
  assert sorted(os.listdir(folder)) == sorted(_PARTS)
  assert (folder / "validation_tr.csv").read_bytes() == before["validation_tr.csv"]
  with pytest.raises(ValueError, match=r"item id 'a\\nb' cannot be written"):
    paper_files.write_vaecf_dir(_tiny_split(("a\nb", "c", "d", "e")), folder)


def test_write_user_lines_is_atomic_with_normal_permissions(tmp_path, monkeypatch):
  p = tmp_path / "train.txt"
  old = os.umask(0o027)
  try:
    paper_files.write_user_lines(p, np.array([1, 0]), np.array([5, 6]))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
  assert p.read_text() == "0 6\n1 5\n"
  assert read_user_lines(p).users.size == 2

  def no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(files.os, "fsync", no_space)
  with pytest.raises(OSError, match="No space left"):
    paper_files.write_user_lines(p, np.array([2]), np.array([7]))
  assert p.read_text() == "0 6\n1 5\n" and os.listdir(tmp_path) == ["train.txt"]


def test_raw_ids_survive_exactly(tmp_path):
  # Numeric only when every id is a canonical int64; anything else stays text as written.
  # Bytes that are not UTF-8 ("\xff9", "\xfe9") are two ids, written back byte for byte.
  for ids, kind in (((str(2**53), str(2**53 + 1), "-5", "0"), "i"),
                    (("007", "7", str(2**63), "1.0"), "U"),
                    (("\udcff9", "\udcfe9", "9", "caf\u00e9"), "U")):
    d = tmp_path / kind
    paper_files.write_vaecf_dir(_tiny_split(item_ids=ids), d)
    got = paper_files.read_vaecf_dir(d).item_ids
    assert got.dtype.kind == kind
    assert [str(i) for i in got.tolist()] == list(ids)
    if "9" in ids:
      assert (d / "unique_sid.txt").read_bytes() == b"\xff9\n\xfe9\n9\ncaf\xc3\xa9\n"
