"""The training engine: the train / test / benchmark workflow of a run folder.

``python -m experiments.train`` and every other tool run it; so does
:func:`jax_vaecf.api.fit`. One clear loop: load (or build and cache) the split, resume from the workdir's latest
checkpoint if there is one, train epoch by epoch with the host batcher prefetching to
the device, validate every ``validation_step`` epochs, keep the best checkpoints by
validation NDCG@100, append one JSON line per epoch to ``<workdir>/metrics.jsonl``, and
finally score the best checkpoint on the test users.

A run is deterministic: batch order comes from ``(seed, epoch)``, dropout and noise from
``(seed, step)``. A run killed at any moment and restarted with the same workdir resumes
from its last complete checkpoint, replays the epochs after it, and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jax_vaecf import catalogue
from jax_vaecf import checkpoint as checkpoint_lib
from jax_vaecf import configs
from jax_vaecf import data as data_lib
from jax_vaecf import distributed
from jax_vaecf import metrics as metrics_lib
from jax_vaecf import model as model_lib
from jax_vaecf import parallel as parallel_lib
from jax_vaecf import per_user
from jax_vaecf import precision as precision_lib
from jax_vaecf import run_folder
from jax_vaecf import schedules
from jax_vaecf import train as train_lib
from jax_vaecf.progress import Progress

VALIDATION_KS = (20, 50, 100)
BEST_METRIC = "ndcg@100"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jax_vaecf")


# ---------------------------------------------------------------------------- data


# The Config fields load_data builds the split from (data_dir, cache_dir and download
# say only where the files are): a partitioned folder records them and a run reading it
# must give the same.
DATA_SETTINGS = configs.tagged("data")


def data_settings(cfg: configs.Config) -> dict:
  """The config's :data:`DATA_SETTINGS`, as JSON values."""
  return {name: getattr(cfg, name) for name in DATA_SETTINGS}


IN_MEMORY = "in_memory"  # the data set of a run given its data in Python (jax_vaecf.api)


def _split_settings(cfg: configs.Config, dataset: str) -> dict[str, Any]:
  """The run's split settings that the split of ``dataset`` takes: the data set's
  registry entry decides (a given train/test pair, the paper's folder and ml-20m_alt's
  own procedure take none)."""
  settings = {"seed": cfg.split_seed, "heldout_fraction": cfg.heldout_fraction}
  if cfg.n_heldout_users:  # 0 leaves the data set's default
    settings["n_heldout_users"] = cfg.n_heldout_users
  takes = data_lib.split_options(dataset, cfg.protocol, cfg.fold or None)
  return {k: v for k, v in settings.items() if k in takes}


def with_validation(cfg: configs.Config, split: data_lib.Split) -> data_lib.Split:
  """The per-user protocol's split with its validation targets cut from the training
  rows (``validation_fraction``, seeded by ``split_seed``); any other split as it is."""
  if (split.protocol == "per_user" and split.validation is None
      and cfg.validation_fraction > 0):
    # Validation targets come out of the training rows; the test fold-in stays the
    # user's full training row and the test items are never read.
    split = data_lib.hold_out_validation(split, cfg.validation_fraction, cfg.split_seed)
  return split


def split_interactions(cfg: configs.Config, inter: data_lib.Interactions
                       ) -> data_lib.Split:
  """The config's split of in-memory interactions (:func:`jax_vaecf.data.from_columns`),
  made as a ``--dataset=csv`` file's: the same split function, defaults and split
  settings; ratings above ``csv_threshold`` are positives (every row without ratings,
  or with ``csv_all_positive``). The per-user protocol's validation targets are cut
  when a run takes the split (:func:`run`), as :func:`load_data` cuts them."""
  entry = data_lib.registry.get("csv")
  fn = data_lib.split_function(entry, cfg.protocol)
  takes = set(inspect.signature(fn).parameters)
  kwargs = {k: v for k, v in entry.split_defaults.items() if k in takes}
  kwargs.update(_split_settings(cfg, "csv"))
  if "threshold" in takes:
    kwargs["threshold"] = (None if inter.ratings is None or cfg.csv_all_positive
                           else cfg.csv_threshold)
  return fn(inter, **kwargs)


