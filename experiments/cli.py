"""What every command-line entry point of ``experiments`` does first."""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging


def start(argv: Sequence[str], required: Sequence[str] = ()) -> None:
  """Quiets library logging and rejects stray arguments and missing required flags.

  Raises ``app.UsageError`` (absl prints it with the usage line and exits non-zero).
  """
  fl = flags.FLAGS
  if not fl["verbosity"].present:
    # Orbax logs every checkpoint operation at INFO; keep the console to our lines.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in required:
    if not getattr(fl, name):
      raise app.UsageError(f"--{name} is required")
