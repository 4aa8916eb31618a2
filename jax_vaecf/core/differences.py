"""Where two sets of settings differ: a checkpoint's identity against a run's, a run
folder's recorded settings against a command's."""

from __future__ import annotations

from typing import Any, Mapping


def differences(old: Mapping[str, Any], new: Mapping[str, Any], *,
                old_defaults: Mapping[str, Any] | None = None
                ) -> dict[str, tuple[Any, Any]]:
  """``{key: (old value, new value)}`` for each key whose values differ.

  The keys compared are both sides' (a key one side lacks reads as None there), so a
  fact only one side has is a difference too. With ``old_defaults``, only ``new``'s keys
  are compared and a key ``old`` lacks reads as its ``old_defaults`` value (a setting
  added since ``old`` was written)."""
  if old_defaults is None:
    keys = set(old) | set(new)
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}
  return {k: (old.get(k, old_defaults[k]), v) for k, v in new.items()
          if old.get(k, old_defaults[k]) != v}


def describe(diff: Mapping[str, tuple[Any, Any]], line: str, sep: str) -> str:
  """``diff`` (:func:`differences`) as one text: ``line.format(key=, old=, new=)`` for
  each key in sorted order, joined by ``sep``."""
  return sep.join(line.format(key=k, old=a, new=b) for k, (a, b) in sorted(diff.items()))