def load_data(cfg: configs.Config) -> data_lib.Split:
  """The split the config asks for, from the cache when it is there; with
  ``--partitioned_data``, this process's part of that folder
  (:class:`jax_vaecf.data.PartSplit`, memory-mapped)."""
  if cfg.partitioned_data:
    return data_lib.open_part(cfg.partitioned_data, jax.process_index(),
                              jax.process_count(), settings=data_settings(cfg))
  if cfg.dataset == IN_MEMORY:
    raise ValueError(f"the run's data was given in Python (--dataset={IN_MEMORY}): "
                     "give it again (jax_vaecf.api.fit), or a data set and --data_dir")
  options = _split_settings(cfg, cfg.dataset)
  if cfg.dataset == "csv":
    options.update(csv_reader_options(cfg))
  if not os.path.exists(cfg.data_dir) and not cfg.download:
    raise FileNotFoundError(
        f"--data_dir={cfg.data_dir!r} does not exist; point it at the folder holding the "
        f"{cfg.dataset} files" + (" or add --download"
                                  if data_lib.registry.get(cfg.dataset).download else ""))
  t0 = time.perf_counter()

  def report(stage: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] preprocessing {cfg.dataset}: {stage}",
          file=sys.stderr, flush=True)

  split = data_lib.load_split(cfg.dataset, cfg.data_dir,
                              cache_dir=cfg.cache_dir or DEFAULT_CACHE,
                              download=cfg.download, protocol=cfg.protocol,
                              fold=cfg.fold or None, progress=report, **options)
  return with_validation(cfg, split)


def csv_reader_options(cfg: configs.Config) -> dict[str, Any]:
  """The ``csv_*`` settings in :func:`jax_vaecf.data.read_delimited`'s terms (their
  text forms were checked by ``configs.validate``), with the positive threshold."""
  columns = [c.strip() for c in cfg.csv_columns.split(",")] if cfg.csv_columns else None
  return dict(
      delimiter=data_lib.readers.delimiter_of(cfg.csv_delimiter),
      columns=None if columns is None else tuple(
          int(c) if c.isdigit() else (c or None) for c in columns),
      header=data_lib.readers.HEADER_CHOICES[cfg.csv_header],
      threshold=None if cfg.csv_all_positive else cfg.csv_threshold)


def anneal_steps(cfg: configs.Config, steps_per_epoch: int) -> tuple[int, int]:
  """``(total_anneal_steps, anneal_cycle_steps)`` in steps: as given, or with
  ``anneal_epochs`` the anneal (and the cycle, when it follows the anneal) that many
  epochs of ``steps_per_epoch`` optimiser steps long."""
  if cfg.anneal_epochs <= 0:
    return cfg.total_anneal_steps, cfg.anneal_cycle_steps
  total = max(1, round(cfg.anneal_epochs * steps_per_epoch))
  return total, (cfg.anneal_cycle_steps and total)


