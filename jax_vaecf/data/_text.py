"""Vectorised parsing of delimited text held in memory (internal).

Everything here works on a whole file as one ``bytes`` object and a ``uint8`` view of
it: line and field boundaries are found with numpy comparisons, fields are gathered
into fixed-width ``S`` arrays in chunks, numbers are parsed by numpy's casts (or its C
tokenizer, ``np.fromstring(..., sep=' ')``) and ids by :func:`parse_ids`, exactly. No
Python code runs per line on the success path; the slow per-line code only runs to
locate the first bad line for an error message.
"""

from __future__ import annotations

import gzip
import os
import warnings

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
# Ids are bytes in the files; as text they are decoded with this error handler, so a
# byte that is not UTF-8 becomes a lone surrogate and encodes back to the same byte.
# Two different ids never decode to the same string (``errors="replace"`` would merge
# them into U+FFFD).
ID_ERRORS = "surrogateescape"
# Lines per block when hunting for the first unparsable line: small enough that the
# per-line fallback inside one block is quick, large enough that blocks stay few.
_BLOCK_LINES = 1 << 14
# Bytes gathered at a time into a ``(rows, width)`` matrix; bounds the int64 index
# matrix to 8 times that.
_GATHER_BYTES = 1 << 22
# The longest field (id or number) a table may hold, in bytes. Fields are gathered at
# the longest one's width, so memory grows with rows x this; real ids (hashes, MBIDs,
# SKUs, names) are far shorter, and a longer field is a missing quote or line break.
MAX_FIELD_BYTES = 1024


def read_bytes(path: str | os.PathLike) -> bytes:
  """Returns the file's content, gunzipped when it starts with the gzip magic number,
  without a leading UTF-8 byte-order mark (spreadsheets write one; left in, it would
  make the first line look like text).

  Raises FileNotFoundError naming the path when it is missing or is a folder, and
  ValueError naming the line of a NUL byte (no text format of a data set has one; in an
  id it would be indistinguishable from padding).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
  if data.startswith(_UTF8_BOM):
    data = data[len(_UTF8_BOM):]
  nul = data.find(b"\0")
  if nul >= 0:
    line = data.count(b"\n", 0, nul) + 1
    column = nul - data.rfind(b"\n", 0, nul)
    raise ValueError(f"{path}, line {line}: holds a NUL byte (0x00) at column {column}; "
                     "expected text")
  return data


def normalize(data: bytes, path: str) -> bytes:
  """Turns CRLF line endings into LF and drops trailing blank lines; ends with exactly one
  newline.

  Raises ValueError when nothing but whitespace is left, and for a carriage return that
  ends no line (CR-only line endings, or a stray CR): dropped, it would glue two lines
  or two numbers together (``"4.0\r1"`` read as 4.01).
  """
  if b"\r" in data:
    check_line_endings(data, path)
    data = data.replace(b"\r\n", b"\n").rstrip(b"\r")
  data = data.rstrip(b"\n")
  if not data.strip():
    raise ValueError(f"{path}: empty file, expected at least one data line")
  return data + b"\n"


def check_line_endings(data: bytes, path: str) -> None:
  """Raises ValueError naming the first CR not followed by LF (line endings are LF or
  CRLF; a CR ending the file ends its last line)."""
  body = data.rstrip(b"\r")
  if body.count(b"\r") == body.count(b"\r\n"):
    return
  buf = np.frombuffer(body, np.uint8)
  cr = np.flatnonzero(buf == 13)
  lone = cr[buf[cr + 1] != 10]  # body does not end with CR: cr + 1 is inside
  if b"\n" not in data:
    raise ValueError(f"{path}: has CR-only line endings (classic Mac OS); convert them "
                     "to LF or CRLF first (e.g. tr '\\r' '\\n')")
  at = int(lone[0])
  line = data.count(b"\n", 0, at) + 1
  start = data.rfind(b"\n", 0, at) + 1
  end = data.find(b"\n", at) if b"\n" in data[at:] else len(data)
  raise ValueError(f"{path}, line {line}: holds a carriage return (CR) that ends no line "
                   f"(line endings must be LF or CRLF): {shown(data[start:end][:200])!r}")


def split_header(data: bytes) -> tuple[bytes, bytes]:
  """Splits off the first line (without its newline) from the rest."""
  i = data.index(b"\n")
  return data[:i], data[i + 1:]


def line_bounds(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Start and end (exclusive, at the newline) offsets of every line of ``buf``.

  ``buf`` is a uint8 view of normalised text (ends with a newline). Both int64 (n,).
  """
  ends = np.flatnonzero(buf == 10)
  starts = np.empty_like(ends)
  starts[0] = 0
  starts[1:] = ends[:-1] + 1
  return starts, ends


