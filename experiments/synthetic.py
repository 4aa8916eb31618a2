"""Synthetic implicit-feedback data with a real dataset's shape, built directly as CSR.

Used by :mod:`experiments.benchmark`: the cost of a Mult-VAE step depends on the number
of users, items and interactions per user (and their spread), not on what the items
are, so a matrix with ML-20M's shape times like ML-20M. Rows are users with lognormal
activity (heavy-tailed, at least ``min_per_user`` items); items are drawn with Zipf-like
popularity, without repeats inside a row. Everything is vectorised: ML-20M's 8.5M
interactions take a few seconds.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jax_vaecf.data.split import EvalSplit

# ML-20M after the paper's preprocessing: 136,677 users with >= 5 ratings >= 3.5 over
# 20,108 items, ~73 per user; 2 x 10,000 are held out for validation and test.
ML20M_TRAIN_USERS = 116_677
ML20M_ITEMS = 20_108
ML20M_MEAN_PER_USER = 73.0


def define_shape_flags(flag_values=None) -> None:
  """``--n_items``, ``--n_users`` and ``--mean_per_user``: the data's shape, declared once
  for every tool that builds it (``benchmark``, ``torch_baseline``; the tool adopts
  them as its own flags with ``flags.adopt_module_key_flags(synthetic)``). Values
  below 1 are refused when the flags are parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_integer("n_items", ML20M_ITEMS, f"Items (ML-20M: {ML20M_ITEMS:,}).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("n_users", ML20M_TRAIN_USERS,
                       f"Training users (ML-20M: {ML20M_TRAIN_USERS:,}).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_float("mean_per_user", ML20M_MEAN_PER_USER,
                     f"Mean interactions per user (ML-20M: ~{ML20M_MEAN_PER_USER:g}).",
                     lower_bound=1.0, flag_values=fv)


def _unique(a: np.ndarray) -> np.ndarray:
  # Sort-based: numpy 2's hash-based np.unique is ~7x slower on 10M int64 keys.
  a = np.sort(a)
  return a[np.concatenate([[True], a[1:] != a[:-1]])] if a.size else a


def _rows(rng: np.random.Generator, n_users: int, n_items: int, mean_per_user: float,
          min_per_user: int, zipf: float) -> sp.csr_matrix:
  """Binary float32 CSR (n_users, n_items) with the module docstring's distributions."""
  sigma = 1.0
  act = rng.lognormal(0.0, sigma, n_users)
  extra = max(mean_per_user - min_per_user, 0.0)
  counts = min_per_user + np.floor(act / act.mean() * extra).astype(np.int64)
  counts = np.minimum(counts, n_items)
  # Popularity rank r gets weight 1 / r**zipf; ranks map to a random item permutation so
  # popular items are spread over the kernel, as in real catalogues.
  pop = 1.0 / np.arange(1, n_items + 1) ** zipf
  cdf = np.cumsum(pop / pop.sum())
  item_of_rank = rng.permutation(n_items).astype(np.int32)
  # Draw with replacement, drop repeats inside a row, keep a random subset of the
  # distinct items of each row of the wanted size. Rows left short (heavy users of a
  # small catalogue) draw again, only they, a few rounds; any still short after that
  # lose well under 0.1% of the interactions.
  def draw(users, n):
    rows = np.repeat(users, n)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(rows.size)), n_items - 1)
    return rows * n_items + item_of_rank[ranks]

  keys = _unique(draw(np.arange(n_users, dtype=np.int64), counts + counts // 2 + 4))
  for _ in range(8):
    have = np.bincount(keys // n_items, minlength=n_users)
    short = np.flatnonzero(have < counts)
    if not short.size:
      break
    extra = draw(short.astype(np.int64), 2 * (counts[short] - have[short]) + 8)
    keys = _unique(np.concatenate([keys, extra]))
  r = keys // n_items
  rand = rng.random(keys.size)
  order = np.lexsort((rand, r))
  rank_in_row = np.arange(keys.size) - np.searchsorted(r, r[order])
  keys = np.sort(keys[order][rank_in_row < counts[r[order]]])
  r = (keys // n_items).astype(np.int32)
  c = (keys % n_items).astype(np.int32)
  indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n_users))])
  return sp.csr_matrix((np.ones(c.size, np.float32), c, indptr.astype(np.int64)),
                       shape=(n_users, n_items))


def make_dataset(n_users: int = ML20M_TRAIN_USERS, n_items: int = ML20M_ITEMS,
                 n_eval_users: int = 10_000, mean_per_user: float = ML20M_MEAN_PER_USER,
                 min_per_user: int = 5, zipf: float = 0.9,
                 heldout_items_fraction: float = 0.2,
                 seed: int = 0) -> tuple[sp.csr_matrix, EvalSplit]:
  """Training rows and an evaluation split with the given shape.

  Args:
    n_users: training users (rows of the first result).
    n_items: items (columns).
    n_eval_users: held-out users; each keeps ``1 - heldout_items_fraction`` of their
      items as fold-in and the rest (at least one, when they have 5 or more) as held-out.
    mean_per_user: mean interactions per user.
    min_per_user: fewest interactions a user has.
    zipf: popularity exponent (rank ``r`` has weight ``r ** -zipf``).
    heldout_items_fraction: share of an evaluation user's items to predict.
    seed: the numpy seed.

  Returns:
    ``(train, eval_split)``: float32 binary CSR ``(n_users, n_items)`` and an
    :class:`~jax_vaecf.data.EvalSplit` over ``n_eval_users`` users.
  """
  rng = np.random.default_rng(seed)
  every = _rows(rng, n_users + n_eval_users, n_items, mean_per_user, min_per_user, zipf)
  train = every[:n_users]
  ev = every[n_users:].tocoo()
  # Pick the held-out entries per row: a random score, ranked inside each row.
  score = rng.random(ev.nnz)
  order = np.lexsort((score, ev.row))
  row_sorted = ev.row[order]
  starts = np.searchsorted(row_sorted, np.arange(n_eval_users))
  rank = np.arange(ev.nnz) - starts[row_sorted]
  n_row = np.bincount(ev.row, minlength=n_eval_users)
  n_held = np.where(n_row >= 5, np.maximum(1, np.floor(heldout_items_fraction * n_row)), 0)
  held = np.zeros(ev.nnz, bool)
  held[order] = rank < n_held[row_sorted]
  shape = (n_eval_users, n_items)

  def part(sel):
    return sp.csr_matrix((ev.data[sel], (ev.row[sel], ev.col[sel])), shape=shape,
                         dtype=np.float32)

  split = EvalSplit(fold_in=part(~held), heldout=part(held),
                    user_ids=np.arange(n_users, n_users + n_eval_users))
  return sp.csr_matrix(train), split
