"""The in-process calls of the tools (tests/_tools.py) that the usage-error checks use:
each answers as ``python -m`` does and leaves the test process as it found it."""

import gc
import importlib
import logging as pylogging
import os
import subprocess
import sys
import threading

from absl import flags
from absl import logging

from experiments import cli

import _tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every tool a test calls in-process: its flags are defined by its define_flags only.
TOOLS = ("accuracy", "bench_data", "benchmark", "compare", "export", "partition", "plot",
         "probe_matmul", "recommend", "torch_baseline", "train", "tune")


def test_the_same_status_and_output_as_a_new_process(tmp_path):
  args = [f"--workdir={tmp_path / 'w'}", "--number_of_gpus=2", "--number_of_devices=4"]
  # A usage error, and a flag that does not parse.
  for module, argv in [("experiments.train", args),
                       ("experiments.recommend", ["--bogus"])]:
    sub = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    here = _tools.run(module, *argv)
    assert (here.returncode, here.stdout, here.stderr) == (
        sub.returncode, sub.stdout, sub.stderr), module
  here = _tools.run("experiments.train", *args)
  assert here.returncode == 2 and here.stderr.splitlines() == [
      "error: --number_of_gpus is --number_of_devices: give one of them",
      "hint: python -m experiments.train --help lists every flag"]


def test_a_flag_that_does_not_parse_gives_absls_message_and_status_1():
  here = _tools.run("experiments.recommend", "--bogus")
  assert here.returncode == 1 and here.stderr.splitlines() == [
      "FATAL Flags parsing error: Unknown command line flag 'bogus'",
      "Pass --helpshort or --helpfull to see help on flags."]


def test_a_tool_waits_only_for_the_threads_it_started():
  # recommend's _fail joins them before it exits: a thread of the test process that
  # lives on (an idle pool's worker) must not be waited for.
  stop = threading.Event()
  older = threading.Thread(target=stop.wait)
  older.start()
  try:
    fv = flags.FlagValues()
    flags.DEFINE_integer("verbosity", -1, "", flag_values=fv)
    fv(["tool", "--verbosity=0"])
    cli.start(["tool"], flag_values=fv)
    newer = threading.Thread(target=stop.wait)
    newer.start()
    daemon = threading.Thread(target=stop.wait, daemon=True)
    daemon.start()
    assert cli.threads_started() == [newer]
  finally:
    stop.set()


def test_the_test_process_is_left_as_it_was(tmp_path):
  tools = {name: importlib.import_module(f"experiments.{name}") for name in TOOLS}

  def state():
    gc.collect()  # a call's own set of flags, and the aliases kept with it, are gone
    fv = flags.FLAGS
    return (sorted(fv), fv.is_parsed(), sorted(fv.flags_by_module_dict()),
            dict(cli._tool_aliases),  # pylint: disable=protected-access
            logging.get_absl_logger().level, pylogging.getLogger().level, list(sys.argv),
            sys.modules["__main__"],
            {name: tool.__dict__.get("FLAGS", tool.__dict__.get("_FLAGS"))
             for name, tool in tools.items()})

  before = state()
  assert all(flags_ is flags.FLAGS for flags_ in before[-1].values())
  # Importing a tool defines none of its flags in the process's set.
  assert not [m for m in before[2] if m.startswith("experiments.") and m != cli.__name__]
  # Aliases of the benchmark, --verbosity, two tools whose flags share names, a bad flag,
  # and stray arguments.
  for module, args, status in [
      ("experiments.benchmark", ["--batch_size=10", "--batch_size_train=20"], 2),
      ("experiments.train", [f"--workdir={tmp_path}", "--verbosity=1", "--config=x"], 2),
      ("experiments.export", ["--workdir=w", f"--out={tmp_path / 'o'}", "--k=0"], 2),
      ("experiments.recommend", ["--workdir=w", f"--out={tmp_path / 'o'}"], 2),
      ("experiments.recommend", ["--bogus"], 1),
      ("experiments.partition", ["extra"], 2)]:
    assert _tools.run(module, *args).returncode == status, module
  assert state() == before
