"""Top-k ranking metrics with the paper's definitions, computed on device.

For a user with held-out set ``T`` (``n = |T|``) and ranking ``r_1, r_2, ...`` of all
items not in the user's fold-in set, by descending score (ties: lower item index first,
as ``jax.lax.top_k``):

* ``NDCG@k = sum_{j<=k} [r_j in T] / log2(j + 1)  /  sum_{j<=min(k, n)} 1 / log2(j + 1)``
* ``Recall@k = |{r_1..r_k} & T| / min(k, n)`` (the paper's; it reaches 1 for every user)
* ``RecallN@k = |{r_1..r_k} & T| / n`` (the LightGCN / NGCF papers' recall)
* ``Precision@k = |{r_1..r_k} & T| / k``
* ``HitRate@k = 1 if {r_1..r_k} & T else 0`` (HR@k of the NCF papers with one held-out
  item per user; "at least one hit" with more)
* ``MRR@k = 1 / j`` for the first ``j <= k`` with ``r_j in T``, else 0
* ``MAP@k = sum_{j<=k} [r_j in T] Precision@j / min(k, n)`` (average precision cut at
  ``k``, RecBole's normalisation)

Every function returns per-user values ``(B,)`` so callers can average, weight or
bootstrap, together with ``valid`` ``(B,)``: users with no held-out items (and padded
rows) get value 0 and ``valid = False``, and must be left out of averages.

A diverged model (NaN / inf parameters) still yields a ranking, and so finite metrics
that mean nothing. :func:`ranking_metrics` therefore flags each user whose scores are
not all finite (``nonfinite``), and :class:`MetricAccumulator` refuses such a batch with
:class:`NonFiniteModelError`.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Which convention each metric name follows, for reports that put numbers beside
# published tables (docs/model.md has the definitions and sources).
CONVENTIONS = {
    "ndcg": "NDCG, ideal DCG over min(k, n) (Mult-VAE, RecVAE, EASE papers)",
    "recall": "hits / min(k, n) (Mult-VAE paper's Recall@R)",
    "recalln": "hits / n (NGCF, LightGCN)",
    "precision": "hits / k",
    "hitrate": "1 if any hit (NCF's HR@k)",
    "mrr": "1 / rank of the first hit",
    "map": "average precision over min(k, n) (RecBole)",
}


def convention(name: str) -> str | None:
  """The convention a metric column follows (for reports beside published tables).

  Args:
    name: a column name such as ``"recalln@20"``.

  Returns:
    One line naming the definition and its sources (:data:`CONVENTIONS`), or ``None``
    for a column that is not a ranking metric.
  """
  return CONVENTIONS.get(name.split("@", 1)[0])


# Per-user outputs of ranking_metrics that are bookkeeping, not metrics to average.
_NOT_METRICS = ("valid", "n_heldout", "is_user", "nonfinite", "top")


class NonFiniteModelError(ValueError):
  """A model's parameters or scores are NaN / inf: it diverged in training."""


def nonfinite_rows(scores: Array) -> Array:
  """Rows of scores holding any NaN or +-inf (a diverged model).

  Check the scores before items are masked out with ``-inf`` on purpose.

  Args:
    scores: ``(B, n_items)``, any float dtype.

  Returns:
    bool ``(B,)``: True where the row is not all finite.
  """
  return jnp.any(~jnp.isfinite(scores), axis=1)


def _check(scores: Array, heldout: Array, fold_in: Array | None, k: int) -> None:
  if scores.ndim != 2:
    raise ValueError(f"scores: expected shape (B, n_items), got {scores.shape}")
  if heldout.shape != scores.shape:
    raise ValueError(f"heldout: expected shape {scores.shape}, got {heldout.shape}")
  if fold_in is not None and fold_in.shape != scores.shape:
    raise ValueError(f"fold_in: expected shape {scores.shape}, got {fold_in.shape}")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  if k > scores.shape[1]:
    raise ValueError(f"k={k} is larger than the number of items ({scores.shape[1]})")


