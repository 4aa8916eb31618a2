"""The epoch loop: a run's state trained epoch by epoch (resuming), each epoch checked
for divergence, validated, checkpointed, logged and reported."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np
from absl import logging

from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.core import finite
from jax_vaecf.core import precision as precision_lib
from jax_vaecf.training import reporting
from jax_vaecf.training import run_folder
from jax_vaecf.training import run_state
from jax_vaecf.training import steps as train_lib
from jax_vaecf.training.checkpoint_choice import (Standing, resume_point, save_latest,
                                         validate_and_keep_best)
from jax_vaecf.training.evaluate import own_shards
from jax_vaecf.core.progress import Progress


# Called after each epoch that validated with (epoch, the epoch's record); a returned
# reason stops the run after that epoch.
OnValidation = Callable[[int, dict], "str | None"]


# Called with every epoch's record (a closed-form fit's one record) once it is logged.
OnEpoch = Callable[[dict], None]


class TrainingDivergedError(RuntimeError):
  """The loss or the parameters stopped being finite: the run cannot go on."""


def check_finite(cfg: configs.Config, state: train_lib.TrainState,
                 host_metrics: list[dict], epoch: int, last_saved_epoch: int) -> None:
  """Raises :class:`TrainingDivergedError` when an applied step had a non-finite loss or
  a parameter holds NaN or an infinity.

  Under dynamic loss scaling (fp16) a non-finite step is skipped by design and leaves the
  parameters as they were, so only the parameters are checked there.
  """
  bad_steps = [] if precision_lib.get_policy(cfg.precision).loss_scaling else [
      i for i, m in enumerate(host_metrics) if not np.isfinite(m["loss"])]
  trees = {"params": state.params}
  if state.ema_params is not None:
    trees["ema_params"] = state.ema_params
  bad_leaves = finite.nonfinite_arrays(trees)
  if not bad_steps and not bad_leaves:
    return
  what = []
  if bad_steps:
    i = bad_steps[0]
    what.append(f"the loss is {host_metrics[i]['loss']} from step {i + 1} of the epoch "
                f"on ({len(bad_steps)} of {len(host_metrics)} steps)")
  if bad_leaves:
    what.append("non-finite values in " + ", ".join(bad_leaves[:4])
                + (f" and {len(bad_leaves) - 4} more arrays" if len(bad_leaves) > 4
                   else ""))
  saved = (f"the last checkpoint is epoch {last_saved_epoch}" if last_saved_epoch
           else "no checkpoint was saved")
  hint = f"lower --lr (now {cfg.lr:g})"
  if cfg.precision != "fp32":
    hint += " or use --precision=fp32"
  if last_saved_epoch:
    hint += " and start again in a new --workdir"
  raise TrainingDivergedError(
      f"training diverged in epoch {epoch}: {'; '.join(what)}. Nothing of this epoch was "
      f"validated or saved ({saved}); {hint}")


def start(cfg: configs.Config, workdir: str, split: data_lib.Split,
          ck: checkpoint_lib.RunCheckpoints | None, built: run_state.Built,
          report: reporting.Report = reporting.log_record
          ) -> tuple[train_lib.TrainState, int, Standing, run_folder.MetricsLog | None]:
  """``(state, first epoch, standing, log)``: a fresh state, or the run resumed from its
  checkpoints (its log cut back to the resumed epoch, its run files written); the state
  is placed on the run's devices."""
  # In a multi-process run every process computes the same records; one writes them.
  writes = ck is not None and jax.process_index() == 0
  log = run_folder.MetricsLog(workdir) if writes else None
  if ck is None:
    return run_state.placed_fresh_state(cfg, built), 0, Standing(), log
  layout = run_state.state_layout(cfg, built)
  state, meta = resume_point(cfg, workdir, ck, layout, log)
  state = (run_state.placed_fresh_state(cfg, built) if state is layout
           else built.steps.init_state(state))
  start_epoch, standing = int(meta["epoch"]), Standing.from_meta(meta)
  if start_epoch:
    logging.info("resuming %s after epoch %d (step %d)", workdir, start_epoch,
                 int(state.step))
    report({"event": "resumed", "epoch": start_epoch})
  if log is not None:
    log.truncate_after(start_epoch)
    run_folder.write_run_files(cfg, workdir, split, start_epoch)
  return state, start_epoch, standing, log


