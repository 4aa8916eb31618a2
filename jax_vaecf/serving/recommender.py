"""Top-k recommendations for new users, folded in without retraining.

A user is given as the list of raw item ids they interacted with. The trained encoder
maps that row to its posterior mean, the decoder scores every item, the user's own items
are excluded, and the k best are returned as raw ids. Batches are padded to a few fixed
shapes (users and non-zeros), so serving compiles a handful of programs, not one per
request.

``Recommender.from_workdir(DIR)`` needs nothing but a training run's directory: the
model's shape is read from the best checkpoint's metadata and the raw item ids from
``DIR/item_ids.npy``.

A diverged model is refused rather than served: parameters with NaN / inf when the
recommender is built, NaN / inf scores when it recommends
(:class:`jax_vaecf.evaluation.metrics.NonFiniteModelError`, a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.core import finite
from jax_vaecf.data import inputs
from jax_vaecf.evaluation import metrics as metrics_lib
from jax_vaecf import model as model_lib
from jax_vaecf.training import run_folder
from jax_vaecf.serving import artefact as serve_lib
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

def check_finite_params(params) -> None:
  """Checks that every parameter is finite.

  Args:
    params: a pytree of float arrays (device or numpy), any shapes.

  Raises:
    jax_vaecf.evaluation.metrics.NonFiniteModelError: naming the parameters that hold NaN / inf.
  """
  finite.check_finite_params(params, lambda arrays: metrics_lib.NonFiniteModelError(
      f"the model's parameters are not finite (NaN/inf in {arrays}): it diverged in "
      "training; serve an earlier checkpoint or retrain"))


def _check_has_checkpoint(workdir: str) -> None:
  """Raises FileNotFoundError unless the run's best set holds a finished save.

  Checked on the file system before orbax is involved: a CheckpointManager opened on a
  folder removes its interrupted saves (a training run writing into it right now would
  lose its save), and its close() does not wait for that clean-up, whose thread then
  fails with a traceback when the process exits straight after the error.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints", checkpoint_lib.BEST)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint in {workdir!r} (looked for {directory})")
  # Orbax names a finished step's folder by the step alone; an unfinished one has a
  # suffix ("12.orbax-checkpoint-tmp-...").
  if not any(name.isdigit() and os.path.isdir(os.path.join(directory, name))
             for name in os.listdir(directory)):
    raise FileNotFoundError(
        f"no checkpoint in {workdir!r}: {directory} holds no finished save (has the run "
        "validated yet?)")


def scorer_fn(model, k: int):
  """The fold-in top-``k`` program an exported artefact holds, as a pure function.

  ``score(params, rows, cols, vals, row_mask)`` takes a :class:`SparseBatch`'s arrays
  (int32 ``(nnz,)`` rows and columns, float32 ``(nnz,)`` values, float32 ``(B,)`` row
  mask) of the users' known items; those items are never returned. A user with fewer
  than ``k`` unseen items gets them first, and the rest of the row are fillers: score
  ``-inf``, item ``-1`` (the shapes stay fixed, so one program serves every request;
  :meth:`Recommender.recommend` drops them). A user whose logits are not all finite (a
  diverged model) gets NaN for every score of the row, so no caller takes its ranking
  for a real one.

  Args:
    model: the Linen module (``n_items`` wide, taking a ``SparseBatch``).
    k: items per user, in ``[1, n_items]``.

  Returns:
    ``score(params, rows, cols, vals, row_mask) -> (scores float32 (B, k), items int32
    (B, k))``, best first; not jitted.

  Raises:
    ValueError: ``k`` out of range.
  """
  if not 1 <= k <= model.n_items:
    raise ValueError(f"k must be in [1, {model.n_items}], got {k}")

  def score(params, rows, cols, vals, row_mask):
    batch = sparse_lib.SparseBatch(rows, cols, vals, row_mask)
    logits = model.apply({"params": params}, batch, train=False).logits
    seen = sparse_lib.densify(batch, model.n_items) > 0
    bad = metrics_lib.nonfinite_rows(logits)  # before the seen items become -inf
    scores, items = jax.lax.top_k(jnp.where(seen, -jnp.inf, logits), k)
    # Past a user's unseen items top_k returns seen ones (at -inf); mark them as fillers.
    filler = jnp.take_along_axis(seen, items, axis=1)
    return jnp.where(bad[:, None], jnp.nan, scores), jnp.where(filler, -1, items)

  return score