def steps_per_epoch(cfg: configs.Config, n_train_users: int) -> int:
  """Optimiser steps in one epoch: a round of the model's phases over the users."""
  passes = sum(p.passes for p in build_model(cfg, 1).phases)
  return passes * -(-n_train_users // cfg.batch_size_train)


def step_options(cfg: configs.Config, n_train_users: int | None = None
                 ) -> train_lib.StepOptions:
  """The config's :class:`jax_vaecf.train.StepOptions`: how a step updates the state.

  ``n_train_users`` sizes an epoch for ``anneal_epochs``; it is needed only then."""
  if cfg.anneal_epochs > 0 and n_train_users is None:
    raise ValueError("anneal_epochs: the number of training users is needed")
  total, cycle = anneal_steps(
      cfg, steps_per_epoch(cfg, n_train_users) if cfg.anneal_epochs > 0 else 0)
  schedule = schedules.get_schedule(cfg.anneal_schedule, cap=cfg.anneal_cap,
                                    total_anneal_steps=total, cycle_steps=cycle)
  return train_lib.StepOptions(
      beta_schedule=schedule, kl_gamma=cfg.kl_gamma, lam=cfg.lam,
      input_format=cfg.input_format,
      loss_scaling=precision_lib.get_policy(cfg.precision).loss_scaling,
      output_chunk_size=cfg.output_chunk_size, ema_decay=cfg.ema_decay)


def build_model(cfg: configs.Config, n_items: int):
  """The config's model (``--model`` and its settings) over ``n_items`` items."""
  return model_lib.build_model(
      cfg.model, n_items, settings=cfg.model_settings, dropout_rate=cfg.dropout_rate,
      dtype=precision_lib.get_policy(cfg.precision).compute_dtype)


def optimizer(cfg: configs.Config):
  """The run's optimiser (Adam with the config's learning rate and betas)."""
  return train_lib.make_optimizer(cfg.lr, b1=cfg.adam_b1, b2=cfg.adam_b2)


def fresh_state(cfg: configs.Config, built: "Built") -> train_lib.TrainState:
  """The run's initial state, as host-side arrays of one device."""
  return train_lib.create_train_state(built.model, optimizer(cfg),
                                      jax.random.PRNGKey(cfg.seed), built.options)


def state_layout(cfg: configs.Config, built: "Built") -> train_lib.TrainState:
  """The shapes and dtypes of the run's state (nothing allocated): the layout its
  checkpoints are restored into."""
  return jax.eval_shape(lambda: fresh_state(cfg, built))


def placed_fresh_state(cfg: configs.Config, built: "Built") -> train_lib.TrainState:
  """The run's initial state made on its devices (item-split arrays shard by shard;
  the same values as :func:`fresh_state`)."""
  return built.steps.create_state(optimizer(cfg), jax.random.PRNGKey(cfg.seed))


# -------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Built:
  """What a config builds: its model, step options and placed steps."""

  model: Any
  options: train_lib.StepOptions
  steps: parallel_lib.ParallelSteps


def build(cfg: configs.Config, n_items: int, n_train_users: int | None = None) -> "Built":
  """Model, step options and the (parallel) step functions of a config
  (``n_train_users``: see :func:`step_options`)."""
  model = build_model(cfg, n_items)
  options = step_options(cfg, n_train_users)
  devices = select_devices(cfg)
  precision_lib.check_backend_supports(cfg.precision, devices[0].platform)
  ks = tuple(sorted(set(VALIDATION_KS) | set(int(k) for k in cfg.test_ks)))
  model_shards = parallel_lib.parse_mesh(cfg.mesh)[1] if cfg.mesh else 1
  steps = parallel_lib.make_parallel_steps(model, options, mode=cfg.parallel,
                                           devices=devices, ks=ks,
                                           model_shards=model_shards)
  return Built(model, options, steps)


def select_devices(cfg: configs.Config) -> list:
  """``--mesh`` (``DATA * MODEL`` devices over all processes), ``--gpu_number`` (one
  chosen local device) or ``--number_of_devices`` (0 = all)."""
  if cfg.mesh:
    d, m = parallel_lib.parse_mesh(cfg.mesh)
    n_proc = jax.process_count()
    if (d * m) % n_proc:
      raise ValueError(f"--mesh={cfg.mesh}: {d * m} devices do not split over "
                       f"{n_proc} processes")
    per_process = d * m // n_proc
    if per_process % m:
      raise ValueError(f"--mesh={cfg.mesh}: each of the {n_proc} processes has "
                       f"{per_process} of the devices, not whole rows of {m}")
    return parallel_lib.resolve_devices(per_process)
  if cfg.gpu_number >= 0:
    local = jax.local_devices()
    if cfg.gpu_number >= len(local) or jax.process_count() > 1:
      raise ValueError(f"--gpu_number={cfg.gpu_number}: this process has {len(local)} "
                       f"local devices ({local[0].platform}); single-process runs only")
    return [local[cfg.gpu_number]]
  return parallel_lib.resolve_devices(cfg.number_of_devices)


def _own_shards(batches, process_local: bool = False):
  """This process's shards of each global batch (all of them in a one-process run);
  ``process_local`` batches (partitioned data) hold only them already."""
  n, i = jax.process_count(), jax.process_index()
  for b in batches:
    yield b if n == 1 or process_local else distributed.process_shards(b, i, n)


def train_batcher(cfg: configs.Config, split: data_lib.Split, num_shards: int):
  """The run's training batches: a :class:`jax_vaecf.data.TrainBatcher` over the whole
  split, or for partitioned data the :class:`jax_vaecf.data.BlockBatcher` of this
  process's part (its shards only)."""
  if isinstance(split, data_lib.PartSplit):
    return split.train_batcher(cfg.batch_size_train, cfg.seed, num_shards)
  return data_lib.TrainBatcher(split.train, cfg.batch_size_train, seed=cfg.seed,
                               num_shards=num_shards)


def evaluate(steps, params, split: data_lib.EvalSplit, batch_size: int, *,
             accumulator: metrics_lib.MetricAccumulator | None = None) -> dict:
  """Mean (and standard error) of every metric over the split's users with held-out items
  (a :class:`jax_vaecf.data.PartEvalSplit`: every process's users, each process feeding
  its own; the per-user metrics come back to every process). ``accumulator``, when
  given, keeps every user's values (in the split's row order, except for partitioned
  data)."""
  acc = metrics_lib.MetricAccumulator() if accumulator is None else accumulator
  if isinstance(split, data_lib.PartEvalSplit):
    batches = split.batches(batch_size, steps.num_shards)
  else:
    batches = _own_shards(data_lib.eval_batches(split, batch_size,
                                                num_shards=steps.num_shards))
  for _, out in _pipelined(steps.eval_step, params, batches, steps.put_batch):
    acc.add(steps.metrics_to_host(out))  # every user of the global batch
  return acc.result()


def _pipelined(fn, params, host_batches, put):
  """Runs ``fn(params, batch)`` over batches, copying the next while one runs."""
  pending = None
  for host_batch in host_batches:
    out = fn(params, put(host_batch))
    if pending is not None:
      yield pending
    pending = (host_batch, out)
  if pending is not None:
    yield pending


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


# ---------------------------------------------------------------------------- modes


# Called after each epoch that validated with (epoch, the epoch's record); a returned
# reason stops the run after that epoch.
OnValidation = Callable[[int, dict], "str | None"]
# Called with every epoch's record (a closed-form fit's one record) once it is logged.
OnEpoch = Callable[[dict], None]


class TrainingDivergedError(RuntimeError):
  """The loss or the parameters stopped being finite: the run cannot go on."""


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
  # One bool per array, replicated: any process reads it from a local device.
  finite = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)),
                                  _leaf_is_finite(trees))
  bad_leaves = ["/".join(str(getattr(k, "key", k)) for k in path)
                for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
                if not bool(np.all(ok))]
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


