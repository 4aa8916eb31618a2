"""A searched setting of the tuner (:class:`Param`), declared where the setting lives:
the run-level ones in :mod:`jax_vaecf.tuning.space` (`RUN_SPACE`), a model's own in its registry entry
(:attr:`jax_vaecf.model.ModelEntry.space`). Pure data: importing it imports no optional
package.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched setting.

  Attributes:
    name: the setting it sets (a :class:`~jax_vaecf.training.configs.Config` field or a model's
      own setting).
    kind: ``float``, ``int`` or ``categorical``.
    help: one line for ``--help`` and the docs.
    low, high, log: the range of a ``float`` / ``int`` (``log``: sampled log-uniformly).
    choices: the values of a ``categorical``.
    applies: which models it applies to (a rule of the tuner; ``"model"``: every model
      whose entry declares it).
    per_epochs: ``low`` and ``high`` are multiples of the base's ``number_of_epochs``.
    read: ``setting's value -> one trial value`` for a setting that holds more than one
      scalar (``hidden_dims``: its one width; raises ``ValueError`` with the reason when
      the value has no trial value); ``None``: the value itself.
    write: ``(trial value, setting's value) -> setting's new value`` (``hidden_dims``:
      that width for every layer); ``None``: the trial value itself.
  """

  name: str
  kind: str
  help: str
  low: float = 0.0
  high: float = 0.0
  log: bool = False
  choices: tuple = ()
  applies: str = "trained"
  per_epochs: bool = False
  read: Callable[[Any], Any] | None = None
  write: Callable[[Any, Any], Any] | None = None


def one_width(widths) -> int:
  """The one width of equal hidden layers (:attr:`Param.read` of ``hidden_dims``)."""
  widths = tuple(int(w) for w in widths)
  if len(set(widths)) != 1:
    raise ValueError(f"the base's hidden layers have widths {widths}; the search gives "
                     "every layer one width")
  return widths[0]


def every_width(value, widths) -> tuple[int, ...]:
  """``value`` for each of ``widths``' layers (:attr:`Param.write` of ``hidden_dims``)."""
  return (int(value),) * len(tuple(widths))


def one_value(values) -> float:
  """The one value of a list setting searched one value per trial (EASE's ``l2``)."""
  if len(values) != 1:
    raise ValueError(f"the base gives {len(values) or 'no'} values (a sweep in each "
                     "trial); give it one to start from")
  return float(values[0])


def as_list(value, values) -> tuple[float, ...]:
  """``(value,)``: a trial's one value of a list setting."""
  del values
  return (float(value),)


def hidden_dims_param(help: str) -> Param:
  """The search of one width for every hidden layer."""
  return Param("hidden_dims", "categorical", help, choices=(200, 400, 600, 800, 1200),
               applies="model", read=one_width, write=every_width)
