r"""Hyperparameter search on the validation users (``python -m experiments.tune``).

  python -m experiments.tune --config=ml1m --data_dir=DIR --root=runs/tune_ml1m \
      --trials=40 [--space=lr,dropout_rate,anneal_cap] [--parallel_trials=4]

Needs Optuna (``pip install -e .[tune]``). Takes ``experiments.train``'s settings
(``--config=PRESET_OR_FILE`` and the flag of any Config field): the resulting
configuration is the search's *base*. Trial 0 runs the base's own values; every later
trial changes only the parameters of ``--space`` (default: every parameter of
:data:`SPACE` that applies to the base's model) and keeps every other setting of the
base. A trial trains ``number_of_epochs`` epochs in ``ROOT/trials/NNNN`` with
``--notest``, validating every ``validation_step`` epochs; its objective is its best
validation NDCG@100 (maximised). Optuna's TPE sampler proposes the trials and a median
pruner stops a trial whose best-so-far validation NDCG@100 falls below the median of the
finished trials at the same epoch (from ``--prune_warmup_epochs`` on; a trial with
weight averaging only once its average spans ``1 / (1 - ema_decay)`` steps,
:func:`may_prune`). A trial whose
training diverges (NaN) is recorded as failed, with the message, and never chosen.

Only the validation users are read for any decision: trials run with ``test=False``, so
the test users are never scored and their held-out items never reach a trial, the
sampler or the pruner.

The search is reproducible from ``--tune_seed``: the sampler is created afresh for each
trial with a seed drawn from ``(tune_seed, trial)``, so the same command on the same data
asks the same trials, and a resumed search asks exactly what an uninterrupted one would
(for the same ``--parallel_trials``). The study lives in ``ROOT/study.db`` (SQLite):
rerunning the same command resumes it. ``--trials`` counts finished trials, those already
in the study included: after 20, ``--trials=30`` runs ten more. A trial interrupted by a kill
is recorded as failed (``interrupted``) and run again with the same parameters; its
workdir resumes from its own last checkpoint. Resuming with other base settings, another
space, seed or pruner setting is refused (only settings that change no trial's result,
such as ``--data_dir`` or the devices, may change).

``--parallel_trials=K`` runs K trials at once, each in a process of this module
(``python -m jax_vaecf.tune ROOT TRIAL``) on its share of the CPU cores or on its own GPU. The K trials of a
batch are asked before any runs and told only when all have ended, in order, so no trial
of a batch sees another's outcome and the result does not depend on which ends first.

Outputs in ``ROOT``: ``results.md`` (every trial: state, parameters, best validation
NDCG@100, its epoch, epochs run, seconds; rewritten after each batch of trials),
``best.json`` (the full settings of the best complete trial, with ``train`` and ``test``
on: ``--config=ROOT/best.json`` for ``experiments.train`` and ``experiments.accuracy``),
``trials/NNNN`` (each trial's workdir, with its ``result.json``) and ``study.db``.
See docs/tuning.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, TextIO

import numpy as np

from jax_vaecf import configs
from jax_vaecf import model as model_lib
from jax_vaecf import space as space_lib
from jax_vaecf import loop
from jax_vaecf import run_folder
from jax_vaecf import files as files_lib
from jax_vaecf import metrics as metrics_lib

STUDY_NAME = "jax_vaecf"
METRIC = "val_ndcg@100"
PRUNED_PREFIX = "pruned by optuna"

# Settings a resumed search may change: those that change no trial's result (where the
# data is, devices, evaluation batching, checkpoint cadence). The run length, the
# validation cadence and early stopping are part of what a trial measures.
RESUMABLE_FIELDS = configs.RESUMABLE_FIELDS - {
    "number_of_epochs", "validation_step", "early_stopping"}


class TuneError(ValueError):
  """A search that cannot start as asked (printed as a one-line usage error)."""


# ------------------------------------------------------------------------ the space

# Which models a parameter applies to, judged from the base config and its built model
# (on one item: only its kind matters): rule -> (predicate(base, model), words for
# messages and docs).
_APPLIES: dict[str, tuple[Callable[[configs.Config, Any], bool], str]] = {
    "trained": (lambda cfg, m: not m.closed_form,
                "every model trained by gradient steps (not EASE)"),
    "closed_form": (lambda cfg, m: m.closed_form, "models fitted in closed form (EASE)"),
    "kl_beta": (lambda cfg, m: m.has_kl and cfg.kl_gamma == 0,
                "models with a KL term weighted by the beta schedule (kl_gamma = 0)"),
    "kl_anneal": (lambda cfg, m: m.has_kl and cfg.kl_gamma == 0
                  and cfg.anneal_schedule != "constant",
                  "models with a KL term annealed by the beta schedule (kl_gamma = 0, "
                  "schedule not constant)"),
    "model": (lambda cfg, m: True, "the models whose registry entry declares it"),
    "kl_gamma": (lambda cfg, m: m.has_kl and cfg.kl_gamma > 0,
                 "models whose KL term is weighted per user (kl_gamma > 0: RecVAE)"),
}


Param = space_lib.Param


# The search space, declared once. Trial 0 runs exactly the base: a categorical gains the
# base's value as a choice, and a base value outside a range is run as a fixed value
# without widening the range (see `distribution`).
SPACE: tuple[Param, ...] = (
    Param("lr", "float", "Adam learning rate.", 1e-4, 1e-2, log=True),
    Param("dropout_rate", "float", "Input dropout rate.", 0.0, 0.8),
    Param("anneal_cap", "float", "Largest KL weight (beta).", 0.05, 1.0,
          applies="kl_beta"),
    Param("anneal_epochs", "float", "Epochs for beta to reach 1 (capped at anneal_cap), "
          "as 0.2x to 5x the base's number_of_epochs.", 0.2, 5.0, log=True,
          applies="kl_anneal", per_epochs=True),
    Param("ema_decay", "categorical", "Weight averaging: the decay of the moving average "
          "that is validated (0 = the weights).", choices=(0.0, 0.99, 0.995, 0.999)),
    Param("batch_size_train", "categorical", "Users per training batch.",
          choices=(100, 250, 500, 1000)),
    Param("kl_gamma", "float", "Per-user KL weight: kl_gamma x the user's number of "
          "items.", 1e-3, 3e-2, log=True, applies="kl_gamma"),
)


def model_params(model: str | None = None) -> tuple[Param, ...]:
  """The searched settings of the model called ``model`` (its registry entry's
  ``space``), or of every registered model (each name once) when ``None``."""
  names = model_lib.names() if model is None else (model,)
  out: dict[str, Param] = {}
  for name in names:
    for p in model_lib.model_entry(name).space:
      out.setdefault(p.name, p)
  return tuple(out.values())


class _NotRepresentable(Exception):
  """The base's value of a parameter has no place in the parameter's distribution."""


def applies(param: Param, base: configs.Config, model: Any = None) -> bool:
  """Whether ``param`` applies to the base's model (``model``: it, built on one item;
  built here when not given) and KL rule."""
  return _APPLIES[param.applies][0](base, model or loop.build_model(base, 1))


def base_value(param: Param, base: configs.Config,
               n_train_users: Callable[[], int]) -> Any:
  """The base's own value of ``param`` (trial 0's); ``n_train_users()`` is asked only
  to express a step-count anneal in epochs.

  Raises ``_NotRepresentable`` with the reason when the parameter cannot hold it.
  """
  if param.read is not None:
    try:
      return param.read(getattr(base, param.name))
    except ValueError as e:
      raise _NotRepresentable(str(e)) from None
  if param.name == "anneal_epochs" and base.anneal_epochs <= 0:
    if base.total_anneal_steps <= 0:
      raise _NotRepresentable("the base has no anneal (total_anneal_steps = 0: beta = "
                              "anneal_cap from the first step)")
    return base.total_anneal_steps / loop.steps_per_epoch(base, n_train_users())
  return _field_type(param.name)(getattr(base, param.name))


def distribution(param: Param, base: configs.Config, value: Any):
  """The Optuna distribution of ``param`` for this base.

  A categorical gains the base's ``value`` as a choice. A range is the declared one
  (``per_epochs``: relative to the base's ``number_of_epochs``) and is not widened to
  the base's value: trial 0 runs that value as a fixed parameter outside the range,
  and the search stays where a run of this length can express the setting. (Widened to
  the paper's 200,000-step anneal, 20,000 epochs on ML-1M at batch 500, the anneal range
  spent half its trials on runs whose KL weight hardly moved.)
  """
  import optuna  # pylint: disable=g-import-not-at-top
  if param.kind == "categorical":
    return optuna.distributions.CategoricalDistribution(
        tuple(sorted(set(param.choices) | {value})))
  scale = base.number_of_epochs if param.per_epochs else 1
  low, high = param.low * scale, param.high * scale
  if param.log and value <= 0:
    raise _NotRepresentable(f"the base's value {value} is not > 0 (sampled on a log scale)")
  if param.kind == "int":
    return optuna.distributions.IntDistribution(int(low), int(high), log=param.log)
  return optuna.distributions.FloatDistribution(float(low), float(high), log=param.log)


def _field_type(name: str) -> type:
  """``int`` or ``float``: the type of the setting ``name`` (a list of ints: one, an
  int)."""
  default = configs.default_of(name)
  return int if isinstance(default, (int, tuple)) else float


def config_changes(param: Param, base: configs.Config, value: Any) -> dict:
  """The Config fields a trial value sets."""
  if param.write is not None:
    return {param.name: param.write(value, getattr(base, param.name))}
  return {param.name: _field_type(param.name)(value)}


@dataclasses.dataclass(frozen=True)
class Space:
  """The searched parameters of one base: each one's distribution and base value."""

  params: tuple[Param, ...]
  distributions: dict
  base_values: dict

  def trial_config(self, base: configs.Config, values: dict) -> configs.Config:
    """The base with a trial's values, training without testing. A value equal to the
    base's leaves the base's field as it is (``hidden_dims=()``, a step-count anneal)."""
    changes: dict = {}
    for p in self.params:
      if values[p.name] != self.base_values[p.name]:
        changes.update(config_changes(p, base, values[p.name]))
    return base.replace(**changes, train=True, test=False, benchmark=False)

  def to_json(self) -> dict:
    import optuna  # pylint: disable=g-import-not-at-top
    return {p.name: optuna.distributions.distribution_to_json(self.distributions[p.name])
            for p in self.params}


def make_space(base: configs.Config, names: tuple[str, ...] = (),
               n_train_users: Callable[[], int] | None = None,
               note: Callable[[str], None] = lambda s: None) -> Space:
  """The space for ``base``: the parameters ``names`` (default: all of :data:`SPACE` that
  apply to the model and can hold the base's value; those left out are reported through
  ``note``).

  Raises :class:`TuneError` for an unknown name, a parameter that does not apply to the
  model, or one that cannot hold the base's value.
  """
  known = [p.name for p in SPACE + model_params()]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise TuneError(f"--space: unknown parameter {', '.join(map(repr, unknown))}; "
                    f"expected names from {', '.join(known)}")
  mine = [p.name for p in SPACE + model_params(base.model)]
  other = [n for n in names if n not in mine]
  if other:
    raise TuneError(f"--space: {', '.join(other)} does not apply to --model={base.model} "
                    "(a setting of another model)")
  if len(set(names)) != len(names):
    raise TuneError(f"--space names a parameter twice: {','.join(names)}")
  model = loop.build_model(base, 1)
  if n_train_users is None:
    n_train_users = lambda: loop.load_data(base).n_train_users
  cache: list[int] = []

  def users() -> int:
    if not cache:
      cache.append(int(n_train_users()))
    return cache[0]

  chosen, dists, values = [], {}, {}
  for p in SPACE + model_params(base.model):
    if names and p.name not in names:
      continue
    if not applies(p, base, model):
      if names:
        raise TuneError(f"--space: {p.name} does not apply to --model={base.model} with "
                        f"these settings (it applies to {_APPLIES[p.applies][1]})")
      continue
    try:
      value = base_value(p, base, users)
      dists[p.name] = distribution(p, base, value)
    except _NotRepresentable as e:
      if names:
        raise TuneError(f"--space: {p.name} cannot start from the base: {e}") from None
      note(f"not searching {p.name}: {e}")
      continue
    chosen.append(p)
    values[p.name] = value
    dist = dists[p.name]
    if p.kind != "categorical" and not dist.low <= value <= dist.high:
      note(f"trial 0 runs the base's {p.name}={value:g}, outside the searched range "
           f"{dist.low:g} to {dist.high:g}")
  if not chosen:
    raise TuneError("--space: no parameter to search")
  return Space(tuple(chosen), dists, values)


# ----------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to search (the tool's own flags)."""

  trials: int = 20
  tune_seed: int = 0
  parallel_trials: int = 1
  timeout_minutes: float = 0.0
  space: tuple[str, ...] = ()
  prune_warmup_epochs: int = 10
  prune_startup_trials: int = 5

  def check(self) -> None:
    for ok, message in [
        (self.trials >= 1, "--trials must be >= 1"),
        (self.tune_seed >= 0, "--tune_seed must be >= 0"),
        (self.parallel_trials >= 1, "--parallel_trials must be >= 1"),
        (self.timeout_minutes >= 0, "--timeout_minutes must be >= 0"),
        (self.prune_warmup_epochs >= 0, "--prune_warmup_epochs must be >= 0"),
        (self.prune_startup_trials >= 0, "--prune_startup_trials must be >= 0"),
    ]:
      if not ok:
        raise TuneError(message)


def check_base(base: configs.Config) -> None:
  """Refuses a base that gives trials nothing to validate."""
  try:
    configs.validate(base.replace(train=True, test=False, benchmark=False))
  except ValueError as e:
    raise TuneError(str(e)) from None
  if base.number_of_epochs < 1:
    raise TuneError("number_of_epochs must be >= 1: a trial trains the base's epochs")
  if base.protocol == "per_user" and base.validation_fraction <= 0:
    raise TuneError("--protocol=per_user with --validation_fraction=0 has no validation "
                    "users to tune on; give --validation_fraction > 0")


def _fingerprint(base: configs.Config, space: Space, settings: Settings) -> dict:
  """What a resumed search must share with the study: everything that decides a trial."""
  return {"base": {k: v for k, v in configs.to_json(base).items()
                   if k not in RESUMABLE_FIELDS},
          "space": space.to_json(), "tune_seed": settings.tune_seed,
          "prune_warmup_epochs": settings.prune_warmup_epochs,
          "prune_startup_trials": settings.prune_startup_trials}


def _differences(saved: dict, now: dict) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(now)):
    a, b = saved.get(key), now.get(key)
    if isinstance(a, dict) and isinstance(b, dict) and key in ("base", "space"):
      for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
          what = f"--{k}" if key == "base" else f"the space's {k}"
          out.append(f"{what}: the study has {a.get(k)!r}, this command {b.get(k)!r}")
    elif a != b:
      out.append(f"--{key}: the study has {a!r}, this command {b!r}")
  return out