@jax.jit
def _leaf_is_finite(tree):
  return jax.tree_util.tree_map(lambda a: jnp.all(jnp.isfinite(a)), tree)


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


def start(cfg: configs.Config, workdir: str, split: data_lib.Split,
          ck: checkpoint_lib.RunCheckpoints | None, built: Built
          ) -> tuple[train_lib.TrainState, int, Standing, run_folder.MetricsLog | None]:
  """``(state, first epoch, standing, log)``: a fresh state, or the run resumed from its
  checkpoints (its log cut back to the resumed epoch, its run files written); the state
  is placed on the run's devices."""
  # In a multi-process run every process computes the same records; one writes them.
  writes = ck is not None and jax.process_index() == 0
  log = run_folder.MetricsLog(workdir) if writes else None
  if ck is None:
    return placed_fresh_state(cfg, built), 0, Standing(), log
  layout = state_layout(cfg, built)
  state, meta = resume_point(cfg, workdir, ck, layout, log)
  state = (placed_fresh_state(cfg, built) if state is layout
           else built.steps.init_state(state))
  start_epoch, standing = int(meta["epoch"]), Standing.from_meta(meta)
  if start_epoch:
    logging.info("resuming %s after epoch %d (step %d)", workdir, start_epoch,
                 int(state.step))
    print(f"resumed from epoch {start_epoch}", flush=True)
  if log is not None:
    log.truncate_after(start_epoch)
    run_folder.write_run_files(cfg, workdir, split, start_epoch)
  return state, start_epoch, standing, log


