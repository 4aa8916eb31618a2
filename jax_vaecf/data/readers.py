"""Readers for the raw interaction files of every supported data set.

Each reader returns an :class:`Interactions`: parallel numpy arrays in file order, one
entry per line. Ids are kept exactly as written (:func:`_text.parse_ids`): a user or
item column whose every token is a canonical decimal integer within int64 is kept as
int64 (parsed digit by digit, never through float64); any other column (hashes, MBIDs,
SKUs, ``007``, ``1.0``, integers beyond int64; always for Last.fm and MSD) is text, and
each id is replaced by its index in the sorted unique list of tokens, kept in
``user_vocab`` / ``item_vocab`` (so codes are contiguous and deterministic). Ratings and
timestamps are numbers. Files may be gzip-compressed (detected by content, not name).

Bad input raises ``FileNotFoundError`` (missing file) or ``ValueError`` whose message
names the file, the 1-based line number and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import os
from typing import Sequence

import numpy as np

from jax_vaecf.data import _text


@dataclasses.dataclass(frozen=True)
class Interactions:
  """User-item interactions in file order.

  Attributes:
    users: int64 (n,), raw user ids, or codes into ``user_vocab`` when it is set.
    items: int64 (n,), raw item ids, or codes into ``item_vocab`` when it is set.
    ratings: float32 (n,) or None: rating, play count or other strength.
    timestamps: int64 (n,) or None: unix seconds.
    user_vocab, item_vocab: sorted unique ``S`` (bytes) arrays, or None for numeric ids.
    source: where the data came from (for messages and cache keys).
  """

  users: np.ndarray
  items: np.ndarray
  ratings: np.ndarray | None = None
  timestamps: np.ndarray | None = None
  user_vocab: np.ndarray | None = None
  item_vocab: np.ndarray | None = None
  source: str = ""

  def __len__(self) -> int:
    return int(self.users.size)

  def select(self, mask_or_index: np.ndarray) -> "Interactions":
    """The rows picked by a boolean mask or an index array (order kept)."""
    pick = lambda a: None if a is None else a[mask_or_index]
    return dataclasses.replace(
        self, users=self.users[mask_or_index], items=self.items[mask_or_index],
        ratings=pick(self.ratings), timestamps=pick(self.timestamps))

  def raw_user_ids(self, users: np.ndarray) -> np.ndarray:
    """Maps codes back to raw ids (decoded strings for string ids)."""
    return _decode(users, self.user_vocab)

  def raw_item_ids(self, items: np.ndarray) -> np.ndarray:
    return _decode(items, self.item_vocab)


def _decode(codes, vocab):
  if vocab is None:
    return np.asarray(codes)
  # ``U`` (not object) arrays so they can be saved without pickle. Tokens are UTF-8;
  # a byte that is not becomes a lone surrogate (``_text.ID_ERRORS``), so every id
  # stays distinct and encodes back to its exact bytes. Plain ASCII takes the fast cast.
  raw = vocab[codes]
  if raw.size == 0 or int(raw.view(np.uint8).max()) < 128:
    return raw.astype(str)
  return np.char.decode(raw, "utf-8", _text.ID_ERRORS)


def _encode(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  vocab, codes = np.unique(strings, return_inverse=True)
  return codes.astype(np.int64).reshape(-1), vocab


# A header flag's words (--csv_header, --users_header) in read_delimited's terms.
HEADER_CHOICES = {"auto": None, "yes": True, "no": False}


def delimiter_of(text: str) -> str:
  """A delimiter flag's value as the separator: ``tab`` or ``\\t`` is a tab."""
  return "\t" if text in ("tab", "\\t") else text


def _id_column(values, what: str) -> tuple[np.ndarray, np.ndarray | None]:
  """``(ids or codes int64 (n,), vocab or None)`` of one column of raw ids: integers
  as they are, anything else by its text (UTF-8) into a sorted vocabulary, as a file's
  text ids are read."""
  a = np.asarray(values)
  if a.ndim != 1:
    raise ValueError(f"{what}: expected one id per interaction (a 1-D column), got "
                     f"shape {a.shape}")
  if a.dtype.kind in "iu":
    return a.astype(np.int64), None
  if a.dtype.kind == "b" or a.dtype.kind == "f":
    raise ValueError(f"{what}: ids must be integers or text, got {a.dtype} values")
  text = [v if isinstance(v, bytes) else str(v).encode("utf-8", _text.ID_ERRORS)
          for v in a.tolist()]
  codes, vocab = _encode(np.array(text, dtype="S") if text else np.zeros(0, "S1"))
  return codes, vocab


