"""Reading and writing the paper's output folder, to exchange splits with its code.

The folder holds ``train.csv``, ``validation_tr.csv``, ``validation_te.csv``,
``test_tr.csv``, ``test_te.csv`` (header ``uid,sid``; ``uid`` = ``profile2id``: training
users first, then validation, then test users; ``sid`` = ``show2id`` column) and
``unique_sid.txt`` (the raw item id of each column, one per line). ``unique_uid.txt``
(raw user id of each ``uid``) is written as an extra; the paper's code ignores it.

Files are written atomically with normal permissions (:mod:`jax_vaecf.core.files`). Reading
checks what would otherwise fail far from the cause or silently: every error names the
file and, where there is one, the line.
"""

from __future__ import annotations

import os

import numpy as np

from jax_vaecf.core import files
from jax_vaecf.data import _text
from jax_vaecf.data.split import EvalSplit, Split, binary_csr

_PARTS = ("train.csv", "validation_tr.csv", "validation_te.csv", "test_tr.csv",
          "test_te.csv")


# Uids without rows tolerated beyond one per uid with rows, when no unique_uid.txt
# bounds the user count: the paper numbers users 0, 1, 2, ... and only held-out users
# whose every item is outside training have no rows, so real folders have few.
_GAP_SLACK = 1000
# Ids are parsed as float64; above this they are no longer exact integers.
_MAX_ID = 2**53


def _write_pairs(path: str, m, uid_offset: int) -> None:
  coo = m.tocoo()
  order = np.lexsort((coo.col, coo.row))
  pairs = np.stack([coo.row[order].astype(np.int64) + uid_offset,
                    coo.col[order].astype(np.int64)], axis=1)
  with files.atomic_write(path, "w", newline="") as f:
    f.write("uid,sid\n")
    np.savetxt(f, pairs, fmt="%d", delimiter=",")


def _id_lines(ids: np.ndarray, what: str) -> str:
  ids = np.asarray(ids)
  if ids.dtype.kind in "USO":
    for i in ids.tolist():
      t = str(i)
      if not t.strip() or "\n" in t or "\r" in t:
        raise ValueError(f"write_vaecf_dir: {what} id {t!r} cannot be written one per "
                         "line (blank, or holds a line break)")
  return "".join(f"{i}\n" for i in ids.tolist())


def write_vaecf_dir(split: Split, out_dir: str | os.PathLike) -> None:
  """Writes ``split`` (protocol ``heldout_users`` with validation) in the paper's format.

  Each file is replaced atomically; an error leaves no temporary file.
  """
  if split.validation is None:
    raise ValueError("write_vaecf_dir: the paper's format needs a validation set")
  out_dir = os.fspath(out_dir)
  item_text = _id_lines(split.item_ids, "item")
  user_text = _id_lines(np.concatenate([split.train_user_ids, split.validation.user_ids,
                                        split.test.user_ids]), "user")
  os.makedirs(out_dir, exist_ok=True)
  n_tr, n_vd = split.train.shape[0], split.validation.n_users
  _write_pairs(os.path.join(out_dir, "train.csv"), split.train, 0)
  _write_pairs(os.path.join(out_dir, "validation_tr.csv"), split.validation.fold_in, n_tr)
  _write_pairs(os.path.join(out_dir, "validation_te.csv"), split.validation.heldout, n_tr)
  _write_pairs(os.path.join(out_dir, "test_tr.csv"), split.test.fold_in, n_tr + n_vd)
  _write_pairs(os.path.join(out_dir, "test_te.csv"), split.test.heldout, n_tr + n_vd)
  # Ids go back to the bytes they were read from (see _text.ID_ERRORS).
  files.write_bytes_atomic(os.path.join(out_dir, "unique_sid.txt"),
                           item_text.encode("utf-8", _text.ID_ERRORS))
  files.write_bytes_atomic(os.path.join(out_dir, "unique_uid.txt"),
                           user_text.encode("utf-8", _text.ID_ERRORS))


def _fmt(v: float) -> str:
  return str(int(v)) if np.isfinite(v) and v == np.floor(v) else repr(float(v))


def _check_ids(values: np.ndarray, path: str, what: str) -> np.ndarray:
  """float64 column (n,) of the rows after the header -> int64, naming the first line
  (row i is line i + 2) that is not a non-negative integer."""
  bad = (values < 0) | (values >= _MAX_ID)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{path}, line {i + 2}: expected a {what} in [0, 2**53), got "
                     f"{_fmt(values[i])}")
  return _text.check_integers(values, path, 2, what)