def passes_per_epoch(steps) -> int:
  """Passes over the training users in one epoch: one round of the model's phases."""
  return sum(p.passes for p in steps.phases)


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
        own = _own_shards(batcher.epoch_batches(pass_index),
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
    record.update({f"val_{k}": vm[k] for k in ("ndcg@100", "recall@20", "recall@50")})
    record["val_time_s"] = time.perf_counter() - t0
    if vm[BEST_METRIC] > standing.best:
      standing.best, standing.best_epoch, standing.stale = vm[BEST_METRIC], done, 0
      standing.best_metrics = {k: vm[k] for k in ("ndcg@100", "recall@20", "recall@50")}
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


def train_and_validate(cfg: configs.Config, workdir: str, split: data_lib.Split,
                       ck: checkpoint_lib.RunCheckpoints | None, built: Built,
                       *, stop_after_epochs: int | None = None,
                       on_validation: OnValidation | None = None,
                       on_epoch: OnEpoch | None = None) -> dict:
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
  state, start_epoch, standing, log = start(cfg, workdir, split, ck, built)
  batcher = train_batcher(cfg, split, steps.num_shards)
  epoch_times, val_times = [], []
  if (0 < start_epoch < cfg.number_of_epochs and cfg.early_stopping
      and standing.stale >= cfg.early_stopping):
    print(f"the run stopped early after epoch {start_epoch} ({standing.stale} validations "
          "without improvement): nothing to train", flush=True)
    return _summary(cfg, standing, epoch_times, val_times, split.n_train_users)
  standing.stopped = None  # a stop asked by on_validation is asked again on resume
  for epoch in range(start_epoch, cfg.number_of_epochs):
    state, host_metrics, seconds = train_epoch(steps, state, batcher, epoch, cfg.prefetch)
    epoch_times.append(seconds)
    try:
      check_finite(cfg, state, host_metrics, epoch + 1, standing.last_saved_epoch)
    except TrainingDivergedError as e:
      if log is not None:
        log.write({"split": "diverged", "epoch": epoch + 1, "message": str(e)})
      raise
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
    if log is not None:
      log.write(record)
    if on_epoch is not None:
      on_epoch(dict(record))
    _print_epoch(record)
    if standing.stopped is not None:
      print(f"stopped after epoch {epoch + 1}: {standing.stopped}", flush=True)
      break
    if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
      break
  return _summary(cfg, standing, epoch_times, val_times, split.n_train_users)


def _state_of(cfg: configs.Config, built: Built, params) -> train_lib.TrainState:
  """A closed-form model's state: its fitted parameters in the layout of
  :func:`state_layout` (no optimiser state: the model has no training phase)."""
  key = jax.random.split(jax.random.PRNGKey(cfg.seed))[1]
  return train_lib.TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state=(),
                              key=jax.random.key_data(key) if jnp.issubdtype(
                                  key.dtype, jax.dtypes.prng_key) else key,
                              loss_scale=precision_lib.init_loss_scale(False),
                              tx=optimizer(cfg))


def fit_closed_form(cfg: configs.Config, workdir: str, split: data_lib.Split,
                    ck: checkpoint_lib.RunCheckpoints | None, built: Built, *,
                    on_epoch: OnEpoch | None = None) -> dict:
  """Fits a model by its entry's closed-form ``fit`` (:class:`model_lib.ModelEntry`) on
  the run's first device, settings it sweeps chosen on the validation users; keeps the
  result as the run's one checkpoint (step 1, "epoch" 1). A run whose folder already
  holds it fits nothing again. Returns the training summary (as
  :func:`train_and_validate`), with the settings the fit chose (``chosen``)."""
  if isinstance(split, data_lib.PartSplit) or jax.process_count() > 1:
    raise ValueError(f"{cfg.model}: a closed-form fit reads every training row in one "
                     "process; run it without --partitioned_data, in one process")
  steps = built.steps
  if ck is not None and ck.best_step() is not None:
    meta = ck.restore_best(state_layout(cfg, built))[1]
    print(f"{cfg.model} was fitted already ({meta.get('chosen')}): nothing to fit",
          flush=True)
    return {"best_validation": meta.get("best_metrics") or {}, "best_epoch": 1,
            "stopped": None, "chosen": meta.get("chosen") or {}}
  log = None
  if ck is not None and jax.process_index() == 0:
    log = run_folder.MetricsLog(workdir)
    log.truncate_after(0)
    run_folder.write_run_files(cfg, workdir, split, 0)
  sweep_steps: dict = {}

  def score(model, params):
    if model not in sweep_steps:
      sweep_steps[model] = parallel_lib.make_parallel_steps(
          model, built.options, mode=cfg.parallel, devices=steps.devices,
          ks=VALIDATION_KS)
    return evaluate(sweep_steps[model], sweep_steps[model].replicate(params),
                    split.validation, cfg.batch_size_validation)

  def report(record):
    if log is not None:
      log.write(record)
    print("  ".join([" ".join(f"{k} {v:g}" for k, v in record["swept"].items()),
                     *(f"val {k[4:]} {record[k]:.4f}" for k in
                       ("val_ndcg@100", "val_recall@20", "val_recall@50"))]), flush=True)

  batcher = data_lib.TrainBatcher(split.train, cfg.batch_size_train, seed=cfg.seed)
  problem = model_lib.ClosedFormProblem(
      lambda: batcher.epoch_batches(0), split.n_items, split.n_train_users,
      steps.devices[0], score if split.validation is not None else None, report)
  t0 = time.perf_counter()
  fitted = model_lib.model_entry(cfg.model).fit(cfg.model_settings, problem)
  fit_s = time.perf_counter() - t0
  params, chosen = fitted.params, model_lib.settings_json(
      cfg.replace(**fitted.chosen).model_settings)
  state = steps.init_state(_state_of(cfg, built, params))
  standing = Standing(best_epoch=1)
  record = {"split": "train", "epoch": 1, "step": 1, "chosen": chosen,
            "fit_time_s": fit_s, "epoch_time_s": fit_s,
            "users_per_s": split.n_train_users / fit_s}
  if split.validation is not None:
    vm = evaluate(steps, state, split.validation, cfg.batch_size_validation)
    standing.best = vm[BEST_METRIC]
    standing.best_metrics = {k: vm[k] for k in ("ndcg@100", "recall@20", "recall@50")}
    record.update({f"val_{k}": v for k, v in standing.best_metrics.items()})
  record["best_val_ndcg@100"] = standing.best if standing.best > -math.inf else None
  check_finite_params(params, cfg.model)
  record["checkpointed"] = ck is not None
  if ck is not None:
    ck.save_best(1, steps.to_host(state), {**standing.meta(1), "chosen": chosen},
                 {BEST_METRIC: standing.best if standing.best > -math.inf else 1.0})
  if log is not None:
    log.write(record)
  if on_epoch is not None:
    on_epoch(dict(record))
  line = f"fitted {cfg.model} with {fitted.summary} in {fit_s:.2f}s"
  if "val_ndcg@100" in record:
    line += (f"  val ndcg@100 {record['val_ndcg@100']:.4f}  recall@20 "
             f"{record['val_recall@20']:.4f}  recall@50 {record['val_recall@50']:.4f}")
  print(line, flush=True)
  return {"best_validation": standing.best_metrics, "best_epoch": 1, "stopped": None,
          "chosen": chosen, "fit_time_s": fit_s}