def from_columns(users, items, ratings=None, timestamps=None, *,
                 source: str = "columns") -> Interactions:
  """:class:`Interactions` from in-memory columns of raw ids (one entry per interaction,
  in order): integer ids kept as they are, other ids (``str``, ``bytes``) by their text.

  Raises ``ValueError`` naming the column for columns of different lengths, ids that
  are floats, or ratings / timestamps that are not finite numbers.
  """
  u, user_vocab = _id_column(users, "users")
  i, item_vocab = _id_column(items, "items")
  if u.size != i.size:
    raise ValueError(f"{source}: {u.size} users but {i.size} items; expected one of "
                     "each per interaction")
  r = None
  if ratings is not None:
    r = np.asarray(ratings, np.float32).reshape(-1)
    if r.size != u.size or not np.all(np.isfinite(r)):
      raise ValueError(f"{source}: ratings must be {u.size} finite numbers")
  t = None
  if timestamps is not None:
    t = np.asarray(timestamps).reshape(-1)
    if t.size != u.size or t.dtype.kind not in "iu":
      raise ValueError(f"{source}: timestamps must be {u.size} integers")
    t = t.astype(np.int64)
  return Interactions(users=u, items=i, ratings=r, timestamps=t, user_vocab=user_vocab,
                      item_vocab=item_vocab, source=source)


def unify_ids(*parts: Interactions) -> tuple[Interactions, ...]:
  """The parts with their user ids, and their item ids, on one footing.

  A column that is numeric in every part stays as it is. Otherwise, as for one file,
  the whole column is text: every part's ids are recoded into one sorted vocabulary of
  the union of their tokens (numeric ids by their decimal text, which is exactly the
  token they were read from).
  """
  out = list(parts)
  for kind in ("user", "item"):
    vocabs = [getattr(p, f"{kind}_vocab") for p in parts]
    if all(v is None for v in vocabs):
      continue
    codes = [getattr(p, f"{kind}s") for p in parts]
    tokens = []
    for c, v in zip(codes, vocabs):
      if v is None:
        uniq, inv = np.unique(c, return_inverse=True)
        tokens.append((uniq.astype("S"), inv.reshape(-1)))
      else:
        tokens.append((v, c))
    vocab = np.unique(np.concatenate([t for t, _ in tokens]))
    for k, (t, c) in enumerate(tokens):
      out[k] = dataclasses.replace(out[k], **{
          f"{kind}s": np.searchsorted(vocab, t)[c].astype(np.int64),
          f"{kind}_vocab": vocab})
  return tuple(out)


def concat(parts: Sequence[Interactions], source: str = "") -> Interactions:
  """The rows of every part in order, ids unified (:func:`unify_ids`)."""
  parts = unify_ids(*parts)
  def cat(k):
    vals = [getattr(p, k) for p in parts]
    return None if any(v is None for v in vals) else np.concatenate(vals)
  return Interactions(users=cat("users"), items=cat("items"), ratings=cat("ratings"),
                      timestamps=cat("timestamps"), user_vocab=parts[0].user_vocab,
                      item_vocab=parts[0].item_vocab, source=source)


def _ids(buf, fs, fe, path, first_line, what, as_strings=False):
  """``(ids, vocab)`` of one column given its field bounds (blanks around trimmed)."""
  fs, fe = _text.strip_fields(buf, fs, fe)
  return _text.parse_ids(_text.gather_strings(buf, fs, fe, path, first_line, what),
                         path, first_line, what, as_strings)


def _ratings(buf, fs, fe, path, first_line, what="rating"):
  values = _text.parse_numbers(_text.gather_strings(buf, fs, fe, path, first_line, what),
                               np.float64, path,
                               first_line, f"a numeric {what}")
  return _text.check_finite(values, path, first_line, what).astype(np.float32)


