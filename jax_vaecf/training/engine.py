"""The training engine: the train / test / benchmark workflow of a run folder.

``python -m experiments.train`` and every other tool run it; so does
:func:`jax_vaecf.api.fit`. :func:`run` claims the folder, takes the split
(:mod:`jax_vaecf.training.run_data`), builds the model and its placed steps (:func:`build`),
trains (:mod:`jax_vaecf.training.epochs`: the epoch loop; :mod:`jax_vaecf.training.checkpoint_choice`: which
states are kept) or fits a closed-form model, and scores the best checkpoint on the test
users (:mod:`jax_vaecf.training.evaluate`). What happens is told to a reporter
(:mod:`jax_vaecf.training.reporting`; the command line's prints it), never printed here.

A run is deterministic: batch order comes from ``(seed, epoch)``, dropout and noise from
``(seed, step)``. A run killed at any moment and restarted with the same workdir resumes
from its last complete checkpoint, replays the epochs after it, and ends with the same
metrics as an uninterrupted run.
"""

from __future__ import annotations

import math
import gc
import os
import time

import jax
import jax.numpy as jnp

from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import closed_form
from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.core import finite
from jax_vaecf import model as model_lib
from jax_vaecf.training import parallel as parallel_lib
from jax_vaecf.core import precision as precision_lib
from jax_vaecf.training import reporting
from jax_vaecf.training import run_folder
from jax_vaecf.core import schedules
from jax_vaecf.training import steps as train_lib
# The engine's parts, under the names the tools and the tests have always used.
from jax_vaecf.training.checkpoint_choice import (Standing, resume_point, save_latest,  # pylint: disable=unused-import
                                         validate_and_keep_best)
from jax_vaecf.training.run_data import (DATA_SETTINGS, DEFAULT_CACHE, IN_MEMORY,  # pylint: disable=unused-import
                                      csv_reader_options, data_settings, load_data,
                                      split_interactions, with_validation)
from jax_vaecf.training.epochs import (OnEpoch, OnValidation, TrainingDivergedError,  # pylint: disable=unused-import
                              check_finite, passes_per_epoch, start, train_and_validate,
                              train_batcher, train_epoch)
from jax_vaecf.training.evaluate import (BEST_METRIC, VALIDATION_KS, evaluate,  # pylint: disable=unused-import
                                  split_identity, test_best)
from jax_vaecf.training.reporting import format_benchmark, format_catalogue, format_test  # pylint: disable=unused-import
from jax_vaecf.training.run_state import (Built, fresh_state, optimizer,  # pylint: disable=unused-import
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
  """The config's :class:`jax_vaecf.training.steps.StepOptions`: how a step updates the state.

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


def resolve_precision(cfg: configs.Config,
                      report: reporting.Report = reporting.log_record) -> configs.Config:
  """``cfg`` with ``--precision=auto`` replaced by the measured choice: ``bf16`` when the
  step's large products run at least ``machine.AUTO_BF16_SPEEDUP`` times faster in it
  on the run's first device (:func:`jax_vaecf.core.machine.bf16_speedup`), else ``fp32``
  (reported as a ``precision`` event). Any other precision is returned unchanged."""
  if cfg.precision != configs.AUTO_PRECISION:
    return cfg
  if jax.process_count() > 1:
    # Each process would measure its own machine, and processes that chose differently
    # would run different programs against each other's collectives.
    raise ValueError("bad setting: --precision=auto measures one machine; give "
                     "--precision=fp32 or bf16 in a multi-process run")
  from jax_vaecf.core import machine  # pylint: disable=import-outside-toplevel
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
  with each record of what happens (:mod:`jax_vaecf.training.reporting`; default: to the log)."""
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
    if (cfg.train or cfg.benchmark) and model_lib.model_entry(cfg.model).fit:
      results["train"] = closed_form.fit_closed_form(
          cfg, workdir, split, ck if cfg.train else None, built, on_epoch=on_epoch,
          report=report)
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
  # The refit builds its own model and data: the validated run's are let go first, or a
  # model near the memory limit (EASE's n_items^2 B) would find it taken.
  del built, ck, split
  gc.collect()
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
  model: with the settings its fit chose), no early stop, the same seed and schedule."""
  epochs = train_summary.get("best_epoch")
  if not epochs:
    raise ValueError("refit: the validated run chose no epoch (did it validate?)")
  changes = dict(validation_fraction=0.0, number_of_epochs=int(epochs), early_stopping=0,
                 refit=False)
  return cfg.replace(**changes, **(train_summary.get("chosen") or {}))


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


