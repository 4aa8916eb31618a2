"""KL-weight (beta) schedules: pure functions of the update count, usable inside jit.

Each ``*_schedule`` returns ``beta(step) -> float32 scalar`` where ``step`` is the number
of updates already applied (the paper's ``update_count``: the first update uses
``beta(0)``). ``step`` may be a Python int or a traced integer array.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

Schedule = Callable[[object], object]


def _check_cap(cap: float) -> None:
  if not 0.0 <= cap <= 1.0:
    raise ValueError(f"anneal cap must be in [0, 1], got {cap}")


def linear_schedule(cap: float = 0.2, total_anneal_steps: int = 200_000) -> Schedule:
  """The paper's annealing: ``beta = min(cap, step / total_anneal_steps)``.

  ``total_anneal_steps = 0`` means no warm-up: ``beta = cap`` from the first step.
  """
  _check_cap(cap)
  if total_anneal_steps < 0:
    raise ValueError(f"total_anneal_steps must be >= 0, got {total_anneal_steps}")

  def schedule(step):
    if total_anneal_steps == 0:
      return jnp.asarray(cap, jnp.float32)
    frac = jnp.asarray(step, jnp.float32) / float(total_anneal_steps)
    return jnp.minimum(jnp.float32(cap), frac)

  return schedule


def constant_schedule(beta: float) -> Schedule:
  """``beta`` at every step (``beta = 0`` turns Mult-VAE into an unregularised AE)."""
  _check_cap(beta)
  return lambda step: jnp.asarray(beta, jnp.float32)


def cyclical_schedule(cycle_steps: int, cap: float = 1.0, ratio: float = 0.5) -> Schedule:
  """Cyclical annealing (Fu et al., NAACL 2019).

  Within each cycle of ``cycle_steps`` updates, ``beta`` rises linearly from 0 to ``cap``
  over the first ``ratio`` of the cycle and stays at ``cap`` for the rest:
  ``tau = (step mod cycle_steps) / cycle_steps``, ``beta = cap * min(1, tau / ratio)``.
  """
  _check_cap(cap)
  if cycle_steps <= 0:
    raise ValueError(f"cycle_steps must be positive, got {cycle_steps}")
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"ratio must be in (0, 1], got {ratio}")

  def schedule(step):
    tau = jnp.mod(jnp.asarray(step, jnp.int32), cycle_steps).astype(jnp.float32)
    tau = tau / float(cycle_steps)
    return jnp.float32(cap) * jnp.minimum(1.0, tau / ratio)

  return schedule


SCHEDULES = ("linear", "constant", "cyclical")


def get_schedule(kind: str, *, cap: float, total_anneal_steps: int,
                 cycle_steps: int = 0, ratio: float = 0.5) -> Schedule:
  """Builds a schedule by name: ``'linear'``, ``'constant'`` (beta = cap) or ``'cyclical'``."""
  if kind == "linear":
    return linear_schedule(cap, total_anneal_steps)
  if kind == "constant":
    return constant_schedule(cap)
  if kind == "cyclical":
    return cyclical_schedule(cycle_steps or max(total_anneal_steps, 1), cap, ratio)
  raise ValueError(f"unknown anneal schedule {kind!r}: expected one of {SCHEDULES}")