def _timestamps(buf, fs, fe, path, first_line, what="timestamp"):
  values = _text.parse_numbers(_text.gather_strings(buf, fs, fe, path, first_line, what),
                               np.float64, path,
                               first_line, f"a numeric {what}")
  return _text.check_integers(values, path, first_line, what)


def _expect_header(data: bytes, path: str, expected: Sequence[str]) -> bytes:
  header, rest = _text.split_header(data)
  names = [h.strip() for h in header.decode("utf-8", "replace").split(",")]
  if names[:len(expected)] != list(expected):
    raise ValueError(f"{path}, line 1: expected the header {','.join(expected)!r}, got "
                     f"{_text.shown(header[:200])!r}")
  if not rest:
    raise ValueError(f"{path}: no data lines after the header")
  return rest


def read_movielens_csv(path: str | os.PathLike) -> Interactions:
  """MovieLens ``ratings.csv`` (ml-20m, ml-25m, ml-latest(-small)): CSV with the header
  ``userId,movieId,rating,timestamp``; LF or CRLF line ends."""
  path = os.fspath(path)
  names = ("userId", "movieId", "rating", "timestamp")
  data = _expect_header(_text.normalize(_text.read_bytes(path), path), path, names)
  return _four_columns(data, b",", path, 2, names)


def read_ml1m(path: str | os.PathLike) -> Interactions:
  """MovieLens 1M/10M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header."""
  path = os.fspath(path)
  data = _text.normalize(_text.read_bytes(path), path)
  return _four_columns(data, b"::", path, 1)


def read_ml100k(path: str | os.PathLike) -> Interactions:
  """MovieLens 100K ``u.data`` (and ``u1.base`` ... ``ub.test``): ``user item rating
  timestamp`` separated by tabs, no header."""
  path = os.fspath(path)
  return _four_columns(_text.normalize(_text.read_bytes(path), path), b"\t", path, 1)


def read_pinterest(path: str | os.PathLike) -> Interactions:
  """NCF ``pinterest-20.train.rating`` (also ``ml-1m.train.rating``): ``user item rating
  timestamp`` as tab separated integers, no header."""
  return read_ml100k(path)


def _four_columns(data, delim, path, first_line,
                  names=("user id", "item id", "rating", "timestamp")):
  """user, item, rating, timestamp separated by ``delim`` (messages name ``names``)."""
  buf, fs, fe = _text.fields(data, delim, 4, path, first_line)
  empty = fe <= fs
  if empty.any():
    i, j = np.argwhere(empty)[0]
    raise ValueError(f"{path}, line {first_line + i}: field {j + 1} is empty, expected "
                     f"{_text.a(names[j])}: {_text.nth_line(data, i)!r}")
  users, user_vocab = _ids(buf, fs[:, 0], fe[:, 0], path, first_line, names[0])
  items, item_vocab = _ids(buf, fs[:, 1], fe[:, 1], path, first_line, names[1])
  return Interactions(
      users=users, items=items,
      ratings=_ratings(buf, fs[:, 2], fe[:, 2], path, first_line, names[2]),
      timestamps=_timestamps(buf, fs[:, 3], fe[:, 3], path, first_line, names[3]),
      user_vocab=user_vocab, item_vocab=item_vocab, source=path)