def check_finite_params(params, model_name: str) -> None:
  """Raises :class:`TrainingDivergedError` when a fitted parameter is NaN / inf (a
  factorisation that failed), before anything is saved."""
  bad = [jax.tree_util.keystr(path) for path, leaf in
         jax.tree_util.tree_flatten_with_path(params)[0]
         if not bool(jnp.all(jnp.isfinite(leaf)))]
  if bad:
    raise TrainingDivergedError(f"{model_name}: the fit gave NaN/inf in {', '.join(bad)} "
                                "(the matrix was not positive definite in float32: raise "
                                "--l2)")


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


def _print_epoch(r: dict) -> None:
  line = (f"epoch {r['epoch']:4d}  loss {r.get('loss', float('nan')):9.3f}  "
          f"beta {r.get('beta', 0):.4f}  time {r['epoch_time_s']:7.2f}s  "
          f"{r['users_per_s']:10.0f} users/s")
  if "val_ndcg@100" in r:
    line += (f"  val ndcg@100 {r['val_ndcg@100']:.4f}  recall@20 {r['val_recall@20']:.4f}"
             f"  recall@50 {r['val_recall@50']:.4f}")
  print(line, flush=True)


def test_best(cfg: configs.Config, workdir: str, split: data_lib.Split,
              ck: checkpoint_lib.RunCheckpoints, built: Built) -> dict:
  """Scores the best checkpoint of ``workdir`` on the test users."""
  steps = built.steps
  restored = ck.restore_best(state_layout(cfg, built))
  if restored is None:
    raise FileNotFoundError(
        f"{workdir}: no trained checkpoint to test; run with --train first")
  state, meta = restored
  acc = metrics_lib.MetricAccumulator()
  result = evaluate(steps, steps.init_state(state), split.test, cfg.batch_size_validation,
                    accumulator=acc)
  result["epoch"] = meta.get("epoch")
  if isinstance(split.test, data_lib.PartEvalSplit):
    return result  # users come back in block order, and each process has its rows only
  users = acc.users()
  popularity = catalogue.item_popularity(split.train)
  result.update(catalogue.catalogue_metrics(users["top"], popularity,
                                            split.n_train_users, cfg.test_ks))
  if jax.process_index() == 0:
    per_user.write(os.path.join(workdir, per_user.FILE), split.test.user_ids, users,
                   split.item_ids, popularity,
                   {"split": split_identity(cfg, split), "epoch": meta.get("epoch"),
                    "run": {"model": cfg.model, "seed": cfg.seed},
                    "summary": {k: v for k, v in result.items()
                                if isinstance(v, (int, float))}})
  return result


