"""The two settings that size the held-out split: ``heldout_users_fraction`` (a fraction
of the users, held out twice: validation and test) and ``heldout_items_fraction`` (a
fraction of each held-out user's items, hidden as targets); the old name
``heldout_fraction`` read wherever a user already has it."""

import glob
import json
import os
import re

import numpy as np
import pytest
from absl import app
from absl import flags

from experiments import cli
from experiments import compare
from jax_vaecf import api
from jax_vaecf.data import partition, preprocess, readers, write_partitions
from jax_vaecf.training import configs
from jax_vaecf.training import run_data
from jax_vaecf.training import run_folder

import _runs
import _tools

N_USERS = 40


def _interactions() -> readers.Interactions:
  """40 users, user u with 5 + u % 11 distinct items of 20 (all rated 5, each item in
  many training rows, so that no held-out row is dropped), in file order."""
  rng = np.random.default_rng(3)
  users, items = [], []
  for u in range(N_USERS):
    chosen = rng.choice(20, 5 + u % 11, replace=False)
    users += [u] * chosen.size
    items += chosen.tolist()
  return readers.Interactions(users=np.array(users), items=np.array(items),
                              ratings=np.full(len(users), 5.0, np.float32),
                              source="fixture")


def _counts(ev):
  """(items hidden as targets, items in all) of each user of an EvalSplit."""
  hidden = np.diff(ev.heldout.indptr)
  return hidden, hidden + np.diff(ev.fold_in.indptr)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.75])
def test_heldout_items_fraction_is_the_share_of_each_heldout_users_items_hidden(fraction):
  cfg = configs.Config().replace(heldout_items_fraction=fraction)
  split = run_data.split_interactions(cfg, _interactions())
  for ev in (split.validation, split.test):
    hidden, total = _counts(ev)
    # The paper's draw: int(fraction * n) of a user's n >= 5 items (every user here).
    assert total.min() >= 5
    np.testing.assert_array_equal(hidden, [int(fraction * n) for n in total.tolist()])
  per_user = run_data.split_interactions(cfg.replace(protocol="per_user"), _interactions())
  hidden = np.diff(per_user.test.heldout.indptr)
  total = hidden + np.diff(per_user.train.indptr)
  np.testing.assert_array_equal(hidden, [int(fraction * n) for n in total.tolist()])


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_heldout_users_fraction_holds_out_that_share_of_users_twice(fraction):
  split = run_data.split_interactions(
      configs.Config().replace(heldout_users_fraction=fraction), _interactions())
  h = round(fraction * N_USERS)
  assert split.validation.n_users == split.test.n_users == h
  assert split.train.shape[0] == N_USERS - 2 * h


def test_the_default_item_share_is_the_papers_split():
  inter = _interactions()
  paper = preprocess.split_heldout_users(inter, threshold=3.5, min_uc=5)
  ours = run_data.split_interactions(configs.Config(), inter)
  for a, b in ((paper.validation, ours.validation), (paper.test, ours.test)):
    assert (a.heldout != b.heldout).nnz == 0 and (a.fold_in != b.fold_in).nnz == 0
  assert configs.Config().heldout_items_fraction == configs.ADDED["heldout_items_fraction"]


def _write_csv(path):
  inter = _interactions()
  with open(path, "w") as f:
    for u, i in zip(inter.users.tolist(), inter.items.tolist()):
      f.write(f"{u},{i},5,0\n")


def test_another_item_share_is_another_cached_split(tmp_path):
  csv = tmp_path / "ratings.csv"
  _write_csv(csv)
  cache = tmp_path / "cache"
  cfg = configs.Config().replace(dataset="csv", data_dir=str(csv), cache_dir=str(cache))
  stages = []
  first = run_data.load_data(cfg, stages.append)
  assert stages and len(glob.glob(str(cache / "*.npz"))) == 1
  stages.clear()
  other = run_data.load_data(cfg.replace(heldout_items_fraction=0.5), stages.append)
  assert stages, "a changed item share must rebuild the split, not read the cached one"
  assert len(glob.glob(str(cache / "*.npz"))) == 2
  assert other.test.heldout.nnz > first.test.heldout.nnz
  stages.clear()
  again = run_data.load_data(cfg, stages.append)
  assert not stages and (again.test.heldout != first.test.heldout).nnz == 0


