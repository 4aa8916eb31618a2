"""``python -m experiments.tune``: the command over :mod:`jax_vaecf.tuning.search` (the search,
its space, outputs and guarantees are documented there and in docs/tuning.md).

  python -m experiments.tune --config=ml1m --data_dir=DIR --root=runs/tune_ml1m \\
      --trials=40 [--space=lr,dropout_rate,anneal_cap] [--parallel_trials=4]

With ``--families=ease,edlae,multdae,multvae,recvae`` it searches several models, the
closed-form ones first, then ``--trials`` trials of each trained one, and tests the
winner once (:mod:`jax_vaecf.tuning.families`; docs/tuning.md, "Which model for my own
data").

Needs Optuna (``pip install -e .[tune]``). ``--parallel_trials=K`` runs K trials at
once in this process (Optuna's ``n_jobs``); several commands may also share one
``--root`` (each on its own devices or cores) and run the one study together.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.tuning import families as families_lib
from jax_vaecf.tuning.search import Settings, best_row, search
from jax_vaecf.tuning.space import SPACE, TuneError, model_params

# ----------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's command line: the Config flags (:mod:`experiments.cli`) and its own;
  called under ``__main__`` only, as ``--root`` is also ``experiments.accuracy``'s."""
  fv = flag_values
  cli.define_config_flags(fv)
  flags.DEFINE_string("root", None, "Tuning folder: study.db, trials/NNNN, results.md, "
                      "best.json. Rerunning with the same folder resumes.", flag_values=fv)
  flags.DEFINE_integer("trials", 20, "Finished trials to reach, counting those already "
                       "in the study (trial 0 is the base's own settings).", flag_values=fv)
  flags.DEFINE_float("timeout_minutes", 0.0, "Ask no new trials after this many minutes "
                     "(0 = no limit); trials already started finish.", flag_values=fv)
  flags.DEFINE_integer("tune_seed", 0, "Seed of the search: the same seed, settings and "
                       "data ask the same trials.", flag_values=fv)
  flags.DEFINE_integer("parallel_trials", 1, "Trials run at once in this process (Optuna's "
                       "n_jobs threads), each on a device of its own when there are "
                       "several; other commands may share the --root.", flag_values=fv)
  flags.DEFINE_list("space", [], "Parameters to search, comma separated, from "
                    + ", ".join(p.name for p in SPACE + model_params()) + " (docs/tuning.md); default: "
                    "every one that applies to the model.", flag_values=fv)
  flags.DEFINE_integer("prune_warmup_epochs", 10, "Pruning may stop a trial only from "
                       "this epoch on.", flag_values=fv)
  flags.DEFINE_integer("prune_startup_trials", 5, "Pruning starts once this many trials "
                       "have completed.", flag_values=fv)
  flags.DEFINE_list("families", [], "Search several models (e.g. ease,edlae,multdae,"
                    "multvae,recvae), each from the base switched to it: the closed-form "
                    "ones first (one fit each), then --trials trials of each trained one "
                    "in ROOT/<model>; the winner is compared with the runner-up and "
                    "tested once (docs/tuning.md). Empty: search the base's model.",
                    flag_values=fv)
  flags.DEFINE_string("family_settings", "", "With --families: a JSON object of model "
                      "settings per family over its defaults, e.g. '{\"ease\": {\"l2\": "
                      "[200, 400]}, \"edlae\": {\"dropout_p\": [0.25]}}' (a closed-form "
                      "family's grid, a trained one's trial 0).", flag_values=fv)
  flags.DEFINE_float("prune_below_best", families_lib.PRUNE_BELOW_BEST, "With --families: "
                     "from --prune_warmup_epochs on, a trial (not a family's trial 0) "
                     "stops when its best validation NDCG@100 is below this fraction "
                     "of the best of the families before (0 = never).", flag_values=fv)
  flags.DEFINE_integer("heartbeat_seconds", 10, "A running trial records that it is alive "
                       "this often; one silent for twice as long is run again (its "
                       "process died).", flag_values=fv)


def _settings_from_flags() -> Settings:
  return Settings(trials=FLAGS.trials, tune_seed=FLAGS.tune_seed,
                  parallel_trials=FLAGS.parallel_trials,
                  timeout_minutes=FLAGS.timeout_minutes,
                  space=tuple(s.strip() for s in FLAGS.space if s.strip()),
                  prune_warmup_epochs=FLAGS.prune_warmup_epochs,
                  prune_startup_trials=FLAGS.prune_startup_trials,
                  heartbeat_seconds=FLAGS.heartbeat_seconds)


def _quiet_optuna() -> None:
  """The search reports each trial itself: Optuna's own log lines (a failed trial's
  traceback) and its experimental-feature warnings would repeat it."""
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")


def _family_settings() -> dict:
  if not FLAGS.family_settings:
    return {}
  try:
    value = json.loads(FLAGS.family_settings)
  except json.JSONDecodeError as e:
    raise TuneError(f"--family_settings: not JSON ({e})") from None
  if not isinstance(value, dict):
    raise TuneError("--family_settings: expected a JSON object {family: {setting: value}}")
  return value


def _search_families(base, settings) -> None:
  families = tuple(f.strip() for f in FLAGS.families if f.strip())
  state = families_lib.search_families(base, FLAGS.root, families, settings,
                                       prune_below_best=FLAGS.prune_below_best,
                                       report=lambda line: print(line, flush=True),
                                       family_settings=_family_settings())
  print(families_lib.families_table(list(state["results"].values())), flush=True)
  print(f"table in {os.path.join(FLAGS.root, 'families.md')}, the winner's settings in "
        f"{os.path.join(FLAGS.root, 'winner.json')}", flush=True)


def main(argv):
  cli.start(argv, required=("root",), flag_values=FLAGS)
  root = FLAGS.root
  base = cli.config_from_flags(FLAGS)
  settings = _settings_from_flags()
  try:
    _quiet_optuna()
  except ImportError:
    pass  # search says how to install it
  try:
    if FLAGS.family_settings and not FLAGS.families:
      raise TuneError("--family_settings needs --families")
    if FLAGS.families:
      return _search_families(base, settings)
    outcome = search(base, root, settings, base_name=FLAGS.config,
                     report=lambda line: print(line, flush=True))
  except TuneError as e:
    raise app.UsageError(str(e)) from None
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(outcome.table, flush=True)
  best = best_row(outcome.rows)
  if best is None:
    print("no trial completed: best.json not written", flush=True)
    return
  best_json = os.path.join(root, "best.json")
  print(f"best: trial {best['trial']}, validation NDCG@100 {best['value']:.4f} "
        f"(epoch {best['best_epoch']}); settings in {best_json}", flush=True)
  print("test it over seeds:  python -m experiments.accuracy "
        f"--config={best_json} --root={os.path.join(root, 'accuracy')}", flush=True)
  print("or train one run:    python -m experiments.train "
        f"--config={best_json} --workdir={os.path.join(root, 'best')}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
