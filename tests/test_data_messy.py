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


def _first_rows(x, threshold):
  """Drops every positive row whose pair had an earlier positive row (a plain loop);
  negative rows stay, so the users' first rows in the file stay where they were.

  Returns the rows and the number of distinct positive pairs.
  """
  seen, keep = set(), []
  for k, (u, i) in enumerate(zip(x.users.tolist(), x.items.tolist())):
    if threshold is not None and not x.ratings[k] > threshold:
      keep.append(k)
    elif (u, i) not in seen:
      seen.add((u, i))
      keep.append(k)
  return x.select(np.array(keep, np.int64)), len(seen)


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
    threshold = 3.5
  elif protocol == "per_user":
    split = lambda d: preprocess.split_per_user(d, threshold=3.5, min_items_to_split=2)
    threshold = 3.5
  elif protocol == "per_user_time":
    split = lambda d: preprocess.split_per_user(d, by_time=True, threshold=None)
    threshold = None
  else:
    split = lambda d: preprocess.split_nvidia_alt(d, 0.1, 0.1)
    threshold = 3.5  # >= 4 on half stars
  s = split(x)
  for ev in (s.validation, s.test):
    if ev is None:
      continue
    rows = ev.fold_in if s.protocol == "heldout_users" else s.train
    assert rows.multiply(ev.heldout).nnz == 0
    assert ev.heldout.nnz > 0
  deduped, n_kept = _first_rows(x, threshold)
  n_positive = n_kept + s.collapsed_duplicates
  assert s.collapsed_duplicates > 0
  assert n_positive == (len(x) if threshold is None else int((x.ratings > threshold).sum()))
  # The same split as on the file with only each pair's first row.
  ref = split(deduped)
  assert ref.collapsed_duplicates == 0
  _assert_same_split(s, ref)
  assert s.stats()["collapsed_duplicates"] == s.collapsed_duplicates
  assert f"{s.collapsed_duplicates:,} duplicate (user, item) rows" in format_stats(s.stats())


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


def test_explicit_ratings_binarized_before_collapsing():
  # User 1 rated item 10 first 2 then 5: positive. Item 11 first 5 then 2: positive.
  users = np.array([1, 1, 1, 1, 1, 1, 1])
  items = np.array([10, 11, 12, 13, 14, 10, 11])
  ratings = np.float32([2, 5, 5, 5, 5, 5, 2])
  x = readers.Interactions(users=users, items=items, ratings=ratings, source="t")
  s = preprocess.split_per_user(x, threshold=3.5, min_items_to_split=100)
  assert sorted(s.item_ids.tolist()) == [10, 11, 12, 13, 14]
  assert s.collapsed_duplicates == 0  # the rating-2 rows were never positives
  # The column order is the first positive row's: item 10 appears after 11..14.
  assert s.item_ids.tolist() == [11, 12, 13, 14, 10]


def test_split_from_files_drops_test_rows_seen_in_train(tmp_path):
  _write(tmp_path / "train.txt", "0 1 2 2\n1 2 3\n")
  _write(tmp_path / "test.txt", "0 3 1 3\n1 1 3\n")
  reports = []
  s = load_split("ngcf", str(tmp_path), progress=reports.append)
  assert _pairs(s.test.heldout, s.test.user_ids) == {(0, 2), (1, 0)}  # items 3, 1
  assert s.train.multiply(s.test.heldout).nnz == 0
  # One repeat in train.txt, one in test.txt, user 0's item 1 and user 1's item 3 seen.
  assert s.collapsed_duplicates == 4
  assert any("collapsed 4 duplicate" in r for r in reports)


def test_load_split_reports_collapsed_rows(tmp_path):
  rows = "".join(f"{u}::{i}::5::0\n" for u in range(1, 21) for i in range(1, 8))
  path = _write(tmp_path / "ratings.dat", rows + "3::2::4::0\n3::2::5::0\n")
  reports = []
  s = load_split("ml-1m", path, progress=reports.append)
  assert s.collapsed_duplicates == 2
  assert any("collapsed 2 duplicate" in r for r in reports)
