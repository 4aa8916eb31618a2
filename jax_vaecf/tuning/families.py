r"""One search across model families: which model to use on a data set.

  python -m experiments.tune --families=ease,edlae,multdae,multvae,recvae \
      --config=ml1m --data_dir=DIR --root=R --trials=10

Each family starts from the base configuration switched to its model
(:func:`family_config`). The closed-form families (EASE, EDLAE) run first: their fit
sweeps its settings on the validation users inside one run (``R/<family>/run``), so one
run is their search. Then each trained family runs the per-model search of
:mod:`jax_vaecf.tuning.search` in ``R/<family>/`` (its own Optuna study, median pruning,
resume, ``best.json``), ``--trials`` trials each, with one more pruning rule
(:func:`stop_rule`): a trial other than a family's trial 0 stops once its best
validation NDCG@100 after the warm-up epochs is below a fraction of the best of the
families searched before it.

Then the winner, the family whose best run has the highest validation NDCG@100; its
margin over the runner-up family, tested user by user on the validation users (both
best checkpoints scored again, :func:`compare`); and one test of the winner on the test
users (:func:`test_winner`: refitted on every training item under the per-user protocol,
its best checkpoint as it is under the held-out-users protocol). ``R/families.json``
keeps what is done: a rerun with the same ``R`` continues where it stopped, and a
finished family, comparison or test is never run again. Outputs: ``R/families.md`` (the
table) and ``R/winner.json`` (the winner's settings), written atomically. The rule and
the costs: docs/tuning.md, "Which model for my own data".
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from jax_vaecf import model as model_lib
from jax_vaecf.core import files as files_lib
from jax_vaecf.evaluation import metrics as metrics_lib
from jax_vaecf.evaluation import significance
from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training.evaluate import BEST_METRIC, evaluate, read_best_state
from jax_vaecf.tuning import search as search_lib
from jax_vaecf.tuning.space import TuneError

Report = Callable[[str], None]
STATE_FILE = "families.json"
STATE_FORMAT = 1
PRUNE_BELOW_BEST = 0.7  # the default fraction of stop_rule (docs/tuning.md: why)


def closed_form(family: str) -> bool:
  """Whether the model called ``family`` is fitted in closed form (its entry's ``fit``)."""
  return model_lib.model_entry(family).fit is not None


def _trained_defaults(family: str) -> dict:
  """The run-level settings a trained family starts from when the base is another
  model's: RecVAE's learning rate and per-user KL weight are its preset's (the paper's);
  the Mult- models weigh the KL term by the beta schedule."""
  if family == "recvae":
    paper = configs.ml20m_recvae()
    return {"lr": paper.lr, "kl_gamma": paper.kl_gamma}
  return {"kl_gamma": 0.0}


def family_config(base: configs.Config, family: str,
                  family_settings: dict | None = None) -> configs.Config:
  """The configuration family ``family`` starts from: ``base`` itself when it is the
  base's model; else ``base`` switched to the model (its shared settings carried,
  ``Config._carried_to``), a closed-form model with its own default sweep and no
  weight average, a trained one with :func:`_trained_defaults`. ``family_settings``
  (``{family: {setting: value}}``, :func:`check_family_settings`): the family's own
  model settings over those (a closed-form family's grid, a trained family's trial 0).
  Never a refit or a test (the winner's come last)."""
  cfg = base
  if family != base.model:
    if closed_form(family):
      cfg = base.replace(model=family, model_settings=model_lib.make_settings(family, None),
                         ema_decay=0.0)  # no optimiser steps to average
    else:
      cfg = base.replace(model=family, **_trained_defaults(family))
  given = (family_settings or {}).get(family)
  if given:
    cfg = cfg.replace(model_settings=model_lib.make_settings(
        family, given, source=f"--family_settings {family}", base=cfg.model_settings))
  return cfg.replace(train=True, test=False, refit=False, benchmark=False)


def check_family_settings(families: tuple[str, ...], family_settings: dict | None) -> dict:
  """``family_settings`` (``{family: {setting: value}}``, e.g. parsed from
  ``--family_settings='{"ease": {"l2": [200, 400]}}'``) checked: every key a searched
  family, every value a dict of that model's settings. Returns it (``{}`` for ``None``);
  :class:`TuneError` naming what is wrong."""
  family_settings = dict(family_settings or {})
  stray = sorted(set(family_settings) - set(families))
  if stray:
    raise TuneError(f"--family_settings names {', '.join(stray)}, not in --families="
                    f"{','.join(families)}")
  for family, values in family_settings.items():
    if not isinstance(values, dict):
      raise TuneError(f"--family_settings {family}: expected {{setting: value}}, got "
                      f"{values!r}")
    try:
      model_lib.make_settings(family, values, source=f"--family_settings {family}")
    except ValueError as e:
      raise TuneError(str(e)) from None
  return family_settings


def check_families(base: configs.Config, families: tuple[str, ...],
                   settings: search_lib.Settings,
                   family_settings: dict | None = None) -> tuple[str, ...]:
  """The families in the order they run (closed-form first, else as given); a
  :class:`TuneError` for a list the search cannot run."""
  known = model_lib.names()
  unknown = [f for f in families if f not in known]
  if unknown or not families:
    raise TuneError(f"--families: unknown model {', '.join(map(repr, unknown))}; expected "
                    f"names from {', '.join(known)}" if unknown else "--families: empty")
  if len(set(families)) != len(families):
    raise TuneError(f"--families names a model twice: {','.join(families)}")
  if settings.space:
    raise TuneError("--space with --families: each family searches its own default space; "
                    "leave --space out")
  trained = [f for f in families if not closed_form(f)]
  if trained and closed_form(base.model):
    raise TuneError(f"--families={','.join(trained)} with a --model={base.model} base: a "
                    "closed-form base has no training settings (epochs, learning rate) "
                    "for the trained families; start from a trained model's preset "
                    "(e.g. --config=ml1m)")
  check_family_settings(families, family_settings)
  for family in families:
    search_lib.check_base(family_config(base, family, family_settings))
  return tuple(f for f in families if closed_form(f)) + tuple(trained)


def hopeless(best: float, bar: float | None, fraction: float) -> bool:
  """Whether a trial whose best validation NDCG@100 so far is ``best`` is below
  ``fraction`` of ``bar`` (the best of the families before; ``None``: no family before)."""
  return bar is not None and fraction > 0 and best < fraction * bar


def stop_rule(bar: float | None, fraction: float,
              warmup_epochs: int) -> search_lib.Stop | None:
  """The cross-family rule given to :func:`jax_vaecf.tuning.search.search`: after a
  validated epoch ``>= warmup_epochs`` that the pruner may stop at, a trial (never a
  family's trial 0) stops when :func:`hopeless`. ``None`` when it can stop nothing."""
  if bar is None or fraction <= 0:
    return None

  def stop(trial: int, epoch: int, best: float) -> str | None:
    del trial  # search never asks about trial 0
    if epoch < warmup_epochs or not hopeless(best, bar, fraction):
      return None
    return (f"best validation NDCG@100 {best:.4f} is below {fraction:g} x {bar:.4f}, "
            "the best of the families before")

  return stop


def disk_bytes(folder: str) -> int:
  """Bytes of the files under ``folder``."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder)
             for f in names if os.path.isfile(os.path.join(d, f)))


def _settings_text(values: dict) -> str:
  cells = []
  for k, v in values.items():
    v = v[0] if isinstance(v, list) and len(v) == 1 else v
    cells.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
  return ", ".join(cells)


def run_closed_form(cfg: configs.Config, root: str, family: str, report: Report) -> dict:
  """Fits a closed-form family once in ``root/<family>/run`` (its sweep on the
  validation users); returns its result (:func:`run_family`)."""
  workdir = os.path.join(root, family, "run")
  report(f"{family}: one fit, its settings swept on the validation users ({workdir})")
  try:
    train = loop.run(cfg, workdir)["train"]
  except search_lib.DIVERGED as e:
    report(f"{family}: failed ({e})")
    return {"value": None, "trials": 1, "error": str(e)}
  chosen = train.get("chosen") or {}
  value = (train.get("best_validation") or {}).get(BEST_METRIC)
  best = cfg.replace(**chosen, test=True)
  return {"value": value, "trials": 1, "best_epoch": 1, "chosen": chosen,
          "settings": _settings_text(chosen), "workdir": os.path.relpath(workdir, root),
          "config": configs.to_json(best)}


def run_trained(cfg: configs.Config, root: str, family: str,
                settings: search_lib.Settings, stop: search_lib.Stop | None,
                report: Report) -> dict:
  """The per-model search of a trained family in ``root/<family>``; returns its result
  (:func:`run_family`)."""
  folder = os.path.join(root, family)
  outcome = search_lib.search(cfg, folder, settings, base_name=f"the base as {family}",
                              report=lambda line: report(f"{family}: {line}"), stop=stop)
  best = search_lib.best_row(outcome.rows)
  finished = sum(r["state"] != "running" for r in outcome.rows)
  if best is None:
    return {"value": None, "trials": finished, "error": "no trial completed"}
  config = configs.get_config(os.path.join(folder, "best.json"))
  return {"value": best["value"], "trials": finished, "best_epoch": best["best_epoch"],
          "chosen": {}, "settings": _settings_text(best["params"]),
          "workdir": os.path.relpath(search_lib.trial_dir(folder, best["trial"]), root),
          "config": configs.to_json(config)}


def run_family(base: configs.Config, root: str, family: str,
               settings: search_lib.Settings, stop: search_lib.Stop | None,
               report: Report, family_settings: dict | None = None) -> dict:
  """Searches one family; its result: ``value`` (best validation NDCG@100, ``None``
  when nothing completed), ``trials``, ``best_epoch``, ``settings`` (text), ``chosen``
  (a closed-form fit's choice), ``workdir`` (the best run's, relative to ``root``),
  ``config`` (JSON of the best settings, testing on), ``seconds`` and ``disk``."""
  cfg, t0 = family_config(base, family, family_settings), time.perf_counter()
  if closed_form(family):
    result = run_closed_form(cfg, root, family, report)
  else:
    result = run_trained(cfg, root, family, settings, stop, report)
  return {"family": family, "title": model_lib.model_entry(family).title, **result,
          "seconds": time.perf_counter() - t0,
          "disk": disk_bytes(os.path.join(root, family))}


def ranked(results: list[dict]) -> list[dict]:
  """The families with a value, best validation NDCG@100 first (on a tie, the one that
  ran first)."""
  return sorted((r for r in results if r.get("value") is not None),
                key=lambda r: -r["value"])


def validation_users(workdir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The best checkpoint of the run in ``workdir`` scored again on the validation users:
  ``(ndcg@100, counted, user_ids)``, each ``(n,)`` in the split's order (float64 with
  NaN where not counted, bool, raw ids)."""
  cfg = configs.get_config(os.path.join(workdir, "config.json"))
  split = loop.load_data(cfg)
  built = loop.build(cfg, split.n_items, split.n_train_users)
  restored = read_best_state(cfg, workdir, split, built, "no best checkpoint to score")
  acc = metrics_lib.MetricAccumulator()
  evaluate(built.steps, built.steps.init_state(restored[0]), split.validation,
           cfg.batch_size_validation, accumulator=acc)
  users = acc.users()
  return users[BEST_METRIC], users["counted"], np.asarray(split.validation.user_ids)


def compare(winner: dict, runner_up: dict, root: str) -> dict:
  """The winner against the runner-up family on the validation users, user by user
  (:func:`jax_vaecf.evaluation.significance.paired_comparison`, ``a`` the runner-up),
  with the ``verdict`` in words."""
  a, counted_a, users_a = validation_users(os.path.join(root, runner_up["workdir"]))
  b, counted_b, users_b = validation_users(os.path.join(root, winner["workdir"]))
  if users_a.shape != users_b.shape or not np.array_equal(users_a, users_b):
    raise ValueError(f"{runner_up['workdir']} and {winner['workdir']} were validated on "
                     "other users: their runs do not share the split")
  keep = counted_a & counted_b
  row = significance.paired_comparison(a[keep], b[keep])
  return {**row, "verdict": significance.verdict(row, runner_up["family"],
                                                 winner["family"])}


def test_winner(winner: dict, root: str) -> dict:
  """The winner's one test on the test users: under the per-user protocol (validation
  targets cut from the rows) its settings refitted on every training item for the epochs
  validation chose (``WORKDIR/refit``); else its best checkpoint as it is."""
  cfg = configs.from_json(winner["config"], "the winner's settings")
  workdir = os.path.join(root, winner["workdir"])
  if cfg.protocol == "per_user" and cfg.validation_fraction > 0:
    summary = {"best_epoch": winner["best_epoch"], "chosen": winner.get("chosen") or {}}
    out = loop.refit(cfg.replace(train=True, test=True, refit=True), workdir, summary)
    folder = os.path.join(workdir, loop.REFIT_FOLDER)
  else:
    out = loop.run(cfg.replace(train=False, test=True, refit=False), workdir)
    folder = workdir
  metrics = {k: float(v) for k, v in out["test"].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  return {"refit": folder != workdir, "folder": os.path.relpath(folder, root),
          "metrics": metrics}


def _fingerprint(base: configs.Config, order: tuple[str, ...],
                 settings: search_lib.Settings, fraction: float,
                 family_settings: dict | None = None) -> dict:
  """What a resumed family search must share with the one in the folder."""
  # As typed settings, so that l2 300 and 300.0 are the same search.
  extra = {"family_settings": {
      f: model_lib.settings_json(model_lib.make_settings(f, v))
      for f, v in sorted(family_settings.items())}} if family_settings else {}
  return {"families": list(order), "trials": settings.trials, "prune_below_best": fraction,
          **extra,
          "prune_warmup_epochs": settings.prune_warmup_epochs,
          "base": {k: v for k, v in configs.to_json(base).items()
                   if k not in search_lib.RESUMABLE_FIELDS}}


def open_state(root: str, fingerprint: dict) -> dict:
  """``root/families.json`` (created when missing); a :class:`TuneError` when it holds
  a family search with other settings."""
  path = os.path.join(root, STATE_FILE)
  if not os.path.exists(path):
    if os.path.exists(os.path.join(root, "study.db")):
      raise TuneError(f"--root={root} holds a search of one model (study.db), not of "
                      "families; use another --root")
    os.makedirs(root, exist_ok=True)
    return {"format": STATE_FORMAT, "settings": fingerprint, "results": {}}
  try:
    with open(path) as f:
      state = json.load(f)
  except (OSError, ValueError) as e:
    raise TuneError(f"{path}: unreadable ({e}); use another --root") from None
  saved = state.get("settings", {})
  if state.get("format") != STATE_FORMAT or saved != fingerprint:
    diff = [f"{k}: the folder has {saved.get(k)!r}, this command {fingerprint[k]!r}"
            for k in fingerprint if k != "base" and saved.get(k) != fingerprint[k]]
    diff += [f"--{k}: the folder has {saved.get('base', {}).get(k)!r}, this command "
             f"{v!r}" for k, v in fingerprint["base"].items()
             if saved.get("base", {}).get(k) != v]
    raise TuneError(f"--root={root} holds a family search with other settings ("
                    + ("; ".join(diff) or "another format") + "); use another --root")
  return state


def save_state(root: str, state: dict) -> None:
  files_lib.write_text_atomic(os.path.join(root, STATE_FILE),
                              json.dumps(state, indent=1) + "\n")


def _seconds(s: float) -> str:
  return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def families_table(results: list[dict]) -> str:
  """The markdown table of the families, in the order they ran."""
  lines = ["| family | trials | best validation NDCG@100 | its settings | wall time "
           "| disk |", "|---|---|---|---|---|---|"]
  for r in results:
    value = "" if r.get("value") is None else f"{r['value']:.4f}"
    settings = r.get("settings") or r.get("error", "")
    lines.append(f"| {r['family']} | {r['trials']} | {value} | {settings} | "
                 f"{_seconds(r['seconds'])} | {r['disk'] / 2**20:.1f} MB |")
  return "\n".join(lines)


def summary_lines(state: dict) -> list[str]:
  """The winner, its margin over the runner-up and the test, in words."""
  ranking = ranked(list(state["results"].values()))
  if not ranking:
    return ["No family completed a run: no winner."]
  w, lines = ranking[0], []
  lines.append(f"Winner: {w['family']} ({w['title']}), validation NDCG@100 "
               f"{w['value']:.4f}, settings in winner.json.")
  c = state.get("comparison")
  if len(ranking) > 1 and c:
    r = ranking[1]
    lines.append(
        f"Runner-up: {r['family']}, {r['value']:.4f}: the winner is "
        f"{w['value'] - r['value']:+.4f} ahead on validation; user by user over "
        f"{c['n_users']} validation users {c['diff']:+.4f} (95% CI {c['ci_low']:+.4f} to "
        f"{c['ci_high']:+.4f}, paired t p = {c['p_ttest']:.2g}): {c['verdict']}.")
  t = state.get("test")
  if t:
    how = ("refitted on every training item" if t["refit"] else
           "its best checkpoint as it is: the held-out-users protocol has no refit")
    m = t["metrics"]
    # recalln@20 (hits / |held-out items|) is the recall NGCF / LightGCN splits publish.
    lines.append(f"Test ({how}, {t['folder']}): " + ", ".join(
        f"{k} {m[k]:.4f}" for k in ("ndcg@20", "recall@20", "recalln@20", "ndcg@100",
                                    "recall@50") if k in m) + ".")
  return lines


def write_outputs(root: str, state: dict) -> None:
  """``families.md`` and (once there is a winner) ``winner.json``, atomically."""
  results = list(state["results"].values())
  text = [f"# Model families searched in {root}", "",
          "Each family's best validation NDCG@100 (validation users only); wall time and "
          "disk of its folder.", "", families_table(results), "", *summary_lines(state),
          ""]
  files_lib.write_text_atomic(os.path.join(root, "families.md"), "\n".join(text))
  ranking = ranked(results)
  if ranking:
    config = dict(ranking[0]["config"])
    cfg = configs.from_json(config, "the winner's settings")
    if cfg.protocol == "per_user" and cfg.validation_fraction > 0:
      config["refit"] = True
    files_lib.write_text_atomic(os.path.join(root, "winner.json"),
                                json.dumps(config, indent=1) + "\n")


def search_families(base: configs.Config, root: str, families: tuple[str, ...],
                    settings: search_lib.Settings, *,
                    prune_below_best: float = PRUNE_BELOW_BEST,
                    report: Report = lambda line: None,
                    family_settings: dict | None = None) -> dict:
  """Searches every family (:func:`run_family`), then compares the winner with the
  runner-up (:func:`compare`) and tests it (:func:`test_winner`), resuming what
  ``root/families.json`` holds; returns that state (``results``: family -> result,
  ``comparison``, ``test``). Raises :class:`TuneError` for a search that cannot start."""
  settings.check()
  if not 0 <= prune_below_best < 1:
    raise TuneError("--prune_below_best must be in [0, 1)")
  order = check_families(base, tuple(families), settings, family_settings)
  state = open_state(root, _fingerprint(base, order, settings, prune_below_best,
                                        family_settings))
  for family in order:
    if family in state["results"]:
      value = state["results"][family]["value"]
      report(f"{family}: searched already (validation NDCG@100 "
             + ("none" if value is None else f"{value:.4f}") + ")")
      continue
    done = ranked(list(state["results"].values()))
    stop = stop_rule(done[0]["value"] if done else None, prune_below_best,
                     settings.prune_warmup_epochs)
    state["results"][family] = run_family(base, root, family, settings, stop, report,
                                          family_settings)
    save_state(root, state)
    write_outputs(root, state)
  ranking = ranked(list(state["results"].values()))
  if len(ranking) > 1 and "comparison" not in state:
    state["comparison"] = compare(ranking[0], ranking[1], root)
    save_state(root, state)
  if ranking and "test" not in state:
    report(f"testing the winner, {ranking[0]['family']}, on the test users")
    state["test"] = test_winner(ranking[0], root)
    save_state(root, state)
  write_outputs(root, state)
  for line in summary_lines(state):
    report(line)
  return state