def mask_fold_in(scores: Array, fold_in: Array | None) -> Array:
  """Removes the items a user gave from the ranking.

  Args:
    scores: ``(B, n_items)``, any float dtype.
    fold_in: ``(B, n_items)``, non-zero where the user gave the item; ``None``: none.

  Returns:
    float32 ``(B, n_items)``: ``scores`` with ``-inf`` where ``fold_in > 0``.
  """
  scores = scores.astype(jnp.float32)
  if fold_in is None:
    return scores
  return jnp.where(fold_in > 0, -jnp.inf, scores)


def _discounts(k: int) -> Array:
  return 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))


def ranking_metrics(scores: Array, heldout: Array, fold_in: Array | None = None,
                    ks: Iterable[int] = (20, 50, 100),
                    row_mask: Array | None = None,
                    nonfinite: Array | None = None) -> dict[str, Array]:
  """Every metric of the module docstring for several ``k`` from one ``top_k``.

  Args:
    scores: ``(B, n_items)`` model scores (logits), any float dtype.
    heldout: ``(B, n_items)``, non-zero where an item is held out (to be predicted).
    fold_in: ``(B, n_items)`` or ``None``, non-zero where an item was given to the model;
      those items are removed from the ranking.
    ks: cut-offs, each in ``[1, n_items]``.
    row_mask: ``(B,)`` or ``None``; rows with 0 are padding and are marked invalid.
    nonfinite: ``bool (B,)`` or ``None``: rows whose scores were not all finite before
      the caller set some to ``-inf`` (its own fold-in masking). ``None``: found here,
      by :func:`nonfinite_rows` on ``scores`` as given (before ``fold_in`` masking).

  Returns:
    ``{'ndcg@k': (B,), 'recall@k': (B,), 'recalln@k': (B,), 'precision@k': (B,),
    'hitrate@k': (B,), 'mrr@k': (B,), 'map@k': (B,), ..., 'valid': bool (B,),
    'n_heldout': int32 (B,), 'is_user': bool (B,), 'nonfinite': bool (B,),
    'top': int32 (B, kmax)}``, metrics float32 (0 where not ``valid``) for every ``k``
    of ``ks`` (``top``: the items ranked first, best first; ``is_user``: not a padding
    row; ``nonfinite``: a real user with NaN / inf scores, whose metrics are
    meaningless: :meth:`MetricAccumulator.add` raises on them).

  Raises:
    ValueError: ``scores`` not 2-D, ``heldout`` / ``fold_in`` of another shape, no
      ``ks``, or a ``k`` that is not a positive int at most ``n_items``.
  """
  ks = sorted(set(int(k) for k in ks))
  if not ks:
    raise ValueError("ks must name at least one cut-off")
  _check(scores, heldout, fold_in, ks[-1])
  kmax = ks[-1]
  hit_matrix = heldout > 0
  _, top = jax.lax.top_k(mask_fold_in(scores, fold_in), kmax)  # (B, kmax)
  hits = jnp.take_along_axis(hit_matrix, top, axis=1)
  n_heldout = jnp.sum(hit_matrix, axis=1, dtype=jnp.int32)
  if nonfinite is None:
    nonfinite = nonfinite_rows(scores)
  return metrics_from_hits(hits, n_heldout, ks, row_mask, nonfinite, top)


