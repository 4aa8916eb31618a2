"""Messy real data: repeated (user, item) rows, ids that are not small integers, odd
csv layouts, and the messages for bad input."""

import numpy as np
import pytest

from jax_vaecf.data import format_stats, preprocess, readers
from jax_vaecf.data.load import load_split


def _write(path, text):
  path.write_text(text)
  return str(path)


def _with_duplicates(seed=0, n_users=120, n_items=60, n=6_000):
  """Random interactions where many (user, item) pairs repeat, in shuffled order."""
  rng = np.random.default_rng(seed)
  pop = 1.0 / np.arange(1, n_items + 1)
  return readers.Interactions(
      users=rng.integers(1, n_users + 1, n) * 3,
      items=rng.choice(np.arange(n_items) * 5 + 2, n, p=pop / pop.sum()),
      ratings=(rng.integers(1, 11, n) / 2).astype(np.float32),
      timestamps=rng.integers(0, 10**6, n), source="dups")


def _first_rows(x):
  """The rule by a plain loop: one row per (user, item) pair at its first row's place,
  with the rating of its latest row (largest timestamp; on a tie the later row).

  Returns the rows (no repeats left).
  """
  first, latest = {}, {}
  for k, (u, i) in enumerate(zip(x.users.tolist(), x.items.tolist())):
    first.setdefault((u, i), k)
    if (u, i) not in latest or x.timestamps[k] >= x.timestamps[latest[(u, i)]]:
      latest[(u, i)] = k
  keep = sorted(first.values())
  pairs = [(int(x.users[k]), int(x.items[k])) for k in keep]
  out = x.select(np.array(keep, np.int64))
  ratings = np.float32([x.ratings[latest[p]] for p in pairs])
  return readers.Interactions(users=out.users, items=out.items, ratings=ratings,
                              timestamps=out.timestamps, source=x.source)


def _same(a, b):
  return a.shape == b.shape and (a != b).nnz == 0


def _assert_same_split(a, b):
  np.testing.assert_array_equal(a.item_ids, b.item_ids)
  np.testing.assert_array_equal(a.train_user_ids, b.train_user_ids)
  assert _same(a.train, b.train)
  for ea, eb in ((a.validation, b.validation), (a.test, b.test)):
    if ea is None:
      assert eb is None
      continue
    assert _same(ea.fold_in, eb.fold_in) and _same(ea.heldout, eb.heldout)
    np.testing.assert_array_equal(ea.user_ids, eb.user_ids)


def _pairs(m, user_ids):
  c = m.tocoo()
  return set(zip(user_ids[c.row].tolist(), c.col.tolist()))


