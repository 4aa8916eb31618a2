r"""Hyperparameter search on the validation users, run by Optuna's own machinery.

  python -m experiments.tune --config=ml1m --data_dir=DIR --root=runs/tune_ml1m \
      --trials=40 [--space=lr,dropout_rate,anneal_cap] [--parallel_trials=4]

The configuration given is the search's *base*: trial 0 runs it, and every later trial
changes only the parameters of the space (:mod:`jax_vaecf.tuning.space`). A
trial trains the base's epochs in ``ROOT/trials/NNNN`` with ``test=False`` (the test
users are never scored); its objective is its best validation NDCG@100, maximised.

``Study.optimize`` runs the trials (``n_jobs`` threads for ``parallel_trials``; several
processes may also share one ``ROOT``), Optuna's median pruner stops poor ones, and the
storage's heartbeats find a trial whose process died: Optuna's retry callback queues it
again with its parameters, and it resumes its workdir. A diverged trial is recorded as
failed and never chosen. The study lives in ``ROOT/study.db``: rerunning resumes it, and
other base settings are refused. The guarantees and their limits: docs/tuning.md.
Needs Optuna (``pip install -e .[tune]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import shutil
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import run_folder
from jax_vaecf.core import files as files_lib
from jax_vaecf.evaluation import metrics as metrics_lib
from jax_vaecf.tuning.space import Space, TuneError, make_space
from jax_vaecf.tuning.space import require_optuna as _optuna

STUDY_NAME = "jax_vaecf"
METRIC = "val_ndcg@100"
PRUNED_PREFIX = "pruned by optuna"
STOPPED_PREFIX = "pruned at epoch"  # a caller's stop rule (``search(stop=...)``)
STUDY_FORMAT = 2  # 1: the tuner's own ask-and-tell batches
TPE_STARTUP_TRIALS = 10  # trials drawn at random before TPE models the finished ones
# Settings a resumed search may change: those that change no trial's result. The run
# length, the validation cadence and early stopping are part of what a trial measures.
RESUMABLE_FIELDS = configs.RESUMABLE_FIELDS - {
    "number_of_epochs", "validation_step", "early_stopping"}
DIVERGED = (loop.TrainingDivergedError, metrics_lib.NonFiniteModelError)

Report = Callable[[str], None]
# ``stop(trial, epoch, best)``: a caller's own rule, asked after a trial other than trial
# 0 validated an epoch the pruner may stop at (``may_prune``), with its best validation
# NDCG@100 so far; a reason (a string) stops the trial as pruned, ``None`` goes on.
Stop = Callable[[int, int, float], "str | None"]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to search (the tool's own flags). ``heartbeat_seconds``: how often a running
  trial records that it is alive; one silent for twice as long is taken as dead."""

  trials: int = 20
  tune_seed: int = 0
  parallel_trials: int = 1
  timeout_minutes: float = 0.0
  space: tuple[str, ...] = ()
  prune_warmup_epochs: int = 10
  prune_startup_trials: int = 5
  heartbeat_seconds: int = 10

  def check(self) -> None:
    for name in ("trials", "parallel_trials", "heartbeat_seconds"):
      if getattr(self, name) < 1:
        raise TuneError(f"--{name} must be >= 1")
    for name in ("tune_seed", "timeout_minutes", "prune_warmup_epochs",
                 "prune_startup_trials"):
      if getattr(self, name) < 0:
        raise TuneError(f"--{name} must be >= 0")


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
  return {"format": STUDY_FORMAT, "space": space.to_json(),
          "base": {k: v for k, v in configs.to_json(base).items()
                   if k not in RESUMABLE_FIELDS},
          **{k: getattr(settings, k) for k in ("tune_seed", "prune_warmup_epochs",
                                               "prune_startup_trials")}}


def _differences(saved: dict, now: dict) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(now)):
    a, b = saved.get(key), now.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      for k in (k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)):
        what = f"--{k}" if key == "base" else f"the space's {k}"
        out.append(f"{what}: the study has {a.get(k)!r}, this command {b.get(k)!r}")
    elif a != b:
      out.append(f"--{key}: the study has {a!r}, this command {b!r}")
  return out


def _retry_callback():
  """Optuna's callback that queues a dead trial again, with its parameters and curve."""
  storages = _optuna().storages
  retry = (getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
           or storages.RetryFailedTrialCallback)  # its name before Optuna 4.9
  return retry(max_retry=None, inherit_intermediate_values=True)


def storage_url(root: str) -> str:
  return "sqlite:///" + os.path.abspath(os.path.join(root, "study.db"))


