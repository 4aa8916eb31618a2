"""The processed data set: training rows plus held-out fold-in / to-predict rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

PROTOCOLS = ("heldout_users", "per_user")
# How repeated (user, item) rows are read (jax_vaecf.data.preprocess.collapse_duplicates),
# in the words every message uses.
DUPLICATE_RULE = ("each pair counts once, before any threshold or filter, with its latest "
                  "rating (play counts summed)")


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """Users evaluated by folding in some of their items and predicting the others.

  Attributes:
    fold_in: CSR float32 (n_users, n_items), binary: items fed to the model.
    heldout: CSR float32 (n_users, n_items), binary: items to predict. A row may be
      empty (a user with fewer than 5 items keeps them all in fold-in); evaluators
      should skip such rows.
    user_ids: (n_users,) raw user id of each row.
  """

  fold_in: sp.csr_matrix
  heldout: sp.csr_matrix
  user_ids: np.ndarray

  @property
  def n_users(self) -> int:
    """Rows (users) of ``fold_in`` and ``heldout``."""
    return self.fold_in.shape[0]


@dataclasses.dataclass(frozen=True)
class Split:
  """A data set split for training and evaluation.

  Attributes:
    train: CSR float32 (n_train_users, n_items), binary.
    validation: held-out validation users (:class:`EvalSplit`), or None.
    test: held-out test users (:class:`EvalSplit`).
    item_ids: (n_items,) raw item id of each column; for the paper's protocol the
      columns follow the paper's ``show2id`` (first appearance in the training rows).
    train_user_ids: (n_train_users,) raw user id of each training row.
    protocol: ``"heldout_users"`` (the paper's strong generalisation: evaluation users
      never appear in training) or ``"per_user"`` (weak generalisation: every user's
      own items are split; ``test.fold_in`` is then the user's training row).
    collapsed_duplicates: input rows dropped because their (user, item) pair had
      already been seen (earlier in the file, before any threshold or filter: see
      :data:`DUPLICATE_RULE`; or, for a given train/test pair, as a positive of the
      training file); each pair counts once.

  Raises:
    ValueError: an item id names two columns (:func:`check_distinct_ids`). The rest is
      checked where a split enters the library (:func:`jax_vaecf.data.inputs.split`).
  """

  train: sp.csr_matrix
  validation: EvalSplit | None
  test: EvalSplit
  item_ids: np.ndarray
  train_user_ids: np.ndarray
  protocol: str = "heldout_users"
  collapsed_duplicates: int = 0

  def __post_init__(self):
    check_distinct_ids(self.item_ids, "item")

  @property
  def n_items(self) -> int:
    """Columns (items) of every matrix: ``len(item_ids)``."""
    return self.train.shape[1]

  @property
  def n_train_users(self) -> int:
    """Training users of the whole data set (a process's part of partitioned data,
    :class:`~jax_vaecf.data.partition.PartSplit`, holds only its block's rows)."""
    return self.train.shape[0]

  def stats(self) -> dict:
    """Users, items, interactions and density of every part.

    Returns:
      ``{"protocol", "items", "users", "interactions", "density",
      "collapsed_duplicates", "train": part, "validation": {"fold_in": part,
      "heldout": part}, "test": {...}}``, each ``part`` ``{"users", "active_users",
      "interactions", "density"}`` (ints; densities float); ``validation`` only when
      there is one.
    """
    def part(m):
      users = m.shape[0]
      return {"users": users, "active_users": int(np.count_nonzero(np.diff(m.indptr))),
              "interactions": int(m.nnz),
              "density": float(m.nnz) / max(users * m.shape[1], 1)}
    out = {"protocol": self.protocol, "items": self.n_items, "train": part(self.train)}
    for name, ev in (("validation", self.validation), ("test", self.test)):
      if ev is not None:
        out[name] = {"fold_in": part(ev.fold_in), "heldout": part(ev.heldout)}
    ids = [self.train_user_ids]
    if self.protocol == "heldout_users":
      ids += [e.user_ids for e in (self.validation, self.test) if e is not None]
    all_ids = np.concatenate(ids) if ids else np.zeros(0)
    out["users"] = int(np.unique(all_ids).size)
    total = self.train.nnz
    if self.protocol == "heldout_users":
      total += sum(e.fold_in.nnz + e.heldout.nnz
                   for e in (self.validation, self.test) if e is not None)
    else:
      total += self.test.heldout.nnz
      if self.validation is not None:
        total += self.validation.heldout.nnz
    out["interactions"] = int(total)
    out["density"] = total / max(out["users"] * self.n_items, 1)
    out["collapsed_duplicates"] = int(self.collapsed_duplicates)
    return out


def check_distinct_ids(ids: np.ndarray, what: str, axis: str = "column") -> None:
  """Checks that no raw id names two columns (or rows).

  Two columns under one raw id would make recommendations and ``--items`` lookups map
  that id to one of them without a word (two rows would merge two users).

  Args:
    ids: ``(n,)`` raw ids (int or str), one per column (or row).
    what: ``"item"`` or ``"user"``, for the message.
    axis: ``"column"`` or ``"row"``, for the message.

  Raises:
    ValueError: naming the id and the two positions that hold it.
  """
  ids = np.asarray(ids)
  if ids.size < 2:
    return
  order = np.argsort(ids, kind="stable")
  same = ids[order][1:] == ids[order][:-1]
  if same.any():
    k = int(np.argmax(same))
    a, b = sorted((int(order[k]), int(order[k + 1])))
    raise ValueError(f"{what} id {ids[a].tolist()!r} names both {axis} {a} and {axis} "
                     f"{b}; every {what} needs an id of its own")


# Users with fewer training items keep them all (the paper's rule for fold-in splits).
MIN_ITEMS_FOR_VALIDATION = 5


def hold_out_validation(split: Split, fraction: float, seed: int) -> Split:
  """The per-user protocol with validation: a seeded slice of each user's training items
  becomes that user's validation targets.

  Each user with at least :data:`MIN_ITEMS_FOR_VALIDATION` training items holds out
  ``max(1, round(fraction * n))`` of its ``n`` items, drawn uniformly by
  ``numpy.random.default_rng(seed)``. The returned split trains on the rest
  (``train``), validates by folding in the rest and predicting the held-out slice
  (``validation``), and tests as before: ``test.fold_in`` stays the user's *full*
  training row, ``test.heldout`` the test items. Test items are never read.

  Args:
    split: a per-user split without validation (``split.protocol == "per_user"``).
    fraction: in (0, 1).
    seed: seed of the draw (the run's ``split_seed``).

  Returns:
    A new :class:`Split`; ``split`` is unchanged.

  Raises:
    ValueError: a split of another protocol, one that already has validation, or a
      fraction outside (0, 1).
  """
  if split.protocol != "per_user" or split.validation is not None:
    raise ValueError("hold_out_validation: expected a per-user split without validation "
                     f"(got protocol {split.protocol!r}"
                     f"{', with validation' if split.validation is not None else ''})")
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"hold_out_validation: fraction must be in (0, 1), got {fraction}")
  full = split.train
  n = np.diff(full.indptr).astype(np.int64)
  k = np.where(n >= MIN_ITEMS_FOR_VALIDATION,
               np.clip(np.floor(fraction * n + 0.5), 1, n - 1), 0).astype(np.int64)
  rows = np.repeat(np.arange(full.shape[0]), n)
  key = np.random.default_rng(seed).random(full.nnz)
  order = np.lexsort((key, rows))  # each row's entries in a random order
  rank = np.empty(full.nnz, np.int64)
  rank[order] = np.arange(full.nnz) - np.repeat(full.indptr[:-1].astype(np.int64), n)
  held = rank < k[rows]
  cols = full.indices.astype(np.int64)
  fold_in = binary_csr(rows[~held], cols[~held], full.shape)
  targets = binary_csr(rows[held], cols[held], full.shape)
  validation = EvalSplit(fold_in=fold_in, heldout=targets,
                         user_ids=split.train_user_ids)
  return dataclasses.replace(split, train=fold_in, validation=validation)


def format_stats(stats: dict) -> str:
  """A small human readable table of :meth:`Split.stats`.

  Args:
    stats: the dict :meth:`Split.stats` returns.

  Returns:
    The table as lines of text joined by ``\\n`` (no trailing newline).
  """
  lines = [f"protocol {stats['protocol']}: {stats['users']:,} users, "
           f"{stats['items']:,} items, {stats['interactions']:,} interactions, "
           f"density {stats['density']:.4%}"]
  rows = [("train", stats["train"])]
  for name in ("validation", "test"):
    if name in stats:
      rows += [(f"{name} fold-in", stats[name]["fold_in"]),
               (f"{name} held-out", stats[name]["heldout"])]
  for name, p in rows:
    lines.append(f"  {name:<20} {p['users']:>9,} users {p['interactions']:>12,} "
                 f"interactions  density {p['density']:.4%}")
  if stats.get("collapsed_duplicates"):
    lines.append(f"  {stats['collapsed_duplicates']:,} repeated (user, item) rows "
                 f"collapsed: {DUPLICATE_RULE}")
  return "\n".join(lines)


def binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
  """A 0/1 matrix from the positions of its ones; duplicates count once.

  Args:
    rows: int ``(nnz,)`` row of each one, in ``[0, shape[0])``.
    cols: int ``(nnz,)`` column of each one, in ``[0, shape[1])``.
    shape: ``(n_rows, n_columns)``.

  Returns:
    CSR float32 ``shape``, every stored value 1, int32 indices (what the batcher and
    device code expect) with sorted columns; int64 ``indptr`` past ``2**31`` entries.
  """
  m = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=shape,
                    dtype=np.float32)
  m.sum_duplicates()
  m.data[:] = 1.0
  m.indices = m.indices.astype(np.int32, copy=False)
  m.indptr = m.indptr.astype(np.int64 if m.nnz >= 2**31 else np.int32, copy=False)
  return m