@pytest.mark.parametrize("protocol", ["heldout_users", "per_user", "per_user_time",
                                      "nvidia_alt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_duplicates_never_both_folded_in_and_held_out(protocol, seed):
  x = _with_duplicates(seed)
  if protocol == "heldout_users":
    split = lambda d: preprocess.split_heldout_users(d, 12)
  elif protocol == "per_user":
    split = lambda d: preprocess.split_per_user(d, threshold=3.5, min_items_to_split=2)
  elif protocol == "per_user_time":
    split = lambda d: preprocess.split_per_user(d, by_time=True, threshold=None)
  else:
    split = lambda d: preprocess.split_nvidia_alt(d, 0.1, 0.1)  # >= 4 on half stars
  s = split(x)
  for ev in (s.validation, s.test):
    if ev is None:
      continue
    rows = ev.fold_in if s.protocol == "heldout_users" else s.train
    assert rows.multiply(ev.heldout).nnz == 0
    assert ev.heldout.nnz > 0
  deduped = _first_rows(x)
  # Every repeated row counts, whatever its rating.
  assert s.collapsed_duplicates == len(x) - len(deduped) > 0
  # The same split as on the file with one row per pair (the latest rating at the
  # first row's place).
  ref = split(deduped)
  assert ref.collapsed_duplicates == 0
  _assert_same_split(s, ref)
  assert s.stats()["collapsed_duplicates"] == s.collapsed_duplicates
  assert (f"{s.collapsed_duplicates:,} repeated (user, item) rows collapsed: each pair "
          "counts once, before any threshold or filter, with its latest rating"
          in format_stats(s.stats()))


def test_no_duplicates_nothing_collapsed():
  x = readers.Interactions(users=np.repeat([1, 2, 3, 4], 5),
                           items=np.tile(np.arange(5), 4), source="t")
  y, n = preprocess.collapse_duplicates(x)
  assert y is x and n == 0
  s = preprocess.split_heldout_users(x, 1, threshold=None)
  assert s.collapsed_duplicates == 0 and s.stats()["collapsed_duplicates"] == 0
  assert "duplicate" not in format_stats(s.stats())


def test_user_filter_counts_distinct_items():
  # User 1: 4 distinct items, each twice (8 rows); user 2..5: 5 distinct items.
  users = np.array([1] * 8 + [2, 3, 4, 5] * 5)
  items = np.array([10, 11, 12, 13] * 2 + [10] * 4 + [11] * 4 + [12] * 4 + [13] * 4
                   + [14] * 4)
  x = readers.Interactions(users=users, items=items, source="t")
  s = preprocess.split_heldout_users(x, 1, threshold=None, min_uc=5)
  all_users = np.concatenate([s.train_user_ids, s.validation.user_ids, s.test.user_ids])
  assert sorted(all_users.tolist()) == [2, 3, 4, 5]
  assert s.collapsed_duplicates == 4
  t = preprocess.split_per_user(x, threshold=None, min_uc=5)
  assert sorted(t.train_user_ids.tolist()) == [2, 3, 4, 5]
  # Item filter: item 20 has 3 rows from one user, so 1 user < min_sc=2.
  y = readers.Interactions(users=np.array([1, 1, 1, 2, 2]), items=np.array([20] * 3 + [21] * 2),
                           source="t")
  kept = preprocess.filter_triplets(preprocess.collapse_duplicates(y)[0], min_uc=0,
                                    min_sc=2)
  assert len(kept) == 0


def test_collapse_keeps_first_row_and_sums_counts():
  x = readers.Interactions(users=np.array([7, 5, 7, 5, 7, 9]),
                           items=np.array([1, 2, 1, 2, 3, 1]),
                           ratings=np.float32([3, 1, 4, 10, 2, 6]),
                           timestamps=np.array([60, 50, 40, 30, 20, 10]), source="t")
  y, n = preprocess.collapse_duplicates(x, sum_ratings=True)
  assert n == 2
  np.testing.assert_array_equal(y.users, [7, 5, 7, 9])
  np.testing.assert_array_equal(y.items, [1, 2, 3, 1])
  np.testing.assert_array_equal(y.ratings, [7, 11, 2, 6])
  np.testing.assert_array_equal(y.timestamps, [60, 50, 20, 10])
  z, _ = preprocess.collapse_duplicates(x)
  np.testing.assert_array_equal(z.ratings, [3, 1, 2, 6])
  # Ids at the ends of int64 still compare exactly.
  big = readers.Interactions(users=np.array([-2**63, 2**63 - 1, -2**63, 0]),
                             items=np.array([2**63 - 1, -2**63, 2**63 - 1, 0]), source="t")
  b, n = preprocess.collapse_duplicates(big)
  assert n == 1 and b.users.tolist() == [-2**63, 2**63 - 1, 0]


def test_repeated_ratings_collapse_before_the_threshold_latest_rating_counts():
  # Item 10 rated 1, later 5: a positive. Item 11 rated 5, later 2: no longer one.
  # Item 15 rated 5 and 1 by timestamp 9 then 3 in file order: the timestamp decides.
  users = np.array([1] * 9)
  items = np.array([10, 11, 12, 13, 14, 10, 11, 15, 15])
  ratings = np.float32([1, 5, 5, 5, 5, 5, 2, 5, 1])
  times = np.array([1, 2, 3, 4, 5, 6, 7, 9, 3])
  x = readers.Interactions(users=users, items=items, ratings=ratings, timestamps=times,
                           source="t")
  s = preprocess.split_per_user(x, threshold=3.5, min_items_to_split=100)
  # Item 10 keeps the place of its first row: the first column.
  assert s.item_ids.tolist() == [10, 12, 13, 14, 15]
  assert s.collapsed_duplicates == 3  # every repeat counts, positive or not
  # The paper's protocol reads them the same way.
  many = readers.Interactions(
      users=np.repeat(np.arange(30), 9), items=np.tile(items, 30),
      ratings=np.tile(ratings, 30), timestamps=np.tile(times, 30), source="t")
  h = preprocess.split_heldout_users(many, 3, min_uc=1)
  assert sorted(h.item_ids.tolist()) == [10, 12, 13, 14, 15]
  assert h.collapsed_duplicates == 90
  # A given train/test pair: the rated-1-then-5 test item is a positive to predict.
  tr = readers.Interactions(users=np.array([1, 1, 2]), items=np.array([10, 11, 10]),
                            ratings=np.float32([5, 5, 5]), source="tr")
  te = readers.Interactions(users=np.array([2, 2]), items=np.array([11, 11]),
                            ratings=np.float32([1, 5]), source="te")
  f = preprocess.split_from_files(tr, te, threshold=3.5)
  assert _pairs(f.test.heldout, f.test.user_ids) == {(2, 1)}  # column 1 is item 11


def test_split_from_files_drops_test_rows_seen_in_train(tmp_path):
  _write(tmp_path / "train.txt", "0 1 2 2\n1 2 3\n")
  _write(tmp_path / "test.txt", "0 3 1 3\n1 1 3\n")
  reports = []
  s = load_split("ngcf", str(tmp_path), progress=reports.append)
  assert _pairs(s.test.heldout, s.test.user_ids) == {(0, 2), (1, 0)}  # items 3, 1
  assert s.train.multiply(s.test.heldout).nnz == 0
  # One repeat in train.txt, one in test.txt, user 0's item 1 and user 1's item 3 seen.
  assert s.collapsed_duplicates == 4
  assert any("collapsed 4 repeated (user, item) rows" in r for r in reports)


def test_load_split_reports_collapsed_rows(tmp_path):
  rows = "".join(f"{u}::{i}::5::0\n" for u in range(1, 21) for i in range(1, 8))
  path = _write(tmp_path / "ratings.dat", rows + "3::2::4::0\n3::2::5::0\n")
  reports = []
  s = load_split("ml-1m", path, progress=reports.append)
  assert s.collapsed_duplicates == 2
  assert any("collapsed 2 repeated (user, item) rows: each pair counts once, before any "
             "threshold or filter, with its latest rating" in r for r in reports)


# ---- ids survive exactly ----

_SHA1 = "3bd73256-3905-4f3a-97e2-8b341527f805"  # an MBID
_HASH = "00000c289a1829a808ac09c00daf10bc3c4e223b"  # a Last.fm user sha1


def _ratings_csv(tmp_path, rows, name="ratings.csv"):
  text = "userId,movieId,rating,timestamp\n" + "".join(
      f"{u},{i},{r},{t}\n" for u, i, r, t in rows)
  return _write(tmp_path / name, text)


def test_ids_beyond_float64_stay_distinct(tmp_path):
  big = 2**53
  p = _ratings_csv(tmp_path, [(1, big, 5, 0), (1, big + 1, 5, 1), (2, big, 4, 2),
                              (-(2**63), 2**63 - 1, 4, 3)])
  x = readers.read_movielens_csv(p)
  assert x.item_vocab is None and x.items.dtype == np.int64
  assert x.items.tolist() == [big, big + 1, big, 2**63 - 1]
  assert x.users.tolist() == [1, 1, 2, -(2**63)]
  s = preprocess.split_per_user(x, threshold=3.5)
  assert sorted(s.item_ids.tolist()) == [big, big + 1, 2**63 - 1]
  assert s.item_ids.dtype == np.int64


def _every_row(s):
  return sorted(np.concatenate(
      [s.train_user_ids] + [e.user_ids for e in (s.validation, s.test)
                            if e is not None and s.protocol == "heldout_users"]).tolist())


def test_text_ids_survive_into_the_split(tmp_path):
  items = [str(2**63), _SHA1, "SKU-00012", "007", "7", "1.0"]
  users = [_HASH, "u-2", str(2**64 + 5)]
  rows = [(u, i, 5, k) for k, (u, i) in enumerate(
      (u, i) for u in users for i in items)]
  p = _ratings_csv(tmp_path, rows)
  x = readers.read_movielens_csv(p)
  assert x.item_vocab is not None and x.user_vocab is not None
  s = preprocess.split_per_user(x, threshold=3.5, min_items_to_split=100)
  assert s.item_ids.dtype.kind == "U" and s.item_ids.tolist() == items
  assert s.train_user_ids.tolist() == sorted(users)
  assert s.train.nnz == len(rows)
  # Six distinct items ('007' and '7' are two), as written.
  t = load_split("ml-latest-small", p, min_uc=1, n_heldout_users=1)
  assert sorted(t.item_ids.tolist()) == sorted(items)
  assert _every_row(t) == sorted(users)
  # And through the cache.
  for _ in range(2):
    c = load_split("ml-latest-small", p, str(tmp_path / "cache"), min_uc=1,
                   n_heldout_users=1)
    assert c.item_ids.tolist() == t.item_ids.tolist() and _every_row(c) == sorted(users)


def test_one_text_token_makes_the_column_text(tmp_path):
  p = _write(tmp_path / "u.data", "1\t10\t5\t0\n2\t010\t5\t0\n1\t+10\t5\t0\n3\t-0\t5\t0\n")
  x = readers.read_ml100k(p)
  assert x.user_vocab is None and x.users.tolist() == [1, 2, 1, 3]
  assert x.raw_item_ids(x.items).tolist() == ["10", "010", "+10", "-0"]


@pytest.mark.parametrize("fmt", ["ml1m", "ml100k", "netflix", "delimited", "user_lines",
                                 "netflix_mv"])
def test_every_reader_keeps_big_and_text_ids(tmp_path, fmt):
  big = str(2**63 + 1)
  if fmt == "ml1m":
    x = readers.read_ml1m(_write(tmp_path / "r.dat", f"{_HASH}::{big}::5::0\n7::SKU-1::4::1\n"))
  elif fmt == "ml100k":
    x = readers.read_ml100k(_write(tmp_path / "u.data", f"{_HASH}\t{big}\t5\t0\n7\tSKU-1\t4\t1\n"))
  elif fmt == "netflix":
    x = readers.read_netflix(_write(tmp_path / "combined_data_1.txt",
                                    f"{big}:\n{_HASH},5,2005-01-01\nSKU-1:\n7,4,2005-01-02\n"))
  elif fmt == "netflix_mv":
    (tmp_path / "training_set").mkdir()
    _write(tmp_path / "training_set" / "mv_1.txt", f"{big}:\n{_HASH},5,2005-01-01\n")
    _write(tmp_path / "training_set" / "mv_2.txt", "SKU-1:\n7,4,2005-01-02\n")
    x = readers.read_netflix(str(tmp_path))
  elif fmt == "delimited":
    x = readers.read_delimited(
        _write(tmp_path / "g.csv", f"{_HASH},{big},5,0\n7,SKU-1,4,1\n"), header=False)
  else:
    x = readers.read_user_lines(_write(tmp_path / "train.txt", f"{_HASH} {big}\n7 SKU-1\n"))
  assert x.raw_user_ids(x.users).tolist() == [_HASH, "7"]
  assert x.raw_item_ids(x.items).tolist() == [big, "SKU-1"]


def test_netflix_files_with_numeric_and_text_ids_share_one_vocabulary(tmp_path):
  (tmp_path / "training_set").mkdir()
  _write(tmp_path / "training_set" / "mv_1.txt", "1:\n7,5,2005-01-01\n8,5,2005-01-01\n")
  _write(tmp_path / "training_set" / "mv_2.txt", "2:\n007,4,2005-01-02\n7,3,2005-01-02\n")
  x = readers.read_netflix(str(tmp_path))
  assert x.raw_user_ids(x.users).tolist() == ["7", "8", "007", "7"]
  assert x.users[0] == x.users[3] != x.users[2]
  assert x.item_vocab is None and x.items.tolist() == [1, 1, 2, 2]


def test_ngcf_text_ids_in_one_file_only(tmp_path):
  _write(tmp_path / "train.txt", "0 1 2\n1 2 3\n")
  _write(tmp_path / "test.txt", "0 3 sku-9\n1 1\n")
  s = load_split("ngcf", str(tmp_path))
  # Items: text in test.txt, so text in both; users stay numbers.
  assert s.item_ids.tolist() == ["1", "2", "3"]
  assert _pairs(s.test.heldout, s.test.user_ids) == {(0, 2), (1, 0)}  # sku-9 unseen
  assert s.test.user_ids.dtype == np.int64


def test_utf8_text_ids(tmp_path):
  p = _write(tmp_path / "g.tsv", "ü\tBjörk\t1\t0\nü\tSigur Rós\t1\t0\nz\tBjörk\t1\t0\n")
  x = readers.read_delimited(p, delimiter="\t", header=False)
  assert x.raw_item_ids(x.items).tolist() == ["Björk", "Sigur Rós", "Björk"]
  assert x.raw_user_ids(x.users).tolist() == ["ü", "ü", "z"]


# ---- generic csv files: 2, 3 or 4+ columns ----


def _grid(users=range(1, 13), items=range(1, 8)):
  return [(u, i) for u in users for i in items]


def test_csv_two_columns_without_and_with_header(tmp_path):
  rows = "".join(f"{u},{i}\n" for u, i in _grid())
  x = readers.read_delimited(_write(tmp_path / "a.csv", rows))
  assert x.ratings is None and x.timestamps is None and len(x) == 84
  assert x.users[0] == 1 and x.items[:3].tolist() == [1, 2, 3]
  y = readers.read_delimited(_write(tmp_path / "b.csv", "user,item\n" + rows))
  assert len(y) == 84 and y.user_vocab is None
  # No rating column: every row is a positive, even with the csv default threshold.
  s = load_split("csv", str(tmp_path / "b.csv"), n_heldout_users=2)
  assert s.stats()["interactions"] == 84


def test_csv_text_ids_need_a_header_setting(tmp_path):
  p = _write(tmp_path / "t.csv", "user,item\nalice,x\nbob,y\n")
  with pytest.raises(ValueError, match=r"t\.csv, line 1: cannot tell whether 'user,item' is "
                                       r"a header.*header=True"):
    readers.read_delimited(p)
  x = readers.read_delimited(p, header=True)
  assert x.raw_user_ids(x.users).tolist() == ["alice", "bob"]
  y = readers.read_delimited(p, header=False)
  assert y.raw_user_ids(y.users).tolist() == ["user", "alice", "bob"]


def test_csv_three_columns_threshold(tmp_path):
  rows = "".join(f"{u},{i},{1 + (u + i) % 5}\n" for u, i in _grid())
  p = _write(tmp_path / "r.csv", "u,i,r\n" + rows)
  x = readers.read_delimited(p)
  assert x.ratings is not None and x.timestamps is None
  np.testing.assert_array_equal(x.ratings[:3], [3, 4, 5])
  kept = lambda **kw: load_split("csv", p, protocol="per_user", min_uc=0, **kw).stats()[
      "interactions"]
  n = len(x)
  assert kept() == int((x.ratings > 3.5).sum()) < n  # the default threshold, 3.5
  assert kept(threshold=4.5) == int((x.ratings > 4.5).sum())
  assert kept(threshold=None) == n


def test_csv_tab_delimiter_and_extra_columns(tmp_path):
  rows = "".join(f"{u}\t{i}\t4.5\t{u * 100 + i}\tnote, with comma\n" for u, i in _grid())
  x = readers.read_delimited(_write(tmp_path / "r.tsv", rows), delimiter="\t")
  assert len(x) == 84 and x.timestamps[:2].tolist() == [101, 102]
  np.testing.assert_array_equal(np.unique(x.ratings), [4.5])


def test_csv_named_and_indexed_columns(tmp_path):
  p = _write(tmp_path / "n.csv", "ts;item;who;score;note\n5;10;1;4.0;x\n6;11;2;2.0;y\n")
  x = readers.read_delimited(p, delimiter=";", columns=("who", "item"))
  assert x.users.tolist() == [1, 2] and x.items.tolist() == [10, 11] and x.ratings is None
  y = readers.read_delimited(p, delimiter=";", columns=(2, 1, None, 0))
  assert y.users.tolist() == [1, 2] and y.timestamps.tolist() == [5, 6] and y.ratings is None
  with pytest.raises(ValueError, match=r"n\.csv, line 1: expected a header with a column "
                                       r"'user'"):
    readers.read_delimited(p, delimiter=";", columns=("user", "item"))
  with pytest.raises(ValueError, match="no header"):
    readers.read_delimited(p, delimiter=";", columns=("who", "item"), header=False)
  with pytest.raises(ValueError, match="one column twice"):
    readers.read_delimited(p, delimiter=";", columns=(2, 2))
  with pytest.raises(ValueError, match=r"item column -1: expected a 0-based index"):
    readers.read_delimited(p, delimiter=";", columns=(2, -1))


def test_csv_wrong_delimiter_and_short_lines(tmp_path):
  p = _write(tmp_path / "s.csv", "1;2\n3;4\n")
  with pytest.raises(ValueError, match=r"s\.csv, line 1: expected at least 2 fields .*','"):
    readers.read_delimited(p)
  q = _write(tmp_path / "q.csv", "1,2,5\n3,4\n")
  with pytest.raises(ValueError, match=r"q\.csv, line 2: expected at least 3 fields"):
    readers.read_delimited(q)


def test_csv_options_change_the_cache_key(tmp_path):
  rows = "".join(f"{u},{i},{1 + (u + i) % 5}\n" for u, i in _grid())
  p = _write(tmp_path / "r.csv", rows)
  cache = str(tmp_path / "cache")
  a = load_split("csv", p, cache, protocol="per_user", min_uc=0)
  b = load_split("csv", p, cache, protocol="per_user", min_uc=0, columns=(0, 1))
  assert b.stats()["interactions"] == 84 > a.stats()["interactions"]


def test_csv_settings_from_the_config(tmp_path):
  configs = pytest.importorskip("jax_vaecf.training.configs")
  loop = pytest.importorskip("jax_vaecf.training.engine")
  grid = _grid(items=range(1, 21))
  rows = "".join(f"{i}\t{u}\t{1 + (u + i) % 5}\n" for u, i in grid)
  p = _write(tmp_path / "r.tsv", "what\twho\tstars\n" + rows)
  cfg = configs.Config(dataset="csv", data_dir=p, cache_dir=str(tmp_path / "cache"),
                       protocol="per_user", csv_delimiter="tab", csv_columns="who,what",
                       csv_header="yes")
  configs.validate(cfg)
  s = loop.load_data(cfg)
  assert s.stats()["interactions"] == len(grid) and s.n_items == 20
  assert s.train_user_ids.tolist() == list(range(1, 13))  # the 'who' column
  cfg = cfg.replace(csv_columns="who,what,stars", csv_threshold=2.0)
  configs.validate(cfg)
  above = sum(1 + (u + i) % 5 > 2 for u, i in grid)
  assert loop.load_data(cfg).stats()["interactions"] == above < len(grid)
  cfg = cfg.replace(csv_all_positive=True)
  assert loop.load_data(cfg).stats()["interactions"] == len(grid)


@pytest.mark.parametrize("change,message", [
    (dict(csv_header="maybe"), "csv_header must be auto, yes or no"),
    (dict(csv_columns="user"), "csv_columns='user': expected"),
    (dict(csv_columns="a,b,c,d,e"), "csv_columns='a,b,c,d,e': expected"),
    (dict(csv_columns=",item"), "csv_columns=',item': expected"),
    (dict(csv_columns="a,a"), "names one column twice"),
    (dict(csv_columns="userId,movieId", csv_header="no"), "csv_header=no"),
    (dict(csv_delimiter=""), "csv_delimiter must be"),
    (dict(csv_threshold=float("nan")), "csv_threshold must be a finite number"),
])
def test_bad_csv_settings(change, message):
  configs = pytest.importorskip("jax_vaecf.training.configs")
  cfg = configs.Config(dataset="csv").replace(**change)
  with pytest.raises(ValueError, match="bad setting: .*" + message):
    configs.validate(cfg)


# ---- messages quote the file's own text; gzipped pairs ----


def test_ml1m_messages_show_the_double_colons(tmp_path):
  p = _write(tmp_path / "ratings.dat", "1::2::5::0\n1::2::5\n")
  with pytest.raises(ValueError) as e:
    readers.read_ml1m(p)
  msg = str(e.value)
  assert "ratings.dat, line 2: expected 4 fields separated by '::', got 3: '1::2::5'" in msg
  assert "\t" not in msg and "\x1f" not in msg
  q = _write(tmp_path / "r2.dat", "1::2::5::0\n1::::5::0\n")
  with pytest.raises(ValueError, match=r"r2\.dat, line 2: field 2 is empty, expected an "
                                       r"item id: '1::::5::0'"):
    readers.read_ml1m(q)


def test_numeric_table_messages_show_the_file_text(tmp_path):
  from jax_vaecf.data import _text
  with pytest.raises(ValueError, match=r"f\.csv, line 3: expected 2 numbers, got '1,x'"):
    _text.numeric_table(b"1,2\n1,x\n", b",", 2, "f.csv", 2)
  with pytest.raises(ValueError, match=r"f\.dat, line 2: expected 2 numbers, got '1::x'"):
    _text.numeric_table(b"1::2\n1::x\n", b"::", 2, "f.dat", 1)


@pytest.mark.parametrize("gz", ["train", "test", "both"])
def test_ngcf_and_ml100k_fold_gzipped(tmp_path, gz):
  import gzip
  files = {"train.txt": b"0 1 2\n1 2 3\n", "test.txt": b"0 3\n1 1\n",
           "u1.base": b"1\t10\t5\t0\n1\t11\t4\t0\n2\t10\t3\t0\n",
           "u1.test": b"1\t12\t5\t0\n2\t11\t4\t0\n"}
  for name, data in files.items():
    zipped = gz == "both" or name.startswith(gz) or (gz == "test" and name.endswith("test"))
    if zipped:
      (tmp_path / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
      (tmp_path / name).write_bytes(data)
  s = load_split("ngcf", str(tmp_path))
  assert s.train.nnz == 4 and s.test.heldout.nnz == 2
  t = load_split("ml-100k", str(tmp_path), fold="u1")
  assert t.item_ids.tolist() == [10, 11] and t.test.heldout.nnz == 1


def test_ngcf_missing_file(tmp_path):
  _write(tmp_path / "train.txt", "0 1\n")
  with pytest.raises(FileNotFoundError, match=r"test\.txt: not found \(nor test\.txt\.gz\)"):
    load_split("ngcf", str(tmp_path))


def test_one_absurdly_long_field_is_refused_by_line_not_by_memory(tmp_path):
  """One 20,000-byte id among 5,000 rows: every row would be gathered at its width."""
  from jax_vaecf.data import _text
  rows = [f"{u % 50},{u % 37},4.0\n" for u in range(5_000)]
  rows[3_210] = "7," + "x" * 20_000 + ",4.0\n"
  p = _write(tmp_path / "long.csv", "user,item,rating\n" + "".join(rows))
  with pytest.raises(ValueError, match=rf"long\.csv, line 3212: an item id of 20000 bytes; "
                                       rf"a field is at most {_text.MAX_FIELD_BYTES} bytes"):
    readers.read_delimited(p)
  # The same through the quoted-csv path.
  rows[3_210] = '7,"' + "x" * 20_000 + '",4.0\n'
  q = _write(tmp_path / "quoted.csv", "user,item,rating\n" + "".join(rows))
  with pytest.raises(ValueError, match=r"quoted\.csv, line 3212: an item id of 20000 bytes"):
    readers.read_delimited(q)


def test_a_field_at_the_limit_is_read_exactly(tmp_path):
  from jax_vaecf.data import _text
  long_id = "é" * (_text.MAX_FIELD_BYTES // 2)  # 2 bytes each in UTF-8
  p = _write(tmp_path / "ok.csv", f"user,item\n1,{long_id}\n2,a\n")
  x = readers.read_delimited(p, header=True)
  assert x.raw_item_ids(x.items).tolist() == [long_id, "a"]


def test_gathering_strings_holds_rows_times_width_at_most(tmp_path):
  """Memory proportional to the rows and the widest field allowed, whatever the
  number of rows gathered at once (the index matrix is bounded too)."""
  import tracemalloc
  from jax_vaecf.data import _text
  n, width = 40_000, 1_000
  buf = np.frombuffer(b"ab" * 50 + b"y" * width, np.uint8)
  fs = np.zeros(n, np.int64)
  fe = np.full(n, 3, np.int64)
  fs[-1], fe[-1] = 100, 100 + width
  tracemalloc.start()
  try:
    out = _text.gather_strings(buf, fs, fe, "f", 1, "item id")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert out[0] == b"aba" and out[-1] == b"y" * width
  assert peak < 3 * n * width  # the old chunking held 8 bytes per row and byte: 8 n w


@pytest.mark.parametrize("text, message", [
    ("user,item,rating\r1,31,2.5\r2,31,4.0\r",
     r"c\.csv: has CR-only line endings \(classic Mac OS\)"),
    ("user,item,rating\n1,31,4.0\r1\n2,31,4.0\n",
     r"c\.csv, line 2: holds a carriage return \(CR\) that ends no line.*'1,31,4\.0\\r1'"),
])
def test_lone_carriage_returns_are_named_not_dropped(tmp_path, text, message):
  p = tmp_path / "c.csv"
  p.write_bytes(text.encode())
  with pytest.raises(ValueError, match=message):
    readers.read_delimited(str(p))
  p.write_bytes(text.replace("\r1\n", "\n").replace("\r", "\r\n").encode())
  assert len(readers.read_delimited(str(p))) == 2


@pytest.mark.parametrize("value, shown", [("inf", "inf"), ("-inf", "-inf"), ("nan", "nan")])
def test_a_non_finite_rating_is_shown_as_written(tmp_path, value, shown):
  p = _write(tmp_path / "r.csv", f"user,item,rating\n1,2,4.0\n1,3,{value}\n")
  with pytest.raises(ValueError, match=rf"r\.csv, line 3: expected a finite rating, got "
                                       rf"{shown}$"):
    readers.read_delimited(p)
