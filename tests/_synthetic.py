"""Small synthetic implicit-feedback data with a low-rank structure."""

import numpy as np


def low_rank_interactions(n_users=800, n_items=200, n_clusters=8, per_user=12, seed=0):
  """Binary ``(n_users, n_items)`` float32: each user likes one cluster of items.

  Items are split into ``n_clusters`` groups; a user draws most items from their own
  group (with a Zipf-like popularity inside it) and a few uniformly at random, so
  the data has a rank-``n_clusters`` signal that a popularity ranking cannot capture.
  """
  rng = np.random.default_rng(seed)
  groups = np.array_split(rng.permutation(n_items), n_clusters)
  x = np.zeros((n_users, n_items), np.float32)
  for u in range(n_users):
    g = groups[rng.integers(n_clusters)]
    p = 1.0 / np.arange(1, len(g) + 1) ** 0.5
    own = rng.choice(g, size=min(per_user, len(g)), replace=False, p=p / p.sum())
    noise = rng.choice(n_items, size=2, replace=False)
    x[u, own] = 1
    x[u, noise] = 1
  return x


def fold_in_split(x, frac=0.2, seed=1):
  """Splits each row's items into fold-in (80%) and held-out (20%) halves."""
  rng = np.random.default_rng(seed)
  fold, held = np.zeros_like(x), np.zeros_like(x)
  for u in range(x.shape[0]):
    items = np.flatnonzero(x[u])
    test = rng.choice(items, size=max(1, int(frac * len(items))), replace=False)
    fold[u, items] = 1
    fold[u, test] = 0
    held[u, test] = 1
  return fold, held


def write_movielens_csv(folder, n_users=300, n_items=150, seed=3, titles=False):
  """Writes ``ratings.csv`` (and with ``titles`` a ``movies.csv``) in MovieLens format.

  Raw movie ids are ``7 * column + 1`` so that raw ids and column indices differ.
  """
  import os
  x = low_rank_interactions(n_users=n_users, n_items=n_items, n_clusters=4, per_user=10,
                            seed=seed)
  u, i = np.nonzero(x)
  with open(os.path.join(folder, "ratings.csv"), "w") as f:
    f.write("userId,movieId,rating,timestamp\n")
    for a, b in zip(u, i):
      f.write(f"{a + 1},{b * 7 + 1},4.5,{1000 + a}\n")
  if titles:
    with open(os.path.join(folder, "movies.csv"), "w") as f:
      f.write("movieId,title,genres\n")
      for b in range(n_items):
        f.write(f'{b * 7 + 1},"Movie {b}, The (2000)",Drama\n')
  return x
