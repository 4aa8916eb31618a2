"""Splits: the paper's rules, bit-exactness against a pandas transcription of its
notebook, determinism, the per-user and NVIDIA variants, and the paper's folder I/O."""


import numpy as np
import pytest

from jax_vaecf.data import paper_files, preprocess, readers
from jax_vaecf.data.load import load_split


def _random_ratings(seed=0, n_users=300, n_items=120, n=12_000):
  rng = np.random.default_rng(seed)
  pop = 1.0 / np.arange(1, n_items + 1)
  users = rng.integers(1, n_users + 1, n) * 7  # non-contiguous raw ids
  items = rng.choice(np.arange(n_items) * 3 + 11, n, p=pop / pop.sum())
  # Unique (user, item) pairs, in a shuffled (not sorted) file order.
  _, first = np.unique(users * 100_000 + items, return_index=True)
  keep = rng.permutation(np.sort(first))
  ratings = rng.integers(1, 11, keep.size) / 2
  return readers.Interactions(users=users[keep], items=items[keep],
                              ratings=ratings.astype(np.float32),
                              timestamps=rng.integers(0, 10**9, keep.size), source="fx")


def _write_csv(path, x):
  with open(path, "w") as f:
    f.write("userId,movieId,rating,timestamp\n")
    for u, i, r, t in zip(x.users, x.items, x.ratings, x.timestamps):
      f.write(f"{u},{i},{r},{t}\n")
  return str(path)


def _paper_notebook(path, n_heldout, min_uc=5, min_sc=0, drop_duplicates=False):
  """A transcription of dawenl/vae_cf's notebook preprocessing (pandas); optionally
  with repeated (user, item) rows collapsed before the rating filter (the project's
  rule, written with pandas)."""
  pd = pytest.importorskip("pandas")
  raw_data = pd.read_csv(path, header=0)
  if drop_duplicates:
    # One row per pair at its first row's place, with its latest rating (largest
    # timestamp, then later in the file), before the rating filter.
    pair = ["userId", "movieId"]
    latest = (raw_data.assign(row=np.arange(len(raw_data)))
              .sort_values(["timestamp", "row"]).groupby(pair)["rating"].last())
    raw_data = raw_data.drop_duplicates(pair, keep="first").copy()
    raw_data["rating"] = latest.reindex(pd.MultiIndex.from_frame(raw_data[pair])).values
  raw_data = raw_data[raw_data["rating"] > 3.5]

  def get_count(tp, id):
    return tp[[id]].groupby(id, as_index=False).size()

  def filter_triplets(tp, min_uc=5, min_sc=0):
    if min_sc > 0:
      itemcount = get_count(tp, "movieId")
      tp = tp[tp["movieId"].isin(itemcount["movieId"][itemcount["size"] >= min_sc])]
    if min_uc > 0:
      usercount = get_count(tp, "userId")
      tp = tp[tp["userId"].isin(usercount["userId"][usercount["size"] >= min_uc])]
    return tp, get_count(tp, "userId"), get_count(tp, "movieId")

  raw_data, user_activity, _ = filter_triplets(raw_data, min_uc, min_sc)
  unique_uid = user_activity["userId"].to_numpy()
  np.random.seed(98765)
  idx_perm = np.random.permutation(unique_uid.size)
  unique_uid = unique_uid[idx_perm]
  n_users = unique_uid.size
  tr_users = unique_uid[:(n_users - n_heldout * 2)]
  vd_users = unique_uid[(n_users - n_heldout * 2):(n_users - n_heldout)]
  te_users = unique_uid[(n_users - n_heldout):]
  train_plays = raw_data.loc[raw_data["userId"].isin(tr_users)]
  unique_sid = pd.unique(train_plays["movieId"])
  show2id = dict((sid, i) for (i, sid) in enumerate(unique_sid))
  profile2id = dict((pid, i) for (i, pid) in enumerate(unique_uid))

  def split_train_test_proportion(data, test_prop=0.2):
    tr_list, te_list = [], []
    np.random.seed(98765)
    for _, group in data.groupby("userId"):
      n_items_u = len(group)
      if n_items_u >= 5:
        idx = np.zeros(n_items_u, dtype="bool")
        idx[np.random.choice(n_items_u, size=int(test_prop * n_items_u),
                             replace=False).astype("int64")] = True
        tr_list.append(group[np.logical_not(idx)])
        te_list.append(group[idx])
      else:
        tr_list.append(group)
    return pd.concat(tr_list), pd.concat(te_list)

  vad_plays = raw_data.loc[raw_data["userId"].isin(vd_users)]
  vad_plays = vad_plays.loc[vad_plays["movieId"].isin(unique_sid)]
  vad_tr, vad_te = split_train_test_proportion(vad_plays)
  test_plays = raw_data.loc[raw_data["userId"].isin(te_users)]
  test_plays = test_plays.loc[test_plays["movieId"].isin(unique_sid)]
  test_tr, test_te = split_train_test_proportion(test_plays)

  def numerize(tp):
    return (np.array([profile2id[x] for x in tp["userId"]]),
            np.array([show2id[x] for x in tp["movieId"]]))

  return (unique_sid, unique_uid, numerize(train_plays), numerize(vad_tr), numerize(vad_te),
          numerize(test_tr), numerize(test_te))


