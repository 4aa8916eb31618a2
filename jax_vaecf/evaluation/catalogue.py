"""Beyond accuracy: what a model's top-k lists do to the catalogue.

Computed from the same top-k lists the accuracy metrics rank (``top`` of
:func:`jax_vaecf.evaluation.metrics.ranking_metrics`), over ``U`` users and ``I`` catalogue items,
with ``pop(i)`` the number of training users who have item ``i``, ``N`` the number of
training users and ``c_k(i)`` how many of the users' top-``k`` lists hold ``i``:

* ``coverage@k = |{i : c_k(i) > 0}| / I``: the share of the catalogue recommended to
  anyone (catalogue coverage; Ge et al., RecSys 2010; RecBole ``ItemCoverage``).
* ``avgpop@k = mean over users of (sum of pop(i) over their k items) / k``: average
  recommendation popularity (Yin et al., VLDB 2012; RecBole ``AveragePopularity``).
* ``tail@k``: the share of recommended slots outside the short head, the ``ceil(I / 5)``
  most popular items (ties: lower column first) (Abdollahpouri et al., RecSys 2017;
  RecBole ``TailPercentage`` with the 20% rule).
* ``gini@k = sum_j (2 j - I - 1) c_(j) / (I * sum_i c_k(i))`` over the counts sorted in
  increasing order, ``c_(1) <= ... <= c_(I)``, items never recommended included: 0 when
  every item is recommended equally often, near 1 when a few take every slot (RecBole
  ``GiniIndex``).
* ``novelty@k = mean over recommended slots of -log2(max(pop(i), 1) / N)``: self-
  information of the recommended items (Zhou et al., PNAS 2010); an item no training
  user has counts as one.

All are pure NumPy functions of host arrays.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.sparse as sp

CATALOGUE_METRICS = ("coverage", "avgpop", "tail", "gini", "novelty")
HEAD_FRACTION = 0.2


def item_popularity(train: sp.spmatrix) -> np.ndarray:
  """int64 ``(n_items,)``: training users per item (column sums of a binary matrix)."""
  train = sp.csr_matrix(train)
  return np.bincount(train.indices, minlength=train.shape[1]).astype(np.int64)


def short_head(popularity: np.ndarray, fraction: float = HEAD_FRACTION) -> np.ndarray:
  """bool ``(n_items,)``: the ``ceil(fraction * n_items)`` most popular items (ties:
  lower column first)."""
  n = popularity.size
  order = np.lexsort((np.arange(n), -popularity))
  head = np.zeros(n, bool)
  head[order[:int(np.ceil(fraction * n))]] = True
  return head


def gini(counts: np.ndarray) -> float:
  """Gini index of non-negative counts ``(n,)`` (0: equal; ``(n-1)/n``: one has all)."""
  c = np.sort(np.asarray(counts, np.float64))
  n, total = c.size, c.sum()
  if n == 0 or total == 0:
    return 0.0
  j = np.arange(1, n + 1)
  return float(((2 * j - n - 1) * c).sum() / (n * total))


def catalogue_metrics(top: np.ndarray, popularity: np.ndarray, n_train_users: int,
                      ks: Iterable[int]) -> dict[str, float]:
  """Every metric of the module docstring at each ``k``.

  Args:
    top: int ``(U, kmax)``: each user's items, best first (columns in
      ``[0, n_items)``); ``kmax >= max(ks)``.
    popularity: int ``(n_items,)``: :func:`item_popularity` of the training rows.
    n_train_users: ``N``, the training users ``popularity`` was counted over.
    ks: cut-offs.

  Returns:
    ``{"coverage@k": float, "avgpop@k": ..., "tail@k": ..., "gini@k": ...,
    "novelty@k": ...}`` for each ``k``.
  """
  top = np.asarray(top)
  popularity = np.asarray(popularity, np.int64)
  n_items = popularity.size
  ks = sorted(set(int(k) for k in ks))
  if top.ndim != 2 or (ks and top.shape[1] < ks[-1]):
    raise ValueError(f"top: expected (users, >= {ks[-1] if ks else 0}), got {top.shape}")
  if top.size and (top.min() < 0 or top.max() >= n_items):
    raise ValueError(f"top: item columns must be in [0, {n_items})")
  if n_train_users < 1:
    raise ValueError(f"n_train_users must be >= 1, got {n_train_users}")
  head = short_head(popularity)
  info = -np.log2(np.maximum(popularity, 1) / n_train_users)
  out = {}
  for k in ks:
    rec = top[:, :k]
    counts = np.bincount(rec.ravel(), minlength=n_items)
    out[f"coverage@{k}"] = float(np.count_nonzero(counts) / n_items)
    out[f"avgpop@{k}"] = float(popularity[rec].mean()) if rec.size else float("nan")
    out[f"tail@{k}"] = float((~head[rec]).mean()) if rec.size else float("nan")
    out[f"gini@{k}"] = gini(counts)
    out[f"novelty@{k}"] = float(info[rec].mean()) if rec.size else float("nan")
  return out