def line_text(data: bytes, starts, ends, i: int) -> str:
  s = data[int(starts[i]):int(ends[i])]
  return shown(s[:200])


def shown(raw: bytes) -> str:
  """Bytes from a file as text for a message: UTF-8, with any other byte as ``\\xNN``
  (so the message names the exact bytes)."""
  return raw.decode("utf-8", "backslashreplace")


def nth_line(data: bytes, i: int) -> str:
  """Line ``i`` (0-based) of ``data`` as text, for error messages (scans the data)."""
  starts, ends = line_bounds(np.frombuffer(data, np.uint8))
  return line_text(data, starts, ends, i)


def single_byte_delimiter(data: bytes, delim: bytes, path: str) -> tuple[bytes, bytes]:
  """``(data, delim)`` with a multi-byte ``delim`` (``::``) replaced by one byte that the
  data does not hold. Newlines are untouched, so line ``i`` stays line ``i``."""
  if len(delim) == 1:
    return data, delim
  if not delim or b"\n" in delim:
    raise ValueError(f"{path}: bad delimiter {delim!r}, expected characters other than "
                     "a line break")
  for sep in (b"\x1f", b"\x1e", b"\x1d", b"\x1c", b"\x01"):
    if sep not in data:
      return data.replace(delim, sep), sep
  raise ValueError(f"{path}: holds every control byte used to stand in for the "
                   f"delimiter {delim.decode('utf-8', 'replace')!r}")


def fields(data: bytes, delim: bytes, n_fields: int, path: str, first_line: int,
           min_fields: bool = False):
  """Field boundaries of a table whose fields are separated by ``delim``.

  Args:
    data: normalised text (no header).
    delim: the separator, one byte or more (a longer one is replaced by a single byte
      first, see :func:`single_byte_delimiter`; messages still show the file's text).
    n_fields: fields expected on each line (at least that many if ``min_fields``; any
      further fields are then ignored).
    path, first_line: for error messages; ``first_line`` is the 1-based line number of
      the first line of ``data`` in the file.

  Returns:
    ``(buf, fs, fe)``: the uint8 view (of the text with a multi-byte delimiter replaced)
    and two int64 ``(n_lines, n_fields)`` arrays of field start and end offsets in it.

  Raises ValueError naming the file and line when a line has the wrong field count.
  """
  original, shown = data, delim
  data, delim = single_byte_delimiter(data, delim, path)
  buf = np.frombuffer(data, np.uint8)
  starts, ends = line_bounds(buf)
  dpos = np.flatnonzero(buf == delim[0])
  first = np.searchsorted(dpos, starts)
  count = np.searchsorted(dpos, ends) - first
  bad = count < n_fields - 1 if min_fields else count != n_fields - 1
  if bad.any():
    i = int(np.argmax(bad))
    least = "at least " if min_fields else ""
    raise ValueError(
        f"{path}, line {first_line + i}: expected {least}{n_fields} fields separated by "
        f"{shown.decode('utf-8', 'replace')!r}, got {int(count[i]) + 1}: "
        f"{nth_line(original, i)!r}")
  fs = np.empty((starts.size, n_fields), np.int64)
  fe = np.empty_like(fs)
  fs[:, 0] = starts
  for j in range(1, n_fields):
    d = dpos[first + j - 1]
    fe[:, j - 1] = d
    fs[:, j] = d + 1
  fe[:, -1] = ends
  if min_fields:
    more = count > n_fields - 1
    fe[more, -1] = dpos[first[more] + n_fields - 1]
  return buf, fs, fe


def check_field_lengths(lengths: np.ndarray, path: str, first_line, what: str) -> None:
  """Raises ValueError naming the line of the first field longer than
  :data:`MAX_FIELD_BYTES` (``lengths``: int (n,), entries on the lines as in
  :func:`parse_numbers`)."""
  long = lengths > MAX_FIELD_BYTES
  if long.any():
    i = int(np.argmax(long))
    raise ValueError(f"{path}, line {_line_no(first_line, i)}: {a(what)} of "
                     f"{int(lengths[i])} bytes; a field is at most {MAX_FIELD_BYTES} "
                     "bytes (is a quote or a line break missing?)")