def _pairs(m, offset):
  c = m.tocoo()
  return set(zip((c.row + offset).tolist(), c.col.tolist()))


def test_bit_exact_against_paper_notebook(tmp_path):
  x = _random_ratings()
  path = _write_csv(tmp_path / "ratings.csv", x)
  h = 25
  sid, uid, tr, vtr, vte, ttr, tte = _paper_notebook(path, h)
  s = load_split("ml-20m", path, n_heldout_users=h)
  np.testing.assert_array_equal(s.item_ids, sid)
  np.testing.assert_array_equal(
      np.concatenate([s.train_user_ids, s.validation.user_ids, s.test.user_ids]), uid)
  n_tr = s.train.shape[0]
  assert _pairs(s.train, 0) == set(zip(*map(np.ndarray.tolist, tr)))
  assert _pairs(s.validation.fold_in, n_tr) == set(zip(*map(np.ndarray.tolist, vtr)))
  assert _pairs(s.validation.heldout, n_tr) == set(zip(*map(np.ndarray.tolist, vte)))
  assert _pairs(s.test.fold_in, n_tr + h) == set(zip(*map(np.ndarray.tolist, ttr)))
  assert _pairs(s.test.heldout, n_tr + h) == set(zip(*map(np.ndarray.tolist, tte)))
  assert s.train.nnz == tr[0].size and s.test.heldout.nnz == tte[0].size


def test_bit_exact_with_duplicates_against_notebook_plus_drop_duplicates(tmp_path):
  x = _random_ratings(seed=7)
  rng = np.random.default_rng(7)
  # Repeat 3,000 rows with fresh ratings, each somewhere after (or before) the original.
  rep = rng.choice(len(x), 3_000)
  both = readers.Interactions(
      users=np.concatenate([x.users, x.users[rep]]),
      items=np.concatenate([x.items, x.items[rep]]),
      ratings=np.concatenate([x.ratings, (rng.integers(1, 11, rep.size) / 2).astype(
          np.float32)]),
      timestamps=np.concatenate([x.timestamps, x.timestamps[rep]]), source="fx")
  path = _write_csv(tmp_path / "ratings.csv", both.select(rng.permutation(len(both))))
  h = 25
  sid, uid, tr, vtr, vte, ttr, tte = _paper_notebook(path, h, drop_duplicates=True)
  s = load_split("ml-20m", path, n_heldout_users=h)
  assert s.collapsed_duplicates > 0
  np.testing.assert_array_equal(s.item_ids, sid)
  np.testing.assert_array_equal(
      np.concatenate([s.train_user_ids, s.validation.user_ids, s.test.user_ids]), uid)
  n_tr = s.train.shape[0]
  for m, offset, ref in ((s.train, 0, tr), (s.validation.fold_in, n_tr, vtr),
                         (s.validation.heldout, n_tr, vte), (s.test.fold_in, n_tr + h, ttr),
                         (s.test.heldout, n_tr + h, tte)):
    assert m.nnz == ref[0].size
    assert _pairs(m, offset) == set(zip(*map(np.ndarray.tolist, ref)))


def test_bit_exact_with_min_sc(tmp_path):
  x = _random_ratings(seed=3)
  path = _write_csv(tmp_path / "ratings.csv", x)
  sid, uid, tr, *_ , tte = _paper_notebook(path, 20, min_uc=5, min_sc=15)
  s = preprocess.split_heldout_users(readers.read_movielens_csv(path), 20, min_uc=5,
                                     min_sc=15)
  np.testing.assert_array_equal(s.item_ids, sid)
  assert _pairs(s.train, 0) == set(zip(*map(np.ndarray.tolist, tr)))
  assert _pairs(s.test.heldout, s.train.shape[0] + 20) == set(
      zip(*map(np.ndarray.tolist, tte)))


def test_split_rules():
  x = _random_ratings(seed=1)
  s = preprocess.split_heldout_users(x, heldout_users_fraction=0.1)
  n_users = s.train.shape[0] + 2 * s.test.n_users
  assert s.test.n_users == s.validation.n_users == round(0.1 * n_users)
  # Every item column is used by some training user.
  assert (np.diff(s.train.tocsc().indptr) > 0).all()
  for ev in (s.validation, s.test):
    n_in = np.diff(ev.fold_in.indptr)
    n_out = np.diff(ev.heldout.indptr)
    total = n_in + n_out
    assert (n_out == (0.2 * total).astype(int) * (total >= 5)).all()
    assert (n_out[total < 5] == 0).all()
    assert ev.fold_in.multiply(ev.heldout).nnz == 0
  # Held-out users are disjoint from training users.
  assert not set(s.test.user_ids) & set(s.train_user_ids)
  assert s.train.dtype == np.float32 and set(np.unique(s.train.data)) == {1.0}


