"""Calls an ``experiments`` tool's ``main`` in the test process and answers as
``python -m <tool> <args>`` would, for the checks that read only its exit status and what
it prints: a new interpreter spends seconds importing jax before the tool reaches its
first check.

The tool defines its command line into a fresh ``flags.FlagValues`` (its
``define_flags``, which its ``__main__`` block calls on ``flags.FLAGS``), the arguments
are parsed into that set, and ``main`` runs with the tool module's name for the process's
flags (``FLAGS``) bound to it for the call. The exit status is the command's: a flag that
does not parse gives 1 with absl's message, a usage error 2 with the tool's line and hint
(:func:`experiments.cli.print_usage_error`), ``sys.exit`` its code, an exception 1 with
its traceback. ``flags.FLAGS`` is neither read nor changed, and nothing of absl's is
patched.

Left to the tool's own process (a check of these keeps its subprocess): ``--help``,
absl's once-per-process set-up, the host allocator settings of :func:`experiments.cli.run`
(speed only), what a tool reads from ``sys.argv`` (the benchmark's record of its command
line, bench_data's child process), which stays the test process's, and whatever happens
at interpreter exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging as pylogging
import sys
import textwrap
import traceback
from unittest import mock

from absl import app
from absl import flags
from absl import logging

from experiments import cli


@dataclasses.dataclass
class Result:
  """What ``subprocess.run(..., capture_output=True, text=True)`` gives back."""
  returncode: int
  stdout: str
  stderr: str


def tool_flags(tool) -> flags.FlagValues:
  """A fresh set of the flags ``python -m <tool>`` parses: the tool's own, and absl's
  ``--verbosity`` (here a plain integer: it sets no log level of the test process)."""
  fv = flags.FlagValues()
  flags.DEFINE_integer("verbosity", -1, "Logging verbosity.", short_name="v",
                       flag_values=fv)
  tool.define_flags(fv)
  return fv


def _exit_status(code) -> int:
  # As the interpreter turns SystemExit's code into the process's status.
  if code is None:
    return 0
  if isinstance(code, int):
    return code & 0xFF
  print(code, file=sys.stderr)
  return 1


def _parse(fv: flags.FlagValues, argv: list[str]) -> list[str] | None:
  """The arguments left after the flags, or None after absl.app.run's message for a
  command line that does not parse."""
  try:
    return fv(argv)
  except flags.Error as e:
    message = str(e)
    sys.stderr.write(f"FATAL Flags parsing error:\n{textwrap.indent(message, '  ')}\n"
                     if "\n" in message else f"FATAL Flags parsing error: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    return None


def _call(tool, fv: flags.FlagValues, argv: list[str], program: str) -> int:
  args = _parse(fv, argv)
  if args is None:
    return 1
  try:
    return _exit_status(tool.main(args))
  except app.UsageError as e:
    cli.print_usage_error(e, program)
    return 2
  except SystemExit as e:
    return _exit_status(e.code)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1


def run(module: str, *args: str) -> Result:
  """``python -m <module> <args>``, in this process: the exit status and the text the
  tool wrote to stdout and stderr."""
  tool = importlib.import_module(module)
  fv = tool_flags(tool)
  # The tool reads its flags through its module's name for flags.FLAGS.
  names = [name for name, value in vars(tool).items() if value is flags.FLAGS]
  assert names, f"{module} has no module-level name for flags.FLAGS"
  out, err = io.StringIO(), io.StringIO()
  # cli.start quiets library logging for the tool's process; the test process keeps its
  # own levels.
  levels = (logging.get_absl_logger().level, pylogging.getLogger().level)
  try:
    with contextlib.ExitStack() as stack:
      for name in names:
        stack.enter_context(mock.patch.object(tool, name, fv))
      stack.enter_context(contextlib.redirect_stdout(out))
      stack.enter_context(contextlib.redirect_stderr(err))
      status = _call(tool, fv, [module, *args], f"python -m {module}")
  finally:
    logging.get_absl_logger().setLevel(levels[0])
    pylogging.getLogger().setLevel(levels[1])
  return Result(status, out.getvalue(), err.getvalue())
