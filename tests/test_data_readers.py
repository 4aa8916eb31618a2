"""Readers: every format on tiny fixture files, and the bad-input messages."""

import gzip

import numpy as np
import pytest

from jax_vaecf.data import readers


def _write(path, text, gz=False):
  data = text.encode()
  if gz:
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


def test_movielens_csv_crlf(tmp_path):
  p = _write(tmp_path / "ratings.csv",
             "userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n1,1029,3.0,1260759179\r\n"
             "7,10,4.5,964982703\r\n")
  x = readers.read_movielens_csv(p)
  np.testing.assert_array_equal(x.users, [1, 1, 7])
  np.testing.assert_array_equal(x.items, [31, 1029, 10])
  np.testing.assert_array_equal(x.ratings, np.float32([2.5, 3.0, 4.5]))
  np.testing.assert_array_equal(x.timestamps, [1260759144, 1260759179, 964982703])
  assert x.users.dtype == np.int64 and x.ratings.dtype == np.float32


def test_ml1m_gz(tmp_path):
  p = _write(tmp_path / "ratings.dat.gz", "1::1193::5::978300760\n2::661::3::978302109\n",
             gz=True)
  x = readers.read_ml1m(p)
  np.testing.assert_array_equal(x.items, [1193, 661])
  np.testing.assert_array_equal(x.ratings, [5, 3])


def test_ml100k_and_pinterest(tmp_path):
  p = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
  x = readers.read_ml100k(p)
  np.testing.assert_array_equal(x.users, [196, 186])
  q = _write(tmp_path / "pinterest-20.train.rating", "0\t0\t1\t0\n0\t1\t1\t0\n3\t7\t1\t0\n")
  y = readers.read_pinterest(q)
  np.testing.assert_array_equal(y.items, [0, 1, 7])


def test_netflix_mv_files_and_combined(tmp_path):
  ts = tmp_path / "nf" / "training_set"
  ts.mkdir(parents=True)
  _write(ts / "mv_0000001.txt", "1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n")
  _write(ts / "mv_0000002.txt", "2:\n2059652,4,2005-09-05\n")
  x = readers.read_netflix(str(tmp_path / "nf"))
  np.testing.assert_array_equal(x.items, [1, 1, 2])
  np.testing.assert_array_equal(x.users, [1488844, 822109, 2059652])
  np.testing.assert_array_equal(x.ratings, [3, 5, 4])
  assert x.timestamps[0] == 1125964800  # 2005-09-06T00:00:00Z
  c = _write(tmp_path / "combined_data_1.txt",
             "1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n2:\n2059652,4,2005-09-05\n")
  y = readers.read_netflix(c)
  np.testing.assert_array_equal(y.items, x.items)
  np.testing.assert_array_equal(y.users, x.users)


def test_lastfm_string_ids_sorted(tmp_path):
  p = _write(tmp_path / "lf.tsv",
             "bb\tmbid-1\tArtist A\t10\n"
             "aa\t\tNo Mbid\t3\n"
             "bb\tmbid-2\tArtist B\t7\n"
             "aa\tmbid-1\tArtist A\t1\n")
  x = readers.read_lastfm(p)
  assert list(x.user_vocab) == [b"aa", b"bb"]
  np.testing.assert_array_equal(x.users, [1, 0, 1, 0])
  # Items are (mbid, name) pairs, sorted: "\tNo Mbid" < "mbid-1\t..." < "mbid-2\t...".
  np.testing.assert_array_equal(x.items, [1, 0, 2, 1])
  np.testing.assert_array_equal(x.ratings, [10, 3, 7, 1])
  assert x.raw_user_ids(np.array([1]))[0] == "bb"


def test_msd(tmp_path):
  p = _write(tmp_path / "train_triplets.txt",
             "u2\tSOB\t1\nu1\tSOA\t5\nu2\tSOA\t2\n")
  x = readers.read_msd(p)
  np.testing.assert_array_equal(x.users, [1, 0, 1])
  np.testing.assert_array_equal(x.items, [1, 0, 0])
  np.testing.assert_array_equal(x.ratings, [1, 5, 2])


def test_delimited_named_columns_and_extra_fields(tmp_path):
  p = _write(tmp_path / "g.csv", "time;item;who;score;note\n5;10;1;4.0;x\n6;11;2;2.0;y\n")
  x = readers.read_delimited(p, delimiter=";", columns=("who", "item", "score", "time"))
  np.testing.assert_array_equal(x.users, [1, 2])
  np.testing.assert_array_equal(x.items, [10, 11])
  np.testing.assert_array_equal(x.ratings, [4.0, 2.0])
  np.testing.assert_array_equal(x.timestamps, [5, 6])
  q = _write(tmp_path / "h.tsv", "a\tx\nb\ty\na\ty\n")
  y = readers.read_delimited(q, delimiter="\t", columns=(0, 1), header=False,
                             string_ids=True)
  np.testing.assert_array_equal(y.users, [0, 1, 0])
  np.testing.assert_array_equal(y.items, [0, 1, 1])
  assert y.ratings is None