# Serialises, within this process, Optuna's taking of a queued trial (WAITING -> RUNNING):
# on SQLite the row lock RDBStorage asks for (SELECT ... FOR UPDATE) does nothing, so two
# trial threads could both read a re-queued trial as waiting and both run it.
_TAKE_LOCK = threading.Lock()


def _storage_class():
  """RDBStorage whose move of a trial to RUNNING is taken under :data:`_TAKE_LOCK`."""
  optuna = _optuna()

  class Storage(optuna.storages.RDBStorage):

    def set_trial_state_values(self, trial_id, state, values=None):
      if state != optuna.trial.TrialState.RUNNING:
        return super().set_trial_state_values(trial_id, state, values)
      with _TAKE_LOCK:  # the state read and its change committed before another reads
        return super().set_trial_state_values(trial_id, state, values)

  return Storage


def open_study(root: str, settings: Settings | None = None, *, create: bool = False,
               base_values: dict | None = None):
  """The study in ``ROOT/study.db`` (``create``: made when missing), with heartbeats,
  the retry callback, the pruner and the sampler of ``settings`` (default: Settings());
  ``base_values``: trial 0's parameters, which the sampler gives it (:func:`_sampler`)."""
  optuna, s = _optuna(), settings or Settings()
  name = ("heartbeat_stale_trial_callback" if hasattr(
      optuna.storages, "RetryHeartbeatStaleTrialCallback") else "failed_trial_callback")
  storage = _storage_class()(
      storage_url(root), engine_kwargs={"connect_args": {"timeout": 300}},
      heartbeat_interval=s.heartbeat_seconds, grace_period=2 * s.heartbeat_seconds,
      **{name: _retry_callback()})
  if not create and STUDY_NAME not in optuna.get_all_study_names(storage):
    raise TuneError(f"{root}: no search there (no study {STUDY_NAME!r} in study.db)")
  return optuna.create_study(
      storage=storage, study_name=STUDY_NAME, direction="maximize", load_if_exists=True,
      sampler=_sampler(s.tune_seed, base_values), pruner=optuna.pruners.MedianPruner(
          n_startup_trials=s.prune_startup_trials, n_warmup_steps=s.prune_warmup_epochs))


def sampler_seed(tune_seed: int, position: int) -> int:
  """The sampler's seed for the trial at ``position``: a function of both only."""
  return int(np.random.SeedSequence([tune_seed, position]).generate_state(1)[0])


def _sampler(tune_seed: int, base_values: dict | None = None):
  """Optuna's TPE (multivariate, constant liar for running trials), made afresh for each
  trial with the seed of (``tune_seed``, its position): what a trial draws does not
  depend on what this process asked before (a resumed search asks what an uninterrupted
  one would). The trial at position 0 is given ``base_values`` instead: the base is
  trial 0 without Optuna's queue of waiting trials, whose pop is not atomic on SQLite
  (two threads could both take an enqueued trial 0)."""
  tpe_sampler = _optuna().samplers.TPESampler

  class PerTrialTPE(_optuna().samplers.BaseSampler):

    def __init__(self):
      self.tpe, self.base, self.lock = {}, set(), threading.Lock()

    def before_trial(self, study, trial):
      at = positions(study.get_trials(deepcopy=False))[trial.number]
      with self.lock:
        self.tpe[trial.number] = tpe_sampler(
            seed=sampler_seed(tune_seed, at), multivariate=True, constant_liar=True,
            n_startup_trials=TPE_STARTUP_TRIALS)
        if at == 0 and base_values is not None:
          self.base.add(trial.number)
      self.tpe[trial.number].before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
      if trial.number in self.base:
        return {}
      return self.tpe[trial.number].infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
      if trial.number in self.base:
        return {}
      return self.tpe[trial.number].sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, dist):
      if trial.number in self.base:
        return base_values[name]
      return self.tpe[trial.number].sample_independent(study, trial, name, dist)

    def after_trial(self, study, trial, state, values):
      with self.lock:
        tpe = self.tpe.pop(trial.number, None)
        self.base.discard(trial.number)
      if tpe is not None:
        tpe.after_trial(study, trial, state, values)

    def reseed_rng(self):
      pass  # the seeds are the trials' own (optimize reseeds each of its threads)

  return PerTrialTPE()


def positions(trials) -> dict[int, int]:
  """Optuna trial number -> the search's trial (its row and workdir): trials that are not
  retries are numbered 0, 1, ... in order, and a retry takes its original's. A function
  of the stored trials alone, so the processes of a search agree on it."""
  retry, out, fresh = _retry_callback(), {}, 0
  for t in sorted(trials, key=lambda t: t.number):
    original = retry.retried_trial_number(t)
    out[t.number] = fresh if original is None else out[original]
    fresh += original is None
  return out