def gather_strings(buf: np.ndarray, fs: np.ndarray, fe: np.ndarray, path: str,
                   first_line, what: str) -> np.ndarray:
  """The byte strings ``buf[fs[i]:fe[i]]`` as a fixed-width ``S`` array (n,).

  Every string takes the longest one's width, so a field over :data:`MAX_FIELD_BYTES`
  is refused first (:func:`check_field_lengths`; ``path``, ``first_line`` and ``what``
  name it): one absurd field would otherwise cost its length in every row.
  """
  lengths = fe - fs
  check_field_lengths(lengths, path, first_line, what)
  width = max(int(lengths.max()) if lengths.size else 0, 1)
  out = np.zeros((fs.size, width), np.uint8)
  cols = np.arange(width)
  last = buf.size - 1
  step = max(_GATHER_BYTES // width, 1)
  for lo in range(0, fs.size, step):
    hi = min(lo + step, fs.size)
    idx = fs[lo:hi, None] + cols
    keep = cols < lengths[lo:hi, None]
    np.minimum(idx, last, out=idx)
    out[lo:hi] = np.where(keep, buf[idx], 0)
  return out.view(f"S{width}").reshape(-1)


def strip_fields(buf: np.ndarray, fs: np.ndarray, fe: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Field bounds (int64 (n,)) moved inwards past leading and trailing spaces and tabs."""
  fs, fe = fs.copy(), fe.copy()
  # One vectorised step per blank removed; fields rarely have more than one or two.
  while True:
    move = fs < fe
    move[move] = _is_blank(buf[fs[move]])
    if not move.any():
      break
    fs[move] += 1
  while True:
    move = fe > fs
    move[move] = _is_blank(buf[fe[move] - 1])
    if not move.any():
      break
    fe[move] -= 1
  return fs, fe


def _is_blank(b: np.ndarray) -> np.ndarray:
  return (b == 32) | (b == 9)


def a(what: str) -> str:
  """``what`` with its indefinite article, for messages ("an item id", "a user id")."""
  return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def _line_no(lines, i: int) -> int:
  """1-based line of entry ``i``: ``lines + i`` for an int, ``lines[i]`` for an array."""
  return int(lines + i) if np.ndim(lines) == 0 else int(lines[i])


def parse_numbers(strings: np.ndarray, dtype, path: str, first_line,
                  what: str) -> np.ndarray:
  """Converts an ``S`` array to numbers; on failure names the first bad line.

  ``first_line`` is the 1-based line of ``strings[0]`` (entries on consecutive lines),
  or an int array with the line of every entry.
  """
  try:
    return strings.astype(dtype)
  except (ValueError, OverflowError):
    pass
  for i, s in enumerate(strings):
    try:
      np.array(s).astype(dtype)
    except (ValueError, OverflowError):
      raise ValueError(
          f"{path}, line {_line_no(first_line, i)}: expected {what}, got "
          f"{shown(s)!r}") from None
  raise AssertionError("unreachable")


# Ids are parsed in blocks of this many rows (bounds the (rows, width) temporaries).
_ID_ROWS = 1 << 20
_INT64_MAX = np.uint64(2**63 - 1)
_INT64_MIN_ABS = np.uint64(2**63)


def parse_ids(strings: np.ndarray, path: str, first_line, what: str,
              as_strings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
  """Ids exactly as written in the file.

  A column is numeric when every token is a canonical decimal integer that fits in
  int64: an optional ``-``, then digits without a leading zero (``0`` itself is fine;
  no ``+``, ``.``, exponent, blank or ``-0``). Those are parsed digit by digit, never
  through float64, so every int64 survives. Any other token (``007``, ``1.0``,
  ``2**63``, a hash, an SKU) makes the whole column text, so ``007`` and ``7`` stay two
  ids.

  Args:
    strings: ``S`` array (n,) of the tokens, in file order.
    path, first_line: for messages (as in :func:`parse_numbers`).
    what: the column's name in messages, e.g. ``"user id"``.
    as_strings: treat the column as text whatever it holds.

  Returns:
    ``(ids, vocab)``: for a numeric column the int64 (n,) values and None; for text,
    int64 (n,) codes into ``vocab``, the sorted unique tokens (``S`` array).

  Raises ValueError naming the line of the first empty token.
  """
  strings = np.ascontiguousarray(strings)
  n = strings.size
  if n == 0:
    return np.zeros(0, np.int64), None
  width = strings.dtype.itemsize
  mat = strings.view(np.uint8).reshape(n, width)
  empty = ~mat.any(axis=1)
  if empty.any():
    i = int(np.argmax(empty))
    raise ValueError(f"{path}, line {_line_no(first_line, i)}: expected {a(what)}, got an "
                     "empty field")
  # The longest int64 token, "-9223372036854775808", has 20 bytes.
  if not as_strings and width <= 20:
    values = np.empty(n, np.int64)
    for lo in range(0, n, _ID_ROWS):
      if not _canonical_int64(mat[lo:lo + _ID_ROWS], values[lo:lo + _ID_ROWS]):
        break
    else:
      return values, None
  vocab, codes = np.unique(strings, return_inverse=True)
  return codes.astype(np.int64).reshape(-1), vocab


def _canonical_int64(mat: np.ndarray, out: np.ndarray) -> bool:
  """Parses the tokens of a ``(rows, width)`` uint8 matrix (NUL padded) into ``out``;
  False (``out`` then undefined) when one is not a canonical int64."""
  rows, width = mat.shape
  length = np.count_nonzero(mat, axis=1)
  neg = mat[:, 0] == ord("-")
  start = neg.astype(np.int64)
  n_digits = length - start
  digit = mat - np.uint8(ord("0"))  # wraps below '0', so > 9 for every non-digit
  pos = np.arange(width)
  inside = (pos >= start[:, None]) & (pos < length[:, None])
  if not (((digit <= 9) | ~inside).all() and (n_digits >= 1).all()
          and (n_digits <= 19).all()):
    return False
  lead = mat[np.arange(rows), start] == ord("0")
  if (lead & ((n_digits > 1) | neg)).any():
    return False
  # At most 19 digits: below 10**19 < 2**64, so uint64 holds every value exactly.
  value = np.zeros(rows, np.uint64)
  ten = np.uint64(10)
  for j in range(width):
    value = np.where(inside[:, j], value * ten + digit[:, j], value)
  if (value > np.where(neg, _INT64_MIN_ABS, _INT64_MAX)).any():
    return False
  # Two's complement negation in uint64, so -2**63 comes out right.
  out[:] = np.where(neg, np.uint64(0) - value, value).view(np.int64)
  return True


def numeric_table(data: bytes, delim: bytes, n_fields: int, path: str,
                  first_line: int) -> np.ndarray:
  """Parses a table of numbers separated by ``delim`` into a float64 ``(n, n_fields)``.

  Float64 holds integers exactly only below 2**53: read ids with :func:`parse_ids`.
  The field count of every line is checked first (vectorised), so a parse failure can
  be pinned to a line by re-parsing blocks. Messages quote the line as in the file.
  """
  original = data
  buf, fs, fe = fields(data, delim, n_fields, path, first_line)
  data, delim = single_byte_delimiter(data, delim, path)
  empty = fe <= fs
  if empty.any():
    i, j = np.argwhere(empty)[0]
    raise ValueError(f"{path}, line {first_line + i}: field {j + 1} is empty: "
                     f"{nth_line(original, i)!r}")
  text = data if delim in (b" ", b"\t") else data.replace(delim, b" ")
  n = fs.shape[0]
  vals = _fromstring(text)
  if vals is None or vals.size != n * n_fields:
    _raise_first_unparsable(text, fs[:, 0], fe[:, -1], n_fields, path, first_line,
                            original)
  return vals.reshape(n, n_fields)


def _fromstring(text: bytes) -> np.ndarray | None:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      return np.fromstring(text, dtype=np.float64, sep=" ")
    except ValueError:
      return None


def _raise_first_unparsable(text, starts, ends, n_fields, path, first_line, original):
  n = starts.size
  for lo in range(0, n, _BLOCK_LINES):
    hi = min(lo + _BLOCK_LINES, n)
    v = _fromstring(text[starts[lo]:ends[hi - 1]])
    if v is not None and v.size == (hi - lo) * n_fields:
      continue
    for i in range(lo, hi):
      v = _fromstring(text[starts[i]:ends[i]])
      if v is None or v.size != n_fields:
        raise ValueError(
            f"{path}, line {first_line + i}: expected {n_fields} numbers, got "
            f"{nth_line(original, i)!r}")
  raise ValueError(f"{path}: could not parse the file as {n_fields} numbers per line")


def check_integers(values: np.ndarray, path: str, first_line, what: str) -> np.ndarray:
  """Casts integral float64 values (timestamps) to int64, naming the first line whose
  value is not an integer within int64."""
  ok = np.isfinite(values) & (values == np.floor(values)) & (np.abs(values) < 2.0**63)
  if not ok.all():
    i = int(np.argmin(ok))
    raise ValueError(f"{path}, line {_line_no(first_line, i)}: expected an integer "
                     f"{what}, got {float(values[i])}")
  return values.astype(np.int64)


def check_finite(values: np.ndarray, path: str, first_line, what: str) -> np.ndarray:
  ok = np.isfinite(values)
  if not ok.all():
    i = int(np.argmin(ok))
    raise ValueError(f"{path}, line {_line_no(first_line, i)}: expected a finite {what}, "
                     f"got {float(values[i])}")
  return values