def test_user_lines(tmp_path):
  p = _write(tmp_path / "train.txt", "0 5 7 9\n1 5\n2\n")
  x = readers.read_user_lines(p)
  np.testing.assert_array_equal(x.users, [0, 0, 0, 1])
  np.testing.assert_array_equal(x.items, [5, 7, 9, 5])


# ---- bad input: every message names the file and the line ----


@pytest.mark.parametrize("text,line,expect", [
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,3.0\n", 3, "expected 4 fields"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,x,4\n", 3,
     "expected a numeric rating, got 'x'"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,,3.0,4\n", 3, "field 2 is empty"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,3.0,4.5\n", 3, "integer timestamp"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,3.0,nan\n", 3, "integer timestamp"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,inf,4\n", 3, "finite rating"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1, ,3.0,4\n", 3,
     "expected a movieId, got an empty field"),
    ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,3.0,4,5\n", 3, "expected 4 fields"),
    ("uid,sid,rating,timestamp\n1,2,3.0,4\n", 1, "expected the header"),
])
def test_bad_movielens_lines(tmp_path, text, line, expect):
  p = _write(tmp_path / "ratings.csv", text)
  with pytest.raises(ValueError) as e:
    readers.read_movielens_csv(p)
  msg = str(e.value)
  assert p in msg and f"line {line}" in msg and expect in msg


def test_bad_line_found_in_large_file(tmp_path):
  rows = ["%d\t%d\t1\t0" % (i, i) for i in range(50_000)]
  rows[41_234] = "5\t5\tabc\t0"
  p = _write(tmp_path / "p.rating", "\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=r"line 41235: expected a numeric rating, got 'abc'"):
    readers.read_pinterest(p)


def test_empty_and_missing_files(tmp_path):
  p = _write(tmp_path / "u.data", "\n\n")
  with pytest.raises(ValueError, match=r"u\.data: empty file"):
    readers.read_ml100k(p)
  with pytest.raises(FileNotFoundError, match="nope.dat"):
    readers.read_ml1m(str(tmp_path / "nope.dat"))
  q = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
  with pytest.raises(ValueError, match="no data lines"):
    readers.read_movielens_csv(q)


def test_bad_netflix_and_lastfm_and_ngcf(tmp_path):
  p = _write(tmp_path / "combined_data_1.txt", "1:\n5,3,2005-09-06\n6,3,2005-13-45\n")
  with pytest.raises(ValueError) as e:
    readers.read_netflix(p)
  assert "combined_data_1.txt, line 3" in str(e.value) and "date" in str(e.value)
  q = _write(tmp_path / "combined_data_2.txt", "5,3,2005-09-06\n")
  with pytest.raises(ValueError, match=r"line 1: expected a 'MovieID:' line"):
    readers.read_netflix(q)
  r = _write(tmp_path / "lf.tsv", "aa\tm\tA\t3\naa\tm\tA\n")
  with pytest.raises(ValueError, match=r"lf\.tsv, line 2: expected 4 fields"):
    readers.read_lastfm(r)
  s = _write(tmp_path / "lf2.tsv", "aa\tm\tA\t3\naa\tm\tA\tmany\n")
  with pytest.raises(ValueError, match=r"lf2\.tsv, line 2: expected a numeric play count"):
    readers.read_lastfm(s)
  t = _write(tmp_path / "train.txt", "0 1 2\n  \n1 2\n")
  with pytest.raises(ValueError, match=r"train\.txt, line 2: expected 'user item"):
    readers.read_user_lines(t)


def test_corrupt_gzip(tmp_path):
  data = gzip.compress(b"1::2::3::4\n" * 1000)
  p = tmp_path / "ratings.dat.gz"
  p.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="ratings.dat.gz: corrupt or truncated gzip"):
    readers.read_ml1m(str(p))


def test_write_user_lines_round_trips(tmp_path):
  from jax_vaecf.data import read_user_lines, write_user_lines
  users = np.array([3, 1, 3, 0, 1, 3])
  items = np.array([10, 11, 12, 13, 14, 15])
  p = tmp_path / "train.txt"
  write_user_lines(p, users, items)
  assert p.read_text() == "0 13\n1 11 14\n3 10 12 15\n"
  back = read_user_lines(p)
  assert sorted(zip(back.users.tolist(), back.items.tolist())) == sorted(
      zip(users.tolist(), items.tolist()))
  with pytest.raises(ValueError, match="one length"):
    write_user_lines(p, users, items[:2])
