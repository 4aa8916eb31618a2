"""Every tool that runs a Config takes it one way (experiments.cli): ``--config=PRESET``
and the flag of each field, listed by its ``--helpfull``, and a bad setting fails the same
way in each."""

import ast
import dataclasses
import importlib
import os
import re
import subprocess
import sys

import pytest
from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.training import configs

import _tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each tool with the flags it requires, so that only the setting under test can fail.
TOOLS = {
    "train": ["--workdir={tmp}/w"],
    "accuracy": ["--root={tmp}/w"],
    "benchmark": [],
    "bench_data": ["--keep={tmp}/w"],
    "partition": ["--processes=2", "--out={tmp}/w"],
}


def _tool(name, *args, timeout=60):
  return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONPATH=REPO))


def _lists_every_setting_with_its_help(text):
  text = re.sub(r"\s+", " ", text)
  assert re.search(r"--config: Preset", text)
  for name in configs.setting_names():  # the run's and every model's own
    words = " ".join(configs.help_of(name).split()[:4])
    assert re.search(rf"--(\[no\])?{name}: {re.escape(words)}", text), name


def test_the_config_flags_help_lists_every_setting_with_its_help():
  fields = dataclasses.fields(configs.Config)
  assert all(configs.help_of(f.name).strip() for f in fields)
  fv = flags.FlagValues()
  cli.define_config_flags(fv)
  _lists_every_setting_with_its_help(fv.get_help())


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_config_tool_defines_the_config_flags_before_it_runs(tool):
  # What each tool's --helpfull lists is what its __main__ block defines: its
  # define_flags, which defines the config flags (checked above), must run there, before
  # cli.run parses the command line; the in-process calls (tests/_tools.py) define the
  # same flags with the same function.
  with open(os.path.join(REPO, "experiments", f"{tool}.py")) as f:
    tree = ast.parse(f.read())
  main_blocks = [node for node in tree.body if isinstance(node, ast.If)
                 and ast.unparse(node.test) == "__name__ == '__main__'"]
  assert len(main_blocks) == 1, tool
  calls = [ast.unparse(n.func) for n in ast.walk(main_blocks[0]) if isinstance(n, ast.Call)]
  assert "define_flags" in calls and "cli.run" in calls, calls
  assert calls.index("define_flags") < calls.index("cli.run"), calls
  (define,) = [node for node in tree.body if isinstance(node, ast.FunctionDef)
               and node.name == "define_flags"]
  assert "cli.define_config_flags" in [ast.unparse(n.func) for n in ast.walk(define)
                                       if isinstance(n, ast.Call)], tool
  fv = _tools.tool_flags(importlib.import_module(f"experiments.{tool}"))
  assert "config" in fv and all(name in fv for name in configs.setting_names()), tool


def test_helpfull_of_a_tool_lists_every_setting_with_its_help():
  # One process end to end (absl's --helpfull of the key flags of `python -m ...`); the
  # other tools define the same flags the same way (checked above, in-process).
  r = _tool("train", "--helpfull")
  _lists_every_setting_with_its_help(r.stdout + r.stderr)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_bad_setting_fails_the_same_way_in_every_tool(tool, tmp_path):
  args = [a.format(tmp=tmp_path) for a in TOOLS[tool]]
  r = _tools.run(f"experiments.{tool}", *args, "--config=ml1m",
                 "--batch_size_train=0")
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
      "error: bad setting: batch_size_train must be >= 1",
      f"hint: python -m experiments.{tool} --help lists every flag"]
  assert not os.path.exists(tmp_path / "w")  # nothing was started


def _parse(*args, aliases=None):
  fv = flags.FlagValues()
  cli.define_config_flags(fv, aliases=aliases)
  fv(["tool", *args])
  return fv


def test_config_is_the_preset_with_the_given_flags():
  fv = _parse("--config=ml1m", "--lr=0.002", "--hidden_dims=300,100", "--nodownload",
              "--anneal_schedule=cyclical")
  assert cli.config_overrides(fv) == {"lr": 0.002, "hidden_dims": (300, 100),
                                      "download": False, "anneal_schedule": "cyclical"}
  assert cli.config_from_flags(fv) == configs.get_config("ml1m").replace(
      lr=0.002, hidden_dims=(300, 100), download=False, anneal_schedule="cyclical")
  assert cli.config_from_flags(_parse()) == configs.get_config(cli.DEFAULT_PRESET)
  # '' = the model's paper's widths (the preset's model: Mult-VAE's 600).
  assert cli.config_from_flags(_parse("--hidden_dims=")).hidden_dims == (600,)


def test_reference_flags_and_aliases_mean_their_setting():
  fv = _parse("--use_tf_amp", "--number_of_gpus=2", "--batch_size=100",
              aliases={"batch_size": "batch_size_train"})
  cfg = cli.config_from_flags(fv)
  assert (cfg.precision, cfg.number_of_devices, cfg.batch_size_train) == ("bf16", 2, 100)
  # The same value twice is fine; two different ones are refused.
  fv = _parse("--number_of_gpus=2", "--number_of_devices=2")
  assert cli.config_from_flags(fv).number_of_devices == 2
  for args, message in [
      (("--number_of_gpus=2", "--number_of_devices=4"),
       "--number_of_gpus is --number_of_devices: give one of them"),
      (("--use_tf_amp", "--precision=fp16"),
       "--use_tf_amp means --precision=bf16; do not give both"),
      (("--test_ks=5,x",), "--test_ks: expected comma-separated integers, got '5,x'"),
      (("--config=nope",), "unknown config 'nope'"),
      (("--ema_decay=1",), "bad setting: ema_decay must be in [0, 1)"),
  ]:
    with pytest.raises(app.UsageError, match=re.escape(message)):
      cli.config_from_flags(_parse(*args))


def test_defining_the_flags_twice_only_adds_aliases():
  fv = flags.FlagValues()
  cli.define_config_flags(fv)
  cli.define_config_flags(fv, aliases={"eval_batch_size": "batch_size_validation"})
  fv(["tool", "--eval_batch_size=40"])
  assert cli.config_from_flags(fv).batch_size_validation == 40
  with pytest.raises(ValueError, match="not a Config field"):
    cli.define_config_flags(fv, aliases={"bs": "batch"})


def test_bench_data_refuses_settings_it_would_ignore(tmp_path):
  for args, message in (
      (["--lr=0.1"], "error: bench_data times reading and splitting only; it does not "
                     "use --lr"),
      (["--config=netflix"], "error: --dataset=netflix: bench_data generates a MovieLens "
                             "ratings.csv")):
    r = _tools.run("experiments.bench_data", f"--keep={tmp_path}/w", *args)
    assert r.returncode == 2 and r.stderr.splitlines()[0].startswith(message), r.stderr
    assert not os.path.exists(tmp_path / "w")
