"""Whether a tree of arrays holds only finite values: the one check of parameters before
they are trained on, saved, served or exported."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _leaf_is_finite(tree):
  return jax.tree_util.tree_map(lambda a: jnp.all(jnp.isfinite(a)), tree)


def nonfinite_arrays(tree) -> list[str]:
  """The paths (``"decoder/kernel"``) of the arrays of ``tree`` that hold a NaN or an
  infinity, in the tree's order. One bool per array is formed on the arrays' devices and
  read from a local device, so every process of a multi-process run can call it."""
  finite = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)),
                                  _leaf_is_finite(tree))
  return ["/".join(str(getattr(k, "key", k)) for k in path)
          for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
          if not bool(np.all(ok))]


def check_finite_params(params, error: Callable[[str], Exception]) -> None:
  """Raises ``error(arrays)`` (``arrays``: the paths of :func:`nonfinite_arrays`, comma
  separated) when any array of ``params`` is not finite; the caller's error says what it
  means there (a diverged fit, a model not fit to serve)."""
  bad = nonfinite_arrays(params)
  if bad:
    raise error(", ".join(bad))