def test_small_heldout_users_keep_all():
  users = np.repeat([1, 2, 3, 4, 5, 6], [6, 6, 6, 6, 6, 3])
  items = np.concatenate([np.arange(6)] * 5 + [np.arange(3)])
  x = readers.Interactions(users=users, items=items, source="t")
  s = preprocess.split_heldout_users(x, 1, threshold=None, min_uc=3)
  for ev in (s.validation, s.test):
    n_in, n_out = ev.fold_in.nnz, ev.heldout.nnz
    assert (n_in, n_out) in ((3, 0), (5, 1))


def test_determinism_and_seed():
  x = _random_ratings(seed=2)
  a = preprocess.split_heldout_users(x, 20)
  b = preprocess.split_heldout_users(x, 20)
  c = preprocess.split_heldout_users(x, 20, seed=1)
  assert (a.test.heldout != b.test.heldout).nnz == 0
  np.testing.assert_array_equal(a.test.user_ids, b.test.user_ids)
  assert not np.array_equal(a.test.user_ids, c.test.user_ids)


def test_no_user_left():
  x = readers.Interactions(users=np.array([1, 2]), items=np.array([1, 2]),
                           ratings=np.float32([5, 5]), source="tiny.csv")
  with pytest.raises(ValueError, match=r"tiny\.csv: no user left after filtering"):
    preprocess.split_heldout_users(x, 1)


def test_per_user_random_and_time():
  x = _random_ratings(seed=4)
  s = preprocess.split_per_user(x, 0.2, seed=0)
  assert s.protocol == "per_user" and s.validation is None
  assert s.test.fold_in is s.train
  assert s.train.multiply(s.test.heldout).nnz == 0
  n_all = np.bincount(np.unique(x.users, return_inverse=True)[1].ravel())
  n_tr = np.diff(s.train.indptr)
  assert (n_tr <= n_all).all() and (n_tr >= n_all - (0.2 * n_all).astype(int)).all()
  t = preprocess.split_per_user(x, 0.25, by_time=True)
  # The held-out rows are each user's latest ones.
  u = np.unique(x.users)[0]
  rows = np.flatnonzero(x.users == u)
  order = rows[np.lexsort((rows, x.timestamps[rows]))]
  k = int(0.25 * rows.size)
  latest = set(x.items[order[rows.size - k:]].tolist())
  col = {v: i for i, v in enumerate(t.item_ids.tolist())}
  got = set(t.item_ids[t.test.heldout[0].indices].tolist())
  assert got == {i for i in latest if i in col}


def test_split_from_files_ml100k_and_ngcf(tmp_path):
  (tmp_path / "u1.base").write_text("1\t10\t5\t0\n1\t11\t4\t0\n2\t10\t3\t0\n")
  (tmp_path / "u1.test").write_text("1\t12\t5\t0\n2\t11\t4\t0\n")
  s = load_split("ml-100k", str(tmp_path), fold="u1")
  np.testing.assert_array_equal(s.item_ids, [10, 11])
  assert s.test.heldout.nnz == 1  # item 12 is unseen in training
  (tmp_path / "train.txt").write_text("0 1 2\n1 2\n")
  (tmp_path / "test.txt").write_text("0 3\n1 1\n")
  t = load_split("ngcf", str(tmp_path))
  assert t.train.nnz == 3 and t.test.heldout.nnz == 1


def test_nvidia_alt():
  x = _random_ratings(seed=5)
  s = preprocess.split_nvidia_alt(x, 0.1, 0.1)
  for ev in (s.validation, s.test):
    assert ev.fold_in.multiply(ev.heldout).nnz == 0
  assert s.train.shape[0] + s.validation.n_users + s.test.n_users == np.unique(
      preprocess.filter_triplets(preprocess.binarize(x, 4.0, inclusive=True), 5).users).size


def test_paper_folder_round_trip(tmp_path):
  x = _random_ratings(seed=6)
  s = preprocess.split_heldout_users(x, 15)
  paper_files.write_vaecf_dir(s, tmp_path / "pro_sg")
  for name in ("train.csv", "validation_tr.csv", "validation_te.csv", "test_tr.csv",
               "test_te.csv", "unique_sid.txt"):
    assert (tmp_path / "pro_sg" / name).exists()
  assert (tmp_path / "pro_sg" / "train.csv").read_text().startswith("uid,sid\n")
  r = load_split("vaecf_dir", str(tmp_path / "pro_sg"))
  for a, b in ((s.train, r.train), (s.validation.fold_in, r.validation.fold_in),
               (s.validation.heldout, r.validation.heldout), (s.test.fold_in, r.test.fold_in),
               (s.test.heldout, r.test.heldout)):
    assert a.shape == b.shape and (a != b).nnz == 0
  np.testing.assert_array_equal(r.item_ids, s.item_ids)
  np.testing.assert_array_equal(r.test.user_ids, s.test.user_ids)