def metrics_from_hits(hits: Array, n_heldout: Array, ks: Iterable[int],
                      row_mask: Array | None, nonfinite: Array,
                      top: Array | None = None) -> dict[str, Array]:
  """:func:`ranking_metrics` from a ranking already made.

  Args:
    hits: bool ``(B, kmax)``: whether the item ranked ``j`` is held out, ``kmax`` the
      largest of ``ks``.
    n_heldout: int32 ``(B,)``: held-out items per user.
    ks, row_mask: as :func:`ranking_metrics`.
    nonfinite: bool ``(B,)``: users whose scores were not all finite.
    top: int32 ``(B, kmax)`` or None: the ranked items themselves, returned as ``top``
      (what the catalogue metrics of :mod:`jax_vaecf.evaluation.catalogue` count).

  Returns:
    The dict of :func:`ranking_metrics` (``top`` only when given).

  Raises:
    ValueError: ``hits`` is not ``(B, max(ks))``.
  """
  ks = sorted(set(int(k) for k in ks))
  kmax = ks[-1]
  if hits.ndim != 2 or hits.shape[1] != kmax:
    raise ValueError(f"hits: expected shape (B, {kmax}), got {hits.shape}")
  hits = hits.astype(jnp.float32)
  valid = n_heldout > 0
  if row_mask is not None:
    valid = valid & (row_mask > 0)
  n_f = n_heldout.astype(jnp.float32)
  disc = _discounts(kmax)
  cum_disc = jnp.cumsum(disc)
  is_user = jnp.ones_like(valid) if row_mask is None else row_mask > 0
  reciprocal = 1.0 / jnp.arange(1, kmax + 1, dtype=jnp.float32)
  precision_at = jnp.cumsum(hits, axis=1) * reciprocal  # (B, kmax): Precision@j
  out: dict[str, Array] = {"valid": valid, "n_heldout": n_heldout, "is_user": is_user,
                           "nonfinite": nonfinite & is_user}
  if top is not None:
    out["top"] = top.astype(jnp.int32)
  for k in ks:
    h = hits[:, :k]
    dcg = h @ disc[:k]
    n_ideal = jnp.clip(n_heldout, 1, k)
    idcg = cum_disc[n_ideal - 1]
    n_hits = jnp.sum(h, axis=1)
    out[f"ndcg@{k}"] = jnp.where(valid, dcg / idcg, 0.0)
    out[f"recall@{k}"] = jnp.where(valid, n_hits / jnp.minimum(float(k), jnp.maximum(n_f, 1.0)), 0.0)
    out[f"recalln@{k}"] = jnp.where(valid, n_hits / jnp.maximum(n_f, 1.0), 0.0)
    out[f"precision@{k}"] = jnp.where(valid, n_hits / k, 0.0)
    out[f"hitrate@{k}"] = jnp.where(valid, (n_hits > 0).astype(jnp.float32), 0.0)
    out[f"mrr@{k}"] = jnp.where(valid, jnp.max(h * reciprocal[:k], axis=1), 0.0)
    out[f"map@{k}"] = jnp.where(
        valid, (h * precision_at[:, :k]).sum(axis=1)
        / jnp.minimum(float(k), jnp.maximum(n_f, 1.0)), 0.0)
  return out


def ndcg_at_k(scores: Array, heldout: Array, k: int = 100,
              fold_in: Array | None = None) -> tuple[Array, Array]:
  """Per-user NDCG@k (see the module docstring).

  Args:
    scores: ``(B, n_items)`` model scores, any float dtype.
    heldout: ``(B, n_items)``, non-zero where an item is held out.
    k: the cut-off, in ``[1, n_items]``.
    fold_in: ``(B, n_items)`` or ``None``, non-zero where an item was given.

  Returns:
    ``(ndcg float32 (B,), valid bool (B,))``; users without held-out items get 0 and
    ``valid = False``.

  Raises:
    ValueError: as :func:`ranking_metrics`.
  """
  m = ranking_metrics(scores, heldout, fold_in, (k,))
  return m[f"ndcg@{k}"], m["valid"]


def recall_at_k(scores: Array, heldout: Array, k: int = 20,
                fold_in: Array | None = None) -> tuple[Array, Array]:
  """Per-user Recall@k, hits divided by ``min(k, n)`` (the paper's).

  Args:
    scores: ``(B, n_items)`` model scores, any float dtype.
    heldout: ``(B, n_items)``, non-zero where an item is held out.
    k: the cut-off, in ``[1, n_items]``.
    fold_in: ``(B, n_items)`` or ``None``, non-zero where an item was given.

  Returns:
    ``(recall float32 (B,), valid bool (B,))``; users without held-out items get 0 and
    ``valid = False``.

  Raises:
    ValueError: as :func:`ranking_metrics`.
  """
  m = ranking_metrics(scores, heldout, fold_in, (k,))
  return m[f"recall@{k}"], m["valid"]


