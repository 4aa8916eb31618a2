"""The processed data set: training rows plus held-out fold-in / to-predict rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

PROTOCOLS = ("heldout_users", "per_user")


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
    return self.fold_in.shape[0]


@dataclasses.dataclass(frozen=True)
class Split:
  """A data set split for training and evaluation.

  Attributes:
    train: CSR float32 (n_train_users, n_items), binary.
    validation: held-out validation users, or None.
    test: held-out test users.
    item_ids: (n_items,) raw item id of each column; for the paper's protocol the
      columns follow the paper's ``show2id`` (first appearance in the training rows).
    train_user_ids: (n_train_users,) raw user id of each training row.
    protocol: ``"heldout_users"`` (the paper's strong generalisation: evaluation users
      never appear in training) or ``"per_user"`` (weak generalisation: every user's
      own items are split; ``test.fold_in`` is then the user's training row).
    collapsed_duplicates: input rows dropped because their (user, item) pair had
      already been seen (earlier in the file after binarising, or, for a given
      train/test pair, in the training file); each pair counts once.
  """

  train: sp.csr_matrix
  validation: EvalSplit | None
  test: EvalSplit
  item_ids: np.ndarray
  train_user_ids: np.ndarray
  protocol: str = "heldout_users"
  collapsed_duplicates: int = 0

  @property
  def n_items(self) -> int:
    return self.train.shape[1]

  def stats(self) -> dict:
    """Users, items, interactions and density of every part, as a nested dict."""
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


def format_stats(stats: dict) -> str:
  """A small human readable table of :meth:`Split.stats`."""
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
    lines.append(f"  {stats['collapsed_duplicates']:,} duplicate (user, item) rows "
                 "collapsed into their first occurrence")
  return "\n".join(lines)


def binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
  """A float32 CSR matrix with 1 at every (row, col); duplicates count once.

  Indices are int32 (what the batcher and device code expect) with sorted columns.
  """
  m = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=shape,
                    dtype=np.float32)
  m.sum_duplicates()
  m.data[:] = 1.0
  m.indices = m.indices.astype(np.int32, copy=False)
  m.indptr = m.indptr.astype(np.int64 if m.nnz >= 2**31 else np.int32, copy=False)
  return m