@pytest.mark.parametrize("name,value,message", [
    ("heldout_items_fraction", 0.0, "heldout_items_fraction must be in (0, 1)"),
    ("heldout_items_fraction", 1.0, "heldout_items_fraction must be in (0, 1)"),
    ("heldout_items_fraction", -0.2, "heldout_items_fraction must be in (0, 1)"),
    ("heldout_users_fraction", 0.5, "heldout_users_fraction must be in (0, 0.5)"),
    ("heldout_users_fraction", 0.0, "heldout_users_fraction must be in (0, 0.5)"),
])
def test_out_of_range_fractions_are_refused_in_one_line(name, value, message):
  with pytest.raises(ValueError) as e:
    configs.validate(configs.Config().replace(**{name: value}))
  assert str(e.value) == f"bad setting: {message}"


@pytest.mark.parametrize("name,value", [("heldout_users_fraction", 0.2),
                                        ("n_heldout_users", 500)])
def test_a_user_share_under_the_per_user_protocol_is_refused_not_ignored(name, value):
  cfg = configs.Config().replace(protocol="per_user")
  configs.validate(cfg)  # the defaults stand
  with pytest.raises(ValueError) as e:
    configs.validate(cfg.replace(**{name: value}))
  assert str(e.value).startswith(f"bad setting: n_heldout_users=") and (
      "--protocol=per_user holds out no users" in str(e.value))
  assert "\n" not in str(e.value)
  configs.validate(cfg.replace(protocol="heldout_users", **{name: value}))


def test_the_command_line_refuses_an_out_of_range_item_share_in_one_line(tmp_path):
  r = _tools.run("experiments.train", "--config=demo", f"--workdir={tmp_path / 'w'}",
                 "--heldout_items_fraction=1")
  assert r.returncode == 2
  assert r.stderr.splitlines()[0] == ("error: bad setting: heldout_items_fraction must be "
                                      "in (0, 1)")
  assert not os.path.exists(tmp_path / "w")


def _flags(*args):
  fv = flags.FlagValues()
  cli.define_config_flags(fv)
  fv(["tool", *args])
  return fv


def test_the_old_flag_is_the_users_fraction():
  assert cli.config_from_flags(_flags("--heldout_fraction=0.2")).heldout_users_fraction == 0.2
  both = _flags("--heldout_fraction=0.2", "--heldout_users_fraction=0.2")
  assert cli.config_from_flags(both).heldout_users_fraction == 0.2
  with pytest.raises(app.UsageError,
                     match="--heldout_fraction is --heldout_users_fraction: give one of them"):
    cli.config_from_flags(_flags("--heldout_fraction=0.2", "--heldout_users_fraction=0.1"))
  with pytest.raises(app.UsageError, match=re.escape(
      "bad setting: heldout_users_fraction must be in (0, 0.5)")):
    cli.config_from_flags(_flags("--heldout_fraction=0.6"))
  text = re.sub(r"\s+", " ", _flags().get_help())
  assert "--heldout_fraction: Old name of --heldout_users_fraction: same meaning." in text
  assert "--heldout_items_fraction: Fraction of each held-out user's items" in text


def test_a_settings_file_with_the_old_name_reads_as_the_new(tmp_path):
  path = tmp_path / "best.json"
  path.write_text(json.dumps({"model": "multvae", "heldout_fraction": 0.25}))
  cfg = configs.get_config(str(path))
  assert cfg.heldout_users_fraction == 0.25 and cfg.heldout_items_fraction == 0.2
  path.write_text(json.dumps({"heldout_fraction": 0.25, "heldout_users_fraction": 0.1}))
  with pytest.raises(ValueError, match=re.escape(
      f"{path}: gives both heldout_fraction and heldout_users_fraction")):
    configs.get_config(str(path))
  with pytest.raises(ValueError, match="its new name is heldout_users_fraction"):
    configs.Config().replace(heldout_fraction=0.2)
  with pytest.raises(ValueError, match=r"heldout_fraction is now heldout_users_fraction"):
    api.fit(config="demo", heldout_fraction=0.2)


def _old_config_json(cfg) -> dict:
  """``cfg``'s config.json as an earlier version wrote it: the users' share under its old
  name, no item share (the split then always hid 20%)."""
  obj = configs.to_json(cfg)
  obj["heldout_fraction"] = obj.pop("heldout_users_fraction")
  del obj["heldout_items_fraction"]
  return obj


