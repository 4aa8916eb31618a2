"""Runs an ``experiments`` tool in the test process as ``python -m`` runs it, for the
checks that read only its exit status and what it prints: a new interpreter spends
seconds importing jax before the tool reaches its first check.

The tool's module runs from its source as ``__main__``, so its ``if __name__ ==
"__main__"`` block defines its flags and calls :func:`experiments.cli.run` as on the
command line. Its flags are parsed into a fresh set that holds what a new process would
have when the tool starts (absl's flags, the libraries', ``experiments.cli``'s, all
unset): the tools and absl read the one global ``flags.FLAGS`` and the flags of two
tools clash by name, so that object's contents are swapped for the call and put back.

Kept out of the test process: absl's once-per-process set-up (the process's name, a
handler on the root logger, faulthandler), the process-wide allocator settings of
``--reuse_host_memory`` (speed only), and the log levels, warning filters and flag
aliases a tool sets. Not covered: whatever happens at interpreter exit (threads cut
off, exit hooks); a check of that keeps its subprocess.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging as pylogging
import runpy
import sys
import threading
import traceback
from unittest import mock
import warnings

from absl import app
from absl import flags
from absl import logging

from experiments import cli
from jax_vaecf.core import host_memory

# absl.app.run defines these in the global set once per process; a fresh set needs its
# own.
_HELP_FLAGS = [getattr(app, name) for name in ("HelpFlag", "HelpshortFlag", "HelpfullFlag",
                                               "HelpXMLFlag", "OnlyCheckFlagsFlag")
               if hasattr(app, name)]


@dataclasses.dataclass
class Result:
  """What ``subprocess.run(..., capture_output=True, text=True)`` gives back."""
  returncode: int
  stdout: str
  stderr: str


def _is_tool_flag(module_name: str) -> bool:
  # A tool's own flags (and those it has a helper module define) exist only in the
  # process that runs it; experiments.cli's exist wherever it is imported.
  return module_name.startswith("experiments.") and module_name != cli.__name__


def _fresh_flags() -> flags.FlagValues:
  fv = copy.deepcopy(flags.FLAGS)
  for flag in [f for module, defined in fv.flags_by_module_dict().items()
               if _is_tool_flag(module) for f in defined]:
    for name in (flag.name, flag.short_name):
      if name in fv:
        delattr(fv, name)
  for name in fv:
    fv[name].unparse()
  for make in _HELP_FLAGS:
    flag = make()
    if flag.name not in fv:
      flags.DEFINE_flag(flag, fv)
  return fv


@contextlib.contextmanager
def _flags_of_a_new_process():
  """Swaps the contents of ``flags.FLAGS`` for a fresh set during the block."""
  fv = flags.FLAGS
  imported = set(sys.modules)
  saved = fv.__dict__.copy()
  fresh = _fresh_flags()
  fv.__dict__.clear()
  fv.__dict__.update(fresh.__dict__)
  try:
    yield
  finally:
    fv.__dict__.clear()
    fv.__dict__.update(saved)
    # A library first imported during the call defined its flags in the fresh set;
    # importing it again defines nothing, so they join the process's set here.
    for module, defined in fresh.flags_by_module_dict().items():
      if module in sys.modules and module not in imported and not _is_tool_flag(module):
        for flag in defined:
          if flag.name not in fv:
            flag = copy.deepcopy(flag)
            flag.unparse()
            flags.DEFINE_flag(flag, fv, module_name=module)


def _app_run(main, argv=None, flags_parser=app.parse_flags_with_usage):
  """``absl.app.run`` without its once-per-process set-up, which would outlive the
  call: parse (a bad flag exits 1 with absl's message), then ``sys.exit(main(...))``."""
  args = flags_parser(sys.argv if argv is None else argv)
  if flags.FLAGS["verbosity"].using_default_value:
    flags.FLAGS.verbosity = 0
  sys.exit(main(args))


def _exit_status(code) -> int:
  # As the interpreter turns SystemExit's code into the process's status.
  if code is None:
    return 0
  if isinstance(code, int):
    return code & 0xFF
  print(code, file=sys.stderr)
  return 1


def run(module: str, *args: str) -> Result:
  """``python -m <module> <args>``, in this process: the exit status and the text the
  tool wrote to stdout and stderr."""
  out, err = io.StringIO(), io.StringIO()
  levels = (logging.get_absl_logger().level, pylogging.getLogger().level)
  existing = set(threading.enumerate())
  main_thread = threading.main_thread()
  real_enumerate = threading.enumerate
  with contextlib.ExitStack() as stack:
    stack.enter_context(_flags_of_a_new_process())
    stack.enter_context(mock.patch.dict(cli._aliases))  # pylint: disable=protected-access
    stack.enter_context(mock.patch.object(app, "run", _app_run))
    stack.enter_context(mock.patch.object(host_memory, "reuse_freed_memory",
                                          lambda: "left to the test process"))
    # A tool that waits for its threads before exiting (recommend's _fail, as interpreter
    # exit does) sees the threads of its own process: those started during the call.
    stack.enter_context(mock.patch.object(
        threading, "enumerate",
        lambda: [t for t in real_enumerate() if t is main_thread or t not in existing]))
    stack.enter_context(mock.patch.object(sys, "argv", [module, *args]))
    stack.enter_context(warnings.catch_warnings())
    # runpy's note that the tool's module was imported before (by a test): it runs anew.
    warnings.filterwarnings("ignore", r".* found in sys\.modules after import",
                            RuntimeWarning)
    stack.enter_context(contextlib.redirect_stdout(out))
    stack.enter_context(contextlib.redirect_stderr(err))
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      status = 0
    except SystemExit as e:
      status = _exit_status(e.code)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      status = 1
    finally:
      logging.get_absl_logger().setLevel(levels[0])
      pylogging.getLogger().setLevel(levels[1])
  return Result(status, out.getvalue(), err.getvalue())
