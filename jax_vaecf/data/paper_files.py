"""Reading and writing the paper's output folder, to exchange splits with its code.

The folder holds ``train.csv``, ``validation_tr.csv``, ``validation_te.csv``,
``test_tr.csv``, ``test_te.csv`` (header ``uid,sid``; ``uid`` = ``profile2id``: training
users first, then validation, then test users; ``sid`` = ``show2id`` column) and
``unique_sid.txt`` (the raw item id of each column, one per line). ``unique_uid.txt``
(raw user id of each ``uid``) is written as an extra; the paper's code ignores it.
"""

from __future__ import annotations

import os

import numpy as np

from jax_vaecf.data import _text
from jax_vaecf.data.split import EvalSplit, Split, binary_csr

_PARTS = ("train.csv", "validation_tr.csv", "validation_te.csv", "test_tr.csv",
          "test_te.csv")


def _write_pairs(path: str, m, uid_offset: int) -> None:
  coo = m.tocoo()
  order = np.lexsort((coo.col, coo.row))
  pairs = np.stack([coo.row[order].astype(np.int64) + uid_offset,
                    coo.col[order].astype(np.int64)], axis=1)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("uid,sid\n")
    np.savetxt(f, pairs, fmt="%d", delimiter=",")
  os.replace(tmp, path)


def write_vaecf_dir(split: Split, out_dir: str | os.PathLike) -> None:
  """Writes ``split`` (protocol ``heldout_users`` with validation) in the paper's format."""
  if split.validation is None:
    raise ValueError("write_vaecf_dir: the paper's format needs a validation set")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  n_tr, n_vd = split.train.shape[0], split.validation.n_users
  _write_pairs(os.path.join(out_dir, "train.csv"), split.train, 0)
  _write_pairs(os.path.join(out_dir, "validation_tr.csv"), split.validation.fold_in, n_tr)
  _write_pairs(os.path.join(out_dir, "validation_te.csv"), split.validation.heldout, n_tr)
  _write_pairs(os.path.join(out_dir, "test_tr.csv"), split.test.fold_in, n_tr + n_vd)
  _write_pairs(os.path.join(out_dir, "test_te.csv"), split.test.heldout, n_tr + n_vd)
  for name, ids in (("unique_sid.txt", split.item_ids),
                    ("unique_uid.txt", np.concatenate(
                        [split.train_user_ids, split.validation.user_ids,
                         split.test.user_ids]))):
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "w") as f:
      f.write("".join(f"{i}\n" for i in ids.tolist()))
    os.replace(tmp, os.path.join(out_dir, name))


def _read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
  data = _text.normalize(_text.read_bytes(path), path)
  header, rest = _text.split_header(data)
  if header.replace(b" ", b"") != b"uid,sid":
    raise ValueError(f"{path}, line 1: expected the header 'uid,sid', got "
                     f"{header[:200].decode('utf-8', 'replace')!r}")
  if not rest:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  t = _text.numeric_table(rest, b",", 2, path, 2)
  return (_text.check_integers(t[:, 0], path, 2, "uid"),
          _text.check_integers(t[:, 1], path, 2, "sid"))


def _read_ids(path: str) -> np.ndarray:
  lines = _text.read_bytes(path).decode("utf-8").split()
  try:
    return np.array([int(s) for s in lines], np.int64)
  except ValueError:
    return np.array(lines, dtype=str)


def read_vaecf_dir(folder: str | os.PathLike) -> Split:
  """Reads the paper's folder back into a :class:`Split`.

  As in the paper's ``load_tr_te_data``, a held-out block spans uids from the smallest
  to the largest uid present in its two files. User ids are the raw ids from
  ``unique_uid.txt`` when present, else the ``uid`` numbers.
  """
  folder = os.fspath(folder)
  item_ids = _read_ids(os.path.join(folder, "unique_sid.txt"))
  n_items = item_ids.size
  parts = {}
  for name in _PARTS:
    path = os.path.join(folder, name)
    u, s = _read_pairs(path)
    if s.size and (s.min() < 0 or s.max() >= n_items):
      raise ValueError(f"{path}: sid out of range [0, {n_items}) of unique_sid.txt")
    parts[name] = (u, s)
  uid_path = os.path.join(folder, "unique_uid.txt")
  u_tr, s_tr = parts["train.csv"]
  n_tr = int(u_tr.max()) + 1
  blocks = []
  for a, b in (("validation_tr.csv", "validation_te.csv"), ("test_tr.csv", "test_te.csv")):
    (ua, sa), (ub, sb) = parts[a], parts[b]
    both = np.concatenate([ua, ub])
    if both.size == 0:
      raise ValueError(f"{os.path.join(folder, a)}: no rows, expected held-out users")
    lo, hi = int(both.min()), int(both.max())
    shape = (hi - lo + 1, n_items)
    blocks.append((lo, hi, binary_csr(ua - lo, sa, shape), binary_csr(ub - lo, sb, shape)))
  n_users = blocks[1][1] + 1
  uids = _read_ids(uid_path) if os.path.exists(uid_path) else np.arange(n_users)
  if uids.size < n_users:
    raise ValueError(f"{uid_path}: {uids.size} ids, expected at least {n_users}")
  evals = [EvalSplit(fold_in=f, heldout=h, user_ids=uids[lo:hi + 1])
           for lo, hi, f, h in blocks]
  return Split(train=binary_csr(u_tr, s_tr, (n_tr, n_items)), validation=evals[0],
               test=evals[1], item_ids=item_ids, train_user_ids=uids[:n_tr],
               protocol="heldout_users")


def write_user_lines(path: str | os.PathLike, users: np.ndarray, items: np.ndarray) -> None:
  """Writes interactions in the NGCF / LightGCN format (``user item item ...`` per line,
  users in ascending order, items in the given order), atomically.

  ``users`` and ``items`` are integer ids of equal length; :func:`read_user_lines` reads
  the file back.
  """
  path = os.fspath(path)
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  if users.shape != items.shape or users.ndim != 1:
    raise ValueError(f"write_user_lines: users {users.shape} and items {items.shape} "
                     "must be 1-D of one length")
  order = np.argsort(users, kind="stable")
  users, items = users[order], items[order]
  bounds = np.flatnonzero(np.diff(users)) + 1
  lines = [f"{u[0]} " + " ".join(map(str, it.tolist()))
           for u, it in zip(np.split(users, bounds), np.split(items, bounds)) if u.size]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + ("\n" if lines else ""))
  os.replace(tmp, path)
