"""A run's folder: its exclusive lock, settings, item ids, metrics log and checkpoint
identity.

``<workdir>/config.json`` holds the settings a run trains with (a resumed run may change
only ``configs.RESUMABLE_FIELDS``, and each change is logged), ``item_ids.npy`` the raw
id of each item column, ``metrics.jsonl`` one JSON line per epoch (and per test, per
settings change, per divergence). :func:`identity` is what a checkpoint must match to be
resumed, tested or served. Every file is written atomically with the user's normal
permissions (:mod:`jax_vaecf.core.files`).

A run folder (``--workdir``) is written by one process at a time. :class:`RunLock` holds
an OS lock (``flock``) on ``<folder>/.lock`` for the whole run, so a second writer (a
training run, a test run, a tuning trial) stops at once with the holder's pid instead of
interleaving its epochs with the first one's. The kernel drops the lock when its process
ends, however it ends, so a killed run never leaves a stale lock: the file stays, the
lock does not. Readers (recommending, exporting) take no lock: every file is replaced
atomically (:mod:`jax_vaecf.core.files`), and they check that the item ids they read are
those the checkpoint was trained on (:func:`items_digest`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket

import numpy as np

from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.core import differences as differences_lib
from jax_vaecf.core import files as files_lib
from jax_vaecf import model as model_lib

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


def identity(cfg: configs.Config, split: data_lib.Split) -> dict:
  """What a checkpoint must match to be resumed or tested: model shape and data."""
  ids = np.ascontiguousarray(split.item_ids)
  return {
      "model": cfg.model,
      "n_items": int(split.n_items),
      "dataset": cfg.dataset,
      "protocol": split.protocol,
      "n_train_users": int(split.n_train_users),
      "items_digest": items_digest(ids),
    # The checkpointed state has ema_params exactly when the run keeps an average; the
    # key is left out otherwise, so workdirs written before averaging existed still match.
    # The settings that shape the model's parameters are those its entry declares.
  } | ({"weight_average": True} if cfg.ema_decay > 0 else {}) | (
      model_lib.shape_settings(cfg.model, cfg.model_settings))



class MetricsLog:
  """``<workdir>/metrics.jsonl``: one JSON object per line, appended per epoch."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    out = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            out.append(json.loads(line))
          except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is replayed anyway
    return out

  def truncate_after(self, epoch: int) -> None:
    """Keeps the training records up to ``epoch`` (a resumed run replays the rest)."""
    keep = [r for r in self.records()
            if r.get("split") in ("train", "config") and r["epoch"] <= epoch]
    files_lib.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

  def checkpointed_epochs(self) -> list[int]:
    """Epochs whose record says a resumable checkpoint was saved (records written
    before that was recorded count as saved: the cautious reading)."""
    return [int(r["epoch"]) for r in self.records()
            if r.get("split") == "train" and r.get("checkpointed", True)]

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())