# ------------------------------------------------------------------------- optuna


def _optuna():
  try:
    import optuna  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TuneError("experiments.tune needs Optuna: pip install -e .[tune] "
                    "(or pip install optuna)") from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  return optuna


def storage_url(root: str) -> str:
  return "sqlite:///" + os.path.abspath(os.path.join(root, "study.db"))


def _rdb_storage(root: str):
  """The storage of ``ROOT/study.db``. The caller keeps it: a trial's user attributes
  and intermediate values are written through it where no ``optuna.trial.Trial`` of
  the trial is at hand (a killed search's trials, a worker's trial)."""
  optuna = _optuna()
  # Several worker processes write intermediate values at once: wait for the lock.
  return optuna.storages.RDBStorage(storage_url(root),
                                    engine_kwargs={"connect_args": {"timeout": 300}})


def _pruner(fingerprint: dict):
  optuna = _optuna()
  return optuna.pruners.MedianPruner(
      n_startup_trials=fingerprint["prune_startup_trials"],
      n_warmup_steps=fingerprint["prune_warmup_epochs"])


def sampler_seed(tune_seed: int, position: int) -> int:
  """The sampler's seed for the trial at ``position``: a function of both only."""
  return int(np.random.SeedSequence([tune_seed, position]).generate_state(1)[0])


