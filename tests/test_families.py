"""The search across model families (``experiments.tune --families``): each family from
the base switched to its model, the stop rule against the best family before, the
winner, its table and settings, one test of the winner, and a resume that runs nothing
again."""

import json
import os
import shutil

import pytest

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
from jax_vaecf.training import engine as loop
from jax_vaecf.training import run_folder
from jax_vaecf.tuning import families as fam
from jax_vaecf.tuning import search as tune
from jax_vaecf.tuning.space import TuneError

import _tools

# The end-to-end search trains a Mult-VAE search and fits EASE twice (the sweep, then
# the winner's refit) on the demo data, then runs the command again.
SLOW_TESTS = ("test_the_family_search_end_to_end_on_the_demo_data",)


def test_stop_rule_needs_a_bar_the_warm_up_and_a_value_below_the_fraction():
  assert fam.stop_rule(None, 0.8, 2) is None      # no family before: nothing to stop
  assert fam.stop_rule(0.40, 0.0, 2) is None      # --prune_below_best=0: never
  stop = fam.stop_rule(0.40, 0.8, 3)
  assert stop(1, 2, 0.10) is None                 # before the warm-up epochs
  assert stop(1, 3, 0.33) is None                 # 0.33 >= 0.8 x 0.40
  reason = stop(1, 3, 0.3199)
  assert reason == ("best validation NDCG@100 0.3199 is below 0.8 x 0.4000, the best of "
                    "the families before")
  assert fam.hopeless(0.31, 0.40, 0.8) and not fam.hopeless(0.33, 0.40, 0.8)
  assert not fam.hopeless(0.0, None, 0.8)


class _Trial:
  """What the pruning hook asks of an Optuna trial; the median pruner never prunes."""

  def __init__(self):
    self.reported = {}

  def report(self, value, epoch):
    self.reported[epoch] = value

  def should_prune(self):
    return False


def test_the_search_asks_the_stop_rule_never_for_trial_0_nor_at_the_last_epoch(tmp_path):
  cfg = configs.Config().replace(number_of_epochs=5)
  always = lambda trial, epoch, best: "hopeless"
  record = {"val_ndcg@100": 0.1, "step": 40}
  workdir = str(tmp_path / "trial")
  hook = tune._pruning_hook(_Trial(), cfg, workdir, set(), 0, always)  # pylint: disable=protected-access
  assert hook(3, record) is None                  # trial 0, the reference, runs whole
  hook = tune._pruning_hook(_Trial(), cfg, workdir, set(), 1, always)  # pylint: disable=protected-access
  assert hook(5, record) is None                  # the last epoch: the trial is complete
  reason = hook(3, record)
  assert reason == "pruned at epoch 3: hopeless"
  # The search reads the reason back from the log as a pruned trial's.
  os.makedirs(workdir)
  run_folder.MetricsLog(workdir).write({"split": "train", "epoch": 3, "stopped": reason,
                                        "val_ndcg@100": 0.1})
  assert tune._pruned(workdir) == reason  # pylint: disable=protected-access


def _row(family, value, **more):
  return {"family": family, "title": family.upper(), "value": value, "trials": 2,
          "seconds": 75.0, "disk": 3 * 2**20, "settings": "lr=0.001", **more}


def test_the_winner_is_the_best_value_and_the_first_family_on_a_tie():
  rows = [_row("ease", 0.30), _row("multvae", None, error="no trial completed"),
          _row("multdae", 0.35), _row("recvae", 0.35)]
  assert [r["family"] for r in fam.ranked(rows)] == ["multdae", "recvae", "ease"]
  assert fam.ranked([_row("multvae", None)]) == []


def test_the_table_has_a_row_per_family_in_the_order_run():
  rows = [_row("ease", 0.3012, seconds=16.2),
          _row("multvae", None, settings=None, error="no trial completed",
               seconds=150.0)]
  lines = fam.families_table(rows).splitlines()
  assert lines[0] == ("| family | trials | best validation NDCG@100 | its settings | "
                      "wall time | disk |")
  assert lines[2] == "| ease | 2 | 0.3012 | lr=0.001 | 16 s | 3.0 MB |"
  assert lines[3] == "| multvae | 2 |  | no trial completed | 2.5 min | 3.0 MB |"
  assert len(lines) == 4