def passes_per_epoch(steps) -> int:
  """Passes over the training users in one epoch: one round of the model's phases."""
  return sum(p.passes for p in steps.phases)


def train_batcher(cfg: configs.Config, split: data_lib.Split, num_shards: int):
  """The run's training batches: a :class:`jax_vaecf.data.TrainBatcher` over the whole
  split, or for partitioned data the :class:`jax_vaecf.data.BlockBatcher` of this
  process's part (its shards only)."""
  if isinstance(split, data_lib.PartSplit):
    return split.train_batcher(cfg.batch_size_train, cfg.seed, num_shards)
  return data_lib.TrainBatcher(split.train, cfg.batch_size_train, seed=cfg.seed,
                               num_shards=num_shards)


def train_epoch(steps, state: train_lib.TrainState, batcher: data_lib.TrainBatcher,
                epoch: int, prefetch: int, *, max_steps: int | None = None
                ) -> tuple[train_lib.TrainState, list[dict], float]:
  """One epoch: a round of the model's phases, each phase ``passes`` passes of its
  ``steps.train_steps[i]`` over ``batcher``'s batches (this process's shards, copied to
  the devices ``prefetch`` batches ahead); with ``max_steps``, each pass's first
  ``max_steps`` steps. Pass ``j`` of the round takes the batch order of
  ``epoch * passes_per_epoch + j`` (for a one-phase model, ``epoch``).

  Returns the state, each step's metrics on the host (read once, after the epoch, with
  its phase's index as ``phase``) and the epoch's seconds. :mod:`experiments.benchmark`
  times this same function.
  """
  per_pass = batcher.steps_per_epoch if max_steps is None else min(
      max_steps, batcher.steps_per_epoch)
  n_passes = passes_per_epoch(steps)
  t0 = time.perf_counter()
  step_metrics = []
  with Progress(per_pass * n_passes, f"epoch {epoch + 1}") as bar:
    pass_index = epoch * n_passes
    for i, phase in enumerate(steps.phases):
      if phase.refresh_frozen:
        state = steps.refresh_frozen(state)
      for _ in range(phase.passes):
        done = 0
        own = own_shards(batcher.epoch_batches(pass_index),
                          getattr(batcher, "process_local", False))
        for batch in data_lib.prefetch(own, size=prefetch, put=steps.put_batch):
          state, m = steps.train_steps[i](state, batch)
          step_metrics.append((i, m))
          done += 1
          bar.update()
          if done == per_pass:
            break
        pass_index += 1
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  return state, [{**steps.metrics_to_host(m), "phase": i} for i, m in step_metrics], seconds


def _mean_of(host: list[dict], phases) -> dict:
  """The epoch's record of per-step metrics already on the host (with several phases,
  also each phase's mean loss as ``<phase>_loss``); ``beta`` is the last step's KL
  weight among the phases that have the KL term."""
  if not host:
    return {}
  keys = ("loss", "nll", "kl")
  out = {k: float(np.mean([m[k] for m in host])) for k in keys}
  if len(phases) > 1:
    for i, phase in enumerate(phases):
      losses = [m["loss"] for m in host if m["phase"] == i]
      if losses:
        out[f"{phase.name}_loss"] = float(np.mean(losses))
  with_kl = [m for m in host if phases[m["phase"]].kl] or host
  out["beta"] = float(with_kl[-1]["beta"])
  out["skipped_steps"] = int(host[-1]["skipped_steps"])
  out["loss_scale"] = float(host[-1]["loss_scale"])
  return out


def _summary(cfg: configs.Config, standing: Standing, epoch_times: list[float],
             val_times: list[float], n_users: int) -> dict:
  """The best validation metrics and, after the warm-up epochs, the mean timings."""
  summary = {"best_validation": standing.best_metrics, "best_epoch": standing.best_epoch,
             "stopped": standing.stopped}
  measured = epoch_times[cfg.warm_up_epochs:]
  if measured:
    mean_epoch = float(np.mean(measured))
    summary.update(mean_epoch_time_s=mean_epoch, train_users_per_s=n_users / mean_epoch,
                   measured_epochs=len(measured))
  if val_times:
    summary["mean_validation_time_s"] = float(np.mean(val_times))
  return summary


