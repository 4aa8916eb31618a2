"""Orbax checkpoints of a training run: the latest state for resuming, the best by a
validation metric for testing and serving.

Layout under a run's ``workdir``::

  workdir/checkpoints/latest/<step>/{state,meta}   newest states, for resuming
  workdir/checkpoints/best/<step>/{state,meta}     the K best by validation NDCG@100

``state`` is the :class:`jax_vaecf.training.steps.TrainState` pytree (params, optimiser state,
step, PRNG key, loss scale, and the weight average when the run keeps one), stored as the
dict of its fields that are not ``None``, so a field added later as optional (``None``
when unused) leaves earlier checkpoints readable. ``meta`` is JSON: the run's identity
(model, shapes, dataset) checked before anything is restored, the data-order position, the raw-id
mapping and whatever else a caller puts there. Orbax writes each step to a temporary
folder and renames it when complete, so an interrupted save never replaces a good
checkpoint. Arrays are restored to the shardings of the ``target`` passed in, so a state
saved on N devices restores on M.

After a save, ``<step>/checksums.json`` records the size and CRC-32 of every file of the
step; a restore verifies them first, so a truncated or altered file is reported by name
instead of being handed to orbax (which may fail deep inside, or read damaged values).
Two latest states are kept by default, so a newest one that cannot be read (a truncated
file, a disk error) falls back to the one before it, with a warning naming the bad
folder; :class:`CheckpointUnreadableError` (naming every folder tried) is raised only
when no state of a kind can be read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import sys
import warnings
import zlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_vaecf.core import differences as differences_lib
from jax_vaecf.core import files as files_lib

LATEST = "latest"
BEST = "best"
CHECKSUMS = "checksums.json"
_CRC_BLOCK = 1 << 24


class CheckpointMismatchError(ValueError):
  """A checkpoint belongs to another model shape or dataset than the run asks for."""


class CheckpointUnreadableError(ValueError):
  """Checkpoint folders exist but none of them can be read back."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a folder gone); the checkpoints
  saved before it are untouched."""


# OS errors a save can end in, said plainly (tensorstore's text names its own internals).
_SAVE_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "a file grew past the file-size limit (see ulimit -f)",
    errno.EDQUOT: "the disk quota is exceeded",
}


def _os_error(e: BaseException) -> str | None:
  """What a known OS error behind ``e`` (or an exception it was raised from) means, or
  None; orbax reports tensorstore's as a ValueError whose message carries the code."""
  seen = 0
  while e is not None and seen < 10:
    for code, meaning in _SAVE_OS_ERRORS.items():
      if isinstance(e, OSError) and e.errno == code:
        return meaning
      if f"os_error_code='{code}'" in str(e) or os.strerror(code) in str(e):
        return meaning
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def _reason(e: BaseException) -> str:
  """The first line of an exception's message (orbax nests long tracebacks in them)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# Where a native library's completion callback enters an event loop: the outermost frame
# of its traceback, with no Python caller (asyncio's loop, and uvloop's, which orbax
# uses when a loop is already running).
_THREADSAFE_ENTRY_NAMES = ("uvloop.loop.Loop.call_soon_threadsafe",)


def _is_callback_into_closed_loop(unraisable) -> bool:
  """Whether an unraisable report is tensorstore telling an event loop that one of its
  writes finished after the loop was closed.

  A save that fails midway ends orbax's coroutine at the first failed write, and orbax
  closes the event loop it ran on while tensorstore's other writes of that save are still
  in flight. As each one finishes, tensorstore calls ``loop.call_soon_threadsafe`` from
  its own thread; the closed loop raises ``RuntimeError('Event loop is closed')``, which
  tensorstore hands to ``sys.unraisablehook`` (no object, no message): a traceback on
  stderr at any moment up to the interpreter's exit, after the run's one-line error.
  """
  tb = unraisable.exc_traceback
  if (tb is None or unraisable.object is not None or unraisable.err_msg is not None
      or unraisable.exc_type is not RuntimeError
      or str(unraisable.exc_value) != "Event loop is closed"):
    return False
  code = tb.tb_frame.f_code
  return (code is asyncio.BaseEventLoop.call_soon_threadsafe.__code__
          or code.co_name in _THREADSAFE_ENTRY_NAMES)


class _DropCallbacksIntoClosedLoops:
  """A ``sys.unraisablehook`` passing every report to the hook it replaced, except the
  late callbacks of a failed save (:func:`_is_callback_into_closed_loop`): nothing is
  lost by dropping them, as the save already failed with its own error."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    if not _is_callback_into_closed_loop(unraisable):
      self.previous(unraisable)


