"""The train / test / benchmark workflow behind ``python -m experiments.train``.

One clear loop: load (or build and cache) the split, resume from the workdir's latest
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
import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import configs
from experiments.progress import Progress
from jax_vaecf import checkpoint as checkpoint_lib
from jax_vaecf import data as data_lib
from jax_vaecf import metrics as metrics_lib
from jax_vaecf import distributed
from jax_vaecf import files as files_lib
from jax_vaecf import model as model_lib
from jax_vaecf import parallel as parallel_lib
from jax_vaecf import precision as precision_lib
from jax_vaecf import schedules
from jax_vaecf import train as train_lib

VALIDATION_KS = (20, 50, 100)
BEST_METRIC = "ndcg@100"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jax_vaecf")


# ---------------------------------------------------------------------------- data


def load_data(cfg: configs.Config) -> data_lib.Split:
  """The split the config asks for, from the cache when it is there."""
  options: dict[str, Any] = {}
  per_file_pair = cfg.dataset == "ngcf" or (cfg.dataset == "ml-100k" and cfg.fold)
  if cfg.dataset in ("ml-20m_alt", "vaecf_dir") or per_file_pair:
    pass
  elif cfg.protocol == "heldout_users":
    options.update(seed=cfg.split_seed, heldout_fraction=cfg.heldout_fraction)
    if cfg.n_heldout_users:
      options["n_heldout_users"] = cfg.n_heldout_users
  else:
    options["seed"] = cfg.split_seed
  if cfg.dataset == "csv":
    # The flags' text forms, in read_delimited's terms (validate checked them).
    columns = [c.strip() for c in cfg.csv_columns.split(",")] if cfg.csv_columns else None
    options.update(
        delimiter="\t" if cfg.csv_delimiter in ("tab", "\\t") else cfg.csv_delimiter,
        columns=None if columns is None else tuple(
            int(c) if c.isdigit() else (c or None) for c in columns),
        header={"auto": None, "yes": True, "no": False}[cfg.csv_header],
        threshold=None if cfg.csv_all_positive else cfg.csv_threshold)
  if not os.path.exists(cfg.data_dir) and not cfg.download:
    raise FileNotFoundError(
        f"--data_dir={cfg.data_dir!r} does not exist; point it at the folder holding the "
        f"{cfg.dataset} files" + (" or add --download" if cfg.dataset.startswith("ml-")
                                  else ""))
  t0 = time.perf_counter()

  def report(stage: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] preprocessing {cfg.dataset}: {stage}",
          file=sys.stderr, flush=True)

  split = data_lib.load_split(cfg.dataset, cfg.data_dir,
                              cache_dir=cfg.cache_dir or DEFAULT_CACHE,
                              download=cfg.download, protocol=cfg.protocol,
                              fold=cfg.fold or None, progress=report, **options)
  return split


def identity(cfg: configs.Config, split: data_lib.Split) -> dict:
  """What a checkpoint must match to be resumed or tested: model shape and data."""
  ids = np.ascontiguousarray(split.item_ids)
  return {
      "model": cfg.model,
      "n_items": int(split.n_items),
      "hidden_dims": [int(h) for h in resolved_hidden_dims(cfg)],
      "latent_dim": int(cfg.latent_dim),
      "dataset": cfg.dataset,
      "protocol": split.protocol,
      "n_train_users": int(split.train.shape[0]),
      "items_digest": hashlib.sha256(
          "\n".join(str(i) for i in ids.tolist()).encode()).hexdigest()[:16],
    # The checkpointed state has ema_params exactly when the run keeps an average; the
    # key is left out otherwise, so workdirs written before averaging existed still match.
  } | ({"weight_average": True} if cfg.ema_decay > 0 else {})


def fresh_state(cfg: configs.Config, model, optimizer) -> train_lib.TrainState:
  """The run's initial state (also the layout its checkpoints are restored into)."""
  return train_lib.create_train_state(
      model, optimizer, jax.random.PRNGKey(cfg.seed),
      loss_scaling=precision_lib.get_policy(cfg.precision).loss_scaling,
      weight_average=cfg.ema_decay > 0)