def _check_or_log(cfg: configs.Config, state: train_lib.TrainState,
                  host_metrics: list[dict], epoch: int, standing: Standing,
                  log: run_folder.MetricsLog | None) -> None:
  """:func:`check_finite`, a divergence also written to the log before it is raised."""
  try:
    check_finite(cfg, state, host_metrics, epoch, standing.last_saved_epoch)
  except TrainingDivergedError as e:
    if log is not None:
      log.write({"split": "diverged", "epoch": epoch, "message": str(e)})
    raise


def _publish(record: dict, log: run_folder.MetricsLog | None,
             on_epoch: OnEpoch | None, report: reporting.Report) -> None:
  """An epoch's record to the log, then to the caller's hook, then to the reporter
  (each its own copy)."""
  if log is not None:
    log.write(record)
  if on_epoch is not None:
    on_epoch(dict(record))
  report({"event": "epoch", "record": dict(record)})


def train_and_validate(cfg: configs.Config, workdir: str, split: data_lib.Split,
                       ck: checkpoint_lib.RunCheckpoints | None, built: run_state.Built,
                       *, stop_after_epochs: int | None = None,
                       on_validation: OnValidation | None = None,
                       on_epoch: OnEpoch | None = None,
                       report: reporting.Report = reporting.log_record) -> dict:
  """Trains ``cfg.number_of_epochs`` epochs (resuming), validating and checkpointing.

  The run ends early when ``cfg.early_stopping`` validations in a row bring no better
  NDCG@100, or when ``on_validation(epoch, record)``, called after each epoch that
  validated, returns a reason; the epoch's record then says why (``stopped``) and a
  resumable checkpoint is saved. A resumed run that had stopped early trains no more
  (unless ``early_stopping`` was raised or set to 0 since); one stopped by
  ``on_validation`` continues, and the new call decides again. ``on_epoch(record)`` is
  called with each epoch's record once it is logged (to send it anywhere).

  ``ck`` is None in pure benchmark runs (nothing is written). Returns the benchmark
  summary and the best validation metrics and epoch. Raises
  :class:`TrainingDivergedError` (after logging it) when the loss or the parameters
  stop being finite.
  """
  steps = built.steps
  state, start_epoch, standing, log = start(cfg, workdir, split, ck, built, report)
  batcher = train_batcher(cfg, split, steps.num_shards)
  epoch_times, val_times = [], []
  if (0 < start_epoch < cfg.number_of_epochs and cfg.early_stopping
      and standing.stale >= cfg.early_stopping):
    report({"event": "stopped_already", "epoch": start_epoch, "stale": standing.stale})
    return _summary(cfg, standing, epoch_times, val_times, split.n_train_users)
  standing.stopped = None  # a stop asked by on_validation is asked again on resume
  for epoch in range(start_epoch, cfg.number_of_epochs):
    state, host_metrics, seconds = train_epoch(steps, state, batcher, epoch, cfg.prefetch)
    epoch_times.append(seconds)
    _check_or_log(cfg, state, host_metrics, epoch + 1, standing, log)
    record = {"split": "train", "epoch": epoch + 1,
              "step": int(steps.to_host(state.step)),
              **_mean_of(host_metrics, steps.phases),
              "epoch_time_s": seconds, "users_per_s": split.n_train_users / seconds}
    host_state = validate_and_keep_best(cfg, steps, state, split, ck, standing, record)
    if "val_time_s" in record:
      val_times.append(record["val_time_s"])
      if on_validation is not None and standing.stopped is None:
        standing.stopped = on_validation(epoch + 1, record) or None
    if standing.stopped is not None and epoch + 1 < cfg.number_of_epochs:
      record["stopped"] = standing.stopped
    else:
      standing.stopped = None  # the last epoch ends the run anyway
    save_latest(cfg, steps, state, ck, standing, record, host_state)
    _publish(record, log, on_epoch, report)
    if standing.stopped is not None:
      report({"event": "stopped", "epoch": epoch + 1, "reason": standing.stopped})
      break
    if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
      break
  return _summary(cfg, standing, epoch_times, val_times, split.n_train_users)