def test_outputs_name_the_winner_and_its_margin_and_refit_under_per_user(tmp_path):
  demo = configs.get_config("demo")
  state = {"results": {
      "ease": _row("ease", 0.36, workdir="ease/run",
                   config=configs.to_json(demo.replace(model="ease", l2=(100.0,)))),
      "multvae": _row("multvae", 0.24, config=configs.to_json(demo))},
      "comparison": {"n_users": 60, "diff": 0.1203, "ci_low": 0.08, "ci_high": 0.16,
                     "p_ttest": 2e-8, "verdict": "ease higher"}}
  fam.write_outputs(str(tmp_path), state)
  text = open(tmp_path / "families.md").read()
  assert "Winner: ease (EASE), validation NDCG@100 0.3600" in text
  assert ("Runner-up: multvae, 0.2400: the winner is +0.1200 ahead on validation; user "
          "by user over 60 validation users +0.1203 (95% CI +0.0800 to +0.1600, paired t "
          "p = 2e-08): ease higher.") in text
  winner = configs.get_config(str(tmp_path / "winner.json"))
  assert winner.model == "ease" and winner.l2 == (100.0,) and not winner.refit
  state["test"] = {"refit": True, "folder": "ease/run/refit", "metrics": {
      "ndcg@100": 0.1047, "recall@20": 0.0721, "recalln@20": 0.0698, "ndcg@20": 0.0569,
      "recall@50": 0.1332, "mrr@20": 0.117}}
  fam.write_outputs(str(tmp_path), state)
  assert ("Test (refitted on every training item, ease/run/refit): ndcg@20 0.0569, "
          "recall@20 0.0721, recalln@20 0.0698, ndcg@100 0.1047, recall@50 0.1332.\n"
          ) in open(tmp_path / "families.md").read()
  del state["test"]
  # Under the per-user protocol the winner's settings ask for the refit it was tested by.
  state["results"]["ease"]["config"] = configs.to_json(
      demo.replace(model="ease", protocol="per_user"))
  fam.write_outputs(str(tmp_path), state)
  assert configs.get_config(str(tmp_path / "winner.json")).refit


def test_each_family_starts_from_the_base_switched_to_its_model():
  base = configs.get_config("demo").replace(hidden_dims=(32,), refit=True,
                                            protocol="per_user")
  own = fam.family_config(base, "multvae")
  assert own == base.replace(test=False, refit=False)
  rec = fam.family_config(base, "recvae")
  paper = configs.get_config("ml20m_recvae")
  assert (rec.model, rec.lr, rec.kl_gamma) == ("recvae", paper.lr, paper.kl_gamma)
  assert rec.hidden_dims == (32,)  # changed from Mult-VAE's default: carried
  assert rec.number_of_epochs == base.number_of_epochs and rec.protocol == "per_user"
  dae = fam.family_config(base.replace(model="recvae", lr=5e-4, kl_gamma=0.005), "multdae")
  assert dae.kl_gamma == 0.0
  # The ml1m preset averages its weights: a closed-form model has none to average.
  ml1m = configs.get_config("ml1m")
  assert fam.check_families(ml1m, ("multvae", "ease", "edlae"), tune.Settings()) == (
      "ease", "edlae", "multvae")
  assert fam.family_config(ml1m, "ease").ema_decay == 0.0
  assert fam.family_config(ml1m, "multvae").ema_decay == ml1m.ema_decay
  ease = fam.family_config(base, "ease")
  assert ease.model == "ease" and ease.l2 == () and not ease.refit and not ease.test
  # A closed-form family that is not the base's model sweeps its own grid.
  edlae = fam.family_config(base.replace(model="ease", l2=(500.0,)), "edlae")
  assert edlae.l2 == () and edlae.dropout_p == ()


