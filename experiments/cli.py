"""What every command-line entry point of ``experiments`` does first, and how it fails.

Every tool that runs a :class:`~jax_vaecf.training.configs.Config` (``train``, ``accuracy``,
``benchmark``) takes it the same way: ``--config=PRESET`` picks a preset and the flag of
each field's name overrides that field (:func:`define_config_flags`,
:func:`config_from_flags`), so the same flags mean the same run in every tool.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging

if TYPE_CHECKING:
  from jax_vaecf.training import configs

# The preset a tool starts from without --config: the paper's ML-20M run, the shape the
# benchmark's synthetic data has, so one command line means the same run everywhere.
DEFAULT_PRESET = "ml20m"

# Other names of Config fields, old name -> field: the reference's --number_of_gpus, in
# every FlagValues that has the Config flags, and the names a tool gave a setting before
# it took the Config flags, kept with the FlagValues they were defined in (a test's fresh
# set of a tool's flags leaves no alias behind).
_REFERENCE_ALIASES = {"number_of_gpus": "number_of_devices"}
_tool_aliases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# The threads alive when the tool's main started (start()): those a tool may wait for
# before it exits are the others, which its own work started.
_threads_at_start: frozenset = frozenset()

flags.DEFINE_bool(
    "reuse_host_memory", True,
    "Keep host memory that a step frees for the next step (glibc malloc settings, "
    "jax_vaecf.core.host_memory): XLA CPU's per-step temporaries are not faulted in again "
    "every step. Changes speed, never a result.")


def _configs():
  # Imported when first needed: configs imports jax, and tools that take no Config
  # (bench_data's parent process, numpy only) use this module too.
  # pylint: disable-next=g-import-not-at-top,redefined-outer-name
  from jax_vaecf.training import configs
  return configs


def _define(kind: type, name: str, help_text: str, flag_values: flags.FlagValues) -> None:
  # Every default is None, so "given on the command line" is "not None" and an unset
  # flag leaves the preset's value.
  if kind is bool:
    flags.DEFINE_bool(name, None, help_text, flag_values=flag_values)
  elif kind is int:
    flags.DEFINE_integer(name, None, help_text, flag_values=flag_values)
  elif kind is float:
    flags.DEFINE_float(name, None, help_text, flag_values=flag_values)
  elif kind is tuple:
    flags.DEFINE_list(name, None, help_text, flag_values=flag_values)
  else:
    flags.DEFINE_string(name, None, help_text, flag_values=flag_values)


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS, *,
                        aliases: Mapping[str, str] | None = None) -> None:
  """Defines ``--config=PRESET``, one flag per :class:`~jax_vaecf.training.configs.Config` field
  (same name, type and help; unset means the preset's value), the reference's
  ``--use_tf_amp`` and ``--number_of_gpus``, the old names of renamed settings
  (``configs.RENAMED``: ``--heldout_fraction``), and ``aliases`` (old flag name ->
  field, help "Deprecated: same as --field").

  A tool calls it from its ``define_flags``, which its ``if __name__ == "__main__"``
  block runs before :func:`run` (and a test on a fresh set of its own), not at import:
  ~50 global flags defined by importing a tool would clash with another tool's own
  flags of the same name (``recommend --benchmark``) wherever both are imported, as in
  the tests. The flags are made key flags of the main program, so ``--help`` lists
  them. Calling it again on the same ``flag_values`` only adds new aliases.
  """
  configs = _configs()
  hints = {name: configs.flag_type(name) for name in configs.setting_names()}
  new = []
  if "config" not in flag_values:
    flags.DEFINE_string("config", DEFAULT_PRESET,
                        "Preset that the setting flags (one per Config field) "
                        f"override: one of {sorted(configs.PRESETS)} "
                        "(jax_vaecf/training/configs.py), or a JSON file of settings (a run's "
                        "config.json, experiments.tune's best.json).",
                        flag_values=flag_values)
    for name in configs.setting_names():
      _define(hints[name], name, configs.help_of(name), flag_values)
    flags.DEFINE_bool("use_tf_amp", None, "Reference flag: same as --precision=bf16.",
                      flag_values=flag_values)
    _define(int, "number_of_gpus", "Reference flag: same as --number_of_devices (0 = all).",
            flag_values)
    for old, name in configs.RENAMED.items():
      _define(hints[name], old, f"Old name of --{name}: same meaning.", flag_values)
    new += ["config", *configs.setting_names(), "use_tf_amp",
            "number_of_gpus", *configs.RENAMED]
  for old, name in (aliases or {}).items():
    if name not in hints:
      raise ValueError(f"alias --{old}: {name!r} is not a Config field")
    if old not in flag_values:
      _define(hints[name], old, f"Deprecated: same as --{name}.", flag_values)
      _tool_aliases.setdefault(flag_values, {})[old] = name
      new.append(old)
  for name in new:
    # absl's --help shows the key flags of the module named sys.argv[0], the program.
    flag_values.register_key_flag_for_module(sys.argv[0], flag_values[name])


def _typed(name: str, value: Any, flag: str) -> Any:
  """A flag's value as the Config field ``name`` holds it (lists become tuples of the
  field's element type)."""
  configs = _configs()
  if isinstance(configs.default_of(name), tuple):
    element = configs.element_of(name)
    try:
      return tuple(element(v) for v in value if str(v).strip())
    except ValueError:
      kind = "integers" if element is int else "numbers"
      raise app.UsageError(f"--{flag}: expected comma-separated {kind}, got "
                           f"{','.join(value)!r}") from None
  return value


def config_overrides(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """The Config fields given on the command line (aliases resolved), as Config values.

  Raises ``app.UsageError`` for a malformed list or an alias contradicting its field.
  """
  configs = _configs()
  fv = flag_values
  changes = {}
  for name in configs.setting_names():
    value = fv[name].value
    if value is not None:
      changes[name] = _typed(name, value, name)
  for old, name in (_REFERENCE_ALIASES | configs.RENAMED
                    | _tool_aliases.get(fv, {})).items():
    if old not in fv or fv[old].value is None:
      continue
    value = _typed(name, fv[old].value, old)
    if name in changes and changes[name] != value:
      raise app.UsageError(f"--{old} is --{name}: give one of them")
    changes[name] = value
  if fv["use_tf_amp"].value:
    if changes.get("precision", "bf16") != "bf16":
      raise app.UsageError("--use_tf_amp means --precision=bf16; do not give both")
    changes["precision"] = "bf16"
  return changes


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> configs.Config:
  """The preset named by ``--config`` with every setting given on the command line,
  validated (:func:`jax_vaecf.training.configs.validate`).

  Raises ``app.UsageError`` (one line, through :func:`run`) for an unknown preset or a
  bad setting, before any work.
  """
  configs = _configs()
  try:
    cfg = configs.get_config(flag_values["config"].value)
    cfg = cfg.replace(**config_overrides(flag_values))
    configs.validate(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return cfg


def start(argv: Sequence[str], required: Sequence[str] = (),
          flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Quiets library logging and rejects stray arguments and missing required flags.

  ``flag_values``: the tool's parsed flags (the process's ``flags.FLAGS`` on the command
  line; a set of their own where a test calls the tool's ``main``).

  Raises ``app.UsageError``, which :func:`run` prints as one line and a hint.
  """
  global _threads_at_start
  _threads_at_start = frozenset(threading.enumerate())
  fl = flag_values
  # Ids read from files keep bytes that are not UTF-8 as lone surrogates (as argv
  # does); printed, they go out as the same bytes instead of failing the print.
  for stream in (sys.stdout, sys.stderr):
    if hasattr(stream, "reconfigure"):
      stream.reconfigure(errors="surrogateescape")
  if "verbosity" not in fl or not fl["verbosity"].present:
    # Orbax logs every checkpoint operation at INFO, and notes such as reading a
    # directory read-only at WARNING; keep the console to our own lines and errors.
    logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in required:
    if not getattr(fl, name):
      raise app.UsageError(f"--{name} is required")


def threads_started() -> list[threading.Thread]:
  """The non-daemon threads the tool started since :func:`start` (all but the main
  thread in a process of its own): those interpreter exit would wait for."""
  return [t for t in threading.enumerate()
          if t is not threading.main_thread() and not t.daemon
          and t not in _threads_at_start]


def print_usage_error(error: app.UsageError, program: str) -> None:
  """What a tool prints on stderr for a usage error (it then exits with status 2):
  ``error: <message>`` and a one-line hint naming ``program``'s ``--help``."""
  print(f"error: {error}", file=sys.stderr)
  print(f"hint: {program} --help lists every flag", file=sys.stderr)


def _program() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    return f"python -m {spec.name}"
  return os.path.basename(sys.argv[0]) if sys.argv else "the command"


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)``, except that a usage error prints ``error: <message>`` and a
  one-line hint (not the whole help) and exits with status 2, and that host memory is
  kept for reuse first (``--reuse_host_memory``)."""

  def main_with_short_usage(argv):
    if flags.FLAGS.reuse_host_memory:
      # Before jax starts its CPU client: a thread that allocated keeps its arena.
      from jax_vaecf.core import host_memory  # pylint: disable=g-import-not-at-top
      host_memory.reuse_freed_memory()
    try:
      return main(argv)
    except app.UsageError as e:
      print_usage_error(e, _program())
      sys.exit(2)

  app.run(main_with_short_usage)