def read_netflix(path: str | os.PathLike) -> Interactions:
  """Netflix Prize ratings.

  ``path`` is one file or a folder. A folder is searched for ``training_set/mv_*.txt``
  (or ``mv_*.txt``), else ``combined_data_*.txt``. Both layouts are blocks: a line
  ``MovieID:`` followed by lines ``CustomerID,Rating,YYYY-MM-DD``; the ``mv_`` files
  hold one block each, so they are simply concatenated (sorted by name). Timestamps are
  unix seconds at midnight UTC of the date.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    files = (sorted(glob.glob(os.path.join(path, "training_set", "mv_*.txt*")))
             or sorted(glob.glob(os.path.join(path, "mv_*.txt*")))
             or sorted(glob.glob(os.path.join(path, "combined_data_*.txt*"))))
    if not files:
      raise FileNotFoundError(
          f"{path}: no Netflix Prize files (training_set/mv_*.txt or "
          "combined_data_*.txt) in this folder")
  else:
    files = [path]
  return concat([_netflix_file(f) for f in files], source=path)


def _netflix_file(path: str) -> Interactions:
  data = _text.normalize(_text.read_bytes(path), path)
  buf = np.frombuffer(data, np.uint8)
  starts, ends = _text.line_bounds(buf)
  is_movie = buf[ends - 1] == ord(":")
  if not is_movie[0]:
    raise ValueError(f"{path}, line 1: expected a 'MovieID:' line, got "
                     f"{_text.line_text(data, starts, ends, 0)!r}")
  movie_lines = np.flatnonzero(is_movie)
  movie_ids, item_vocab = _ids(buf, starts[movie_lines], ends[movie_lines] - 1, path,
                               movie_lines + 1, "MovieID")
  # Each rating line takes the id of the closest 'MovieID:' line above it.
  block = np.cumsum(is_movie) - 1
  rating_lines = np.flatnonzero(~is_movie)
  items = movie_ids[block[rating_lines]]
  line_no = rating_lines + 1
  # Field boundaries for the rating lines only, on the full buffer.
  dpos = np.flatnonzero(buf == ord(","))
  first = np.searchsorted(dpos, starts[rating_lines])
  count = np.searchsorted(dpos, ends[rating_lines]) - first
  if (count != 2).any():
    k = int(np.argmax(count != 2))
    i = int(rating_lines[k])
    raise ValueError(f"{path}, line {i + 1}: expected CustomerID,Rating,Date, got "
                     f"{_text.line_text(data, starts, ends, i)!r}")
  d0, d1 = dpos[first], dpos[first + 1]
  s0, e2 = starts[rating_lines], ends[rating_lines]
  users, user_vocab = _ids(buf, s0, d0, path, line_no, "CustomerID")
  ratings = _ratings(buf, d0 + 1, d1, path, line_no, "Rating")
  days = _text.parse_numbers(_text.gather_strings(buf, d1 + 1, e2, path, line_no, "date"),
                             "datetime64[D]",
                             path, line_no, "a date YYYY-MM-DD")
  return Interactions(users=users, items=items, ratings=ratings,
                      timestamps=days.astype("datetime64[s]").astype(np.int64),
                      user_vocab=user_vocab, item_vocab=item_vocab, source=path)


def _string_plays(path: str | os.PathLike, n_fields: int, item_fields: tuple[int, int],
                  plays_field: int) -> Interactions:
  """Tab-separated string user ids (field 0), string items (the bytes from the start of
  ``item_fields[0]`` to the end of ``item_fields[1]``) and a numeric play count."""
  path = os.fspath(path)
  data = _text.normalize(_text.read_bytes(path), path)
  buf, fs, fe = _text.fields(data, b"\t", n_fields, path, 1)
  users, user_vocab = _encode(_text.gather_strings(buf, fs[:, 0], fe[:, 0], path, 1,
                                                   "user id"))
  first, last = item_fields
  items, item_vocab = _encode(_text.gather_strings(buf, fs[:, first], fe[:, last], path,
                                                   1, "item"))
  plays = _text.parse_numbers(
      _text.gather_strings(buf, fs[:, plays_field], fe[:, plays_field], path, 1,
                           "play count"), np.float32,
      path, 1, "a numeric play count")
  return Interactions(users=users, items=items, ratings=plays, user_vocab=user_vocab,
                      item_vocab=item_vocab, source=path)


def read_lastfm(path: str | os.PathLike) -> Interactions:
  """Last.fm 360K ``usersha1-artmbid-artname-plays.tsv``: ``user-sha1 \\t artist-mbid
  \\t artist-name \\t plays``; the mbid may be empty.

  The item is the (mbid, name) pair, as in NVIDIA's VAE-CF parser, so artists without
  an mbid stay distinct by name (fields 1 and 2 are adjacent in the buffer, so one
  gather yields "mbid\\tname"). ``ratings`` holds the play count.
  """
  return _string_plays(path, 4, (1, 2), 3)


def read_msd(path: str | os.PathLike) -> Interactions:
  """Echo Nest taste profile ``train_triplets.txt``: ``user \\t song \\t play count``."""
  return _string_plays(path, 3, (1, 1), 2)


_COLUMN_ROLES = ("user", "item", "rating", "time")


def read_delimited(path: str | os.PathLike, delimiter: str = ",",
                   columns: Sequence[int | str | None] | None = None,
                   header: bool | None = None, string_ids: bool = False) -> Interactions:
  """A generic delimited file of ``user,item[,rating[,time]]`` columns.

  Args:
    path: the file (gzip allowed).
    delimiter: field separator (one or more characters; ``"\\t"``, ``"::"`` work).
    columns: None takes the columns by position: user, item, then rating and time when
      the first line has a third and a fourth field (more are ignored). Otherwise the
      user, item, rating and time columns in that order, each a 0-based index, a header
      name, or None (absent); a shorter sequence leaves the rest absent. Without a
      rating column every row is an interaction (``ratings`` is None).
    header: whether the first line is a header. None guesses: a header when some used
      field is not a number on line 1 but is one on line 2; data when some used field
      of line 1 is a number; a file whose first two lines are all text (string ids, no
      rating) cannot be told apart and raises. Names in ``columns`` imply a header.
    string_ids: treat user and item ids as text even when they are all integers.

  Returns:
    :class:`Interactions` with ids as in :func:`_text.parse_ids`, float32 ratings and
    int64 timestamps (when those columns exist).

  Raises ValueError (file, 1-based line, what was expected) for bad settings or data.
  """
  path = os.fspath(path)
  data = _text.normalize(_text.read_bytes(path), path)
  delim = delimiter.encode()
  if not delim or b"\n" in delim or b"\r" in delim:
    raise ValueError(f"read_delimited: bad delimiter {delimiter!r}, expected one or more "
                     "characters other than a line break")
  first, rest = _text.split_header(data)
  text1 = _text.shown(first[:200])
  rows = _quoted_rows(data, delimiter, path) if _is_quoted(data, delim) else None
  line1, line2 = _leading_fields(first, rest, delim, rows)
  cols = _column_roles(columns, line1, path, delimiter, text1)
  named = any(isinstance(c, str) for c in cols)
  if header is None:
    header = True if named else _guess_header(line1, line2, cols, path, text1)
  elif named and not header:
    raise ValueError(f"read_delimited: columns {columns!r} name header fields, but the "
                     "file is said to have no header")
  names = [f.decode("utf-8", _text.ID_ERRORS) for f in line1] if header else []
  idx = _column_indices(cols, columns, names, path, text1)
  body, first_line = (rest, 2) if header else (data, 1)
  if not body:
    raise ValueError(f"{path}: no data lines after the header")
  if rows is not None:
    return _from_quoted_rows(rows[1:] if header else rows, idx, path, delimiter,
                             string_ids)
  return _from_delimited_body(body, delim, idx, path, first_line, string_ids)


def _leading_fields(first: bytes, rest: bytes, delim: bytes,
                    rows: list[tuple[int, list[bytes]]] | None
                    ) -> tuple[list[bytes], list[bytes] | None]:
  """The stripped fields of line 1 and of line 2 (None without a second line), split
  at ``delim``, or taken from :func:`_quoted_rows`' ``rows`` when the file is quoted."""
  if rows is None:
    line1 = [f.strip() for f in first.split(delim)]
    line2 = [f.strip() for f in rest.split(b"\n", 1)[0].split(delim)] if rest else None
  else:
    line1 = [f.strip() for f in rows[0][1]]
    line2 = [f.strip() for f in rows[1][1]] if len(rows) > 1 else None
  return line1, line2