def prepare_workdir(cfg: configs.Config, workdir: str, *, lock: bool = True
                    ) -> RunLock | None:
  """Checks, before any data work, that ``workdir`` can hold this run, and claims it.

  It must be a folder (created if missing) that can be written when the run trains or
  tests. Such a run takes the folder's lock (:class:`jax_vaecf.RunLock`,
  returned; the caller releases it when the run ends): another process writing there
  raises :class:`jax_vaecf.RunFolderBusyError` naming its pid. ``lock=False``
  (the processes of a multi-process run other than the one that writes) checks without
  claiming. On an error a folder created here is removed again. Then
  :func:`check_same_run`, once the settings are final.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir}: this is a file, expected a folder for the run")
  if not (cfg.train or cfg.test):
    return None  # benchmark only: nothing is written
  held = RunLock(workdir)
  try:
    if lock:
      held.acquire()
    else:
      os.makedirs(workdir, exist_ok=True)
    with files_lib.atomic_write(os.path.join(workdir, ".write-test"), "wb"):
      pass
    os.remove(os.path.join(workdir, ".write-test"))
  except OSError as e:
    held.release(remove_if_unused=True)
    raise ValueError(
        f"--workdir={workdir}: cannot write there ({e.strerror or e})") from None
  return held if lock else None


def check_same_run(cfg: configs.Config, workdir: str) -> None:
  """When ``workdir`` already holds a run that ``cfg`` would train on, the settings that
  shape what is trained must be those in its ``config.json`` (``configs.RESUMABLE_FIELDS``
  may change); otherwise ``ValueError`` lists the differences, so a record of a run
  never describes settings its checkpoints were not trained with."""
  if cfg.train and holds_a_run(workdir):
    changed = config_changes(_saved_config(workdir), cfg)
    fixed = {k: v for k, v in changed.items() if k not in configs.RESUMABLE_FIELDS}
    if fixed:
      lines = differences_lib.describe(
          fixed, "--{key}: the run has {old!r}, this command asks {new!r}", "; ")
      raise ValueError(
          f"{workdir} holds a run trained with other settings ({lines}). Resuming would "
          "mix them; use another --workdir, or the run's own settings")


def holds_a_run(workdir: str) -> bool:
  ck_root = os.path.join(workdir, "checkpoints")
  has_steps = any(os.listdir(os.path.join(ck_root, kind))
                  for kind in (checkpoint_lib.LATEST, checkpoint_lib.BEST)
                  if os.path.isdir(os.path.join(ck_root, kind)))
  return has_steps or bool(MetricsLog(workdir).checkpointed_epochs())


def read_run_config(workdir: str) -> dict:
  """The settings a run recorded in ``<workdir>/config.json``, as the JSON object.

  Raises FileNotFoundError when there is none, ValueError when it cannot be read.
  """
  path = os.path.join(workdir, "config.json")
  try:
    saved = configs.read_settings_file(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not found") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: expected a JSON object of settings")
  return saved


def run_config(workdir: str, *, ignore_unknown: bool = False) -> configs.Config:
  """The run's settings (``<workdir>/config.json``) as a :class:`Config`
  (``ignore_unknown``: see :func:`jax_vaecf.training.configs.from_json`)."""
  return configs.from_json(read_run_config(workdir), os.path.join(workdir, "config.json"),
                           ignore_unknown=ignore_unknown)


def _saved_config(workdir: str) -> dict:
  """The run's ``config.json`` in the current setting names (an older run's too)."""
  try:
    saved = read_run_config(workdir)
  except FileNotFoundError as e:
    raise ValueError(f"{e}, but the workdir holds checkpoints; cannot tell what they "
                     "were trained with. Use another --workdir") from None
  return configs.current_names(saved, os.path.join(workdir, "config.json"))


def config_changes(saved: dict, cfg: configs.Config) -> dict:
  """``{setting: (saved value, new value)}`` for each setting that differs, the model's
  own by name (a setting the saved config lacks counts as its default)."""
  return differences_lib.differences(
      configs.flat_json(saved), configs.flat_json(configs.to_json(cfg)),
      old_defaults=configs.flat_json(configs.to_json(configs.Config(model=cfg.model))))



def write_run_files(cfg: configs.Config, workdir: str, split: data_lib.Split,
                     start_epoch: int) -> None:
  """The config and raw item ids, so that a workdir alone is enough to serve.

  A run resumed after ``start_epoch`` may have changed only ``configs.RESUMABLE_FIELDS``
  (checked by :func:`prepare_workdir`); such changes are logged in ``metrics.jsonl`` as
  a ``{"split": "config"}`` record before ``config.json`` takes the new values.
  """
  path = os.path.join(workdir, "config.json")
  if start_epoch and os.path.exists(path):
    changed = config_changes(_saved_config(workdir), cfg)
    if changed:
      MetricsLog(workdir).write({
          "split": "config", "epoch": start_epoch,
          "changes": {k: {"from": a, "to": b} for k, (a, b) in sorted(changed.items())}})
  files_lib.write_text_atomic(path, json.dumps(configs.to_json(cfg), indent=1))
  with files_lib.atomic_write(os.path.join(workdir, "item_ids.npy"), "wb") as f:
    np.save(f, np.asarray(split.item_ids), allow_pickle=False)