def make_topk_fn(model, k: int):
  """:func:`scorer_fn` on a :class:`SparseBatch`, jitted.

  Args:
    model: the Linen module (``n_items`` wide).
    k: items per user, in ``[1, n_items]``.

  Returns:
    ``topk(params, batch) -> (scores float32 (B, k), items int32 (B, k))``.

  Raises:
    ValueError: ``k`` out of range.
  """
  score = jax.jit(scorer_fn(model, k))
  return lambda params, batch: score(params, batch.rows, batch.cols, batch.vals,
                                     batch.row_mask)


@dataclasses.dataclass
class Recommendations:
  """Per user: raw ids and scores of the top items, and raw ids that were not known.

  ``items[u]`` and ``scores[u]`` are ``(n_u,)`` arrays, best first, with ``n_u = k``
  unless the user has fewer than ``k`` items they have not interacted with; then
  ``n_u`` is that number (``0`` for a user who has every item). A known item is never
  returned.

  Attributes:
    items: per user, raw item ids ``(n_u,)`` (the item table's dtype), best first.
    scores: per user, float32 ``(n_u,)`` scores (logits) of those items.
    unknown: per user, the given raw ids that are not in the item table (skipped).
  """

  items: list[np.ndarray]
  scores: list[np.ndarray]
  unknown: list[list[Any]]