def resolved_hidden_dims(cfg: configs.Config) -> tuple[int, ...]:
  if cfg.hidden_dims:
    return tuple(int(h) for h in cfg.hidden_dims)
  return (600,) if cfg.model == "multvae" else (200,)


# -------------------------------------------------------------------------- pieces


def build(cfg: configs.Config, n_items: int):
  """Model, optimiser, KL schedule and the (parallel) step functions of a config."""
  policy = precision_lib.get_policy(cfg.precision)
  model = model_lib.build_model(cfg.model, n_items, hidden_dims=resolved_hidden_dims(cfg),
                                latent_dim=cfg.latent_dim, dropout_rate=cfg.dropout_rate,
                                dtype=policy.compute_dtype)
  optimizer = train_lib.make_optimizer(cfg.lr, b1=cfg.adam_b1, b2=cfg.adam_b2)
  schedule = schedules.get_schedule(cfg.anneal_schedule, cap=cfg.anneal_cap,
                                    total_anneal_steps=cfg.total_anneal_steps,
                                    cycle_steps=cfg.anneal_cycle_steps)
  devices = select_devices(cfg)
  precision_lib.check_backend_supports(policy, devices[0].platform)
  input_format = cfg.input_format
  if input_format == "auto":
    input_format = train_lib.default_input_format(devices[0].platform)
  ks = tuple(sorted(set(VALIDATION_KS) | set(int(k) for k in cfg.test_ks)))
  steps = parallel_lib.make_parallel_steps(
      model, optimizer, schedule, mode=cfg.parallel, devices=devices, lam=cfg.lam,
      input_format=input_format, loss_scaling=policy.loss_scaling,
      output_chunk_size=cfg.output_chunk_size, ema_decay=cfg.ema_decay, ks=ks)
  return model, optimizer, steps


def select_devices(cfg: configs.Config) -> list:
  """``--gpu_number`` (one chosen local device) or ``--number_of_devices`` (0 = all)."""
  if cfg.gpu_number >= 0:
    local = jax.local_devices()
    if cfg.gpu_number >= len(local) or jax.process_count() > 1:
      raise ValueError(f"--gpu_number={cfg.gpu_number}: this process has {len(local)} "
                       f"local devices ({local[0].platform}); single-process runs only")
    return [local[cfg.gpu_number]]
  return parallel_lib.resolve_devices(cfg.number_of_devices)


def _own_shards(batches):
  """This process's shards of each global batch (all of them in a one-process run)."""
  n, i = jax.process_count(), jax.process_index()
  for b in batches:
    yield b if n == 1 else distributed.process_shards(b, i, n)


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


def evaluate(steps, params, split: data_lib.EvalSplit, batch_size: int) -> dict:
  """Mean (and standard error) of every metric over the split's users with held-out items."""
  acc = metrics_lib.MetricAccumulator()
  batches = data_lib.eval_batches(split, batch_size, num_shards=steps.num_shards)
  for _, out in _pipelined(steps.eval_step, params, _own_shards(batches),
                                    steps.put_batch):
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


def _mean_of(host: list[dict]) -> dict:
  """The epoch's record of per-step metrics already on the host."""
  if not host:
    return {}
  keys = ("loss", "nll", "kl")
  out = {k: float(np.mean([m[k] for m in host])) for k in keys}
  out["beta"] = float(host[-1]["beta"])
  out["skipped_steps"] = int(host[-1]["skipped_steps"])
  out["loss_scale"] = float(host[-1]["loss_scale"])
  return out


# ---------------------------------------------------------------------------- modes


class TrainingDivergedError(RuntimeError):
  """The loss or the parameters stopped being finite: the run cannot go on."""


