"""Atomic file writing, for every file the project writes.

A file is written to a temporary file in the destination's folder, flushed and
fsynced, then renamed over the destination with ``os.replace``. Readers therefore see
either the old content or the complete new content, never a half-written file, and a
failure (an exception, a full disk) leaves the old content and no temporary file.

The temporary file is named ``.<name>.<pid>.<8 hex digits>.tmp`` so that it is hidden,
recognisably ours and traceable to its writer. It is created with ``os.open(...,
0o666)``, exactly as ``open()`` creates a file, so the kernel applies the umask (and any
default ACL) and the result has the user's normal permissions; ``tempfile.mkstemp``
would leave 0600.

A process killed while writing leaves its temporary file behind.
:func:`remove_stale_temps` removes those, judging staleness by age (no modification for
an hour) rather than by pid: a pid says nothing about processes on another host that
shares the folder (NFS, containers), and a writer that is still running keeps touching
its file.

:func:`sha256_of` is the digest that manifests record of the files written (a
partitioned split's).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from typing import IO, Iterator

# Hidden, our suffix, with the writer's pid and a random token.
_TEMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
# Leaves room for the pid, token and suffix within the usual 255-byte name limit.
_MAX_STEM = 200
STALE_AFTER_S = 3600.0


def is_temp_name(name: str) -> bool:
  """Whether a file name (no folder) is one of :func:`atomic_write`'s temporary files."""
  return bool(_TEMP_RE.match(name))


def _create_temp(path: str) -> tuple[int, str]:
  folder, name = os.path.split(path)
  for _ in range(100):
    tmp = os.path.join(folder, f".{name[:_MAX_STEM]}.{os.getpid()}."
                               f"{secrets.token_hex(4)}.tmp")
    try:
      # Mode 0o666 like open(): the umask applies, so the final file gets normal
      # permissions. O_EXCL: never reuse another writer's file.
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_BINARY", 0), 0o666), tmp
    except FileExistsError:
      continue
  raise FileExistsError(f"{path}: could not create a unique temporary file next to it")


def _fsync_folder(folder: str) -> None:
  # Makes the rename itself durable; not possible everywhere (e.g. Windows), and a
  # failure here cannot lose the data already fsynced, so it is best effort.
  try:
    fd = os.open(folder or ".", os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 encoding: str | None = "utf-8", newline: str | None = None,
                 errors: str | None = None) -> Iterator[IO]:
  """Yields a file object whose content replaces ``path`` when the block ends cleanly.

  Args:
    path: the destination; its folder must exist.
    mode: ``"wb"`` (binary) or ``"w"`` (text).
    encoding, newline, errors: for text mode, as for ``open()``; the encoding defaults
      to UTF-8 (not the locale's), which is what the project's readers expect.

  The new file has the permissions ``open()`` would give a new file (0o666 less the
  umask), not those of the file it replaces. On any exception in the block, or while
  flushing, fsyncing or renaming, the temporary file is removed, ``path`` is left as
  it was, and the exception propagates.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
  path = os.fspath(path)
  fd, tmp = _create_temp(path)
  f = None
  try:
    if mode == "wb":
      f = os.fdopen(fd, "wb")
    else:
      f = os.fdopen(fd, "w", encoding=encoding, newline=newline, errors=errors)
    yield f
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)
  except BaseException:
    if f is None:
      os.close(fd)
    else:
      with contextlib.suppress(OSError):
        f.close()  # may fail again (ENOSPC on flush); the data is discarded anyway
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_folder(os.path.dirname(path))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Replaces ``path`` with ``data`` atomically (see :func:`atomic_write`)."""
  with atomic_write(path, "wb") as f:
    f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """Replaces ``path`` with ``text`` atomically (see :func:`atomic_write`); ``\\n`` is
  written as is."""
  with atomic_write(path, "w", encoding=encoding, newline="") as f:
    f.write(text)


def remove_stale_temps(folder: str | os.PathLike, max_age_s: float = STALE_AFTER_S,
                       *, now: float | None = None) -> list[str]:
  """Removes :func:`atomic_write` temporary files in ``folder`` (not recursively) that
  were last modified more than ``max_age_s`` seconds ago.

  Such files are left by writers that were killed. A writer that is still running
  keeps its file's modification time fresh, so it is not disturbed; one stalled for
  longer than ``max_age_s`` loses its file and fails at the rename, leaving the
  destination as it was. Errors (a missing or unreadable folder, a file that vanished
  or cannot be removed) are ignored: cleaning up is best effort.

  Returns:
    The paths removed.
  """
  folder = os.fspath(folder)
  now = time.time() if now is None else now
  removed = []
  try:
    names = os.listdir(folder)
  except OSError:
    return removed
  for name in names:
    if not is_temp_name(name):
      continue
    p = os.path.join(folder, name)
    try:
      if now - os.stat(p).st_mtime > max_age_s:
        os.remove(p)
        removed.append(p)
    except OSError:
      continue
  return removed


def sha256_of(path: str | os.PathLike) -> str:
  """The sha256 of the file at ``path``: 64 lowercase hex digits (``str``), read in
  16 MiB blocks.

  The artefact loader :mod:`jax_vaecf.serving.artefact` holds a copy: it may import nothing of
  the project (tests/test_export.py checks that the two agree).
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      h.update(block)
  return h.hexdigest()
