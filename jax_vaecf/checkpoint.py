"""Orbax checkpoints of a training run: the latest state for resuming, the best by a
validation metric for testing and serving.

Layout under a run's ``workdir``::

  workdir/checkpoints/latest/<step>/{state,meta}   newest states, for resuming
  workdir/checkpoints/best/<step>/{state,meta}     the K best by validation NDCG@100

``state`` is the :class:`jax_vaecf.train.TrainState` pytree (params, optimiser state,
step, PRNG key, loss scale, and the weight average when the run keeps one), stored as the
dict of its fields that are not ``None``, so a field added later as optional (``None``
when unused) leaves earlier checkpoints readable. ``meta`` is JSON: the run's identity
(model, shapes, dataset) checked before anything is restored, the data-order position, the raw-id
mapping and whatever else a caller puts there. Orbax writes each step to a temporary
folder and renames it when complete, so an interrupted save never replaces a good
checkpoint. Arrays are restored to the shardings of the ``target`` passed in, so a state
saved on N devices restores on M.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


class CheckpointMismatchError(ValueError):
  """A checkpoint belongs to another model shape or dataset than the run asks for."""


def _manager(directory: str, *, max_to_keep: int,
             best_metric: str | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      best_fn=(lambda m: m[best_metric]) if best_metric else None,
      best_mode="max",
      create=True,
      enable_async_checkpointing=False,
      # Folders of saves that were interrupted are removed, never read.
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(directory, options=options)


def _plain(tree):
  """Host numpy copies of a pytree's arrays (for saving from any sharding)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def _stored_fields(state):
  """A dataclass state as the dict of its non-``None`` fields (what is written); any other
  pytree as it is."""
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None}


class RunCheckpoints:
  """The latest-and-best checkpoint pair of one run directory.

  Args:
    workdir: the run's directory.
    identity: JSON-able facts that must match for a checkpoint to be reused (model name
      and sizes, number of items, dataset and processing options).
    keep_latest: how many of the newest states to keep.
    keep_best: how many of the best states (by ``best_metric``) to keep.
    best_metric: the key of the metrics dict passed to :meth:`save_best`.
  """

  def __init__(self, workdir: str, identity: Mapping[str, Any], *, keep_latest: int = 1,
               keep_best: int = 1, best_metric: str = "ndcg@100"):
    if keep_latest < 1 or keep_best < 1:
      raise ValueError("keep_latest and keep_best must be >= 1")
    self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.identity = dict(identity)
    self.best_metric = best_metric
    self._latest = _manager(os.path.join(self.root, LATEST), max_to_keep=keep_latest,
                            best_metric=None)
    self._best = _manager(os.path.join(self.root, BEST), max_to_keep=keep_best,
                          best_metric=best_metric)
    for mngr in (self._latest, self._best):
      step = mngr.latest_step()
      if step is not None:
        self._check_identity(mngr, step)

  def _check_identity(self, mngr: ocp.CheckpointManager, step: int) -> None:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("identity", {})
    # Both ways: a checkpoint with a fact this run lacks is another run's too.
    diff = {k: (saved.get(k), self.identity.get(k)) for k in set(saved) | set(self.identity)
            if saved.get(k) != self.identity.get(k)}
    if diff:
      lines = ", ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}"
                        for k, (a, b) in sorted(diff.items()))
      raise CheckpointMismatchError(
          f"{mngr.directory} holds a checkpoint of another run ({lines}); use another "
          "workdir or delete that one")

  def _save(self, mngr, step: int, state, meta: Mapping[str, Any],
            metrics: Mapping[str, float] | None = None) -> None:
    meta = dict(meta, identity=self.identity)
    mngr.save(int(step),
              args=ocp.args.Composite(
                  state=ocp.args.StandardSave(_plain(_stored_fields(state))),
                  meta=ocp.args.JsonSave(meta)),
              metrics=dict(metrics) if metrics else None, force=True)
    mngr.wait_until_finished()

  def save_latest(self, step: int, state, meta: Mapping[str, Any]) -> None:
    """Saves ``state`` as the newest resumable state at ``step``."""
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
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      _stored_fields(target))
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = out["state"]
    if dataclasses.is_dataclass(target):
      state = dataclasses.replace(target, **state)
    return state, out["meta"]

  def restore_latest(self, target) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the newest state, laid out like ``target``; None if none."""
    step = self._latest.latest_step()
    return None if step is None else self._restore(self._latest, step, target)

  def restore_best(self, target) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the best state, laid out like ``target``; None if none."""
    step = self._best.best_step()
    return None if step is None else self._restore(self._best, step, target)

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
  mngr = _manager(directory, max_to_keep=1, best_metric="ndcg@100")
  try:
    step = mngr.best_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mngr.close()
