"""Vectorised parsing of delimited text held in memory (internal).

Everything here works on a whole file as one ``bytes`` object and a ``uint8`` view of
it: line and field boundaries are found with numpy comparisons, numbers are parsed by
numpy's C tokenizer (``np.fromstring(..., sep=' ')``), and string fields are gathered
into fixed-width ``S`` arrays in chunks. No Python code runs per line on the success
path; the slow per-line code only runs to locate the first bad line for an error
message.
"""

from __future__ import annotations

import gzip
import os
import warnings

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
# Lines per block when hunting for the first unparsable line: small enough that the
# per-line fallback inside one block is quick, large enough that blocks stay few.
_BLOCK_LINES = 1 << 14
# Rows gathered at a time into an ``(rows, width)`` byte matrix; bounds the int64 index
# matrix to ~rows * width * 8 bytes.
_GATHER_ROWS = 1 << 18


def read_bytes(path: str | os.PathLike) -> bytes:
  """Returns the file's content, gunzipped when it starts with the gzip magic number.

  Raises FileNotFoundError naming the path when it is missing or is a folder.
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
  return data


def normalize(data: bytes, path: str) -> bytes:
  """Drops CR (CRLF files) and trailing blank lines; ends with exactly one newline.

  Raises ValueError when nothing but whitespace is left.
  """
  if b"\r" in data:
    data = data.replace(b"\r", b"")
  data = data.rstrip(b"\n")
  if not data.strip():
    raise ValueError(f"{path}: empty file, expected at least one data line")
  return data + b"\n"


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
  return s[:200].decode("utf-8", "replace")


def fields(data: bytes, delim: bytes, n_fields: int, path: str, first_line: int,
           min_fields: bool = False):
  """Field boundaries of a table whose fields are separated by one byte ``delim``.

  Args:
    data: normalised text (no header).
    delim: the separator, one byte.
    n_fields: fields expected on each line (at least that many if ``min_fields``; the
      last field then runs to the end of the line).
    path, first_line: for error messages; ``first_line`` is the 1-based line number of
      the first line of ``data`` in the file.

  Returns:
    ``(buf, fs, fe)``: the uint8 view and two int64 ``(n_lines, n_fields)`` arrays of
    field start and end offsets.

  Raises ValueError naming the file and line when a line has the wrong field count.
  """
  buf = np.frombuffer(data, np.uint8)
  starts, ends = line_bounds(buf)
  dpos = np.flatnonzero(buf == delim[0])
  first = np.searchsorted(dpos, starts)
  count = np.searchsorted(dpos, ends) - first
  bad = count < n_fields - 1 if min_fields else count != n_fields - 1
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"{path}, line {first_line + i}: expected {n_fields} fields separated by "
        f"{delim.decode()!r}, got {int(count[i]) + 1}: {line_text(data, starts, ends, i)!r}")
  fs = np.empty((starts.size, n_fields), np.int64)
  fe = np.empty_like(fs)
  fs[:, 0] = starts
  for j in range(1, n_fields):
    d = dpos[first + j - 1]
    fe[:, j - 1] = d
    fs[:, j] = d + 1
  fe[:, -1] = ends
  return buf, fs, fe


def gather_strings(buf: np.ndarray, fs: np.ndarray, fe: np.ndarray) -> np.ndarray:
  """The byte strings ``buf[fs[i]:fe[i]]`` as a fixed-width ``S`` array (n,)."""
  lengths = fe - fs
  width = max(int(lengths.max()) if lengths.size else 0, 1)
  out = np.zeros((fs.size, width), np.uint8)
  cols = np.arange(width)
  last = buf.size - 1
  for lo in range(0, fs.size, _GATHER_ROWS):
    hi = min(lo + _GATHER_ROWS, fs.size)
    idx = fs[lo:hi, None] + cols
    keep = cols < lengths[lo:hi, None]
    np.minimum(idx, last, out=idx)
    out[lo:hi] = np.where(keep, buf[idx], 0)
  return out.view(f"S{width}").reshape(-1)


def parse_numbers(strings: np.ndarray, dtype, path: str, first_line: int,
                  what: str) -> np.ndarray:
  """Converts an ``S`` array to numbers; on failure names the first bad line."""
  try:
    return strings.astype(dtype)
  except ValueError:
    pass
  for i, s in enumerate(strings):
    try:
      np.array(s).astype(dtype)
    except ValueError:
      raise ValueError(
          f"{path}, line {first_line + i}: expected {what}, got {s.decode('utf-8', 'replace')!r}"
      ) from None
  raise AssertionError("unreachable")


def numeric_table(data: bytes, delim: bytes, n_fields: int, path: str,
                  first_line: int) -> np.ndarray:
  """Parses a table of numbers separated by ``delim`` into a float64 ``(n, n_fields)``.

  Float64 holds every integer id and unix timestamp exactly (< 2**53). The field count
  of every line is checked first (vectorised), so a parse failure can be pinned to a
  line by re-parsing blocks.
  """
  if len(delim) != 1:
    data = data.replace(delim, b"\t")
    delim = b"\t"
  buf, fs, fe = fields(data, delim, n_fields, path, first_line)
  empty = fe <= fs
  if empty.any():
    i, j = np.argwhere(empty)[0]
    starts, ends = fs[:, 0], fe[:, -1]
    raise ValueError(f"{path}, line {first_line + i}: field {j + 1} is empty: "
                     f"{line_text(data, starts, ends, i)!r}")
  text = data if delim in (b" ", b"\t") else data.replace(delim, b" ")
  n = fs.shape[0]
  vals = _fromstring(text)
  if vals is None or vals.size != n * n_fields:
    _raise_first_unparsable(text, fs[:, 0], fe[:, -1], n_fields, path, first_line)
  return vals.reshape(n, n_fields)


def _fromstring(text: bytes) -> np.ndarray | None:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      return np.fromstring(text, dtype=np.float64, sep=" ")
    except ValueError:
      return None


def _raise_first_unparsable(text, starts, ends, n_fields, path, first_line):
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
            f"{line_text(text, starts, ends, i)!r}")
  raise ValueError(f"{path}: could not parse the file as {n_fields} numbers per line")


def check_integers(values: np.ndarray, path: str, first_line: int, what: str) -> np.ndarray:
  """Casts float ids to int64, naming the first line whose value is not an integer."""
  ok = np.isfinite(values) & (values == np.floor(values))
  if not ok.all():
    i = int(np.argmin(ok))
    raise ValueError(f"{path}, line {first_line + i}: expected an integer {what}, got "
                     f"{values[i]!r}")
  return values.astype(np.int64)


def check_finite(values: np.ndarray, path: str, first_line: int, what: str) -> np.ndarray:
  ok = np.isfinite(values)
  if not ok.all():
    i = int(np.argmin(ok))
    raise ValueError(f"{path}, line {first_line + i}: expected a finite {what}, got "
                     f"{values[i]!r}")
  return values
