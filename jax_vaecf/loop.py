"""The training engine: the train / test / benchmark workflow of a run folder.

``python -m experiments.train`` and every other tool run it; so does
:func:`jax_vaecf.api.fit`. :func:`run` claims the folder, takes the split
(:mod:`jax_vaecf.data.run_split`), builds the model and its placed steps (:func:`build`),
trains (:mod:`jax_vaecf.epochs`: the epoch loop; :mod:`jax_vaecf.checkpoint_choice`: which
states are kept) or fits a closed-form model, and scores the best checkpoint on the test
users (:mod:`jax_vaecf.evaluation`). What happens is told to a reporter
(:mod:`jax_vaecf.reporting`; the command line's prints it), never printed here.

A run is deterministic: batch order comes from ``(seed, epoch)``, dropout and noise from
``(seed, step)``. A run killed at any moment and restarted with the same workdir resumes
from its last complete checkpoint, replays the epochs after it, and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp

from jax_vaecf import checkpoint as checkpoint_lib
from jax_vaecf import configs
from jax_vaecf import data as data_lib
from jax_vaecf import ease
from jax_vaecf import finite
from jax_vaecf import model as model_lib
from jax_vaecf import parallel as parallel_lib
from jax_vaecf import precision as precision_lib
from jax_vaecf import reporting
from jax_vaecf import run_folder
from jax_vaecf import schedules
from jax_vaecf import train as train_lib
# The engine's parts, under the names the tools and the tests have always used.
from jax_vaecf.checkpoint_choice import (Standing, resume_point, save_latest,  # pylint: disable=unused-import
                                         validate_and_keep_best)
from jax_vaecf.data.run_split import (DATA_SETTINGS, DEFAULT_CACHE, IN_MEMORY,  # pylint: disable=unused-import
                                      csv_reader_options, data_settings, load_data,
                                      split_interactions, with_validation)
from jax_vaecf.epochs import (OnEpoch, OnValidation, TrainingDivergedError,  # pylint: disable=unused-import
                              check_finite, passes_per_epoch, start, train_and_validate,
                              train_batcher, train_epoch)
from jax_vaecf.evaluation import (BEST_METRIC, VALIDATION_KS, evaluate,  # pylint: disable=unused-import
                                  split_identity, test_best)
from jax_vaecf.reporting import format_benchmark, format_catalogue, format_test  # pylint: disable=unused-import
from jax_vaecf.run_state import (Built, fresh_state, optimizer,  # pylint: disable=unused-import
                                 placed_fresh_state, state_layout)


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
  entry = model_lib.model_entry(cfg.model)
  return model_lib.build_model(
      cfg.model, n_items, hidden_dims=configs.hidden_dims_of(cfg),
      latent_dim=cfg.latent_dim, dropout_rate=cfg.dropout_rate,
      dtype=precision_lib.get_policy(cfg.precision).compute_dtype,
      **{name: getattr(cfg, name) for name in entry.extra})


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
  """Fits a closed-form model (EASE, :mod:`jax_vaecf.ease`): the Gram matrix from the
  training rows' batches on the run's first device, then each ``l2`` scored on the
  validation users from one eigendecomposition (a single ``l2``: a Cholesky fit), the
  best kept as the run's one checkpoint (step 1, "epoch" 1). A run whose folder already
  holds it fits nothing again. Returns the training summary (as
  :func:`train_and_validate`), with the chosen ``l2``."""
  if isinstance(split, data_lib.PartSplit) or jax.process_count() > 1:
    raise ValueError(f"{cfg.model}: a closed-form fit reads every training row in one "
                     "process; run it without --partitioned_data, in one process")
  steps = built.steps
  if ck is not None and ck.best_step() is not None:
    meta = ck.restore_best(state_layout(cfg, built))[1]
    print(f"{cfg.model} was fitted already (l2 {meta.get('l2')}): nothing to fit", flush=True)
    return {"best_validation": meta.get("best_metrics") or {}, "best_epoch": 1,
            "stopped": None, "l2": meta.get("l2")}
  log = None
  if ck is not None and jax.process_index() == 0:
    log = run_folder.MetricsLog(workdir)
    log.truncate_after(0)
    run_folder.write_run_files(cfg, workdir, split, 0)
  grid = ease.l2_values(cfg.l2)
  if len(grid) > 1 and split.validation is None:
    raise ValueError(f"bad setting: --l2 gives {len(grid)} values to choose from but the "
                     "split has no validation data; give one --l2 (or validation "
                     "users: --validation_fraction above 0 in the per-user protocol)")
  device = steps.devices[0]
  n_items = split.n_items
  t0 = time.perf_counter()
  batcher = data_lib.TrainBatcher(split.train, cfg.batch_size_train, seed=cfg.seed)
  gram = ease.gram_matrix(batcher.epoch_batches(0), n_items, device)
  jax.block_until_ready(gram)
  gram_s = time.perf_counter() - t0
  print(f"gram matrix of {split.n_train_users} users x {n_items} items: {gram_s:.2f}s",
        flush=True)
  sweep = []
  if len(grid) == 1:
    l2 = grid[0]
    b = ease.fit(gram, jnp.float32(l2))
  else:
    spectral = ease.Spectral(n_items)
    sweep_steps = parallel_lib.make_parallel_steps(
        spectral, built.options, mode=cfg.parallel, devices=steps.devices,
        ks=VALIDATION_KS)
    s, v = ease.spectrum(gram)  # gram donated
    del gram
    for value in grid:
      t1 = time.perf_counter()
      params = sweep_steps.replicate(ease.sweep_params(s, v, jnp.float32(value)))
      vm = evaluate(sweep_steps, params, split.validation, cfg.batch_size_validation)
      del params
      record = {"split": "l2_sweep", "l2": value,
                **{f"val_{k}": vm[k] for k in ("ndcg@100", "recall@20", "recall@50")},
                "val_time_s": time.perf_counter() - t1}
      sweep.append(record)
      if log is not None:
        log.write(record)
      print(f"l2 {value:10g}  val ndcg@100 {vm['ndcg@100']:.4f}  recall@20 "
            f"{vm['recall@20']:.4f}  recall@50 {vm['recall@50']:.4f}", flush=True)
    l2 = max(sweep, key=lambda r: r["val_ndcg@100"])["l2"]
    b = ease.fit_from_spectrum(s, v, jnp.float32(l2))
    del s, v
  params = ease.params_of(b, l2)
  fit_s = time.perf_counter() - t0
  state = steps.init_state(_state_of(cfg, built, params))
  standing = Standing(best_epoch=1)
  record = {"split": "train", "epoch": 1, "step": 1, "l2": l2, "fit_time_s": fit_s,
            "gram_time_s": gram_s, "epoch_time_s": fit_s,
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
    ck.save_best(1, steps.to_host(state), {**standing.meta(1), "l2": l2},
                 {BEST_METRIC: standing.best if standing.best > -math.inf else 1.0})
  if log is not None:
    log.write(record)
  if on_epoch is not None:
    on_epoch(dict(record))
  line = f"fitted {cfg.model} with l2 {l2:g} in {fit_s:.2f}s"
  if "val_ndcg@100" in record:
    line += (f"  val ndcg@100 {record['val_ndcg@100']:.4f}  recall@20 "
             f"{record['val_recall@20']:.4f}  recall@50 {record['val_recall@50']:.4f}")
  print(line, flush=True)
  return {"best_validation": standing.best_metrics, "best_epoch": 1, "stopped": None,
          "l2": l2, "l2_sweep": sweep, "fit_time_s": fit_s}


def check_finite_params(params, model_name: str) -> None:
  """Raises :class:`TrainingDivergedError` when a fitted parameter is NaN / inf (a
  factorisation that failed), before anything is saved."""
  finite.check_finite_params(params, lambda arrays: TrainingDivergedError(
      f"{model_name}: the fit gave NaN/inf in {arrays} (the matrix was not positive "
      "definite in float32: raise --l2)"))


def resolve_precision(cfg: configs.Config,
                      report: reporting.Report = reporting.log_record) -> configs.Config:
  """``cfg`` with ``--precision=auto`` replaced by the measured choice: ``bf16`` when the
  step's large products run at least ``machine.AUTO_BF16_SPEEDUP`` times faster in it
  on the run's first device (:func:`jax_vaecf.machine.bf16_speedup`), else ``fp32``
  (reported as a ``precision`` event). Any other precision is returned unchanged."""
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
  report({"event": "precision", "chosen": chosen, "speedup": speedup,
          "platform": device.platform})
  return cfg.replace(precision=chosen)


def run(cfg: configs.Config, workdir: str, *,
        on_validation: OnValidation | None = None, on_epoch: OnEpoch | None = None,
        split: data_lib.Split | None = None,
        report: reporting.Report | None = None) -> dict:
  """Runs the modes the config asks for; returns their results. ``on_validation`` and
  ``on_epoch``: see :func:`train_and_validate`. ``split``: the data, when it is not
  the config's data set (``cfg.dataset`` is then :data:`IN_MEMORY`), before the per-user
  protocol's validation targets are cut from it (the run cuts them). ``report``: called
  with each record of what happens (:mod:`jax_vaecf.reporting`; default: to the log)."""
  report = reporting.log_record if report is None else report
  configs.validate(cfg)
  select_devices(cfg)  # fail before any data work
  # One process writes the folder (see start); it alone holds the folder's lock.
  lock = run_folder.prepare_workdir(cfg, workdir, lock=jax.process_index() == 0)
  try:
    results = _run_claimed(cfg, workdir, on_validation, on_epoch, split, report)
  except BaseException:
    if lock is not None:
      lock.release(remove_if_unused=True)  # a run that wrote nothing leaves no folder
    raise
  if lock is not None:
    lock.release()
  return results


def _run_claimed(cfg: configs.Config, workdir: str,
                 on_validation: OnValidation | None, on_epoch: OnEpoch | None,
                 given: data_lib.Split | None, report: reporting.Report) -> dict:
  """:func:`run` once the workdir is checked and claimed."""
  cfg = resolve_precision(cfg, report)
  if cfg.train or cfg.test:
    run_folder.check_same_run(cfg, workdir)
  split = _checked_split(cfg, given, report)
  built = build(cfg, split.n_items, split.n_train_users)
  results: dict = {}
  os.makedirs(workdir, exist_ok=True)
  ck = None
  if cfg.train or cfg.test:
    # Test mode alone only reads: a run still training in the workdir is not disturbed.
    ck = checkpoint_lib.RunCheckpoints(workdir, run_folder.identity(cfg, split),
                                       keep_best=cfg.keep_best, best_metric=BEST_METRIC,
                                       read_only=not cfg.train)
  try:
    if (cfg.train or cfg.benchmark) and built.model.closed_form:
      results["train"] = fit_closed_form(cfg, workdir, split, ck if cfg.train else None,
                                         built, on_epoch=on_epoch)
    elif cfg.train or cfg.benchmark:
      results["train"] = train_and_validate(cfg, workdir, split,
                                            ck if cfg.train else None, built,
                                            on_validation=on_validation,
                                            on_epoch=on_epoch, report=report)
      if cfg.benchmark:
        report({"event": "benchmark", "summary": results["train"]})
    if cfg.test:
      results["test"] = test_best(cfg, workdir, split, ck, built)
      report({"event": "test", "result": results["test"], "ks": cfg.test_ks})
      if jax.process_index() == 0:
        run_folder.MetricsLog(workdir).write({"split": "test", **results["test"]})
  finally:
    if ck is not None:
      ck.close()
  if cfg.refit:
    results["refit"] = refit(cfg, workdir, results["train"], on_epoch=on_epoch,
                             split=given, report=report)
  return results


def _checked_split(cfg: configs.Config, given: data_lib.Split | None,
                   report: reporting.Report) -> data_lib.Split:
  """The run's split (``given``, or the config's), reported, once it is known to fit the
  run: every ``test_ks`` and validation's top 100 within its items, and the model's
  memory check passed."""
  split = load_data(cfg, report) if given is None else with_validation(cfg, given)
  report({"event": "data", "stats": split.stats()})
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
  return split


REFIT_FOLDER = "refit"


def refit_config(cfg: configs.Config, train_summary: dict) -> configs.Config:
  """The refit run's settings: the validated run's, on the full training rows
  (``validation_fraction`` 0), for its best epoch's number of epochs (a closed-form
  model: with its chosen ``l2``), no early stop, the same seed and schedule."""
  epochs = train_summary.get("best_epoch")
  if not epochs:
    raise ValueError("refit: the validated run chose no epoch (did it validate?)")
  changes = dict(validation_fraction=0.0, number_of_epochs=int(epochs), early_stopping=0,
                 refit=False)
  if train_summary.get("l2") is not None:
    changes["l2"] = (float(train_summary["l2"]),)
  return cfg.replace(**changes)


def refit(cfg: configs.Config, workdir: str, train_summary: dict, *,
          on_epoch: OnEpoch | None = None, split: data_lib.Split | None = None,
          report: reporting.Report = reporting.log_record) -> dict:
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
  report({"event": "refit", "epochs": rcfg.number_of_epochs, "folder": sub})
  return run(rcfg, sub, on_epoch=on_epoch, split=split, report=report)


