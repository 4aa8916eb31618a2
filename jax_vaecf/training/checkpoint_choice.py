"""Which states a run keeps: where a run stands between epochs (:class:`Standing`, saved
in every checkpoint's metadata), the state to resume from, the best states by validation
NDCG@100 and the resumable latest state."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.training import run_folder
from jax_vaecf.training import steps as train_lib
from jax_vaecf.training.evaluate import BEST_METRIC, VALIDATION_RECORD, evaluate


@dataclasses.dataclass
class Standing:
  """Where a run stands between epochs: the best validation NDCG@100 so far (its
  metrics and epoch), the validations since it improved (``stale``, for early
  stopping), why the run stopped before its last epoch (``stopped``) and the last epoch
  with a resumable checkpoint. Saved in every checkpoint's metadata, so a resumed run
  continues with the same standing."""

  best: float = -math.inf
  best_metrics: dict = dataclasses.field(default_factory=dict)
  best_epoch: int | None = None
  stale: int = 0
  stopped: str | None = None
  last_saved_epoch: int = 0

  def meta(self, epoch: int) -> dict:
    """A checkpoint's metadata at the end of ``epoch``."""
    return {"epoch": epoch, "best": self.best, "best_metrics": self.best_metrics,
            "best_epoch": self.best_epoch, "stale": self.stale, "stopped": self.stopped}

  @classmethod
  def from_meta(cls, meta: dict) -> "Standing":
    """The standing a checkpoint recorded (checkpoints of older runs hold only
    ``epoch`` and ``best``)."""
    epoch = int(meta["epoch"])
    return cls(best=float(meta.get("best", -math.inf)),
               best_metrics=dict(meta.get("best_metrics") or {}),
               best_epoch=meta.get("best_epoch"), stale=int(meta.get("stale", 0)),
               stopped=meta.get("stopped"), last_saved_epoch=epoch)


def resume_point(cfg: configs.Config, workdir: str, ck: checkpoint_lib.RunCheckpoints,
                 state: train_lib.TrainState, log: run_folder.MetricsLog | None
                 ) -> tuple[train_lib.TrainState, dict]:
  """``(state, meta)`` to continue from: the newest readable latest checkpoint, else
  (with a warning) the newest state of the best set, else epoch 0 (``state`` then is
  the ``state`` given, ``meta`` ``{"epoch": 0}``). ``meta`` is the checkpoint's: ``epoch``, ``best`` and, when the
  run recorded them, the :class:`Standing` fields.

  Raises ``ValueError`` when the metrics log shows that checkpoints were saved but none
  can be read, rather than training again from epoch 0 over that log.
  """
  reason = "no checkpoint in checkpoints/latest"
  try:
    restored = ck.restore_latest(state)
  except checkpoint_lib.CheckpointUnreadableError as e:
    restored, reason = None, str(e)
  if restored is not None:
    return restored
  saved = log.checkpointed_epochs() if log is not None else []
  if not saved:
    return state, {"epoch": 0}  # a run killed before its first checkpoint: start over
  try:
    fallback = ck.restore_newest_best(state)
  except checkpoint_lib.CheckpointUnreadableError as e:
    fallback, reason = None, f"{reason}; {e}"
  if fallback is not None and "best" in fallback[1]:
    state, meta = fallback
    warnings.warn(f"{workdir}: {reason}; resuming from the best checkpoint's state of "
                  f"epoch {meta['epoch']} instead (later epochs are trained again)",
                  RuntimeWarning, stacklevel=2)
    return state, meta
  raise ValueError(
      f"{workdir}: metrics.jsonl records a checkpoint at epoch {max(saved)} but none can "
      f"be resumed ({reason}). Not training again from epoch 0 over that log: move or "
      "delete the workdir's metrics.jsonl and checkpoints/ to start over, or use another "
      "--workdir")


def validate_and_keep_best(cfg: configs.Config, steps, state, split: data_lib.Split,
                           ck: checkpoint_lib.RunCheckpoints | None, standing: Standing,
                           record: dict):
  """Validates when the epoch calls for it, adds the metrics to ``record`` and offers a
  new best state to the best checkpoints. Returns the host copy of the state when one
  was made (so the latest checkpoint reuses it), else None."""
  done, last = record["epoch"], cfg.number_of_epochs
  host_state = None
  if split.validation is not None and (done % cfg.validation_step == 0 or done == last):
    t0 = time.perf_counter()
    vm = evaluate(steps, state, split.validation, cfg.batch_size_validation)
    record.update({f"val_{k}": vm[k] for k in VALIDATION_RECORD})
    record["val_time_s"] = time.perf_counter() - t0
    if vm[BEST_METRIC] > standing.best:
      standing.best, standing.best_epoch, standing.stale = vm[BEST_METRIC], done, 0
      standing.best_metrics = {k: vm[k] for k in VALIDATION_RECORD}
      if ck is not None:
        host_state = steps.to_host(state)
        if not ck.has_best(record["step"]):
          ck.save_best(record["step"], host_state, standing.meta(done),
                       {BEST_METRIC: standing.best})
    else:
      standing.stale += 1
      if cfg.early_stopping and standing.stale >= cfg.early_stopping:
        standing.stopped = (f"early_stopping: {standing.stale} validations without a "
                            f"better ndcg@100 (best {standing.best:.4f}, epoch "
                            f"{standing.best_epoch})")
  elif split.validation is None and done == last and ck is not None:
    # Per-user protocol without validation: the final model is the one tested.
    host_state = steps.to_host(state)
    if not ck.has_best(record["step"]):
      ck.save_best(record["step"], host_state, standing.meta(done), {BEST_METRIC: done})
  record["best_val_ndcg@100"] = standing.best if standing.best > -math.inf else None
  return host_state


def save_latest(cfg: configs.Config, steps, state, ck: checkpoint_lib.RunCheckpoints | None,
                standing: Standing, record: dict, host_state=None) -> None:
  """Saves the resumable state every ``checkpoint_every`` epochs and after the last; the
  record says whether it did."""
  done = record["epoch"]
  record["checkpointed"] = ck is not None and (
      done % cfg.checkpoint_every == 0 or done == cfg.number_of_epochs
      or standing.stopped is not None)
  if record["checkpointed"]:
    host_state = host_state if host_state is not None else steps.to_host(state)
    ck.save_latest(record["step"], host_state, standing.meta(done))
    standing.last_saved_epoch = done