def split_identity(cfg: configs.Config, split: data_lib.Split) -> dict:
  """What two tested runs must share to be compared user by user: the data settings,
  the item table and the test users."""
  ident = run_folder.identity(cfg, split)
  # Validation targets come out of the training rows, never out of the test users' rows
  # or targets: a run with and one without them (a refit) test the same users.
  settings = {k: v for k, v in data_settings(cfg).items() if k != "validation_fraction"}
  return {**settings, **{k: ident[k] for k in (
      "dataset", "protocol", "n_items", "n_train_users", "items_digest")},
          "n_test_users": int(split.test.n_users),
          # The digest the item table gets, over the test users' raw ids.
          "test_users_digest": run_folder.items_digest(split.test.user_ids)}


def format_catalogue(result: dict, ks) -> str:
  """The test's beyond-accuracy metrics (:mod:`jax_vaecf.catalogue`) as one line."""
  parts = [f"{name}@{k} {result[f'{name}@{k}']:.4g}"
           for k in sorted(set(int(k) for k in ks))
           for name in catalogue.CATALOGUE_METRICS if f"{name}@{k}" in result]
  return "catalogue: " + "  ".join(parts) if parts else ""


def format_test(result: dict, ks) -> str:
  parts = []
  for k in sorted(set(int(k) for k in ks)):
    for name in ("ndcg", "recall"):
      key = f"{name}@{k}"
      if key in result:
        parts.append(f"{key} {result[key]:.4f} (+-{result[key + '_se']:.4f})")
  return (f"test ({result['n_users']} users, {result['n_excluded']} without held-out "
          f"items; best epoch {result.get('epoch')}): " + "  ".join(parts))


def resolve_precision(cfg: configs.Config) -> configs.Config:
  """``cfg`` with ``--precision=auto`` replaced by the measured choice: ``bf16`` when the
  step's large products run at least ``machine.AUTO_BF16_SPEEDUP`` times faster in it
  on the run's first device (:func:`jax_vaecf.machine.bf16_speedup`), else ``fp32``.
  Any other precision is returned unchanged."""
  if cfg.precision != configs.AUTO_PRECISION:
    return cfg
  if jax.process_count() > 1:
    # Each process would measure its own machine, and processes that chose differently
    # would run different programs against each other's collectives.
    raise ValueError("bad setting: --precision=auto measures one machine; give "
                     "--precision=fp32 or bf16 in a multi-process run")
  from jax_vaecf import machine  # pylint: disable=import-outside-toplevel
  device = select_devices(cfg)[0]
  speedup = machine.bf16_speedup(device)
  chosen = "bf16" if speedup >= machine.AUTO_BF16_SPEEDUP else "fp32"
  print(f"precision auto: {chosen} (the step's large products run {speedup:.2f}x as fast "
        f"in bf16 as in fp32 on this {device.platform} device)", flush=True)
  return cfg.replace(precision=chosen)


def run(cfg: configs.Config, workdir: str, *,
        on_validation: OnValidation | None = None, on_epoch: OnEpoch | None = None,
        split: data_lib.Split | None = None) -> dict:
  """Runs the modes the config asks for; returns their results. ``on_validation`` and
  ``on_epoch``: see :func:`train_and_validate`. ``split``: the data, when it is not
  the config's data set (``cfg.dataset`` is then :data:`IN_MEMORY`), before the per-user
  protocol's validation targets are cut from it (the run cuts them)."""
  configs.validate(cfg)
  select_devices(cfg)  # fail before any data work
  # One process writes the folder (see start); it alone holds the folder's lock.
  lock = run_folder.prepare_workdir(cfg, workdir, lock=jax.process_index() == 0)
  try:
    results = _run_claimed(cfg, workdir, on_validation, on_epoch, split)
  except BaseException:
    if lock is not None:
      lock.release(remove_if_unused=True)  # a run that wrote nothing leaves no folder
    raise
  if lock is not None:
    lock.release()
  return results