def _latest(study) -> dict[int, Any]:
  """The search's trial -> its latest attempt (a ``FrozenTrial``), in order."""
  trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
  at = positions(trials)
  return dict(sorted({at[t.number]: t for t in trials}.items()))


def _counts(study) -> tuple[int, int]:
  """``(finished, running)`` trials of the search (their latest attempts)."""
  s = _optuna().trial.TrialState
  latest = _latest(study).values()
  return (sum(t.state in (s.COMPLETE, s.PRUNED) or t.state == s.FAIL and
              not t.user_attrs.get("interrupted") for t in latest),
          sum(t.state == s.RUNNING for t in latest))


def recover(study, settings: Settings, report: Report) -> None:
  """Queues again, with their parameters, the trials a stopped search left: those
  interrupted (an error or Ctrl-C: failed, marked ``interrupted``), and those left running
  by a process that died, once their heartbeat is older than its grace period (waited
  out here when a trial is running: it may be another live process's)."""
  optuna = _optuna()
  s, retry = optuna.trial.TrialState, _retry_callback()
  if any(t.state == s.RUNNING for t in study.get_trials(deepcopy=False)):
    time.sleep(2 * settings.heartbeat_seconds + 2)  # stored times have whole seconds
    optuna.storages.fail_stale_trials(study)  # and queues them again (the callback)
  for t in _latest(study).values():
    if t.state == s.FAIL and t.user_attrs.get("interrupted"):
      retry(study, t)
  for position, t in _latest(study).items():
    if t.state == s.WAITING and retry.retried_trial_number(t) is not None:
      report(f"trial {position} was interrupted (optuna trial "
             f"{retry.retried_trial_number(t)}); it runs again with the same parameters, "
             "resuming its workdir")


def trial_dir(root: str, position: int) -> str:
  return os.path.join(root, "trials", f"{position:04d}")


def _curve(workdir: str) -> tuple[list[tuple[int, float]], list[dict]]:
  """``([(epoch, best validation NDCG@100 up to it)], train records)`` of the log."""
  records = [r for r in run_folder.MetricsLog(workdir).records()
             if r.get("split") == "train"] if os.path.isdir(workdir) else []
  curve, best = [], -math.inf
  for r in (r for r in records if r.get(METRIC) is not None):
    best = max(best, float(r[METRIC]))
    curve.append((int(r["epoch"]), best))
  return curve, records


def _pruned(workdir: str) -> str | None:
  """The pruner's reason when it stopped the run in ``workdir``."""
  return next((r["stopped"] for r in _curve(workdir)[1]
               if str(r.get("stopped", "")).startswith((PRUNED_PREFIX, STOPPED_PREFIX))),
              None)


def may_prune(cfg: configs.Config, epoch: int, record: dict) -> bool:
  """Whether the pruner may stop a trial after validating ``epoch`` (its log ``record``).

  Never at the last epoch (the trial is complete), and not while a weight average is
  younger than its window: with ``ema_decay = d`` the validated average weighs the last
  ``1 / (1 - d)`` steps, so before that many steps it still carries the early weights
  and scores below the plain weights of a trial without averaging at the same epoch.
  """
  if epoch >= cfg.number_of_epochs:
    return False
  return cfg.ema_decay <= 0 or int(record["step"]) * (1.0 - cfg.ema_decay) >= 1.0


def _pruning_hook(trial, cfg: configs.Config, workdir: str, reported: set,
                  position: int, stop: Stop | None = None):
  """``loop.run``'s ``on_validation``: reports the best-so-far validation NDCG@100 of
  each validated epoch (a resumed run's earlier ones too) and asks the pruner, then
  ``stop``; trial 0 (``position`` 0), the reference, is never stopped."""

  def on_validation(epoch: int, record: dict) -> str | None:
    curve = [(e, v) for e, v in _curve(workdir)[0] if e < epoch]
    best = max([float(record[METRIC])] + [v for _, v in curve])
    for e, v in curve + [(epoch, best)]:
      if e not in reported:
        trial.report(v, e)
        reported.add(e)
    if position == 0 or not may_prune(cfg, epoch, record):
      return None
    if trial.should_prune():
      return f"{PRUNED_PREFIX} at epoch {epoch}"
    reason = stop(position, epoch, best) if stop is not None else None
    return f"{STOPPED_PREFIX} {epoch}: {reason}" if reason else None

  return on_validation


