"""The in-process runner of the tools (tests/_in_process.py) that the usage-error checks
use: it answers as ``python -m`` does and leaves the test process as it found it."""

import logging as pylogging
import os
import subprocess
import sys

from absl import flags
from absl import logging

from experiments import cli
# Imported, as by the recommend tests: its flags are in the process's set, and export's
# flags of the same names must not clash with them.
from experiments import recommend  # pylint: disable=unused-import

import _in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_same_status_and_output_as_a_new_process(tmp_path):
  args = [f"--workdir={tmp_path / 'w'}", "--number_of_gpus=2", "--number_of_devices=4"]
  sub = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  here = _in_process.run("experiments.train", *args)
  assert (here.returncode, here.stdout, here.stderr) == (
      sub.returncode, sub.stdout, sub.stderr)
  assert here.returncode == 2 and here.stderr.splitlines() == [
      "error: --number_of_gpus is --number_of_devices: give one of them",
      "hint: python -m experiments.train --help lists every flag"]


def test_the_test_process_is_left_as_it_was(tmp_path):
  def state():
    fv = flags.FLAGS
    return (sorted(fv), fv.is_parsed(), sorted(fv.flags_by_module_dict()),
            dict(cli._aliases),  # pylint: disable=protected-access
            logging.get_absl_logger().level, pylogging.getLogger().level, list(sys.argv),
            sys.modules["__main__"])

  before = state()
  # Aliases of the benchmark, --verbosity, a tool whose flags clash with recommend's, a
  # bad flag, and stray arguments.
  for module, args, status in [
      ("experiments.benchmark", ["--batch_size=10", "--batch_size_train=20"], 2),
      ("experiments.train", [f"--workdir={tmp_path}", "--verbosity=1", "--config=x"], 2),
      ("experiments.export", ["--workdir=w", f"--out={tmp_path / 'o'}", "--k=0"], 2),
      ("experiments.recommend", ["--bogus"], 1),
      ("experiments.partition", ["extra"], 2)]:
    assert _in_process.run(module, *args).returncode == status, module
  assert state() == before