def test_a_family_list_the_search_cannot_run_is_refused():
  base, settings = configs.get_config("demo"), tune.Settings()
  assert fam.check_families(base, ("multvae", "edlae", "ease"), settings) == (
      "edlae", "ease", "multvae")  # the closed-form ones first
  with pytest.raises(TuneError, match="unknown model 'bogus'; expected names from"):
    fam.check_families(base, ("ease", "bogus"), settings)
  with pytest.raises(TuneError, match="names a model twice"):
    fam.check_families(base, ("ease", "ease"), settings)
  with pytest.raises(TuneError, match="--space with --families"):
    fam.check_families(base, ("ease",), tune.Settings(space=("lr",)))
  with pytest.raises(TuneError, match="a closed-form base has no training settings"):
    fam.check_families(configs.get_config("ml1m_ease"), ("ease", "multvae"), settings)
  with pytest.raises(TuneError, match="validation_fraction=0 has no validation"):
    fam.check_families(base.replace(protocol="per_user", validation_fraction=0.0),
                       ("ease",), settings)


def test_a_folder_of_another_family_search_is_refused(tmp_path):
  base, settings = configs.get_config("demo"), tune.Settings(trials=2)
  saved = fam._fingerprint(base, ("ease", "multvae"), settings, 0.8)  # pylint: disable=protected-access
  fam.save_state(str(tmp_path), {"format": fam.STATE_FORMAT, "settings": saved,
                                 "results": {}})
  assert fam.open_state(str(tmp_path), saved)["results"] == {}
  other = fam._fingerprint(base.replace(lr=0.01), ("ease",), settings, 0.8)  # pylint: disable=protected-access
  with pytest.raises(TuneError) as e:
    fam.open_state(str(tmp_path), other)
  assert "families: the folder has ['ease', 'multvae'], this command ['ease']" in str(e.value)
  assert "--lr: the folder has 0.001, this command 0.01" in str(e.value)
  one = tmp_path / "one"  # the folder of a search of one model
  one.mkdir()
  (one / "study.db").write_bytes(b"")
  with pytest.raises(TuneError, match="holds a search of one model"):
    fam.open_state(str(one), saved)


def test_a_bad_families_flag_is_a_one_line_usage_error(tmp_path):
  proc = _tools.run("experiments.tune", f"--root={tmp_path / 'r'}", "--config=demo",
                    "--families=ease,bogus")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[0].startswith("error: --families: unknown model 'bogus'"), lines
  assert not os.path.exists(tmp_path / "r")


def _table(root):
  """families.md's rows: family -> best validation NDCG@100 (None when empty)."""
  rows = {}
  for line in open(os.path.join(root, "families.md")):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 6 and cells[0] not in ("family", "---"):
      rows[cells[0]] = float(cells[2]) if cells[2] else None
  return rows


def test_the_family_search_end_to_end_on_the_demo_data(tmp_path, monkeypatch):
  root = str(tmp_path / "families")
  args = ("experiments.tune", "--families=multvae,ease", "--config=demo",
          f"--root={root}", "--trials=2", "--number_of_epochs=3", "--hidden_dims=64",
          "--prune_warmup_epochs=2", "--prune_startup_trials=1", "--protocol=per_user",
          "--refit", f"--cache_dir={tmp_path / 'cache'}")
  calls, real_run = [], loop.run

  def counted(cfg, workdir, **kw):
    calls.append((os.path.relpath(workdir, root), cfg.model, cfg.test))
    return real_run(cfg, workdir, **kw)

  monkeypatch.setattr(loop, "run", counted)
  proc = _tools.run(*args)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # EASE ran first (one fit), then Mult-VAE's two trials; every run but one trained
  # without testing, and the one test was the winner's refit.
  assert [c[0] for c in calls[:3]] == [os.path.join("ease", "run"),
                                      os.path.join("multvae", "trials", "0000"),
                                      os.path.join("multvae", "trials", "0001")]
  tested = [c for c in calls if c[2]]
  table = _table(root)
  assert set(table) == {"ease", "multvae"}
  winner = max((f for f in table if table[f] is not None), key=lambda f: table[f])
  state = json.load(open(os.path.join(root, "families.json")))
  assert len(tested) == 1 and tested[0][1] == winner
  assert tested[0][0] == os.path.join(state["results"][winner]["workdir"], "refit")
  assert state["test"]["refit"] and state["test"]["folder"] == tested[0][0]
  assert [r["split"] for r in _records(os.path.join(root, tested[0][0]))
          if r["split"] == "test"] == ["test"]
  text = open(os.path.join(root, "families.md")).read()
  assert f"Winner: {winner} " in text and "refitted on every training item" in text
  config = configs.get_config(os.path.join(root, "winner.json"))
  assert config.model == winner and config.refit and config.test
  # The best checkpoints scored again on the validation users give the values the
  # searches recorded.
  runner_up = ({"ease", "multvae"} - {winner}).pop()
  assert state["comparison"]["b"] == pytest.approx(table[winner], abs=1e-4)
  assert state["comparison"]["a"] == pytest.approx(table[runner_up], abs=1e-4)
  # The same command again runs nothing and writes the same table.
  calls.clear()
  again = _tools.run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert calls == []
  assert "ease: searched already" in again.stdout
  assert open(os.path.join(root, "families.md")).read() == text