def _objective(study, base: configs.Config, root: str, space: Space,
               devices: queue.Queue | None, report: Report, stop: Stop | None = None):
  """The function Optuna maximises: trains a trial (resuming its workdir; on a device of
  its own from ``devices``, when given) and returns its best validation NDCG@100. Raises
  ``optuna.TrialPruned`` when the pruner stopped it; records the reason of a failure."""

  def objective(trial) -> float:
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    position = positions(stored.values())[trial.number]
    values = space.suggest(trial)
    trial.set_user_attr("interrupted", False)  # a retry inherits its original's mark
    report(f"trial {position}: " + ", ".join(f"{k}={_cell(v)}" for k, v in values.items()))
    cfg, workdir = space.trial_config(base, values), trial_dir(root, position)
    t0, device = time.perf_counter(), devices.get() if devices else None
    try:
      if not _pruned(workdir):  # a retry of a trial the pruner had stopped
        hook = _pruning_hook(trial, cfg, workdir,  # the base, the reference, runs whole
                             set(stored[trial.number].intermediate_values), position, stop)
        loop.run(cfg if device is None else cfg.replace(gpu_number=device), workdir,
                 on_validation=hook)
    except DIVERGED as e:
      trial.set_user_attr("error", str(e))
      raise
    except (Exception, KeyboardInterrupt):
      trial.set_user_attr("interrupted", True)  # run again by the next search
      raise
    finally:
      if device is not None:
        devices.put(device)
    curve, records = _curve(workdir)
    trial.set_user_attr("seconds", time.perf_counter() - t0)
    trial.set_user_attr("epochs", max((int(r["epoch"]) for r in records), default=0))
    if not curve:  # the last epoch always validates
      raise RuntimeError(f"{workdir}: the run validated no epoch")
    trial.set_user_attr("best_epoch", next(
        int(r["epoch"]) for r in records if r.get(METRIC) == curve[-1][1]))
    if _pruned(workdir):
      raise _optuna().TrialPruned(_pruned(workdir))
    return curve[-1][1]

  return objective


def _device_slots(base: configs.Config, k: int) -> queue.Queue | None:
  """With ``k`` trials at once and several local devices, each trial of a one-device base
  takes a device of its own (round-robin when ``k`` exceeds them)."""
  n = jax.local_device_count()
  if k == 1 or n == 1 or base.mesh or base.gpu_number >= 0 or base.number_of_devices != 1:
    return None
  slots: queue.Queue = queue.Queue()
  for j in range(k):
    slots.put(j % n)
  return slots


def trial_rows(study) -> list[dict]:
  """One row per trial of the search (its latest attempt), in order."""
  return [{"trial": position, "number": t.number, "state": t.state.name.lower(),
           "params": dict(t.params), "value": t.value,
           **{k: t.user_attrs.get(k) for k in ("best_epoch", "epochs", "seconds", "error")}}
          for position, t in _latest(study).items()]


def best_row(rows: list[dict]) -> dict | None:
  """The complete trial with the highest value (the first such on a tie)."""
  done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
  return max(done, key=lambda r: (r["value"], -r["trial"])) if done else None


def _cell(v: Any) -> str:
  return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


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


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A search's trials (:func:`trial_rows`), its parameters and the results table."""

  rows: list
  names: tuple
  table: str


def drop_spent_checkpoints(root: str, rows: list[dict]) -> list[int]:
  """Removes the checkpoints of every finished trial but the best (its model is the one
  worth serving or testing): a complete, pruned or diverged trial never trains again, and
  its metrics log keeps its curve. An interrupted trial keeps them (it resumes from
  them). Returns the trials whose checkpoints were removed."""
  best = best_row(rows)
  spent = [r["trial"] for r in rows
           if (r["state"] in ("complete", "pruned") or r.get("error"))
           and (best is None or r["trial"] != best["trial"])]
  removed = []
  for position in spent:
    folder = os.path.join(trial_dir(root, position), "checkpoints")
    if os.path.isdir(folder):
      shutil.rmtree(folder)
      removed.append(position)
  return removed


def write_outputs(root: str, base: configs.Config, base_name: str, space: Space,
                  study) -> Outcome:
  """Writes ``results.md`` and (when a trial completed) ``best.json``, atomically."""
  rows, names = trial_rows(study), [p.name for p in space.params]
  table, best = results_table(rows, names), best_row(rows)
  given = f"`--config={base_name}` with the command's settings" if base_name else (
      "the settings given")
  text = [f"# Search in {root}", "",
          f"Base: {given}; trial 0 is the base's own values. Objective: best validation "
          "NDCG@100 (validation users only; the test users are never scored).", "",
          table, ""]
  if best is not None:
    text += [f"Best: trial {best['trial']} (validation NDCG@100 {best['value']:.4f}, "
             f"epoch {best['best_epoch']}); its settings are in best.json.", ""]
    cfg = space.trial_config(base, best["params"]).replace(train=True, test=True)
    files_lib.write_text_atomic(os.path.join(root, "best.json"),
                                json.dumps(configs.to_json(cfg), indent=1) + "\n")
  failures = [f"- trial {r['trial']}: {r['error']}" for r in rows
              if r["state"] == "fail" and r.get("error")]
  if failures:
    text += ["Failed trials:", "", *failures, ""]
  files_lib.write_text_atomic(os.path.join(root, "results.md"), "\n".join(text))
  return Outcome(rows, tuple(names), table)