class Recommender:
  """Serves a trained Mult-VAE / Mult-DAE.

  Args:
    model: the Linen module (``n_items`` wide).
    params: its parameters (a pytree of float arrays); every value must be finite.
    item_ids: ``(n_items,)`` raw id (int or str) of each column.

  Raises:
    ValueError: ``item_ids`` is not ``n_items`` long.
    NonFiniteModelError: a parameter holds NaN / inf (the model diverged in training).
  """

  def __init__(self, model, params, item_ids: np.ndarray):
    if len(item_ids) != model.n_items:
      raise ValueError(f"item_ids has {len(item_ids)} entries, the model {model.n_items}")
    check_finite_params(params)
    self.model = model
    self.params = params
    self.item_ids = np.asarray(item_ids)
    self._column = serve_lib.column_index(self.item_ids)
    self._fns: dict[int, Any] = {}
    self.checkpoint_meta: dict = {}  # the best checkpoint's meta when from a workdir

  @classmethod
  def from_workdir(cls, workdir: str) -> "Recommender":
    """Loads the best checkpoint of a training run (its served weights only).

    Args:
      workdir: the run folder.

    Returns:
      The :class:`Recommender`, with ``checkpoint_meta`` the checkpoint's metadata.

    Raises:
      FileNotFoundError: the run has no finished checkpoint, or no ``item_ids.npy``.
      ValueError: ``item_ids.npy`` is not a numpy array, or another run's item table.
      jax_vaecf.training.checkpoint.CheckpointUnreadableError: no best checkpoint reads back.
      NonFiniteModelError: the checkpoint's parameters are not finite.
    """
    _check_has_checkpoint(workdir)
    meta = checkpoint_lib.read_best_meta(workdir)
    ident = meta["identity"]
    ids_path = os.path.join(workdir, "item_ids.npy")
    if not os.path.exists(ids_path):
      raise FileNotFoundError(f"{ids_path}: not found; the workdir is incomplete")
    try:
      item_ids = np.load(ids_path, allow_pickle=False)
    except (OSError, ValueError) as e:  # a pickle, a truncated or foreign file
      raise ValueError(f"{ids_path}: not a numpy array of item ids ({e})") from None
    recorded = ident.get("items_digest")
    if recorded is not None and run_folder.items_digest(item_ids) != recorded:
      # The ids file and the checkpoint come from different runs (a run started over
      # in the folder): columns would be served under other items' ids.
      raise ValueError(f"{ids_path}: not the item table the best checkpoint was trained "
                       "on (another run wrote the folder since); train again or use "
                       "the run's own folder")
    # The shape settings the model's registry entry declares, as the identity holds them.
    model = model_lib.model_from_identity(ident)
    # Only the served weights are read: no optimiser moments, no second copy.
    field = "ema_params" if ident.get("weight_average", False) else "params"
    abstract = jax.eval_shape(lambda: train_lib.init_params(model, jax.random.PRNGKey(0)))
    ck = checkpoint_lib.RunCheckpoints(workdir, ident, read_only=True)
    try:
      values, meta = ck.restore_best_fields({field: abstract})
    finally:
      ck.close()
    try:
      rec = cls(model, values[field], item_ids)
    except metrics_lib.NonFiniteModelError as e:
      raise metrics_lib.NonFiniteModelError(
          f"the best checkpoint of {workdir!r}: {e}") from None
    rec.checkpoint_meta = meta
    return rec

  def columns_of(self, raw_items: Sequence[Any]) -> tuple[list[int], list[Any]]:
    """Maps raw item ids to the model's columns.

    Args:
      raw_items: raw item ids (int or str; compared by their text).

    Returns:
      ``(columns, unknown)``: the sorted distinct int columns of the known ids, and the
      ids not in the item table, in the order given.
    """
    return serve_lib.columns_of(self._column, raw_items)

  def _fn(self, k: int):
    if k not in self._fns:
      self._fns[k] = make_topk_fn(self.model, k)
    return self._fns[k]

  def recommend(self, users: Sequence[Sequence[Any]], k: int = 10) -> Recommendations:
    """Top-``k`` raw item ids (best first) for each user's list of raw item ids.

    Unknown ids are skipped and reported; a user with no known item gets the items the
    model scores highest for an empty history. A user with fewer than ``k`` unseen items
    gets only those (see :class:`Recommendations`), never an item of their history.

    Args:
      users: per user, a list of raw item ids (int or str).
      k: items per user, an int in ``[1, n_items]``.

    Returns:
      :class:`Recommendations`: per user, raw ids and float32 scores ``(n_u,)``, and the
      unknown ids.

    Raises:
      TypeError: ``users`` not a list of lists of ids, ``k`` not an int.
      ValueError: ``k`` out of range.
      NonFiniteModelError: the model scores any of the users NaN or inf (its
        parameters or computation are not finite).
    """
    k = inputs.k_value(k, self.model.n_items)
    users = inputs.histories(users, "users")
    cols, unknown = zip(*[self.columns_of(u) for u in users]) if users else ((), ())
    scores, top = self.recommend_columns(cols, k)
    keep = top >= 0  # -1: filler past the user's unseen items
    return Recommendations(items=[self.item_ids[t[m]] for t, m in zip(top, keep)],
                           scores=[sc[m] for sc, m in zip(scores, keep)],
                           unknown=[list(u) for u in unknown])

  def recommend_columns(self, columns: Sequence[np.ndarray], k: int = 10
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item columns for users given as their item columns (no id mapping).

    Args:
      columns: per user, the distinct int column indices of their history.
      k: items per user.

    Returns:
      ``(scores float32 (n, k), columns int32 (n, k))``, best first; ``-1`` columns
      (score ``-inf``) are fillers past a user's unseen items. Users are scored
      ``serve.USER_BUCKETS[-1]`` at a time, packed as an exported artefact packs them.

    Raises:
      TypeError: ``k`` is not an int.
      ValueError: ``k`` outside ``[1, n_items]``, or a column outside ``[0, n_items)``
        (the device gather would clip it silently).
      NonFiniteModelError: the model scores any of the users NaN or inf (its
        parameters or computation are not finite).
    """
    k = inputs.k_value(k, self.model.n_items)
    n = len(columns)
    for i, c in enumerate(columns):
      c = np.asarray(c)
      # An out-of-range column would be clipped by the device gather, silently.
      if c.size and (c.min() < 0 or c.max() >= self.model.n_items):
        raise ValueError(f"user {i}: item columns must be in [0, {self.model.n_items}), "
                         f"got {int(c.min())}..{int(c.max())}")
    scores = np.empty((n, k), np.float32)
    top = np.empty((n, k), np.int32)
    step = serve_lib.USER_BUCKETS[-1]
    for lo in range(0, n, step):
      part = columns[lo:lo + step]
      # The same packing as an exported artefact's serve.py: the same arrays, the same
      # top-k.
      rows, col_arr, vals, mask = serve_lib.pack(part)
      batch = sparse_lib.SparseBatch(rows, col_arr, vals, mask)
      s, t = jax.device_get(self._fn(k)(self.params, batch))
      scores[lo:lo + len(part)], top[lo:lo + len(part)] = s[:len(part)], t[:len(part)]
    n_bad = int(np.isnan(scores).any(axis=1).sum())
    if n_bad:
      raise metrics_lib.NonFiniteModelError(
          f"non-finite scores for {n_bad} of {n} users: the model's parameters are not "
          "finite (it diverged in training) or its logits overflow; nothing is returned")
    return scores, top