class MetricAccumulator:
  """Host-side accumulation of per-user metrics over batches.

  ``add`` takes the dict returned by :func:`ranking_metrics` (device or numpy arrays;
  padding rows are told apart by its ``is_user``, or by an explicit ``row_mask``);
  ``result`` returns the mean and standard error of each metric over valid users, the
  number of users counted and the number excluded for having no held-out items.
  :meth:`users` gives every real user's values, in the order added (the split's row
  order when batches come from :func:`jax_vaecf.data.eval_batches`).

  ``add`` raises :class:`NonFiniteModelError` when the dict's ``nonfinite`` flags any
  real user (a diverged model), and keeps nothing of that batch.
  """

  def __init__(self):
    self._values: dict[str, list[np.ndarray]] = {}  # every real user's values
    self._counted: list[np.ndarray] = []  # which of them have held-out items
    self._n_heldout: list[np.ndarray] = []
    self._top: list[np.ndarray] = []

  def add(self, batch_metrics: Mapping[str, Array], row_mask: Array | None = None) -> None:
    """Adds one batch's users.

    Args:
      batch_metrics: the dict of :func:`ranking_metrics` (device or numpy arrays).
      row_mask: ``(B,)``, 0 for padding rows; ``None``: ``batch_metrics["is_user"]``.

    Raises:
      NonFiniteModelError: ``nonfinite`` flags a real user; nothing of the batch is kept.
    """
    valid = np.asarray(batch_metrics["valid"]).astype(bool)
    if row_mask is not None:
      real = np.asarray(row_mask) > 0
    else:
      real = np.asarray(batch_metrics.get("is_user", np.ones_like(valid))).astype(bool)
    if "nonfinite" in batch_metrics:
      n_bad = int(np.sum(np.asarray(batch_metrics["nonfinite"]).astype(bool) & real))
      if n_bad:
        raise NonFiniteModelError(
            f"non-finite scores for {n_bad} users in evaluation: the model diverged "
            "(NaN/inf parameters), so its metrics would be meaningless")
    self._counted.append((valid & real)[real])
    if "n_heldout" in batch_metrics:
      self._n_heldout.append(np.asarray(batch_metrics["n_heldout"], np.int64)[real])
    if "top" in batch_metrics:
      self._top.append(np.asarray(batch_metrics["top"], np.int32)[real])
    for name, v in batch_metrics.items():
      if name in _NOT_METRICS:
        continue
      self._values.setdefault(name, []).append(np.asarray(v, np.float64)[real])

  def users(self) -> dict[str, np.ndarray]:
    """Every real user's row, in the order added.

    Returns:
      ``counted`` bool (n,) (has held-out items, so counts in the means), ``n_heldout``
      int64 (n,) when given, each metric float64 (n,) (NaN where not counted) and
      ``top`` int32 (n, kmax) when given.
    """
    counted = np.concatenate(self._counted) if self._counted else np.zeros(0, bool)
    out: dict[str, np.ndarray] = {"counted": counted}
    if self._n_heldout:
      out["n_heldout"] = np.concatenate(self._n_heldout)
    for name, v in self._values.items():
      out[name] = np.where(counted, np.concatenate(v), np.nan)
    if self._top:
      out["top"] = np.concatenate(self._top)
    return out

  def per_user(self) -> dict[str, np.ndarray]:
    """Each metric's values for the counted users, in the order they were added.

    Returns:
      ``{metric: float64 (n_counted,)}``.
    """
    counted = np.concatenate(self._counted) if self._counted else np.zeros(0, bool)
    return {k: np.concatenate(v)[counted] for k, v in self._values.items()}

  def result(self) -> dict[str, float]:
    """The mean and standard error of each metric over the counted users.

    Returns:
      ``{metric: mean, metric + "_se": standard error, "n_users": counted users,
      "n_excluded": users without held-out items}``, floats (NaN for a mean of no
      users, or a standard error of fewer than two) and ints.
    """
    out: dict[str, float] = {}
    n = 0
    for name, values in self.per_user().items():
      n = values.size
      out[name] = float(values.mean()) if n else float("nan")
      out[name + "_se"] = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    counted = np.concatenate(self._counted) if self._counted else np.zeros(0, bool)
    out["n_users"] = n
    out["n_excluded"] = int(counted.size - counted.sum())
    return out
