"""What every command-line entry point of ``experiments`` does first, and how it fails."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging


def start(argv: Sequence[str], required: Sequence[str] = ()) -> None:
  """Quiets library logging and rejects stray arguments and missing required flags.

  Raises ``app.UsageError``, which :func:`run` prints as one line and a hint.
  """
  fl = flags.FLAGS
  if not fl["verbosity"].present:
    # Orbax logs every checkpoint operation at INFO, and notes such as reading a
    # directory read-only at WARNING; keep the console to our own lines and errors.
    logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in required:
    if not getattr(fl, name):
      raise app.UsageError(f"--{name} is required")


def _program() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    return f"python -m {spec.name}"
  return os.path.basename(sys.argv[0]) if sys.argv else "the command"


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)``, except that a usage error prints ``error: <message>`` and a
  one-line hint (not the whole help) and exits with status 2."""

  def main_with_short_usage(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      print(f"hint: {_program()} --help lists every flag", file=sys.stderr)
      sys.exit(2)

  app.run(main_with_short_usage)
