"""Host allocator settings that let XLA CPU reuse the memory of one step in the next.

XLA CPU allocates the temporaries of each execution (the output layer's logits, softmax
and gradient chunks, the first layer's dense kernel gradient: about 280 MB a step at
ML-20M's shape and batch 500) and frees them when it ends. glibc's ``malloc`` serves
blocks that large from fresh ``mmap`` mappings or from per-thread arenas and gives them
back to the kernel on ``free``, so the next step faults every page in again: 54,000
minor faults a step, and a quarter of the step's time on a 2-core Xeon
(``python -m experiments.benchmark --noreuse_host_memory`` against the default shows
it). :func:`reuse_freed_memory` keeps the freed memory in the process instead.

The experiments' command-line tools call it before jax starts (``--reuse_host_memory``,
on by default); a program that uses the library directly can call it itself, first
thing. It changes where memory comes from, never a computed value.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False  # set once the settings are in effect in this process


def reuse_freed_memory() -> str:
  """Makes glibc's ``malloc`` keep freed memory for reuse, process-wide.

  Sets ``M_ARENA_MAX=1`` (every thread, XLA's workers included, allocates from the main
  heap), ``M_MMAP_MAX=0`` (large blocks come from that heap, not from new mappings) and
  ``M_TRIM_THRESHOLD=-1`` (the heap's free top is never returned to the kernel). The
  process's peak memory is unchanged; memory freed after the peak is not given back to
  the system before exit. The same as starting the process with ``MALLOC_ARENA_MAX=1
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1``.

  Call it before jax creates its CPU client (the first computation or
  ``jax.devices()``): a thread that has already allocated keeps its own arena.

  Returns:
    ``"glibc"`` when the settings were applied, else why not (``"not Linux"``,
    ``"not glibc"``, ``"mallopt refused ..."``); then the settings are not (all) in
    effect and :func:`applied` stays ``False``.
  """
  if not sys.platform.startswith("linux"):
    return "not Linux"
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return "not glibc"
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for name, param, value in (("M_ARENA_MAX", _M_ARENA_MAX, 1),
                             ("M_MMAP_MAX", _M_MMAP_MAX, 0),
                             ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, -1)):
    if mallopt(param, value) != 1:
      return f"mallopt refused {name}={value}"
  global _applied
  _applied = True
  return "glibc"


def applied() -> bool:
  """Whether :func:`reuse_freed_memory` has put its settings in effect in this process
  (what a benchmark records beside its times)."""
  return _applied


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def free_heap_bytes() -> int:
  """Bytes this process has freed but glibc keeps for reuse (``mallinfo2().fordblks``):
  after :func:`reuse_freed_memory` they never return to the kernel, so the host's
  ``MemAvailable`` no longer counts them, though this process can allocate them again.
  0 where unknown (not glibc, or glibc before 2.33)."""
  try:
    mallinfo2 = ctypes.CDLL(None).mallinfo2
  except (OSError, AttributeError):
    return 0
  mallinfo2.argtypes, mallinfo2.restype = (), _MallInfo2
  return int(mallinfo2().fordblks)