def resume_point(cfg: configs.Config, workdir: str, ck: checkpoint_lib.RunCheckpoints,
                 state: train_lib.TrainState, log: MetricsLog | None
                 ) -> tuple[train_lib.TrainState, int, float]:
  """``(state, epoch, best)`` to continue from: the newest readable latest checkpoint,
  else (with a warning) the newest state of the best set, else epoch 0.

  Raises ``ValueError`` when the metrics log shows that checkpoints were saved but none
  can be read, rather than training again from epoch 0 over that log.
  """
  reason = "no checkpoint in checkpoints/latest"
  try:
    restored = ck.restore_latest(state)
  except checkpoint_lib.CheckpointUnreadableError as e:
    restored, reason = None, str(e)
  if restored is not None:
    state, meta = restored
    return state, int(meta["epoch"]), float(meta["best"])
  saved = log.checkpointed_epochs() if log is not None else []
  if not saved:
    return state, 0, -math.inf  # a run killed before its first checkpoint: start over
  try:
    fallback = ck.restore_newest_best(state)
  except checkpoint_lib.CheckpointUnreadableError as e:
    fallback, reason = None, f"{reason}; {e}"
  if fallback is not None and "best" in fallback[1]:
    state, meta = fallback
    warnings.warn(f"{workdir}: {reason}; resuming from the best checkpoint's state of "
                  f"epoch {meta['epoch']} instead (later epochs are trained again)",
                  RuntimeWarning, stacklevel=2)
    return state, int(meta["epoch"]), float(meta["best"])
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
                + (f" and {len(bad_leaves) - 4} more arrays" if len(bad_leaves) > 4 else ""))
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


def train_and_validate(cfg: configs.Config, workdir: str, split: data_lib.Split,
                       ck: checkpoint_lib.RunCheckpoints | None, steps, model, optimizer,
                       *, stop_after_epochs: int | None = None) -> dict:
  """Trains ``cfg.number_of_epochs`` epochs (resuming), validating and checkpointing.

  ``ck`` is None in pure benchmark runs (nothing is written). Returns the benchmark
  summary and the best validation metrics. Raises :class:`TrainingDivergedError` (after
  logging it) when the loss or the parameters stop being finite.
  """
  state = fresh_state(cfg, model, optimizer)
  start_epoch, best = 0, -math.inf
  # In a multi-process run every process computes the same records; one writes them.
  log = MetricsLog(workdir) if ck is not None and jax.process_index() == 0 else None
  if ck is not None:
    state, start_epoch, best = resume_point(cfg, workdir, ck, state, log)
    if start_epoch:
      logging.info("resuming %s after epoch %d (step %d)", workdir, start_epoch,
                   int(state.step))
      print(f"resumed from epoch {start_epoch}", flush=True)
    if log is not None:
      log.truncate_after(start_epoch)
      _write_run_files(cfg, workdir, split, start_epoch)
  last_saved_epoch = start_epoch
  state = steps.init_state(state)
  batcher = data_lib.TrainBatcher(split.train, cfg.batch_size_train, seed=cfg.seed,
                                  num_shards=steps.num_shards)
  n_users = split.train.shape[0]
  epoch_times, val_times = [], []
  best_metrics: dict = {}
  last_epoch = cfg.number_of_epochs
  for epoch in range(start_epoch, cfg.number_of_epochs):
    t0 = time.perf_counter()
    step_metrics = []
    with Progress(batcher.steps_per_epoch, f"epoch {epoch + 1}") as bar:
      for batch in data_lib.prefetch(_own_shards(batcher.epoch_batches(epoch)),
                                     size=cfg.prefetch, put=steps.put_batch):
        state, m = steps.train_step(state, batch)
        step_metrics.append(m)
        bar.update()
    jax.block_until_ready(state)
    epoch_time = time.perf_counter() - t0
    epoch_times.append(epoch_time)
    host_metrics = [steps.metrics_to_host(m) for m in step_metrics]  # once per epoch
    done = epoch + 1
    try:
      check_finite(cfg, state, host_metrics, done, last_saved_epoch)
    except TrainingDivergedError as e:
      if log is not None:
        log.write({"split": "diverged", "epoch": done, "message": str(e)})
      raise
    record = {"split": "train", "epoch": done,
              "step": int(steps.to_host(state.step)), **_mean_of(host_metrics),
              "epoch_time_s": epoch_time,
              "users_per_s": n_users / epoch_time}
    validate_now = split.validation is not None and (
        done % cfg.validation_step == 0 or done == last_epoch)
    host_state = None
    if validate_now:
      t1 = time.perf_counter()
      vm = evaluate(steps, state, split.validation,
                    cfg.batch_size_validation)
      val_times.append(time.perf_counter() - t1)
      record.update({f"val_{k}": vm[k] for k in ("ndcg@100", "recall@20", "recall@50")})
      record["val_time_s"] = val_times[-1]
      if vm[BEST_METRIC] > best:
        best = vm[BEST_METRIC]
        best_metrics = {k: vm[k] for k in ("ndcg@100", "recall@20", "recall@50")}
        if ck is not None:
          host_state = steps.to_host(state)
          if not ck.has_best(record["step"]):
            ck.save_best(record["step"], host_state, {"epoch": done, "best": best},
                         {BEST_METRIC: best})
    elif split.validation is None and done == last_epoch and ck is not None:
      # Per-user protocol: no validation users, so the final model is the one tested.
      host_state = steps.to_host(state)
      if not ck.has_best(record["step"]):
        ck.save_best(record["step"], host_state, {"epoch": done, "best": best},
                     {BEST_METRIC: done})
    record["best_val_ndcg@100"] = best if best > -math.inf else None
    record["checkpointed"] = ck is not None and (
        done % cfg.checkpoint_every == 0 or done == last_epoch)
    if record["checkpointed"]:
      host_state = host_state if host_state is not None else steps.to_host(state)
      ck.save_latest(record["step"], host_state, {"epoch": done, "best": best})
      last_saved_epoch = done
    if log is not None:
      log.write(record)
    _print_epoch(record)
    if stop_after_epochs is not None and done - start_epoch >= stop_after_epochs:
      break
  summary = {"best_validation": best_metrics}
  measured = epoch_times[cfg.warm_up_epochs:] if len(epoch_times) > cfg.warm_up_epochs else []
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
              ck: checkpoint_lib.RunCheckpoints, steps, model, optimizer) -> dict:
  """Scores the best checkpoint of ``workdir`` on the test users."""
  restored = ck.restore_best(fresh_state(cfg, model, optimizer))
  if restored is None:
    raise FileNotFoundError(
        f"{workdir}: no trained checkpoint to test; run with --train first")
  state, meta = restored
  result = evaluate(steps, steps.init_state(state), split.test, cfg.batch_size_validation)
  result["epoch"] = meta.get("epoch")
  return result