def _column_roles(columns: Sequence[int | str | None] | None, line1: list[bytes],
                  path: str, delimiter: str, text1: str) -> list[int | str | None]:
  """:func:`read_delimited`'s ``columns`` as four entries (user, item, rating, time),
  each a 0-based index, a header name or None; by position from line 1's field count
  when ``columns`` is None. Raises ValueError for a malformed setting."""
  if columns is None:
    if len(line1) < 2:
      raise ValueError(f"{path}, line 1: expected at least 2 fields (user, item) "
                       f"separated by {delimiter!r}, got 1: {text1!r}")
    cols = [0, 1, 2 if len(line1) > 2 else None, 3 if len(line1) > 3 else None]
  else:
    cols = list(columns)
    if not 2 <= len(cols) <= 4:
      raise ValueError(f"read_delimited: columns {columns!r}: expected 2 to 4 entries "
                       "(user, item[, rating[, time]])")
    cols += [None] * (4 - len(cols))
  for role, c in zip(_COLUMN_ROLES, cols):
    if not (c is None or isinstance(c, str) or (
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0)):
      raise ValueError(f"read_delimited: {role} column {c!r}: expected a 0-based index, "
                       "a header name or None")
  return cols


def _column_indices(cols: list[int | str | None],
                    columns: Sequence[int | str | None] | None, names: list[str],
                    path: str, text1: str) -> list[int | None]:
  """The four column roles (:func:`_column_roles`) as 0-based indices or None, header
  names looked up in ``names``. Raises ValueError for a name not in the header, a
  missing user or item column, or one column used twice."""
  idx = []
  for role, c in zip(_COLUMN_ROLES, cols):
    if isinstance(c, str):
      if c not in names:
        raise ValueError(f"{path}, line 1: expected a header with a column {c!r} (the "
                         f"{role} column), got {text1!r}")
      c = names.index(c)
    idx.append(None if c is None else int(c))
  if idx[0] is None or idx[1] is None:
    raise ValueError(f"read_delimited: columns {columns!r}: the user and item columns "
                     "are required")
  used = [i for i in idx if i is not None]
  if len(set(used)) != len(used):
    raise ValueError(f"read_delimited: columns {columns!r} use one column twice "
                     f"(indices {idx})")
  return idx