def _read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(uids, sids), both int64 (n,), of a ``uid,sid`` file; row i is line i + 2."""
  data = _text.normalize(_text.read_bytes(path), path)
  header, rest = _text.split_header(data)
  if header.replace(b" ", b"") != b"uid,sid":
    raise ValueError(f"{path}, line 1: expected the header 'uid,sid', got "
                     f"{_text.shown(header[:200])!r}")
  if not rest:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  t = _text.numeric_table(rest, b",", 2, path, 2)
  return _check_ids(t[:, 0], path, "uid"), _check_ids(t[:, 1], path, "sid")


def _read_ids(path: str) -> np.ndarray:
  """One id per line: int64 (n,) when every line is an integer, else str (n,).

  Raises ValueError naming the file (and line) for an empty file, a blank line or a
  carriage return that ends no line.
  """
  # Bytes that are not UTF-8 come back as the readers keep them (lone surrogates that
  # encode back to the same bytes), so ids written by write_vaecf_dir read back equal.
  # LF or CRLF line ends; a CR that ends no line is refused with its line (dropped, it
  # would glue two ids into one and shift every later column).
  data = _text.normalize(_text.read_bytes(path), path)
  text = data.decode("utf-8", _text.ID_ERRORS).rstrip("\n")
  # One id per line, kept whole: an id may hold spaces.
  lines = text.split("\n")
  blank = [i for i, s in enumerate(lines) if not s.strip()]
  if blank:
    raise ValueError(f"{path}, line {blank[0] + 1}: blank line, expected one id per "
                     "line (a gap would shift every later id)")
  # Numeric only when every id is a canonical int64 (the readers' rule), so '007',
  # '1.0' or 2**63 stay text, exactly as written.
  try:
    values = [int(s) for s in lines]
    if all(str(v) == s for v, s in zip(values, lines)):
      return np.array(values, np.int64)
  except (ValueError, OverflowError):
    pass
  return np.array(lines, dtype=str)


def _first_line(parts: dict, folder: str, uid: int) -> tuple[str, int]:
  """The first file (in ``_PARTS`` order) and line holding ``uid``."""
  for name in _PARTS:
    hit = np.flatnonzero(parts[name][0] == uid)
    if hit.size:
      return os.path.join(folder, name), int(hit[0]) + 2
  raise AssertionError("unreachable")


def _check_uid_span(parts: dict, folder: str, n_listed: int | None,
                    uid_path: str) -> None:
  """Refuses a largest uid that would make matrices far larger than the folder's
  users: beyond ``unique_uid.txt`` when there is one, else beyond what users without
  rows could explain (see ``_GAP_SLACK``)."""
  u = np.concatenate([parts[name][0] for name in _PARTS])
  hi = int(u.max())
  path, line = _first_line(parts, folder, hi)
  if n_listed is not None:
    if hi >= n_listed:
      raise ValueError(f"{path}, line {line}: uid {hi} is out of range: {uid_path} "
                       f"lists {n_listed} users")
    return
  # distinct <= u.size, so a larger hi fails the rule below whatever the distinct
  # count; checking first keeps the presence array small (the sort only runs on the
  # way to the error).
  if hi + 1 <= 2 * u.size + _GAP_SLACK:
    present = np.zeros(hi + 1, bool)
    present[u] = True
    distinct = int(present.sum())
  else:
    distinct = int(np.unique(u).size)
  if hi + 1 - distinct > distinct + _GAP_SLACK:
    raise ValueError(
        f"{path}, line {line}: uid {hi} is far beyond the {distinct} distinct uids of "
        f"the folder; the paper's format numbers users 0, 1, 2, ... (training, then "
        f"validation, then test users), so few uids below the largest lack rows")


def read_vaecf_dir(folder: str | os.PathLike) -> Split:
  """Reads the paper's folder back into a :class:`Split`.

  As in the paper's ``load_tr_te_data``, a held-out block spans uids from the smallest
  to the largest uid present in its two files. User ids are the raw ids from
  ``unique_uid.txt`` when present, else the ``uid`` numbers.

  Raises:
    FileNotFoundError: a file is missing (``unique_uid.txt`` is optional).
    ValueError: naming the file and line: a header other than ``uid,sid``, a uid or
      sid that is not a non-negative integer, a sid beyond ``unique_sid.txt``, a uid
      beyond ``unique_uid.txt`` or (without it) far beyond the number of distinct
      uids, a ``train.csv`` without rows, a held-out block without rows, an
      ``unique_sid.txt`` that is not UTF-8 or has blank lines.
  """
  folder = os.fspath(folder)
  sid_path = os.path.join(folder, "unique_sid.txt")
  item_ids = _read_ids(sid_path)
  n_items = item_ids.size
  parts = {}
  for name in _PARTS:
    path = os.path.join(folder, name)
    u, s = _read_pairs(path)
    if s.size and s.max() >= n_items:
      i = int(np.argmax(s >= n_items))
      raise ValueError(f"{path}, line {i + 2}: sid {int(s[i])} is out of range: "
                       f"{sid_path} lists {n_items} items")
    parts[name] = (u, s)
  u_tr, s_tr = parts["train.csv"]
  if u_tr.size == 0:
    raise ValueError(f"{os.path.join(folder, 'train.csv')}: no rows after the header, "
                     "expected the training interactions")
  uid_path = os.path.join(folder, "unique_uid.txt")
  listed = _read_ids(uid_path) if os.path.exists(uid_path) else None
  _check_uid_span(parts, folder, None if listed is None else listed.size, uid_path)
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
  uids = listed if listed is not None else np.arange(n_users)
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
  files.write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