def _drop_callbacks_into_closed_loops() -> None:
  """Installs :class:`_DropCallbacksIntoClosedLoops` once; called only after a save
  failed, so a process whose saves succeed keeps its hook untouched."""
  if not isinstance(sys.unraisablehook, _DropCallbacksIntoClosedLoops):
    sys.unraisablehook = _DropCallbacksIntoClosedLoops(sys.unraisablehook)


# Room left beyond the arrays' bytes for the checkpoint's own metadata files.
_SAVE_MARGIN_BYTES = 1 << 20


def _check_free_space(directory: str, tree, step: int) -> None:
  """Raises :class:`CheckpointSaveError` before a save that cannot fit on its device
  (orbax's own failure midway prints pages of tracebacks from its writer threads)."""
  need = sum(int(np.asarray(a).nbytes) for a in jax.tree_util.tree_leaves(tree))
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return  # cannot tell: let the save try
  if free < need + _SAVE_MARGIN_BYTES:
    raise CheckpointSaveError(
        f"{directory}: could not save the checkpoint of step {step}: no space left on the "
        f"device ({free / 2**20:.1f} MiB free, the checkpoint needs "
        f"{(need + _SAVE_MARGIN_BYTES) / 2**20:.1f} MiB); the checkpoints saved before are "
        "kept; free space, then run the same command again (it resumes)")


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(_CRC_BLOCK):
      crc = zlib.crc32(block, crc)
  return crc


def _step_files(step_dir: str) -> list[str]:
  out = []
  for d, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(d, n), step_dir) for n in names]
  return sorted(f for f in out if f != CHECKSUMS)


def write_checksums(step_dir: str) -> None:
  """Records ``[size, crc32]`` of every file under a finished step folder."""
  table = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
           for f in _step_files(step_dir)}
  files_lib.write_text_atomic(os.path.join(step_dir, CHECKSUMS),
                              json.dumps(table, sort_keys=True))


def verify_checksums(step_dir: str) -> None:
  """Raises :class:`CheckpointUnreadableError` naming the first file of ``step_dir`` that
  is missing, truncated or altered since :func:`write_checksums`. A step saved without
  checksums (killed before they were written, or an older version) passes unchecked."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      table = json.load(f)
    if not isinstance(table, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise CheckpointUnreadableError(f"{path}: unreadable checksums ({e})") from None
  for name, (size, crc) in sorted(table.items()):
    f = os.path.join(step_dir, name)
    if not os.path.isfile(f):
      raise CheckpointUnreadableError(f"{f}: missing from the checkpoint")
    actual = os.path.getsize(f)
    if actual != size:
      raise CheckpointUnreadableError(
          f"{f}: {actual} bytes, the checkpoint wrote {size} (truncated or replaced)")
    if _crc32(f) != crc:
      raise CheckpointUnreadableError(f"{f}: content differs from what the checkpoint "
                                      "wrote (checksum mismatch)")


def _manager(directory: str, *, max_to_keep: int | None,
             best_metric: str | None, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep,
      save_interval_steps=0 if read_only else 1,
      best_fn=(lambda m: m[best_metric]) if best_metric else None,
      best_mode="max",
      create=not read_only,
      enable_async_checkpointing=False,
      # A writer removes folders of its own interrupted saves; a reader (a server on a
      # run that is still training) must not remove a save in progress.
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
  )
  if not read_only:
    return ocp.CheckpointManager(directory, options=options)
  # Orbax notes at WARNING that a read-only directory is read-only; that is the intent.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(max(level, logging.ERROR))
  try:
    return ocp.CheckpointManager(directory, options=options)
  finally:
    absl_logger.setLevel(level)


def _plain(tree):
  """Host numpy copies of a pytree's arrays (for saving from any sharding)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def _stored_fields(state):
  """A dataclass state as the dict of its non-``None`` array fields (what is written; a
  static field such as the state's optimiser is part of the run's settings, not of its
  values); any other pytree as it is."""
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None and f.metadata.get("pytree_node", True)}