def test_an_old_run_folder_resumes_with_the_same_settings(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "latest" / "1").mkdir(parents=True)  # holds a run
  # Not the default users' share: read under its old name, or the run would seem to have
  # the default and a command with the default would mix two splits.
  cfg = configs.get_config("demo").replace(heldout_users_fraction=0.2)
  (workdir / "config.json").write_text(json.dumps(_old_config_json(cfg)))
  assert run_folder.run_config(str(workdir)) == cfg
  run_folder.check_same_run(cfg, str(workdir))
  assert run_folder.config_changes(run_folder._saved_config(str(workdir)), cfg) == {}  # pylint: disable=protected-access
  for change, old, new in (({"heldout_users_fraction": 0.1}, 0.2, 0.1),
                           ({"heldout_items_fraction": 0.5}, 0.2, 0.5)):
    name = next(iter(change))
    with pytest.raises(ValueError, match=re.escape(
        f"--{name}: the run has {old!r}, this command asks {new!r}")):
      run_folder.check_same_run(cfg.replace(**change), str(workdir))


def test_an_old_partitioned_folder_is_read_and_a_changed_share_refused(tmp_path):
  cfg = configs.Config().replace(dataset="csv")
  split = run_data.split_interactions(cfg, _interactions())
  old = run_data.data_settings(cfg)
  old["heldout_fraction"] = old.pop("heldout_users_fraction")
  del old["heldout_items_fraction"]
  out = tmp_path / "parts"
  write_partitions(split, out, 1, settings=old)
  part = run_data.load_data(cfg.replace(partitioned_data=str(out)))
  assert isinstance(part, partition.PartSplit)
  assert (part.test.heldout != split.test.heldout).nnz == 0
  for change in ({"heldout_items_fraction": 0.5}, {"heldout_users_fraction": 0.2}):
    with pytest.raises(ValueError, match="made with other data settings.*"
                                         f"{next(iter(change))}: absent in the folder"):
      run_data.load_data(cfg.replace(partitioned_data=str(out), **change))


def test_compare_reads_an_older_results_files_split_identity():
  new = {"dataset": "ml-1m", "split_seed": 98765, "heldout_users_fraction": 0.1,
         "heldout_items_fraction": 0.2, "n_items": 3497}
  old = {"dataset": "ml-1m", "split_seed": 98765, "heldout_fraction": 0.1, "n_items": 3497}
  compare.check_same(new, old, "a", "b")
  compare.check_same(old, new, "a", "b")
  for other in ({**old, "heldout_fraction": 0.2}, {**new, "heldout_items_fraction": 0.5}):
    with pytest.raises(ValueError, match="b was tested on another split than a"):
      compare.check_same(old, other, "a", "b")


def test_an_old_run_folder_trains_on_where_it_stopped(tmp_path):
  from jax_vaecf.training import engine as loop  # pylint: disable=import-outside-toplevel
  data_dir = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data_dir, cache_dir=str(tmp_path / "cache"), number_of_epochs=1,
                           test=False, heldout_users_fraction=0.2)
  workdir = str(tmp_path / "run")
  loop.run(cfg, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    json.dump(_old_config_json(cfg), f)
  loop.run(cfg.replace(number_of_epochs=2), workdir)
  records = _runs.records(workdir)
  assert [r["changes"] for r in records if r["split"] == "config"] == [
      {"number_of_epochs": {"from": 1, "to": 2}}]
  assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2]
  with open(path) as f:
    saved = json.load(f)
  assert "heldout_fraction" not in saved
  assert (saved["heldout_users_fraction"], saved["heldout_items_fraction"]) == (0.2, 0.2)


# Heartbeats and the retry callback are marked experimental by Optuna.
@pytest.mark.filterwarnings("ignore:.*experimental")
def test_a_search_of_an_earlier_version_resumes_under_the_new_name(tmp_path):
  pytest.importorskip("optuna")
  from jax_vaecf.tuning import search as tune  # pylint: disable=import-outside-toplevel
  csv = tmp_path / "ratings.csv"
  _write_csv(csv)
  base = _runs.small_config(str(csv), dataset="csv", cache_dir=str(tmp_path / "cache"),
                            heldout_users_fraction=0.2)
  root, settings = str(tmp_path / "tune"), tune.Settings(space=("lr",))
  study, _ = tune._prepare(base, root, settings, lambda line: None)  # pylint: disable=protected-access
  saved = study.user_attrs["settings"]
  old_base = dict(saved["base"])
  old_base["heldout_fraction"] = old_base.pop("heldout_users_fraction")
  del old_base["heldout_items_fraction"]
  study.set_user_attr("settings", {**saved, "base": old_base})
  tune._prepare(base, root, settings, lambda line: None)  # pylint: disable=protected-access
  with pytest.raises(tune.TuneError, match=re.escape(
      "--heldout_users_fraction: the study has 0.2, this command 0.1")):
    tune._prepare(base.replace(heldout_users_fraction=0.1), root, settings,  # pylint: disable=protected-access
                  lambda line: None)