@contextlib.contextmanager
def _lock(root: str):
  """Processes sharing a folder set the study up one at a time."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(os.path.join(root, ".tune.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _prepare(base: configs.Config, root: str, settings: Settings, report: Report):
  """Checks the search, then creates or reopens its study; returns ``(study, space)``."""
  settings.check()
  check_base(base)
  _optuna()
  if settings.space:
    make_space(base, tuple(settings.space), lambda: 1)  # a bad name before the data
  split = loop.load_data(base)
  if split.validation is None or split.validation.n_users == 0:
    raise TuneError(f"{base.dataset}: the split has no validation users to tune on")
  n_train = int(split.n_train_users)
  del split
  space = make_space(base, tuple(settings.space), lambda: n_train,
                     note=lambda s: report(f"note: {s}"))
  fingerprint = _fingerprint(base, space, settings)
  os.makedirs(root, exist_ok=True)
  with _lock(root):
    trials_dir = os.path.join(root, "trials")
    if (not os.path.exists(os.path.join(root, "study.db")) and os.path.isdir(trials_dir)
        and os.listdir(trials_dir)):
      raise TuneError(f"--root={root} holds trials/ but no study.db: trials of another "
                      "search; use an empty --root")
    study = open_study(root, settings, create=True, base_values=dict(space.base_values))
    saved = study.user_attrs.get("settings")
    if saved is not None and saved.get("format") != STUDY_FORMAT:
      raise TuneError(f"--root={root} holds a search of an earlier version of this tool "
                      "(its trials cannot be resumed); use another --root")
    if saved is not None and isinstance(saved.get("base"), dict):
      # A study of an earlier version names a renamed setting by its old name.
      saved = {**saved, "base": configs.current_names(saved["base"], root)}
    if saved is None:
      study.set_user_attr("settings", fingerprint)
    elif saved != fingerprint:
      raise TuneError(f"--root={root} holds a search with other settings ("
                      + "; ".join(_differences(saved, fingerprint))
                      + "). Use another --root, or this search's own settings")
    recover(study, settings, report)
  return study, space


def search(base: configs.Config, root: str, settings: Settings, *, base_name: str = "",
           report: Report = lambda line: None, stop: Stop | None = None) -> Outcome:
  """Runs (or resumes) the search of ``settings`` around ``base`` in ``root`` until
  ``settings.trials`` trials have finished or the time is up; ``report(line)`` is told
  what happens; ``stop``: a rule of the caller's that may stop a trial as pruned
  (:data:`Stop`). Raises :class:`TuneError` for a search that cannot start; an error of a
  trial other than divergence stops the search (the next call runs that trial again)."""
  study, space = _prepare(base, root, settings, report)
  objective = _objective(study, base, root, space,
                         _device_slots(base, settings.parallel_trials), report, stop)

  def after_trial(study, frozen) -> None:
    error = frozen.user_attrs.get("error")
    value = "" if frozen.value is None else f" {frozen.value:.4f}"
    report(f"trial {positions(study.get_trials(deepcopy=False))[frozen.number]}: "
           f"{frozen.state.name.lower()}{value}" + (f" ({error})" if error else ""))
    write_outputs(root, base, base_name, space, study)
    drop_spent_checkpoints(root, trial_rows(study))
    if sum(_counts(study)) >= settings.trials:  # those running (here or not) will finish
      study.stop()

  deadline = time.monotonic() + 60 * settings.timeout_minutes
  while sum(_counts(study)) < settings.trials:
    if settings.timeout_minutes and time.monotonic() >= deadline:
      report(f"--timeout_minutes={settings.timeout_minutes:g} reached: no new trials")
      break
    study.optimize(objective, n_trials=settings.trials - sum(_counts(study)),
                   n_jobs=settings.parallel_trials, callbacks=[after_trial],
                   catch=DIVERGED,
                   timeout=deadline - time.monotonic() if settings.timeout_minutes else None)
  return write_outputs(root, base, base_name, space, study)