def format_test(result: dict, ks) -> str:
  parts = []
  for k in sorted(set(int(k) for k in ks)):
    for name in ("ndcg", "recall"):
      key = f"{name}@{k}"
      if key in result:
        parts.append(f"{key} {result[key]:.4f} (+-{result[key + '_se']:.4f})")
  return (f"test ({result['n_users']} users, {result['n_excluded']} without held-out "
          f"items; best epoch {result.get('epoch')}): " + "  ".join(parts))


def prepare_workdir(cfg: configs.Config, workdir: str) -> None:
  """Checks, before any data work, that ``workdir`` can hold this run.

  It must be a folder (created if missing) that can be written when the run trains or
  tests. When it already holds a run, the settings that shape what is trained must be
  those in its ``config.json`` (``configs.RESUMABLE_FIELDS`` may change); otherwise
  ``ValueError`` lists the differences, so a record of a run never describes settings
  its checkpoints were not trained with.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir}: this is a file, expected a folder for the run")
  if not (cfg.train or cfg.test):
    return  # benchmark only: nothing is written
  try:
    os.makedirs(workdir, exist_ok=True)
    with files_lib.atomic_write(os.path.join(workdir, ".write-test"), "wb"):
      pass
    os.remove(os.path.join(workdir, ".write-test"))
  except OSError as e:
    raise ValueError(f"--workdir={workdir}: cannot write there ({e.strerror or e})") from None
  if cfg.train and _holds_a_run(workdir):
    changed = config_changes(_saved_config(workdir), cfg)
    fixed = {k: v for k, v in changed.items() if k not in configs.RESUMABLE_FIELDS}
    if fixed:
      lines = "; ".join(f"--{k}: the run has {a!r}, this command asks {b!r}"
                        for k, (a, b) in sorted(fixed.items()))
      raise ValueError(
          f"{workdir} holds a run trained with other settings ({lines}). Resuming would "
          "mix them; use another --workdir, or the run's own settings")


def _holds_a_run(workdir: str) -> bool:
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
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not found") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: expected a JSON object of settings")
  return saved


def _saved_config(workdir: str) -> dict:
  try:
    return read_run_config(workdir)
  except FileNotFoundError as e:
    raise ValueError(f"{e}, but the workdir holds checkpoints; cannot tell what they "
                     "were trained with. Use another --workdir") from None


def _as_json(cfg: configs.Config) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def config_changes(saved: dict, cfg: configs.Config) -> dict:
  """``{field: (saved value, new value)}`` for each setting that differs (a field the
  saved config lacks counts as its default)."""
  now = _as_json(cfg)
  default = _as_json(configs.Config())
  return {k: (saved.get(k, default[k]), v) for k, v in now.items()
          if saved.get(k, default[k]) != v}


def run(cfg: configs.Config, workdir: str) -> dict:
  """Runs the modes the config asks for; returns their results."""
  configs.validate(cfg)
  select_devices(cfg)  # fail before any data work
  prepare_workdir(cfg, workdir)
  split = load_data(cfg)
  print(data_lib.format_stats(split.stats()), flush=True)
  n_items = split.n_items
  too_big = [k for k in cfg.test_ks if int(k) > n_items]
  if too_big:
    raise ValueError(f"bad setting: test_ks {too_big} exceed the {n_items} items")
  if n_items < max(VALIDATION_KS):
    raise ValueError(f"{cfg.dataset}: {n_items} items after preprocessing; validation "
                     f"ranks the top {max(VALIDATION_KS)} and needs at least that many")
  model, optimizer, steps = build(cfg, n_items)
  results: dict = {}
  os.makedirs(workdir, exist_ok=True)
  ck = None
  if cfg.train or cfg.test:
    # Test mode alone only reads: a run still training in the workdir is not disturbed.
    ck = checkpoint_lib.RunCheckpoints(workdir, identity(cfg, split),
                                       keep_best=cfg.keep_best, best_metric=BEST_METRIC,
                                       read_only=not cfg.train)
  try:
    if cfg.train or cfg.benchmark:
      results["train"] = train_and_validate(cfg, workdir, split,
                                            ck if cfg.train else None, steps, model,
                                            optimizer)
      if cfg.benchmark:
        print(format_benchmark(results["train"]), flush=True)
    if cfg.test:
      results["test"] = test_best(cfg, workdir, split, ck, steps, model, optimizer)
      print(format_test(results["test"], cfg.test_ks), flush=True)
      if jax.process_index() == 0:
        MetricsLog(workdir).write({"split": "test", **results["test"]})
  finally:
    if ck is not None:
      ck.close()
  return results


def format_benchmark(s: dict) -> str:
  if "mean_epoch_time_s" not in s:
    return "benchmark: no epoch after the warm-up epochs; raise --number_of_epochs"
  line = (f"benchmark: {s['measured_epochs']} epochs after warm-up, mean epoch "
          f"{s['mean_epoch_time_s']:.3f}s, {s['train_users_per_s']:.0f} training users/s")
  if "mean_validation_time_s" in s:
    line += f", validation {s['mean_validation_time_s']:.3f}s"
  return line


def _write_run_files(cfg: configs.Config, workdir: str, split: data_lib.Split,
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
  files_lib.write_text_atomic(path, json.dumps(_as_json(cfg), indent=1))
  with files_lib.atomic_write(os.path.join(workdir, "item_ids.npy"), "wb") as f:
    np.save(f, np.asarray(split.item_ids), allow_pickle=False)
