"""Splitting interactions into training and evaluation users, deterministically.

:func:`split_heldout_users` reproduces the Mult-VAE paper's notebook (dawenl/vae_cf,
``VAE_ML20M_WWW2018.ipynb``) bit for bit, without pandas:

* collapse repeated (user, item) rows into one, at the first row's place with the
  latest row's rating (:func:`collapse_duplicates`; the paper's files had none, so
  this changes nothing there); keep ratings ``> threshold`` (3.5);
  ``filter_triplets``: items with ``>= min_sc`` users when ``min_sc > 0``, then users
  with ``>= min_uc`` rows;
* users sorted by id, permuted by ``RandomState(seed).permutation`` (seed 98765), the
  last ``2 H`` become validation then test users;
* columns: items of the training users in order of first appearance (``pd.unique``);
  validation/test rows restricted to those items;
* each held-out block is split by a fresh ``RandomState(seed)``: users in sorted id
  order, rows in file order, ``choice(n, int(0.2 n), replace=False)`` marks the items
  to predict when ``n >= 5`` (0.2 is ``heldout_items_fraction``, the paper's
  ``test_prop``); smaller users keep everything as fold-in.

The paper's code used numpy's global legacy generator; ``RandomState(seed)`` produces
the same stream without touching global state.

:func:`split_per_user` and :func:`split_from_files` build the weak-generalisation
protocol (each user's own items split into train and test), and :func:`split_nvidia_alt`
NVIDIA's alternative ML-20M processing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_vaecf.data.readers import Interactions, unify_ids
from jax_vaecf.data.split import EvalSplit, Split, binary_csr

PAPER_SEED = 98765


def binarize(inter: Interactions, threshold: float | None,
             inclusive: bool = False) -> Interactions:
  """Keeps rows whose rating is ``> threshold`` (``>=`` if ``inclusive``).

  ``threshold=None`` keeps every row (implicit data such as play counts).
  """
  if threshold is None:
    return inter
  if inter.ratings is None:
    raise ValueError(f"{inter.source}: a rating threshold was given but the data has "
                     "no rating column")
  keep = inter.ratings >= threshold if inclusive else inter.ratings > threshold
  return inter.select(keep)


def _pair_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """An int64 (n,) key per row, equal exactly when the (user, item) pairs are equal."""
  if users.size == 0:
    return np.zeros(0, np.int64)
  u_lo, i_lo = int(users.min()), int(items.min())
  u_span, i_span = int(users.max()) - u_lo + 1, int(items.max()) - i_lo + 1
  if u_span * i_span <= 2**63:
    # The usual case (codes and raw ids of moderate size): one multiply-add, computed
    # in uint64 so that ids near the int64 limits cannot overflow.
    u = users.astype(np.uint64) - np.uint64(u_lo % 2**64)
    i = items.astype(np.uint64) - np.uint64(i_lo % 2**64)
    return (u * np.uint64(i_span) + i).view(np.int64)
  order = np.lexsort((items, users))
  new = np.ones(users.size, bool)
  new[1:] = (users[order][1:] != users[order][:-1]) | (items[order][1:] != items[order][:-1])
  keys = np.empty(users.size, np.int64)
  keys[order] = np.cumsum(new) - 1
  return keys


def collapse_duplicates(inter: Interactions, sum_ratings: bool = False
                        ) -> tuple[Interactions, int]:
  """One row per (user, item) pair, before any threshold or filter.

  The pair keeps the place of its first row in the file (so first-appearance column
  order and the per-user file order of the paper's draw are those of first rows, and
  the first row's timestamp) and, for explicit ratings, the rating of its *latest* row:
  the largest timestamp, ties and files without timestamps going to the row later in
  the file. A user who rated an item 1 and later 5 likes it; 5 and later 1, no longer.
  For count data (every row positive: plays, clicks) pass ``sum_ratings=True``: the
  pair's rating is its total (float32). Files without repeats come back as they are.

  Returns:
    ``(interactions, n_dropped)``: n_dropped is how many rows repeated an earlier pair.
  """
  n = len(inter)
  keys = _pair_keys(inter.users, inter.items)
  ordered = np.sort(keys)
  if n < 2 or not (ordered[1:] == ordered[:-1]).any():
    return inter, 0
  # Stable, so within a pair the first row in the file comes first.
  order = np.argsort(keys, kind="stable")
  new = np.ones(n, bool)
  new[1:] = keys[order][1:] != keys[order][:-1]
  pair = np.cumsum(new) - 1  # the pair (in key order) of each row of ``order``
  first_rows = order[new]  # file row of each pair's first occurrence, in key order
  keep = np.zeros(n, bool)
  keep[first_rows] = True
  out = inter.select(keep)
  by_file = np.argsort(first_rows)  # ``out`` lists the pairs by first row
  if inter.ratings is not None:
    if sum_ratings:
      totals = np.bincount(pair, weights=inter.ratings[order].astype(np.float64))
      ratings = totals[by_file].astype(np.float32)
    else:
      # The latest row of each pair: the last of its rows ordered by (time, file row).
      time = (inter.timestamps if inter.timestamps is not None
              else np.zeros(n, np.int64))
      latest_order = np.lexsort((np.arange(n), time, keys))
      last = np.ones(n, bool)
      last[:-1] = keys[latest_order][1:] != keys[latest_order][:-1]
      ratings = inter.ratings[latest_order[last]][by_file]
    out = dataclasses.replace(out, ratings=ratings)
  return out, n - int(first_rows.size)


def _distinct_positives(inter: Interactions, threshold: float | None
                        ) -> tuple[Interactions, int]:
  """Repeated pairs collapsed (:func:`collapse_duplicates`; play counts summed when
  there is no threshold), then the positive pairs; and how many rows were repeats."""
  distinct, n_dup = collapse_duplicates(inter, sum_ratings=threshold is None)
  return binarize(distinct, threshold), n_dup


def _counts_per_row(keys: np.ndarray) -> np.ndarray:
  _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
  return counts[inv.reshape(-1)]


def filter_triplets(inter: Interactions, min_uc: int = 5, min_sc: int = 0) -> Interactions:
  """The paper's ``filter_triplets``: items first (only if ``min_sc > 0``), then users.

  Counts rows, so pass distinct (user, item) pairs (:func:`collapse_duplicates`) to
  count distinct items and users. Items that drop below ``min_sc`` after the user
  filter are kept, as in the paper.
  """
  if min_sc > 0 and len(inter):
    inter = inter.select(_counts_per_row(inter.items) >= min_sc)
  if min_uc > 0 and len(inter):
    inter = inter.select(_counts_per_row(inter.users) >= min_uc)
  return inter


def _first_appearance(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``pd.unique`` order: (sorted unique values, their column index)."""
  uniq, first = np.unique(values, return_index=True)
  order = np.argsort(first, kind="stable")
  column = np.empty(uniq.size, np.int64)
  column[order] = np.arange(uniq.size)
  return uniq, column


def _lookup(uniq: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(position of each value in sorted ``uniq``, whether it is there)."""
  if uniq.size == 0:
    return np.zeros(values.size, np.int64), np.zeros(values.size, bool)
  pos = np.searchsorted(uniq, values)
  pos = np.minimum(pos, uniq.size - 1)
  return pos, uniq[pos] == values


def _split_proportion(users: np.ndarray, rs: np.random.RandomState, fraction: float,
                      min_items: int, order_key: np.ndarray | None = None) -> np.ndarray:
  """The paper's ``split_train_test_proportion`` as a mask of rows to predict.

  Users are visited in sorted id order (pandas ``groupby``) with their rows in the
  given order (file order; or ``order_key`` order when given, for the time split).
  """
  if order_key is None:
    order = np.argsort(users, kind="stable")
  else:
    order = np.lexsort((order_key, users))
  bounds = np.flatnonzero(np.diff(users[order])) + 1
  starts = np.concatenate([[0], bounds])
  ends = np.concatenate([bounds, [users.size]])
  heldout = np.zeros(users.size, bool)
  for s, e in zip(starts.tolist(), ends.tolist()):
    n = e - s
    if n >= min_items:
      # int(test_prop * n) (the paper's name) in Python floats, as the paper computes it.
      pick = rs.choice(n, size=int(fraction * n), replace=False)
      heldout[order[s + pick]] = True
  return heldout


def _last_fraction(users, times, fraction, min_items):
  """Marks each user's latest ``int(fraction * n)`` rows (ties: later in file)."""
  order = np.lexsort((np.arange(users.size), times, users))
  bounds = np.flatnonzero(np.diff(users[order])) + 1
  starts = np.concatenate([[0], bounds])
  ends = np.concatenate([bounds, [users.size]])
  n = ends - starts
  k = np.where(n >= min_items, (fraction * n).astype(np.int64), 0)
  rank = np.arange(users.size) - np.repeat(starts, n)
  heldout = np.zeros(users.size, bool)
  heldout[order] = rank >= np.repeat(n - k, n)
  return heldout


def _train_columns(items: np.ndarray, is_train: np.ndarray):
  """Columns for the items of the training rows, numbered by first appearance there.

  Returns ``(uniq_sid, column, item_pos, in_train, sid_order)``: the sorted distinct
  training items, each one's column, each interaction's position in ``uniq_sid`` and
  whether its item is a training item, and the item of each column (as a position in
  ``uniq_sid``).
  """
  uniq_sid, column = _first_appearance(items[is_train])
  item_pos, in_train = _lookup(uniq_sid, items)
  sid_order = np.empty(uniq_sid.size, np.int64)
  sid_order[column] = np.arange(uniq_sid.size)
  return uniq_sid, column, item_pos, in_train, sid_order


def _heldout_count(n: int, n_heldout_users: int | None, heldout_users_fraction: float,
                   context: str) -> int:
  """H, the number of validation users (and again of test users) among ``n``; at least
  one of each and one user left to train on."""
  h = (int(round(heldout_users_fraction * n)) if n_heldout_users is None
       else int(n_heldout_users))
  if h < 1 or n - 2 * h < 1:
    given = (f"heldout_users_fraction {heldout_users_fraction} of them is {h}"
             if n_heldout_users is None else f"n_heldout_users is {h}")
    raise ValueError(
        f"{context}; this protocol holds out H validation and H test users, "
        f"H >= 1, and trains on the rest, so it needs at least 2 * H + 1 users, 3 at "
        f"the least ({given}); give more data or another n_heldout_users / "
        "heldout_users_fraction")
  return h


def split_heldout_users(inter: Interactions, n_heldout_users: int | None = None,
                        heldout_users_fraction: float = 0.1, *,
                        threshold: float | None = 3.5, min_uc: int = 5, min_sc: int = 0,
                        heldout_items_fraction: float = 0.2,
                        min_items_to_split: int = 5, seed: int = PAPER_SEED) -> Split:
  """The paper's strong-generalisation split (see the module docstring).

  Args:
    inter: raw interactions in file order.
    n_heldout_users: validation users, and again test users (H); when None,
      ``round(heldout_users_fraction * n_users)``.
    heldout_users_fraction: H as a fraction of the users left after filtering (when
      ``n_heldout_users`` is None): 0.1 holds out 10% for validation and 10% for test.
    threshold: keep ratings strictly above it; None keeps every row.
    min_uc, min_sc: the paper's user and item minimum counts.
    heldout_items_fraction: fraction of each held-out user's items to predict (the
      paper's ``test_prop``): ``int(heldout_items_fraction * n)`` of its ``n`` items;
      the rest is its fold-in.
    min_items_to_split: held-out users with fewer items keep all in fold-in.
    seed: seeds both the user permutation and (afresh) each held-out block's split.

  Returns:
    A :class:`Split` with rows in the paper's ``profile2id`` order and columns in its
    ``show2id`` order.
  """
  positive, n_dup = _distinct_positives(inter, threshold)
  kept = filter_triplets(positive, min_uc=min_uc, min_sc=min_sc)
  unique_uid = np.unique(kept.users)
  n = unique_uid.size
  if n == 0:
    raise ValueError(
        f"{inter.source}: no user left after filtering (threshold={threshold}, "
        f"min_uc={min_uc}, min_sc={min_sc}); expected at least one")
  h = _heldout_count(n, n_heldout_users, heldout_users_fraction,
                     f"{inter.source}: {n} users left after filtering (threshold="
                     f"{threshold}, min_uc={min_uc})")
  perm = np.random.RandomState(seed).permutation(n)
  profile_of_sorted = np.empty(n, np.int64)
  profile_of_sorted[perm] = np.arange(n)
  sorted_pos, _ = _lookup(unique_uid, kept.users)
  profile = profile_of_sorted[sorted_pos]
  n_train = n - 2 * h
  is_train = profile < n_train
  uniq_sid, column, item_pos, in_train_items, sid_order = _train_columns(kept.items,
                                                                         is_train)
  cols = column[item_pos]
  train = binary_csr(profile[is_train], cols[is_train], (n_train, uniq_sid.size))

  def heldout_block(lo):
    rows = (profile >= lo) & (profile < lo + h) & in_train_items
    users = kept.users[rows]
    te = _split_proportion(users, np.random.RandomState(seed), heldout_items_fraction,
                           min_items_to_split)
    r, c = profile[rows] - lo, cols[rows]
    return EvalSplit(
        fold_in=binary_csr(r[~te], c[~te], (h, uniq_sid.size)),
        heldout=binary_csr(r[te], c[te], (h, uniq_sid.size)),
        user_ids=inter.raw_user_ids(unique_uid[perm[lo:lo + h]]))

  return Split(train=train, validation=heldout_block(n_train),
               test=heldout_block(n_train + h),
               item_ids=inter.raw_item_ids(uniq_sid[sid_order]),
               train_user_ids=inter.raw_user_ids(unique_uid[perm[:n_train]]),
               protocol="heldout_users", collapsed_duplicates=n_dup)


def split_per_user(inter: Interactions, heldout_items_fraction: float = 0.2, *,
                   by_time: bool = False, threshold: float | None = None, min_uc: int = 0,
                   min_items_to_split: int = 2, seed: int = PAPER_SEED) -> Split:
  """Weak generalisation: each user's own rows split into train and test.

  ``heldout_items_fraction`` (the paper's ``test_prop``) of each user's ``n`` rows go to
  test. Random: users in sorted id order, ``RandomState(seed).choice(n,
  int(heldout_items_fraction * n), replace=False)`` rows to test (the paper's draw, one
  stream for all users). By time: each user's latest ``int(heldout_items_fraction * n)``
  rows. Users with fewer than
  ``min_items_to_split`` rows keep all in train. Columns: items of the training rows in
  first-appearance order; test rows of other items are dropped. Rows: every user, in
  sorted id order; ``test.fold_in`` is the training matrix itself. No validation set.
  """
  positive, n_dup = _distinct_positives(inter, threshold)
  kept = filter_triplets(positive, min_uc=min_uc)
  if len(kept) == 0:
    raise ValueError(f"{inter.source}: no interaction left after filtering "
                     f"(threshold={threshold}, min_uc={min_uc})")
  if by_time:
    if kept.timestamps is None:
      raise ValueError(f"{inter.source}: a time split needs a timestamp column")
    te = _last_fraction(kept.users, kept.timestamps, heldout_items_fraction,
                        min_items_to_split)
  else:
    te = _split_proportion(kept.users, np.random.RandomState(seed), heldout_items_fraction,
                           min_items_to_split)
  return _per_user_split(inter, kept.select(~te), kept.select(te), kept.users, n_dup)


def split_from_files(train: Interactions, test: Interactions, *,
                     threshold: float | None = None) -> Split:
  """Weak generalisation from a given train/test pair (ml-100k ``u1.base``/``u1.test``,
  NGCF/LightGCN ``train.txt``/``test.txt``). Rows: users of either file, sorted.

  Repeated (user, item) rows within a file collapse into one
  (:func:`collapse_duplicates`), and a test row whose positive pair is also a positive
  of the training file is dropped (it cannot be predicted without
  being seen); both count in ``collapsed_duplicates``.
  """
  # Each file was read on its own: text ids must share one vocabulary.
  train, test = unify_ids(train, test)
  train, n_train_dup = _distinct_positives(train, threshold)
  test, n_test_dup = _distinct_positives(test, threshold)
  if len(train) == 0:
    raise ValueError(f"{train.source}: no training interaction (threshold={threshold})")
  keys = _pair_keys(np.concatenate([train.users, test.users]),
                    np.concatenate([train.items, test.items]))
  seen = np.isin(keys[len(train):], keys[:len(train)])
  test = test.select(~seen)
  return _per_user_split(train, train, test, np.concatenate([train.users, test.users]),
                         n_train_dup + n_test_dup + int(seen.sum()))


def _per_user_split(inter, tr, te, all_users, n_dup):
  users = np.unique(all_users)
  uniq_sid, column = _first_appearance(tr.items)
  sid_order = np.empty(uniq_sid.size, np.int64)
  sid_order[column] = np.arange(uniq_sid.size)
  shape = (users.size, uniq_sid.size)
  tr_rows, _ = _lookup(users, tr.users)
  tr_pos, _ = _lookup(uniq_sid, tr.items)
  train = binary_csr(tr_rows, column[tr_pos], shape)
  te_pos, ok = _lookup(uniq_sid, te.items)
  te_rows, _ = _lookup(users, te.users)
  heldout = binary_csr(te_rows[ok], column[te_pos[ok]], shape)
  user_ids = inter.raw_user_ids(users)
  return Split(train=train, validation=None,
               test=EvalSplit(fold_in=train, heldout=heldout, user_ids=user_ids),
               item_ids=inter.raw_item_ids(uniq_sid[sid_order]), train_user_ids=user_ids,
               protocol="per_user", collapsed_duplicates=n_dup)


def _by_first_appearance(raw_users: np.ndarray, kept_users: np.ndarray) -> np.ndarray:
  """``kept_users`` (sorted) reordered by their first row in the raw file."""
  raw_uniq, raw_first = np.unique(raw_users, return_index=True)
  first = raw_first[_lookup(raw_uniq, kept_users)[0]]
  return kept_users[np.argsort(first, kind="stable")]


def _alt_user_groups(idx: np.ndarray, validation_fraction: float, test_fraction: float,
                     source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Train, validation and test positions (into the row order) from the permutation
  ``idx``: ``rint(n (1 - v - t))``, ``rint(n v)`` and the rest."""
  n = idx.size
  n_train = int(np.rint(n * (1 - validation_fraction - test_fraction)))
  n_val = int(np.rint(n * validation_fraction))
  if n_train < 1 or n_val < 1 or n - n_train - n_val < 1:
    raise ValueError(f"{source}: {n} users cannot be split {n_train}/{n_val}/"
                     f"{n - n_train - n_val}")
  return idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]


def _alt_rows_and_parts(users_in_order: np.ndarray, groups, users: np.ndarray):
  """Each interaction's row within its part and its part (0 train, 1 validation,
  2 test), for the interactions' ``users``."""
  kept_users = np.sort(users_in_order)
  sorted_of_order = _lookup(kept_users, users_in_order)[0]
  row_of_sorted = np.empty(users_in_order.size, np.int64)
  part_of_sorted = np.empty(users_in_order.size, np.int64)
  for part, g in enumerate(groups):
    row_of_sorted[sorted_of_order[g]] = np.arange(g.size)
    part_of_sorted[sorted_of_order[g]] = part
  upos = _lookup(kept_users, users)[0]
  return row_of_sorted[upos], part_of_sorted[upos]


def _alt_fold_in_mask(r: np.ndarray, rs: np.random.RandomState,
                      fold_in_fraction: float) -> np.ndarray:
  """Which of a block's interactions (rows ``r``, sorted) are folded in: per user, the
  first ``floor(fold_in_fraction * k)`` of a shuffle of their ``k`` items."""
  bounds = np.flatnonzero(np.diff(r)) + 1
  fold = np.zeros(r.size, bool)
  for s, e in zip(np.concatenate([[0], bounds]).tolist(),
                  np.concatenate([bounds, [r.size]]).tolist()):
    k = e - s
    perm = np.arange(k)
    rs.shuffle(perm)
    fold[s + perm[:int(np.floor(k * fold_in_fraction))]] = True
  return fold


def split_nvidia_alt(inter: Interactions, validation_fraction: float = 0.1,
                     test_fraction: float = 0.1, *, threshold: float = 4.0,
                     min_items: int = 5, fold_in_fraction: float = 0.8,
                     seed: int = PAPER_SEED) -> Split:
  """NVIDIA's alternative ML-20M processing (``ml-20m_alt`` in the early VAE-CF example).

  Reconstructed from ``vae/load/parsers.py`` (``parse_movielens``) and the helpers
  ``filter_data``, ``split_into_train_val_test``, ``split_movies_into_train_test`` and
  ``remove_items_that_doesnt_occure_in_train`` of NVIDIA DeepLearningExamples
  ``TensorFlow/Recommendation/VAE-CF/vae/load/preprocessing.py``. It differs from the
  paper's protocol in that:

  * positives are ratings ``>= threshold`` (4; the same rows as ``> 3.5`` on half-star
    data);
  * users and items are numbered by first appearance in the whole file; only users
    with ``>= min_items`` positives are kept (items need 1 user: no item filter);
  * held-out users are fractions of all users (``rint(n * (1 - v - t))`` train,
    ``rint(n * v)`` validation, the rest test) instead of a fixed count;
  * every held-out user is split, whatever their item count: the items are shuffled and
    the first ``floor(fold_in_fraction * n)`` folded in, the rest predicted (so the
    held-out side gets ``ceil(0.2 n)``, the paper's ``int(0.2 n)``); the split happens
    before dropping items unseen in training;
  * NVIDIA seeded nothing; here everything derives from ``seed`` (one
    ``RandomState`` for the user permutation and then the per-user shuffles).

  The fractions NVIDIA passed were not in the sources found; 0.1 / 0.1 is a guess.
  Columns: training items by first appearance (NVIDIA's order differs; same set).
  """
  pos, n_dup = collapse_duplicates(inter)
  pos = binarize(pos, threshold, inclusive=True)
  pos = filter_triplets(pos, min_uc=min_items)
  if len(pos) == 0:
    raise ValueError(f"{inter.source}: no user left after filtering (threshold>="
                     f"{threshold}, min_items={min_items}); expected at least one")
  users_in_order = _by_first_appearance(inter.users, np.unique(pos.users))
  rs = np.random.RandomState(seed)
  groups = _alt_user_groups(rs.permutation(users_in_order.size), validation_fraction,
                            test_fraction, inter.source)
  n_train = groups[0].size
  row, part = _alt_rows_and_parts(users_in_order, groups, pos.users)
  is_train = part == 0
  uniq_sid, column, item_pos, in_train, sid_order = _train_columns(pos.items, is_train)
  m = uniq_sid.size
  train = binary_csr(row[is_train], column[item_pos[is_train]], (n_train, m))

  def heldout(p, g):
    sel = np.flatnonzero(part == p)
    # Visit users in row order, their items in file order, as NVIDIA's loop did.
    sel = sel[np.argsort(row[sel], kind="stable")]
    r, c = row[sel], column[item_pos[sel]]
    fold = _alt_fold_in_mask(r, rs, fold_in_fraction)
    f, t = fold & in_train[sel], ~fold & in_train[sel]
    return EvalSplit(fold_in=binary_csr(r[f], c[f], (g.size, m)),
                     heldout=binary_csr(r[t], c[t], (g.size, m)),
                     user_ids=inter.raw_user_ids(users_in_order[g]))

  return Split(train=train, validation=heldout(1, groups[1]), test=heldout(2, groups[2]),
               item_ids=inter.raw_item_ids(uniq_sid[sid_order]),
               train_user_ids=inter.raw_user_ids(users_in_order[groups[0]]),
               protocol="heldout_users", collapsed_duplicates=n_dup)