def test_a_held_out_users_winner_is_tested_as_it_is(trained_run, tmp_path):
  root = str(tmp_path)
  workdir = os.path.join(root, "multvae", "trials", "0000")
  shutil.copytree(trained_run, workdir)
  best = max(r["val_ndcg@100"] for r in _records(workdir) if r.get("val_ndcg@100"))
  # The best checkpoint scored again, user by user, gives the value the run recorded.
  ndcg, counted, users = fam.validation_users(workdir)
  assert ndcg.shape == counted.shape == users.shape and counted.any()
  assert ndcg[counted].mean() == pytest.approx(best, abs=1e-5)
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["protocol"] == "heldout_users" and not config["test"]
  winner = {"family": "multvae", "workdir": os.path.relpath(workdir, root),
            "best_epoch": 2, "config": config}
  tested = fam.test_winner(winner, root)
  assert not tested["refit"] and tested["folder"] == winner["workdir"]
  assert not os.path.exists(os.path.join(workdir, loop.REFIT_FOLDER))
  (test,) = [r for r in _records(workdir) if r["split"] == "test"]
  assert tested["metrics"]["ndcg@100"] == pytest.approx(test["ndcg@100"])


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_family_settings_set_a_familys_grid_and_are_checked():
  base, settings = configs.get_config("demo"), tune.Settings()
  given = {"ease": {"l2": [400]}, "edlae": {"dropout_p": [0.25, 0.5], "l2": [100.0]},
           "multvae": {"latent_dim": 50}}
  ease = fam.family_config(base, "ease", given)
  assert ease.l2 == (400.0,) and ease.model == "ease"
  edlae = fam.family_config(base, "edlae", given)
  assert (edlae.dropout_p, edlae.l2) == ((0.25, 0.5), (100.0,))
  own = fam.family_config(base, "multvae", given)
  assert own.latent_dim == 50 and own.hidden_dims == base.hidden_dims
  assert fam.family_config(base, "recvae", given).latent_dim == base.latent_dim
  assert fam.check_families(base, ("multvae", "ease", "edlae"), settings, given) == (
      "ease", "edlae", "multvae")
  # A resumed search with other settings is another search; 400 and 400.0 are one.
  fingerprint = lambda given: fam._fingerprint(base, ("ease",), settings, 0.7, given)
  assert fingerprint({"ease": {"l2": [400]}}) != fingerprint(None)
  assert fingerprint({"ease": {"l2": [400]}}) == fingerprint({"ease": {"l2": [400.0]}})
  assert fingerprint({"ease": {"l2": [400]}}) != fingerprint({"ease": {"l2": [300]}})
  with pytest.raises(TuneError, match="names recvae, not in --families=ease"):
    fam.check_families(base, ("ease",), settings, {"recvae": {"latent_dim": 50}})
  with pytest.raises(TuneError, match=r"--family_settings ease: EASE \(--model=ease\) has "
                     "no setting dropout_p"):
    fam.check_families(base, ("ease",), settings, {"ease": {"dropout_p": [0.5]}})
  with pytest.raises(TuneError, match=r"expected \{setting: value\}"):
    fam.check_families(base, ("ease",), settings, {"ease": [400]})
  with pytest.raises(TuneError, match="l2 must be in"):
    fam.check_families(base, ("ease",), settings, {"ease": {"l2": [0.0]}})
