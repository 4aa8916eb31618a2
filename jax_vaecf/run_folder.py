"""What makes a run folder one run's: its exclusive lock and the digest of its item ids.

A run folder (``--workdir``) is written by one process at a time. :class:`RunLock` holds
an OS lock (``flock``) on ``<folder>/.lock`` for the whole run, so a second writer (a
training run, a test run, a tuning trial) stops at once with the holder's pid instead of
interleaving its epochs with the first one's. The kernel drops the lock when its process
ends, however it ends, so a killed run never leaves a stale lock: the file stays, the
lock does not. Readers (recommending, exporting) take no lock: every file is replaced
atomically (:mod:`jax_vaecf.files`), and they check that the item ids they read are
those the checkpoint was trained on (:func:`items_digest`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket

import numpy as np

try:  # POSIX
  import fcntl
except ImportError:  # pragma: no cover - Windows
  fcntl = None
  import msvcrt  # pylint: disable=import-error

LOCK_NAME = ".lock"
# How a run folder's item ids are turned into bytes for their digest: a byte that was
# not UTF-8 in the data file comes back as that byte (jax_vaecf.data._text.ID_ERRORS).
_ID_ERRORS = "surrogateescape"


class RunFolderBusyError(ValueError):
  """Another process holds the run folder's lock."""


def items_digest(item_ids: np.ndarray) -> str:
  """16 hex digits of the sha256 of raw ids (n,), one per line in order: what a
  checkpoint records of the items its columns are (and a test of its users)."""
  text = "\n".join(str(i) for i in np.asarray(item_ids).tolist())
  return hashlib.sha256(text.encode("utf-8", _ID_ERRORS)).hexdigest()[:16]


def _try_lock(fd: int) -> bool:
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover
      msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    return True
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      return False
    raise


def read_holder(folder: str) -> str:
  """What the lock file says of its holder (``pid N on HOST``), or ``"unknown"``."""
  try:
    with open(os.path.join(folder, LOCK_NAME), encoding="utf-8") as f:
      pid, _, host = f.read().strip().partition(" ")
  except OSError:
    return "unknown"
  if not pid.isdigit():
    return "unknown"
  return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


class RunLock:
  """The exclusive lock of one run folder, held from :meth:`acquire` to :meth:`release`.

  Args:
    folder: the run folder; created (with its parents) by :meth:`acquire` when missing.
  """

  def __init__(self, folder: str | os.PathLike):
    self.folder = os.fspath(folder)
    self.path = os.path.join(self.folder, LOCK_NAME)
    self.created_folder = False
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "RunLock":
    """Takes the lock, or raises :class:`RunFolderBusyError` naming the folder and the
    holder's pid at once (it never waits). OSError when the folder cannot be written."""
    if self._fd is not None:
      raise RuntimeError(f"{self.folder}: the lock is already held by this object")
    if not os.path.isdir(self.folder):
      os.makedirs(self.folder, exist_ok=True)
      self.created_folder = True
    for _ in range(10):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      except FileNotFoundError:  # the folder was removed by a holder that made it
        os.makedirs(self.folder, exist_ok=True)
        continue
      try:
        locked = _try_lock(fd)
      except BaseException:
        os.close(fd)
        raise
      if not locked:
        os.close(fd)
        raise RunFolderBusyError(
            f"{self.folder}: in use by another run ({read_holder(self.folder)}); wait "
            "for it to end or use another folder")
      # A holder that removed the file (an empty folder it had made) before we locked
      # it leaves us a lock on a file no one else will open: take the new file's.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self
      os.close(fd)
    raise RunFolderBusyError(f"{self.folder}: its lock file keeps being replaced")

  def release(self, *, remove_if_unused: bool = False) -> None:
    """Drops the lock. With ``remove_if_unused``, a folder that :meth:`acquire` created
    and that holds nothing but the lock file is removed (a run that failed before
    writing anything leaves nothing behind)."""
    if self._fd is None:
      return
    try:
      if (remove_if_unused and self.created_folder
          and os.listdir(self.folder) == [LOCK_NAME]):
        # Still locked while removed, so no other process can have started using it.
        with contextlib.suppress(OSError):
          os.remove(self.path)
          os.rmdir(self.folder)
    finally:
      os.close(self._fd)  # closing the descriptor drops the lock
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, exc_type, exc, tb) -> None:
    self.release(remove_if_unused=exc_type is not None)
