"""Recommendations for many users at once, beside :class:`jax_vaecf.serving.recommender.Recommender`:
the users (a ``user,item`` file, or the held-out users of a run's own split) as item
columns, raw ids looked up in the item table by their text, the ``user,rank,item,score``
CSV written atomically a chunk of users at a time, and MovieLens titles.
``python -m experiments.recommend`` is the command over these functions.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import time

import numpy as np

from jax_vaecf.core import files as files_lib
from jax_vaecf.serving import recommender as recommend_lib
from jax_vaecf.training import run_folder
from jax_vaecf.serving import artefact as serve_lib
from jax_vaecf.data import readers

HELD_OUT_PARTS = ("validation", "test")


def _open_text(path: str):
  """A titles file as text: UTF-8 for movies.csv and any file with a byte-order mark
  (dropped), else Latin-1 (ML-1M's movies.dat and ml-100k's u.item)."""
  with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
    data = f.read()
  utf8 = data.startswith(b"\xef\xbb\xbf") or path.endswith(("movies.csv", "movies.csv.gz"))
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  return io.StringIO(data.decode("utf-8" if utf8 else "latin-1", "replace"), newline="")


def read_titles(path: str) -> dict[str, str]:
  """Raw item id -> title from a MovieLens movies.csv, movies.dat or u.item file."""
  name = os.path.basename(path)
  titles = {}
  with _open_text(path) as f:
    if name.startswith("movies.csv"):
      reader = csv.reader(f)
      next(reader, None)
      for row in reader:
        if len(row) >= 2:
          titles[row[0]] = row[1]
    else:
      sep = "::" if name.startswith("movies.dat") else "|"
      for line in f:
        parts = line.rstrip("\r\n").split(sep)
        if len(parts) >= 2:
          titles[parts[0]] = parts[1]
  return titles


def find_titles(workdir: str) -> str | None:
  """The titles file next to the data the run was trained on, if there is one."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    return None
  with open(cfg_path) as f:
    data_dir = json.load(f).get("data_dir", "")
  folder = data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir)
  for name in ("movies.csv", "movies.dat", "u.item"):
    for cand in (name, name + ".gz"):
      p = os.path.join(folder, cand)
      if os.path.exists(p):
        return p
  return None


@dataclasses.dataclass
class Users:
  """Users to recommend for, in output order, with their histories as item columns.

  Attributes:
    ids: (n,) raw user ids (text for a users file, as written).
    indptr, indices: CSR of the histories: user ``u``'s distinct, sorted int32 columns
      are ``indices[indptr[u]:indptr[u + 1]]``.
    unknown_rows: lines whose item is not in the model's item table (skipped).
    unknown_ids: the distinct raw ids of those items, sorted.
    no_known: users left with no known item (recommended for an empty history).
  """

  ids: np.ndarray
  indptr: np.ndarray
  indices: np.ndarray
  unknown_rows: int = 0
  unknown_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, str))
  no_known: int = 0

  def __len__(self) -> int:
    return len(self.ids)

  def columns(self, lo: int, hi: int) -> list[np.ndarray]:
    """The histories of users ``lo`` to ``hi - 1``, as recommend_columns takes them."""
    return [self.indices[self.indptr[u]:self.indptr[u + 1]] for u in range(lo, hi)]


def read_users_file(path: str, delimiter: str = ",", header: str = "auto"
                    ) -> readers.Interactions:
  """The ``user,item`` lines of a users file, ids as text (``read_delimited``'s codes).

  Raises FileNotFoundError or ValueError (file, line, what was expected).
  """
  try:
    return readers.read_delimited(path, delimiter=readers.delimiter_of(delimiter),
                                  columns=(0, 1), header=readers.HEADER_CHOICES[header],
                                  string_ids=True)
  except ValueError as e:
    if "cannot tell whether" in str(e):
      # read_delimited names its own argument; point at this command's flag instead.
      raise ValueError(f"{str(e).split('; say which')[0]}; say which with "
                       "--users_header=yes or --users_header=no") from None
    raise