def _from_delimited_body(body: bytes, delim: bytes, idx: list[int | None], path: str,
                         first_line: int, string_ids: bool) -> Interactions:
  """:func:`read_delimited`'s columns ``idx`` (user, item, rating, time; None absent)
  from the unquoted data lines ``body``, whose first line is line ``first_line``."""
  used = [i for i in idx if i is not None]
  buf, fs, fe = _text.fields(body, delim, max(used) + 1, path, first_line,
                             min_fields=True)
  out = {}
  for key, j, what in (("users", idx[0], "user id"), ("items", idx[1], "item id")):
    out[key], out[key[:-1] + "_vocab"] = _ids(buf, fs[:, j], fe[:, j], path, first_line,
                                              what, string_ids)
  if idx[2] is not None:
    out["ratings"] = _ratings(buf, fs[:, idx[2]], fe[:, idx[2]], path, first_line)
  if idx[3] is not None:
    out["timestamps"] = _timestamps(buf, fs[:, idx[3]], fe[:, idx[3]], path, first_line)
  return Interactions(source=path, **out)


def _is_quoted(data: bytes, delim: bytes) -> bool:
  """Whether some field starts with a double quote (RFC 4180 quoting, as spreadsheets
  export csv). A quote inside a field (``a"b``) is an ordinary character."""
  return data.startswith(b'"') or b'\n"' in data or delim + b'"' in data


def _quoted_rows(data: bytes, delimiter: str, path: str) -> list[tuple[int, list[bytes]]]:
  """``(line, fields)`` of every line of a file with quoted fields, read by the csv
  module (RFC 4180: quotes removed, ``""`` inside quotes is one quote, a quoted field
  may hold the delimiter). Per line in Python: only such files take this path.

  Raises ValueError naming the line of a malformed quoted field or of a quoted line
  break (one line is one interaction here).
  """
  if len(delimiter) != 1:
    raise ValueError(f"{path}: quoted fields (\"...\") need a one-character delimiter, "
                     f"got {delimiter!r}")
  text = data.decode("utf-8", _text.ID_ERRORS)
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"',
                      doublequote=True, strict=True)
  rows = []
  line = 0
  try:
    for fields in reader:
      if reader.line_num != line + 1:
        raise ValueError(f"{path}, line {line + 1}: a quoted field holds a line break; "
                         "expected one interaction per line")
      line = reader.line_num
      rows.append((line, [f.encode("utf-8", _text.ID_ERRORS) for f in fields]))
  except csv.Error as e:
    raise ValueError(f"{path}, line {reader.line_num}: malformed quoted field ({e}): "
                     f"{_text.nth_line(data, reader.line_num - 1)!r}") from None
  return rows


