"""Runs a model that is fitted in closed form (its registry entry's ``fit``: EASE, EDLAE)
as a run of the engine: the fit on the run's first device, the settings it sweeps scored
on the validation users, the result kept as the run's one checkpoint (step 1, "epoch" 1).
What happens is reported (:mod:`jax_vaecf.training.reporting`), never printed.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.core import finite
from jax_vaecf import model as model_lib
from jax_vaecf.training import parallel as parallel_lib
from jax_vaecf.core import precision as precision_lib
from jax_vaecf.training import reporting
from jax_vaecf.training import run_folder
from jax_vaecf.training import steps as train_lib
from jax_vaecf.training.checkpoint_choice import Standing
from jax_vaecf.training.epochs import OnEpoch, TrainingDivergedError
from jax_vaecf.training.evaluate import BEST_METRIC, VALIDATION_KS, evaluate
from jax_vaecf.training.run_state import Built, optimizer, state_layout

_SHOWN = ("ndcg@100", "recall@20", "recall@50")


def _state_of(cfg: configs.Config, built: Built, params) -> train_lib.TrainState:
  """A closed-form model's state: its fitted parameters in the layout of
  :func:`state_layout` (no optimiser state: the model has no training phase)."""
  key = jax.random.split(jax.random.PRNGKey(cfg.seed))[1]
  return train_lib.TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state=(),
                              key=jax.random.key_data(key) if jnp.issubdtype(
                                  key.dtype, jax.dtypes.prng_key) else key,
                              loss_scale=precision_lib.init_loss_scale(False),
                              tx=optimizer(cfg))


def check_finite_params(params, model_name: str) -> None:
  """Raises :class:`TrainingDivergedError` when a fitted parameter is NaN / inf (a
  factorisation that failed), before anything is saved."""
  finite.check_finite_params(params, lambda arrays: TrainingDivergedError(
      f"{model_name}: the fit gave NaN/inf in {arrays} (the matrix was not positive "
      "definite in float32: raise --l2)"))


def _problem(cfg: configs.Config, split: data_lib.Split, built: Built,
             log: run_folder.MetricsLog | None, report: reporting.Report
             ) -> model_lib.ClosedFormProblem:
  """What the entry's ``fit`` reads: the training batches, the sizes, the device, a
  scorer of candidate parameters on the validation users (``None`` without them), a
  reporter of each swept point (to the metrics log and ``report``) and of the fit's
  progress (to ``report`` only)."""
  steps = built.steps
  sweep_steps: dict = {}

  def score(model, params):
    if model not in sweep_steps:
      sweep_steps[model] = parallel_lib.make_parallel_steps(
          model, built.options, mode=cfg.parallel, devices=steps.devices,
          ks=VALIDATION_KS)
    return evaluate(sweep_steps[model], sweep_steps[model].replicate(params),
                    split.validation, cfg.batch_size_validation)

  def swept(record):
    if log is not None:
      log.write(record)
    report({"event": "swept", "record": record})

  def progress(message):
    report({"event": "fit_progress", "model": cfg.model, "message": message})

  batcher = data_lib.TrainBatcher(split.train, cfg.batch_size_train, seed=cfg.seed)
  return model_lib.ClosedFormProblem(
      lambda: batcher.epoch_batches(0), split.n_items, split.n_train_users,
      steps.devices[0], score if split.validation is not None else None, swept,
      progress)


def _fitted_record(cfg, split, built, state, chosen, fit_s) -> tuple[dict, Standing]:
  """The run's one training record ("epoch" 1) and its standing on validation."""
  standing = Standing(best_epoch=1)
  record = {"split": "train", "epoch": 1, "step": 1, "chosen": chosen,
            "fit_time_s": fit_s, "epoch_time_s": fit_s,
            "users_per_s": split.n_train_users / fit_s}
  if split.validation is not None:
    vm = evaluate(built.steps, state, split.validation, cfg.batch_size_validation)
    standing.best = vm[BEST_METRIC]
    standing.best_metrics = {k: vm[k] for k in _SHOWN}
    record.update({f"val_{k}": v for k, v in standing.best_metrics.items()})
  record["best_val_ndcg@100"] = standing.best if standing.best > -math.inf else None
  return record, standing


def fit_closed_form(cfg: configs.Config, workdir: str, split: data_lib.Split,
                    ck: checkpoint_lib.RunCheckpoints | None, built: Built, *,
                    on_epoch: OnEpoch | None = None,
                    report: reporting.Report = reporting.log_record) -> dict:
  """Fits a model by its entry's closed-form ``fit`` (:class:`model_lib.ModelEntry`),
  settings it sweeps chosen on the validation users, and keeps the result as the run's
  one checkpoint. A run whose folder already holds it fits nothing again. Returns the
  training summary (as :func:`jax_vaecf.training.epochs.train_and_validate`), with the settings
  the fit chose (``chosen``)."""
  if isinstance(split, data_lib.PartSplit) or jax.process_count() > 1:
    raise ValueError(f"{cfg.model}: a closed-form fit reads every training row in one "
                     "process; run it without --partitioned_data, in one process")
  if ck is not None and ck.best_step() is not None:
    meta = ck.restore_best(state_layout(cfg, built))[1]
    report({"event": "fitted_already", "model": cfg.model, "chosen": meta.get("chosen")})
    return {"best_validation": meta.get("best_metrics") or {}, "best_epoch": 1,
            "stopped": None, "chosen": meta.get("chosen") or {}}
  log = None
  if ck is not None and jax.process_index() == 0:
    log = run_folder.MetricsLog(workdir)
    log.truncate_after(0)
    run_folder.write_run_files(cfg, workdir, split, 0)
  t0 = time.perf_counter()
  fitted = model_lib.model_entry(cfg.model).fit(
      cfg.model_settings, _problem(cfg, split, built, log, report))
  fit_s = time.perf_counter() - t0
  chosen = model_lib.settings_json(cfg.replace(**fitted.chosen).model_settings)
  state = built.steps.init_state(_state_of(cfg, built, fitted.params))
  record, standing = _fitted_record(cfg, split, built, state, chosen, fit_s)
  check_finite_params(fitted.params, cfg.model)
  record["checkpointed"] = ck is not None
  if ck is not None:
    ck.save_best(1, built.steps.to_host(state), {**standing.meta(1), "chosen": chosen},
                 {BEST_METRIC: standing.best if standing.best > -math.inf else 1.0})
  if log is not None:
    log.write(record)
  if on_epoch is not None:
    on_epoch(dict(record))
  report({"event": "fitted", "model": cfg.model, "summary": fitted.summary,
          "record": record})
  return {"best_validation": standing.best_metrics, "best_epoch": 1, "stopped": None,
          "chosen": chosen, "fit_time_s": fit_s}