def _sampler(tune_seed: int, position: int):
  optuna = _optuna()
  return optuna.samplers.TPESampler(seed=sampler_seed(tune_seed, position),
                                    multivariate=True, constant_liar=True)


def open_study(root: str, *, create: bool = False, storage=None):
  """The study in ``ROOT/study.db`` (``create``: made when missing), opened through
  ``storage`` (:func:`_rdb_storage`; default: a new one)."""
  optuna = _optuna()
  if storage is None:
    storage = _rdb_storage(root)
  if create:
    return optuna.create_study(storage=storage, study_name=STUDY_NAME,
                               direction="maximize", load_if_exists=True)
  return optuna.load_study(study_name=STUDY_NAME, storage=storage)


def _storage_trial_id(storage, number: int) -> int:
  """The storage's id of the study's trial ``number``: optuna keeps a trial's id private
  (``Trial``, ``FrozenTrial``), and its storages find it by study name and number."""
  return storage.get_trial_id_from_study_id_trial_number(
      storage.get_study_id_from_name(STUDY_NAME), number)


def _frozen(study, number: int):
  """The study's trial ``number`` as stored now (a ``FrozenTrial``)."""
  (trial,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
  return trial


def _position(t) -> int | None:
  p = t.user_attrs.get("position")
  return None if p is None else int(p)


def _interrupted(t) -> bool:
  return bool(t.user_attrs.get("interrupted"))


def _finished_states():
  optuna = _optuna()
  s = optuna.trial.TrialState
  return (s.COMPLETE, s.PRUNED, s.FAIL)


def _next_fresh_position(trials) -> int:
  known = [_position(t) for t in trials if _position(t) is not None]
  return max(known) + 1 if known else 0


def recover_interrupted(study, storage, out: TextIO) -> int:
  """Marks trials left RUNNING by a killed search as failed (``interrupted``) and queues
  each again with the same parameters and position; returns how many. ``storage``: the
  study's (:func:`_rdb_storage`)."""
  optuna = _optuna()
  trials = study.get_trials(deepcopy=False)
  next_position = _next_fresh_position(trials)
  running = sorted((t for t in trials if t.state == optuna.trial.TrialState.RUNNING),
                   key=lambda t: t.number)
  for t in running:
    position = _position(t)
    # The killed process held the trial's Trial object; its attributes can only be
    # written through the storage, and before it is failed (a finished trial is final).
    trial_id = _storage_trial_id(storage, t.number)
    if position is None:  # killed between its ask and its position: the newest asked
      position, next_position = next_position, next_position + 1
      storage.set_trial_user_attr(trial_id, "position", position)
    storage.set_trial_user_attr(trial_id, "interrupted", True)
    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(dict(t.params), user_attrs={"position": position,
                                                    "rerun_of": t.number})
    print(f"trial {position} was interrupted (optuna trial {t.number}); it runs again "
          "with the same parameters, resuming its workdir", file=out, flush=True)
  return len(running)


# ------------------------------------------------------------------------ a trial


def trial_dir(root: str, position: int) -> str:
  return os.path.join(root, "trials", f"{position:04d}")


def _validation_curve(workdir: str) -> tuple[list[tuple[int, float]], list[dict]]:
  """``([(epoch, best validation NDCG@100 up to it)], train records)`` of the log."""
  records = [r for r in run_folder.MetricsLog(workdir).records()
             if r.get("split") == "train"]
  curve, best = [], -math.inf
  for r in records:
    if r.get(METRIC) is not None:
      best = max(best, float(r[METRIC]))
      curve.append((int(r["epoch"]), best))
  return curve, records


def _result_from_log(workdir: str, params: dict, seconds: float) -> dict:
  curve, records = _validation_curve(workdir)
  reason = next((r["stopped"] for r in records
                 if str(r.get("stopped", "")).startswith(PRUNED_PREFIX)), None)
  result = {"params": params, "curve": curve, "seconds": seconds,
            "epochs": max((int(r["epoch"]) for r in records), default=0)}
  if not curve:
    return {**result, "state": "fail", "value": None, "best_epoch": None,
            "error": "no epoch was validated"}
  vals = [float(r[METRIC]) for r in records if r.get(METRIC) is not None]
  best_epoch = next(int(r["epoch"]) for r in records
                    if r.get(METRIC) is not None and float(r[METRIC]) == max(vals))
  return {**result, "state": "pruned" if reason else "complete", "value": curve[-1][1],
          "best_epoch": best_epoch, "reason": reason}


def may_prune(cfg: configs.Config, epoch: int, record: dict) -> bool:
  """Whether the pruner may stop a trial after validating ``epoch`` (its log ``record``).

  Never at the last epoch (the trial is complete), and not while a weight average is
  younger than its window: with ``ema_decay = d`` the validated average weighs the last
  ``1 / (1 - d)`` steps, so before that many steps it still carries the early weights
  and scores below the plain weights of a trial without averaging at the same epoch
  (at ``d = 0.999`` and 10 steps an epoch: the first 100 epochs).
  """
  if epoch >= cfg.number_of_epochs:
    return False
  return cfg.ema_decay <= 0 or int(record["step"]) * (1.0 - cfg.ema_decay) >= 1.0


def run_trial(study, trial, cfg: configs.Config, workdir: str, params: dict) -> dict:
  """Trains one trial in ``workdir`` (resuming it), reporting its best-so-far validation
  NDCG@100 per validated epoch to Optuna and stopping when the pruner says so.

  ``trial``: the study's ``optuna.trial.Trial`` being run, or in a worker its
  :class:`_StoredTrial` (both have ``number``, ``report`` and ``should_prune``).

  Returns (and writes as ``workdir/result.json``) the outcome: ``state`` (``complete``,
  ``pruned`` or ``fail``), ``value`` (best validation NDCG@100), ``best_epoch``,
  ``epochs``, ``seconds``, ``curve``, and ``error`` for a failure. A workdir that already
  holds the result of these parameters, or a run the pruner stopped, is not trained
  again. Errors other than divergence propagate.
  """
  path = os.path.join(workdir, "result.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("params") == params:
      return saved
  if os.path.isdir(workdir):
    done = _result_from_log(workdir, params, 0.0)
    if done["state"] == "pruned":  # stopped by the pruner, killed before its result
      files_lib.write_text_atomic(path, json.dumps(done, indent=1))
      return done
  reported = set(_frozen(study, trial.number).intermediate_values)

  def report(epoch: int, value: float) -> None:
    if epoch not in reported:
      trial.report(value, epoch)
      reported.add(epoch)

  def on_validation(epoch: int, record: dict) -> str | None:
    # A resumed run: the epochs validated before the kill count too.
    curve, _ = _validation_curve(workdir)
    best = -math.inf
    for e, v in curve:
      if e < epoch:
        report(e, v)
        best = v
    best = max(best, float(record[METRIC]))
    report(epoch, best)
    if may_prune(cfg, epoch, record) and trial.should_prune():
      return f"{PRUNED_PREFIX} at epoch {epoch}"
    return None

  t0 = time.perf_counter()
  error = None
  try:
    loop.run(cfg, workdir, on_validation=on_validation)
  except (loop.TrainingDivergedError, metrics_lib.NonFiniteModelError) as e:
    error = str(e)
  result = _result_from_log(workdir, params, time.perf_counter() - t0)
  if error is not None:
    result.update(state="fail", value=None, error=error)
  files_lib.write_text_atomic(path, json.dumps(result, indent=1))
  return result


def _tell(study, trial, result: dict) -> None:
  """Records a trial's outcome: its curve, its attributes, then its state."""
  optuna = _optuna()
  state = optuna.trial.TrialState
  have = _frozen(study, trial.number).intermediate_values
  if result["state"] != "fail":
    for epoch, value in result["curve"]:
      if int(epoch) not in have:
        trial.report(float(value), int(epoch))
  for key in ("best_epoch", "epochs", "seconds", "error", "reason"):
    if result.get(key) is not None:
      trial.set_user_attr(key, result[key])
  if result["state"] == "complete":
    study.tell(trial, float(result["value"]))
  elif result["state"] == "pruned":
    study.tell(trial, state=state.PRUNED)  # the last intermediate value: the best so far
  else:
    study.tell(trial, state=state.FAIL)


# ------------------------------------------------------------------------ parallel


def _device_probe() -> tuple[str, int]:
  """``(backend, local device count)`` seen by a fresh process (this one never starts
  the accelerator, which would take the memory the workers need)."""
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    return "cpu", 1
  code = "import jax; print(jax.default_backend(), jax.local_device_count())"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=_worker_env(), check=False)
  try:
    backend, n = proc.stdout.split()[-2:]
    return backend, int(n)
  except ValueError:
    raise RuntimeError(f"could not list the devices: {proc.stderr[-2000:]}") from None


def _worker_env(extra: dict | None = None) -> dict:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
  env.update(extra or {})
  return env


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the workers run: a CPU core set or one accelerator per slot."""

  backend: str
  cores: tuple[tuple[int, ...], ...] = ()
  devices: tuple[str, ...] = ()
  shared: bool = False

  @classmethod
  def plan(cls, k: int) -> "Placement":
    backend, n = _device_probe()
    if backend == "cpu":
      cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
      if len(cpus) < k:
        return cls("cpu", tuple((c,) for c in (cpus * k)[:k]) if cpus else ())
      return cls("cpu", tuple(tuple(int(c) for c in part)
                              for part in np.array_split(cpus, k)))
    if backend not in ("gpu", "cuda", "rocm"):
      raise TuneError(f"--parallel_trials > 1 runs one trial per CPU core set or GPU; "
                      f"this machine's backend is {backend}")
    var = "HIP_VISIBLE_DEVICES" if backend == "rocm" else "CUDA_VISIBLE_DEVICES"
    visible = [d for d in os.environ.get(var, "").split(",") if d.strip()]
    ids = visible[:n] if visible else [str(i) for i in range(n)]
    return cls(backend, devices=tuple(ids[j % n] for j in range(k)), shared=k > n)

  def env(self, slot: int) -> dict:
    if self.backend == "cpu" or not self.devices:
      return {}
    var = "HIP_VISIBLE_DEVICES" if self.backend == "rocm" else "CUDA_VISIBLE_DEVICES"
    env = {var: self.devices[slot]}
    if self.shared:  # several workers on one device: allocate as needed
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env

  def worker_cores(self, slot: int) -> tuple[int, ...]:
    return self.cores[slot] if self.backend == "cpu" and self.cores else ()


def _run_workers(root: str, batch: list, k: int, placement: Placement,
                 out: TextIO) -> list[dict]:
  """Runs each ``(trial, position, cfg, params)`` of the batch in its own process of
  this module (``python -m jax_vaecf.tune ROOT TRIAL``, :func:`worker_main`) and
  returns their results, in order."""
  procs = []
  for trial, position, _, _ in batch:
    slot = position % k
    workdir = trial_dir(root, position)
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "worker.log")
    cmd = [sys.executable, "-m", "jax_vaecf.tune", root, str(trial.number)]
    cores = placement.worker_cores(slot)
    if cores:
      cmd.append("--cores=" + ",".join(map(str, cores)))
    if placement.devices:
      cmd.append("--one_device")
    log = open(log_path, "a")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env=_worker_env(placement.env(slot))), log, log_path))
    where = (f"cores {','.join(map(str, cores))}" if cores else
             f"device {placement.devices[slot]}" if placement.devices else "")
    print(f"== trial {position}: worker pid {procs[-1][0].pid} {where} (log: {log_path})",
          file=out, flush=True)
  results, failed = [], []
  for (proc, log, log_path), (trial, position, _, params) in zip(procs, batch):
    code = proc.wait()
    log.close()
    path = os.path.join(trial_dir(root, position), "result.json")
    result = None
    if code == 0 and os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
    if result is None or result.get("params") != params:
      with open(log_path) as f:
        tail = f.read()[-3000:]
      failed.append(f"trial {position}: worker exited with status {code} (log: "
                    f"{log_path}):\n{tail}")
    results.append(result)
  if failed:
    raise RuntimeError("\n".join(failed))
  return results


def _exit_with_parent() -> None:
  """Ends this worker when the search that started it dies (a kill): the rerun runs the
  trial again in the same workdir, which two processes must not train at once."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(3)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class _StoredTrial:
  """The study's trial ``number``, asked by the search's process and run in a worker:
  what :func:`run_trial` uses of an ``optuna.trial.Trial``.

  Optuna hands a ``Trial`` only to the process that asks it (``Study.ask``); a worker
  writes the trial's intermediate values through the study's storage
  (:func:`_rdb_storage`) and asks the study's pruner about the stored trial, as
  ``Trial.report`` and ``Trial.should_prune`` do.
  """

  def __init__(self, study, storage, number: int):
    self.study, self.storage, self.number = study, storage, number
    self.trial_id = _storage_trial_id(storage, number)

  def report(self, value: float, step: int) -> None:
    self.storage.set_trial_intermediate_value(self.trial_id, int(step), float(value))

  def should_prune(self) -> bool:
    return bool(self.study.pruner.prune(self.study, self.storage.get_trial(self.trial_id)))


def run_worker(root: str, number: int, cores: tuple[int, ...] = (),
               one_device: bool = False) -> dict:
  """A worker process: runs the study's trial ``number`` (asked by the parent) and
  writes its ``result.json``; the parent tells the study. ``cores``: the CPU cores it
  may use; ``one_device``: it sees only the accelerator it was given, and trains on it."""
  if cores:
    os.sched_setaffinity(0, cores)  # before the first jax computation
  _exit_with_parent()
  storage = _rdb_storage(root)
  study = open_study(root, storage=storage)
  study.pruner = _pruner(study.user_attrs["settings"])
  trial = _StoredTrial(study, storage, number)
  frozen = _frozen(study, number)
  cfg = configs.from_json(frozen.user_attrs["config"], f"{root}: trial {number}")
  if one_device:
    cfg = cfg.replace(number_of_devices=1, gpu_number=-1)  # the one device it was given
  position = int(frozen.user_attrs["position"])
  return run_trial(study, trial, cfg, trial_dir(root, position), dict(frozen.params))


# -------------------------------------------------------------------------- output


def trial_rows(study) -> list[dict]:
  """One row per trial of the search, by position (interrupted attempts left out)."""
  rows = []
  for t in study.get_trials(deepcopy=False):
    if _interrupted(t) or _position(t) is None:
      continue
    rows.append({"trial": _position(t), "number": t.number, "state": t.state.name.lower(),
                 "params": dict(t.params), "value": t.value,
                 **{k: t.user_attrs.get(k) for k in ("best_epoch", "epochs", "seconds",
                                                     "error", "reason")}})
  return sorted(rows, key=lambda r: r["trial"])


def best_row(rows: list[dict]) -> dict | None:
  """The complete trial with the highest value (the first such on a tie)."""
  done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
  return max(done, key=lambda r: (r["value"], -r["trial"])) if done else None


def _cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def results_table(rows: list[dict], names: list[str]) -> str:
  head = ["trial", "state", *names, "best val NDCG@100", "best epoch", "epochs",
          "seconds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [str(r["trial"]), r["state"], *(_cell(r["params"].get(n)) for n in names),
             "" if r["value"] is None else f"{r['value']:.4f}", _cell(r["best_epoch"]),
             _cell(r["epochs"]), "" if r["seconds"] is None else f"{r['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_outputs(root: str, base_name: str, space: Space, rows: list[dict],
                  best_cfg: configs.Config | None) -> str:
  """Writes ``results.md`` and (when a trial completed) ``best.json``; returns the
  table."""
  names = [p.name for p in space.params]
  table = results_table(rows, names)
  best = best_row(rows)
  given = f"`--config={base_name}` with the command's settings" if base_name else (
      "the settings given")
  text = [f"# Search in {root}", "",
          f"Base: {given}; trial 0 is the base's own values. Objective: best validation "
          "NDCG@100 (validation users only; the test users are never scored).", "",
          table, ""]
  if best is not None:
    text += [f"Best: trial {best['trial']} (validation NDCG@100 {best['value']:.4f}, "
             f"epoch {best['best_epoch']}); its settings are in best.json.", ""]
  failures = [r for r in rows if r["state"] == "fail" and r.get("error")]
  if failures:
    text += ["Failed trials:", ""]
    text += [f"- trial {r['trial']}: {r['error']}" for r in failures]
    text.append("")
  files_lib.write_text_atomic(os.path.join(root, "results.md"), "\n".join(text))
  if best_cfg is not None:
    files_lib.write_text_atomic(os.path.join(root, "best.json"),
                                json.dumps(configs.to_json(best_cfg), indent=1) + "\n")
  return table


# -------------------------------------------------------------------------- search


@contextlib.contextmanager
def _lock(root: str):
  """One search at a time in a folder: a second would mark the first's trials as
  interrupted."""
  import fcntl  # pylint: disable=g-import-not-at-top
  f = open(os.path.join(root, ".tune.lock"), "a")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise TuneError(f"--root={root}: another search is running in this folder") from None
    yield
  finally:
    f.close()


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A search's trials (:func:`trial_rows`), its parameters and the results table."""

  rows: list
  names: tuple
  table: str


def search(base: configs.Config, root: str, settings: Settings, *,
           base_name: str = "", out: TextIO | None = None) -> Outcome:
  """Runs (or resumes) the search of ``settings`` around ``base`` in ``root`` until
  ``settings.trials`` trials have finished or the time is up.

  The split is loaded first (from the cache when it is there): a missing data set or
  one without validation users fails before the study is touched.

  Raises :class:`TuneError` for a search that cannot start (a bad space, a study with
  other settings); errors of a trial other than divergence propagate, leaving the trials
  of the batch to be run again by the next call.
  """
  out = out or sys.stdout
  settings.check()
  check_base(base)
  optuna = _optuna()
  if settings.space:
    make_space(base, tuple(settings.space), lambda: 1)  # a bad name before the data
  split = loop.load_data(base)
  if split.validation is None or split.validation.n_users == 0:
    raise TuneError(f"{base.dataset}: the split has no validation users to tune on")
  n_train = int(split.n_train_users)
  del split
  space = make_space(base, tuple(settings.space), lambda: n_train,
                     note=lambda s: print(f"note: {s}", file=out, flush=True))
  fingerprint = _fingerprint(base, space, settings)
  os.makedirs(root, exist_ok=True)
  t_start = time.monotonic()
  with _lock(root):
    new = not os.path.exists(os.path.join(root, "study.db"))
    trials_dir = os.path.join(root, "trials")
    if new and os.path.isdir(trials_dir) and os.listdir(trials_dir):
      raise TuneError(f"--root={root} holds trials/ but no study.db: trials of another "
                      "search; use an empty --root")
    storage = _rdb_storage(root)
    study = open_study(root, create=True, storage=storage)
    saved = study.user_attrs.get("settings")
    if saved is None:
      study.set_user_attr("settings", fingerprint)
    elif saved != fingerprint:
      raise TuneError(f"--root={root} holds a search with other settings ("
                      + "; ".join(_differences(saved, fingerprint))
                      + "). Use another --root, or this search's own settings")
    study.pruner = _pruner(fingerprint)
    if not study.get_trials(deepcopy=False):
      study.enqueue_trial(dict(space.base_values), user_attrs={"position": 0})
    recover_interrupted(study, storage, out)
    placement = None
    k = settings.parallel_trials
    while True:
      trials = study.get_trials(deepcopy=False)
      finished = [t for t in trials if t.state in _finished_states() and not _interrupted(t)]
      remaining = settings.trials - len(finished)
      if remaining <= 0:
        break
      if settings.timeout_minutes and time.monotonic() - t_start > 60 * settings.timeout_minutes:
        print(f"--timeout_minutes={settings.timeout_minutes:g} reached: no new trials",
              file=out, flush=True)
        break
      waiting = sorted((t for t in trials if t.state == optuna.trial.TrialState.WAITING),
                       key=lambda t: t.number)
      reruns = [t for t in waiting if "rerun_of" in t.user_attrs]
      # Interrupted trials run again as the batch they were in, before any new trial.
      n = min(k, remaining, len(reruns)) if reruns else min(k, remaining)
      batch = []
      for _ in range(n):
        trials = study.get_trials(deepcopy=False)
        waiting = sorted((t for t in trials if t.state == optuna.trial.TrialState.WAITING),
                         key=lambda t: t.number)
        position = (_position(waiting[0]) if waiting and _position(waiting[0]) is not None
                    else _next_fresh_position(trials))
        study.sampler = _sampler(settings.tune_seed, position)
        with warnings.catch_warnings():
          # Trial 0's base values may lie outside a range (make_space noted them).
          warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
          trial = study.ask(fixed_distributions=dict(space.distributions))
        if _position(trial) is None:
          trial.set_user_attr("position", position)
        position = int(trial.user_attrs["position"])
        params = {p.name: trial.params[p.name] for p in space.params}
        cfg = space.trial_config(base, params)
        trial.set_user_attr("config", configs.to_json(cfg))
        batch.append((trial, position, cfg, params))
      if k == 1:
        results = []
        for trial, position, cfg, params in batch:
          print(f"== trial {position}: " + ", ".join(
              f"{name}={_cell(v)}" for name, v in params.items()), file=out, flush=True)
          results.append(run_trial(study, trial, cfg, trial_dir(root, position), params))
      else:
        placement = placement or Placement.plan(k)
        for trial, position, cfg, params in batch:
          print(f"== trial {position}: " + ", ".join(
              f"{name}={_cell(v)}" for name, v in params.items()), file=out, flush=True)
        results = _run_workers(root, batch, k, placement, out)
      # Told only when the whole batch has ended, in order: no trial of a batch sees
      # another's outcome, whichever finished first.
      for (trial, position, cfg, params), result in zip(batch, results):
        _tell(study, trial, result)
        value = "" if result["value"] is None else f" {result['value']:.4f}"
        print(f"== trial {position}: {result['state']}{value}"
              + (f" ({result['error']})" if result.get("error") else ""),
              file=out, flush=True)
      _write(root, base, base_name, space, study)
    return _write(root, base, base_name, space, study)


def _write(root, base, base_name, space, study) -> Outcome:
  rows = trial_rows(study)
  best = best_row(rows)
  best_cfg = None
  if best is not None:
    best_cfg = space.trial_config(base, best["params"]).replace(train=True, test=True)
  table = write_outputs(root, base_name, space, rows, best_cfg)
  return Outcome(rows, tuple(p.name for p in space.params), table)


def worker_main(argv: list[str] | None = None) -> None:
  """``python -m jax_vaecf.tune ROOT TRIAL [--cores=0,1] [--one_device]``: a worker of a
  search with ``parallel_trials`` above 1, started by :func:`search` itself; prints the
  trial's result as one JSON line."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m jax_vaecf.tune",
                                   description=worker_main.__doc__)
  parser.add_argument("root", help="the search's folder")
  parser.add_argument("trial", type=int, help="the Optuna trial number to run")
  parser.add_argument("--cores", default="", help="CPU cores of the worker, e.g. 0,1")
  parser.add_argument("--one_device", action="store_true",
                      help="train on the one accelerator the worker sees")
  args = parser.parse_args(argv)
  try:
    cores = tuple(int(c) for c in args.cores.split(",") if c.strip())
  except ValueError:
    parser.error("--cores: expected comma-separated integers")
  result = run_worker(args.root, args.trial, cores, one_device=args.one_device)
  print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
  worker_main()
