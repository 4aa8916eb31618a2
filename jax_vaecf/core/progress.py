"""A dependency-free progress bar for long epochs and long preprocessing (stderr)."""

from __future__ import annotations

import sys
import time


class Progress:
  """``with Progress(total, 'epoch 3') as p: ... p.update(1)``.

  Redraws at most every ``interval`` seconds and only when stderr is a terminal or
  ``force`` is set, so logs of batch jobs stay clean.
  """

  def __init__(self, total: int, label: str, *, interval: float = 0.5,
               force: bool = False, stream=None):
    self.total = max(int(total), 1)
    self.label = label
    self.interval = interval
    self.stream = stream or sys.stderr
    self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
    self.done = 0
    self._start = time.perf_counter()
    self._last = 0.0

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.perf_counter()
    if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
      self._last = now
      frac = min(self.done / self.total, 1.0)
      bar = "#" * int(30 * frac)
      rate = self.done / max(now - self._start, 1e-9)
      self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
                        f"{rate:.1f}/s")
      self.stream.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.enabled:
      self.stream.write("\r" + " " * 79 + "\r")
      self.stream.flush()