class RunCheckpoints:
  """The latest-and-best checkpoint pair of one run directory.

  Args:
    workdir: the run's directory.
    identity: JSON-able facts that must match for a checkpoint to be reused (model name
      and sizes, number of items, dataset and processing options).
    keep_latest: how many of the newest states to keep (2: one to fall back on).
    keep_best: how many of the best states (by ``best_metric``) to keep.
    best_metric: the key of the metrics dict passed to :meth:`save_best`.
    read_only: only restore: nothing is created, saved or cleaned up (for serving a
      workdir, possibly while its run is still training).
  """

  def __init__(self, workdir: str, identity: Mapping[str, Any], *, keep_latest: int = 2,
               keep_best: int = 1, best_metric: str = "ndcg@100", read_only: bool = False):
    if keep_latest < 1 or keep_best < 1:
      raise ValueError("keep_latest and keep_best must be >= 1")
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.identity = dict(identity)
    self.best_metric = best_metric
    self._latest = _manager(os.path.join(self.root, LATEST), max_to_keep=keep_latest,
                            best_metric=None, read_only=read_only)
    self._best = _manager(os.path.join(self.root, BEST), max_to_keep=keep_best,
                          best_metric=best_metric, read_only=read_only)
    # Another run's checkpoints are refused before anything is written: the newest
    # readable meta of each kind is checked (unreadable ones are reported at restore).
    for mngr in (self._latest, self._best):
      for step in sorted(mngr.all_steps(), reverse=True):
        try:
          meta = self._read_meta(mngr, step)
        except CheckpointUnreadableError:
          continue
        self._check_identity(mngr, meta)
        break

  @staticmethod
  def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(os.fspath(mngr.directory), str(step))

  def _read_meta(self, mngr: ocp.CheckpointManager, step: int) -> dict:
    verify_checksums(self._step_dir(mngr, step))
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many kinds for damaged files
      raise CheckpointUnreadableError(
          f"{self._step_dir(mngr, step)}: unreadable checkpoint metadata "
          f"({_reason(e)})") from None
    if not isinstance(meta, dict):
      raise CheckpointUnreadableError(
          f"{self._step_dir(mngr, step)}: checkpoint metadata is not a JSON object")
    return meta

  def _check_identity(self, mngr: ocp.CheckpointManager, meta: dict) -> None:
    saved = meta.get("identity", {})
    # Both ways: a checkpoint with a fact this run lacks is another run's too.
    diff = differences_lib.differences(saved, self.identity)
    if diff:
      lines = differences_lib.describe(
          diff, "{key}: checkpoint has {old!r}, this run has {new!r}", ", ")
      raise CheckpointMismatchError(
          f"{mngr.directory} holds a checkpoint of another run ({lines}); use another "
          "workdir or delete that one")

  def _save(self, mngr, step: int, state, meta: Mapping[str, Any],
            metrics: Mapping[str, float] | None = None) -> None:
    meta = dict(meta, identity=self.identity)
    stored = _plain(_stored_fields(state))
    _check_free_space(str(mngr.directory), stored, int(step))
    # A failing save logs orbax's whole traceback from its writer thread (~100 lines)
    # before raising; the error raised below says it in one line instead.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
      mngr.save(int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(stored),
                    meta=ocp.args.JsonSave(meta)),
                metrics=dict(metrics) if metrics else None, force=True)
      mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      # orbax's messages run to many lines; one says what happened and what to do.
      what = _os_error(e) or _reason(e)
      _drop_callbacks_into_closed_loops()  # the writes still in flight report later
      raise CheckpointSaveError(
          f"{mngr.directory}: could not save the checkpoint of step {int(step)}: {what}; "
          "the checkpoints saved before are kept and the partial one is removed when "
          "the same command runs again (it resumes)") from None
    finally:
      absl_logger.setLevel(level)
    # A best-K manager drops a state at once when it does not rank.
    if jax.process_index() == 0 and int(step) in mngr.all_steps():
      write_checksums(self._step_dir(mngr, step))

  def save_latest(self, step: int, state, meta: Mapping[str, Any]) -> None:
    """Saves ``state`` as the newest resumable state at ``step``.

    A state already stored at ``step`` is replaced: a run only saves a step again when
    it resumed from an older state because that one could not be read.
    """
    if int(step) in self._latest.all_steps():
      self._latest.delete(int(step))
    self._save(self._latest, step, state, meta)

  def save_best(self, step: int, state, meta: Mapping[str, Any],
                metrics: Mapping[str, float]) -> None:
    """Offers ``state`` to the best-K set; kept if ``metrics[best_metric]`` ranks."""
    if self.best_metric not in metrics:
      raise KeyError(f"metrics lack {self.best_metric!r}: {sorted(metrics)}")
    self._save(self._best, step, state, meta, {self.best_metric: float(
        metrics[self.best_metric])})

  def has_best(self, step: int) -> bool:
    """Whether the best set already holds ``step`` (a resumed run replaying an epoch)."""
    return int(step) in self._best.all_steps()

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.best_step()

  def _restore(self, mngr, step: int, target):
    meta = self._read_meta(mngr, step)
    self._check_identity(mngr, meta)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      _stored_fields(target))

    def read(layout):
      return mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(layout)))["state"]

    try:
      state = read(abstract)
    except Exception as e:  # orbax raises many kinds for damaged files
      state = None
      # A one-phase state saved before optimiser states were kept per phase holds the
      # bare optimiser state where a 1-tuple is expected now.
      opt = abstract.get("opt_state") if isinstance(abstract, dict) else None
      if isinstance(opt, tuple) and len(opt) == 1:
        try:
          state = read({**abstract, "opt_state": opt[0]})
          state["opt_state"] = (state["opt_state"],)
        except Exception:  # pylint: disable=broad-except
          state = None
      if state is None:
        raise CheckpointUnreadableError(
            f"{self._step_dir(mngr, step)}: unreadable checkpoint state ({_reason(e)})"
        ) from None
    if dataclasses.is_dataclass(target):
      state = dataclasses.replace(target, **state)
    return state, meta

  def _restore_newest_readable(self, mngr, steps, target):
    """The newest of ``steps`` that reads back; warns about each one that does not."""
    failures = []
    for step in sorted(steps, reverse=True):
      try:
        return self._restore(mngr, step, target)
      except CheckpointUnreadableError as e:
        failures.append(str(e))
        warnings.warn(f"{e}; trying an older checkpoint", RuntimeWarning, stacklevel=3)
    if failures:
      raise CheckpointUnreadableError("no readable checkpoint: " + "; ".join(failures))
    return None

  def restore_latest(self, target) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the newest readable state, laid out like ``target``.

    None when there is none; :class:`CheckpointUnreadableError` when there are some and
    none reads back.
    """
    return self._restore_newest_readable(self._latest, self._latest.all_steps(), target)

  def restore_best(self, target) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the best state, laid out like ``target``; None if none.

    If the best cannot be read the next best is used, with a warning.
    """
    if self._best.best_step() is None:
      return None
    failures = []
    for s in self._best_ranking():
      try:
        return self._restore(self._best, s, target)
      except CheckpointUnreadableError as e:
        failures.append(str(e))
        warnings.warn(f"{e}; trying the next best checkpoint", RuntimeWarning, stacklevel=2)
    raise CheckpointUnreadableError("no readable best checkpoint: " + "; ".join(failures))

  def restore_best_fields(self, fields: Mapping[str, Any]) -> tuple[dict, dict] | None:
    """``(values, meta)``: only the named fields of the best state, as numpy arrays.

    ``fields`` maps field names of the stored state (e.g. ``"params"``) to trees of
    ``jax.ShapeDtypeStruct`` (or arrays) giving their layout; nothing else (no optimiser
    moments) is read. None if the best set is empty; the next best is used, with a
    warning, when the best cannot be read.
    """
    if self._best.best_step() is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, dict(fields))
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    failures = []
    for step in self._best_ranking():
      step_dir = self._step_dir(self._best, step)
      try:
        meta = self._read_meta(self._best, step)
        self._check_identity(self._best, meta)
        try:
          with ocp.PyTreeCheckpointer() as reader:
            values = reader.restore(os.path.join(step_dir, "state"),
                                    args=ocp.args.PyTreeRestore(
                                        item=abstract, restore_args=restore_args,
                                        partial_restore=True))
        except Exception as e:  # orbax raises many kinds for damaged files
          raise CheckpointUnreadableError(
              f"{step_dir}: unreadable checkpoint state ({_reason(e)})") from None
        return dict(values), meta
      except CheckpointUnreadableError as e:
        failures.append(str(e))
        warnings.warn(f"{e}; trying the next best checkpoint", RuntimeWarning, stacklevel=2)
    raise CheckpointUnreadableError("no readable best checkpoint: " + "; ".join(failures))

  def restore_newest_best(self, target) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the most recent state in the best set (a resumable point of
    the same run when the latest states are lost); None if the set is empty."""
    return self._restore_newest_readable(self._best, self._best.all_steps(), target)

  def _best_ranking(self) -> list[int]:
    """Steps of the best set, best first by the stored metric (unscored ones last)."""
    scored = []
    for step in self._best.all_steps():
      try:
        value = (self._best.metrics(step) or {}).get(self.best_metric)
      except Exception:  # a damaged step: tried last, and reported when restored
        value = None
      scored.append((-math.inf if value is None else float(value), step))
    return [st for _, st in sorted(scored, key=lambda p: (-p[0], -p[1]))]

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def read_best_meta(workdir: str) -> dict:
  """The ``meta`` JSON of a run's best checkpoint, without knowing its shapes.

  Raises ``FileNotFoundError`` when ``workdir`` has no best checkpoint.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints", BEST)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint in {workdir!r} (looked for {directory})")
  mngr = _manager(directory, max_to_keep=None, best_metric="ndcg@100", read_only=True)
  try:
    step = mngr.best_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    verify_checksums(os.path.join(directory, str(step)))
    try:
      return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many kinds for damaged files
      raise CheckpointUnreadableError(
          f"{os.path.join(directory, str(step))}: unreadable checkpoint metadata "
          f"({_reason(e)})") from None
  finally:
    mngr.close()