def _run_claimed(cfg: configs.Config, workdir: str,
                 on_validation: OnValidation | None, on_epoch: OnEpoch | None,
                 given: data_lib.Split | None) -> dict:
  """:func:`run` once the workdir is checked and claimed."""
  cfg = resolve_precision(cfg)
  if cfg.train or cfg.test:
    run_folder.check_same_run(cfg, workdir)
  split = load_data(cfg) if given is None else with_validation(cfg, given)
  print(data_lib.format_stats(split.stats()), flush=True)
  n_items = split.n_items
  too_big = [k for k in cfg.test_ks if int(k) > n_items]
  if too_big:
    raise ValueError(f"bad setting: test_ks {too_big} exceed the {n_items} items")
  if n_items < max(VALIDATION_KS):
    raise ValueError(f"{cfg.dataset}: {n_items} items after preprocessing; validation "
                     f"ranks the top {max(VALIDATION_KS)} and needs at least that many")
  check_memory = model_lib.model_entry(cfg.model).check_memory
  if check_memory is not None:
    check_memory(n_items, select_devices(cfg)[0])
  built = build(cfg, n_items, split.n_train_users)
  results: dict = {}
  os.makedirs(workdir, exist_ok=True)
  ck = None
  if cfg.train or cfg.test:
    # Test mode alone only reads: a run still training in the workdir is not disturbed.
    ck = checkpoint_lib.RunCheckpoints(workdir, run_folder.identity(cfg, split),
                                       keep_best=cfg.keep_best, best_metric=BEST_METRIC,
                                       read_only=not cfg.train)
  try:
    if (cfg.train or cfg.benchmark) and model_lib.model_entry(cfg.model).fit:
      results["train"] = fit_closed_form(cfg, workdir, split, ck if cfg.train else None,
                                         built, on_epoch=on_epoch)
    elif cfg.train or cfg.benchmark:
      results["train"] = train_and_validate(cfg, workdir, split,
                                            ck if cfg.train else None, built,
                                            on_validation=on_validation,
                                            on_epoch=on_epoch)
      if cfg.benchmark:
        print(format_benchmark(results["train"]), flush=True)
    if cfg.test:
      results["test"] = test_best(cfg, workdir, split, ck, built)
      print(format_test(results["test"], cfg.test_ks), flush=True)
      if format_catalogue(results["test"], cfg.test_ks):
        print(format_catalogue(results["test"], cfg.test_ks), flush=True)
      if jax.process_index() == 0:
        run_folder.MetricsLog(workdir).write({"split": "test", **results["test"]})
  finally:
    if ck is not None:
      ck.close()
  if cfg.refit:
    results["refit"] = refit(cfg, workdir, results["train"], on_epoch=on_epoch,
                             split=given)
  return results


REFIT_FOLDER = "refit"


def refit_config(cfg: configs.Config, train_summary: dict) -> configs.Config:
  """The refit run's settings: the validated run's, on the full training rows
  (``validation_fraction`` 0), for its best epoch's number of epochs (a closed-form
  model: with the settings its fit chose), no early stop, the same seed and schedule."""
  epochs = train_summary.get("best_epoch")
  if not epochs:
    raise ValueError("refit: the validated run chose no epoch (did it validate?)")
  changes = dict(validation_fraction=0.0, number_of_epochs=int(epochs), early_stopping=0,
                 refit=False)
  return cfg.replace(**changes, **(train_summary.get("chosen") or {}))


def refit(cfg: configs.Config, workdir: str, train_summary: dict, *,
          on_epoch: OnEpoch | None = None, split: data_lib.Split | None = None) -> dict:
  """Trains (and with ``cfg.test`` tests) the refit run in ``WORKDIR/refit``
  (:func:`refit_config`); returns its results. A refit folder holding another number of
  epochs (the validated run chose again since) is refused, not mixed."""
  sub = os.path.join(workdir, REFIT_FOLDER)
  rcfg = refit_config(cfg, train_summary)
  if os.path.exists(os.path.join(sub, "config.json")):
    had = run_folder.read_run_config(sub).get("number_of_epochs")
    if had != rcfg.number_of_epochs:
      raise ValueError(f"{sub} holds a refit of {had} epochs; the validated run now "
                       f"chooses {rcfg.number_of_epochs}. Remove that folder to refit again")
  print(f"refit: {rcfg.number_of_epochs} epochs on every training item in {sub}",
        flush=True)
  return run(rcfg, sub, on_epoch=on_epoch, split=split)


def format_benchmark(s: dict) -> str:
  if "mean_epoch_time_s" not in s:
    return "benchmark: no epoch after the warm-up epochs; raise --number_of_epochs"
  line = (f"benchmark: {s['measured_epochs']} epochs after warm-up, mean epoch "
          f"{s['mean_epoch_time_s']:.3f}s, {s['train_users_per_s']:.0f} training users/s")
  if "mean_validation_time_s" in s:
    line += f", validation {s['mean_validation_time_s']:.3f}s"
  return line