def _from_quoted_rows(rows, idx, path, shown, string_ids) -> Interactions:
  """:func:`read_delimited`'s columns from :func:`_quoted_rows`' data lines."""
  need = max(i for i in idx if i is not None) + 1
  for line, fields in rows:
    if len(fields) < need:
      raise ValueError(f"{path}, line {line}: expected at least {need} fields separated "
                       f"by {shown!r}, got {len(fields)}")
  lines = np.array([line for line, _ in rows], np.int64)
  out = {}

  def column(j, what):
    values = [f[j].strip(b" \t") for _, f in rows]
    _text.check_field_lengths(np.array([len(v) for v in values], np.int64), path, lines,
                              what)
    return np.array(values, dtype="S")

  for key, j, what in (("users", idx[0], "user id"), ("items", idx[1], "item id")):
    out[key], out[key[:-1] + "_vocab"] = _text.parse_ids(column(j, what), path, lines, what,
                                                         string_ids)
  if idx[2] is not None:
    values = _text.parse_numbers(column(idx[2], "rating"), np.float64, path, lines,
                                 "a numeric rating")
    out["ratings"] = _text.check_finite(values, path, lines, "rating").astype(np.float32)
  if idx[3] is not None:
    values = _text.parse_numbers(column(idx[3], "timestamp"), np.float64, path, lines,
                                 "a numeric timestamp")
    out["timestamps"] = _text.check_integers(values, path, lines, "timestamp")
  return Interactions(source=path, **out)


def _is_number(token: bytes) -> bool:
  try:
    float(token)
    return True
  except ValueError:
    return False


def _guess_header(line1, line2, cols, path, text1) -> bool:
  """Whether line 1 is a header, from the used fields of lines 1 and 2 (see
  :func:`read_delimited`)."""
  used = [int(c) for c in cols if c is not None]  # indices: no names when guessing
  at = lambda line, c: line[c] if line is not None and c < len(line) else None
  for c in used:
    a, b = at(line1, c), at(line2, c)
    if a is not None and b is not None and not _is_number(a) and _is_number(b):
      return True
  if any(at(line1, c) is not None and _is_number(at(line1, c)) for c in used):
    return False
  if line2 is None:
    raise ValueError(f"{path}: no data lines: the file's only line is {text1!r}, text "
                     "in every field used (a header alone?); expected data lines")
  raise ValueError(
      f"{path}, line 1: cannot tell whether {text1!r} is a header or data (the fields "
      "used are text, on the next line too); say which with header=True or "
      "header=False (csv_header=yes or no)")


def read_user_lines(path: str | os.PathLike) -> Interactions:
  """The NGCF / LightGCN format: one line per user, ``user item item ...`` separated by
  spaces or tabs (a user with no items may appear alone on its line)."""
  path = os.fspath(path)
  data = _text.normalize(_text.read_bytes(path), path)
  if b"\t" in data:
    data = data.replace(b"\t", b" ")
  buf = np.frombuffer(data, np.uint8)
  starts, ends = _text.line_bounds(buf)
  space = (buf == 32) | (buf == 10)
  # A token starts at a non-space byte preceded by a space, a newline or the start.
  tok = ~space
  tok_start = np.flatnonzero(tok & np.concatenate([[True], space[:-1]]))
  line_of = np.searchsorted(ends, tok_start)
  per_line = np.bincount(line_of, minlength=starts.size)
  if (per_line == 0).any():
    i = int(np.argmax(per_line == 0))
    raise ValueError(f"{path}, line {i + 1}: expected 'user item item ...', got an "
                     "empty line")
  # A token ends at a non-space byte followed by a space or a newline.
  tok_end = np.flatnonzero(tok & np.concatenate([space[1:], [True]])) + 1
  is_user = np.zeros(tok_start.size, bool)
  is_user[np.concatenate([[0], np.cumsum(per_line)[:-1]])] = True
  users, user_vocab = _text.parse_ids(
      _text.gather_strings(buf, tok_start[is_user], tok_end[is_user], path,
                           line_of[is_user] + 1, "user id"), path, 1, "user id")
  items, item_vocab = _text.parse_ids(
      _text.gather_strings(buf, tok_start[~is_user], tok_end[~is_user], path,
                           line_of[~is_user] + 1, "item id"), path,
      line_of[~is_user] + 1, "item id")
  return Interactions(users=np.repeat(users, per_line - 1), items=items,
                      user_vocab=user_vocab, item_vocab=item_vocab, source=path)