def column_lookup(item_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """int64 column of each raw id in the item table, -1 where it is not there.

  Ids are compared by their text, as the recommender and the artefact's scorer compare
  them (:func:`jax_vaecf.serving.artefact.lookup_columns`), so ``7`` in a file matches the int64
  item 7 and ``007`` matches nothing.
  """
  raw = np.asarray(raw)
  return serve_lib.lookup_columns(serve_lib.column_index(item_ids),
                                  raw.ravel().tolist()).reshape(raw.shape)


def users_from_file(inter: readers.Interactions, item_ids: np.ndarray) -> Users:
  """A users file's lines as :class:`Users`: users in order of first appearance, each
  distinct raw item mapped once, unknown items skipped and counted."""
  n_items = len(item_ids)
  n_user_codes = len(inter.user_vocab) if inter.user_vocab is not None else 0
  rows = np.arange(len(inter), dtype=np.int64)
  first = np.full(n_user_codes, len(inter), np.int64)
  np.minimum.at(first, inter.users, rows)
  by_first = np.argsort(first, kind="stable")  # user codes in order of first appearance
  position = np.empty(n_user_codes, np.int64)
  position[by_first] = np.arange(n_user_codes)
  n_item_codes = len(inter.item_vocab) if inter.item_vocab is not None else 0
  col_of_code = column_lookup(item_ids, inter.raw_item_ids(np.arange(n_item_codes)))
  cols = col_of_code[inter.items]
  known = cols >= 0
  # One key per (user, column) pair, sorted by user then column; repeats collapse.
  keys = np.sort(position[inter.users[known]] * n_items + cols[known])
  keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys
  per_user = np.bincount(keys // n_items, minlength=n_user_codes)
  unknown_codes = np.unique(inter.items[~known])
  return Users(ids=inter.raw_user_ids(by_first),
               indptr=np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64),
               indices=(keys % n_items).astype(np.int32),
               unknown_rows=int((~known).sum()),
               unknown_ids=inter.raw_item_ids(unknown_codes),
               no_known=int((per_user == 0).sum()))


def held_out_users(workdir: str, part: str, item_ids: np.ndarray) -> Users:
  """The ``validation`` or ``test`` users of the run's split, their fold-in items as
  histories.

  Raises ValueError when the split's item table is not the model's (the data changed
  since training, so columns would name other items), or has no such part.
  """
  from jax_vaecf.training import engine as loop  # pylint: disable=g-import-not-at-top
  try:
    cfg = run_folder.run_config(workdir, ignore_unknown=True)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; the run's split is rebuilt from its settings") from None
  try:
    split = loop.load_data(cfg)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"--users_file={part}: cannot rebuild the split of {workdir} from "
                     f"its config.json: {e}") from None
  ev = getattr(split, part)
  if ev is None:
    raise ValueError(f"--users_file={part}: the run's split has no {part} users "
                     f"(protocol {split.protocol})")
  theirs = [str(i) for i in np.asarray(split.item_ids).tolist()]
  ours = [str(i) for i in np.asarray(item_ids).tolist()]
  if theirs != ours:
    if len(theirs) != len(ours):
      what = f"{len(theirs)} items, the model has {len(ours)}"
    else:
      j = next(j for j, (a, b) in enumerate(zip(theirs, ours)) if a != b)
      what = f"column {j} is item {theirs[j]} there, {ours[j]} in the model"
    raise ValueError(f"--users_file={part}: the split rebuilt from {cfg.data_dir} has "
                     f"other items than the model's item table ({what}): the data "
                     "changed since training; recommend from a users file instead")
  fold_in = ev.fold_in.tocsr()
  fold_in.sort_indices()
  return Users(ids=np.asarray(ev.user_ids), indptr=fold_in.indptr.astype(np.int64),
               indices=fold_in.indices.astype(np.int32),
               no_known=int((np.diff(fold_in.indptr) == 0).sum()))


def csv_field(text: str) -> str:
  """``text`` as one CSV field (quoted as the csv module does, only when needed)."""
  if any(c in text for c in ',"\r\n'):
    return '"' + text.replace('"', '""') + '"'
  return text


def write_recommendations(rec: recommend_lib.Recommender, users: Users, k: int,
                          out: str, chunk_users: int = 4096, progress=None
                          ) -> tuple[int, float]:
  """Writes ``user,rank,item,score`` rows for every user to ``out``, atomically.

  Users are scored ``chunk_users`` at a time and their rows written before the next
  chunk, so memory stays bounded. Fillers past a user's unseen items are dropped.

  Returns ``(rows written, seconds spent scoring)``. Raises NonFiniteModelError (a
  ``ValueError``) on non-finite scores and OSError when ``out`` cannot be written;
  either way ``out`` is left as it was.
  """
  # Formatted once: per row only the rank and the score are printed.
  item_text = [csv_field(str(i)) for i in rec.item_ids.tolist()]
  n, rows, scoring = len(users), 0, 0.0
  # Ids go out as the bytes they were read from (see jax_vaecf.data._text.ID_ERRORS).
  with files_lib.atomic_write(out, "w", newline="", errors="surrogateescape") as f:
    f.write("user,rank,item,score\n")
    for lo in range(0, n, chunk_users):
      hi = min(lo + chunk_users, n)
      t0 = time.perf_counter()
      scores, top = rec.recommend_columns(users.columns(lo, hi), k)
      scoring += time.perf_counter() - t0
      lines = []
      for uid, s_row, c_row in zip(users.ids[lo:hi].tolist(), scores.tolist(),
                                   top.tolist()):
        u = csv_field(str(uid))
        # Fillers (-1) come after every real item: their score is -inf.
        lines.extend(f"{u},{r},{item_text[c]},{s:.9g}\n"
                     for r, (s, c) in enumerate(zip(s_row, c_row), 1) if c >= 0)
      f.write("".join(lines))
      rows += len(lines)
      if progress is not None:
        progress.update(hi - lo)
  return rows, scoring
