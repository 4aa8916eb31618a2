"""EDLAE (Steck, "Autoencoders that don't overfit towards the Identity", NeurIPS 2020):
the full-rank emphasized denoising linear autoencoder, in closed form.

A linear autoencoder ``x -> x B`` trained with input dropout of probability ``p`` and
the loss emphasizing the dropped-out coordinates learns no part of the identity. In
full rank its solution is EASE's with the L2 weight replaced by a per-item one: with
``G = X^T X``,

    Lambda = p / (1 - p) * dMat(diag(G)) + l2 * I,
    P = (G + Lambda)^-1,    B = I - P dMat(1 / diag(P))    (so diag(B) = 0).

(The paper's section 3, full emphasis on the dropped-out coordinates; the zero diagonal
is the limit the emphasis enforces. The same formula as irspack's ``EDLAERecommender``.)
``p = 0`` is EASE. A run fits each ``(p, l2)`` of its settings, scores each on the
validation users and keeps the best: on a CPU device with EASE's host solvers
(:func:`fit_on_host`: the sparse training rows, one in-place fit per pair, the users x
users form when cheaper, two ``n_items^2`` matrices at the peak), on an accelerator from
one Gram matrix on the device (:func:`fit_on_device`). The model scores a user's row as
``x @ B``, as :class:`jax_vaecf.models.ease.EASE`, and records its ``p`` and ``l2``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_vaecf.models import ease
from jax_vaecf.models import gram_solvers
from jax_vaecf.models import base as model_lib

Array = jax.Array

# Swept when no value is given: dropout probabilities across the paper's range and L2
# weights around EASE's (ML-1M: a first sweep over p 0.1 to 0.33 still rose at its
# largest l2, 500, and fell from l2 100 down to 1).
DEFAULT_DROPOUT_P = (0.1, 0.25, 0.5)
DEFAULT_L2 = (100.0, 300.0, 1000.0, 3000.0)


class EDLAE(ease.EASE):
  """EDLAE's scorer ``x @ B`` (:class:`jax_vaecf.models.ease.EASE`'s), recording the dropout
  probability it was fitted with beside its ``l2`` (float32 scalars)."""

  def setup(self):
    super().setup()
    self.dropout_p = self.param("dropout_p", nn.initializers.zeros, (), self.param_dtype)


def _values(values, default, name: str, low: float, high: float) -> tuple[float, ...]:
  values = tuple(sorted(set(float(v) for v in values))) or default
  bad = [v for v in values if not low <= v < high]
  if bad:
    raise ValueError(f"EDLAE's {name} must be in [{low:g}, {high:g}), got {bad}")
  return values


@dataclasses.dataclass(frozen=True)
class EDLAESettings:
  """EDLAE's own settings (several values each: every pair is tried on validation)."""

  dropout_p: tuple = model_lib.model_setting(
      (), "Dropout probability p, or comma-separated values to try on the validation "
      "data ('' = 0.1, 0.25, 0.5).", element=float)
  l2: tuple = model_lib.model_setting(
      (), "The L2 weight beside the dropout's, or comma-separated values to try ('' = "
      "100, 300, 1000, 3000).", element=float)

  def __post_init__(self):
    self.grid()

  def grid(self) -> list[dict]:
    """Every ``{"dropout_p": p, "l2": l2}`` pair to fit; ``ValueError`` for a value out
    of range (``G + Lambda`` must be positive definite: ``l2 > 0``, ``0 <= p < 1``)."""
    ps = _values(self.dropout_p, DEFAULT_DROPOUT_P, "dropout_p", 0.0, 1.0)
    l2s = _values(self.l2, DEFAULT_L2, "l2", np.finfo(np.float32).tiny, float("inf"))
    return [{"dropout_p": p, "l2": l2} for p, l2 in itertools.product(ps, l2s)]


@jax.jit
def fit(gram: Array, dropout_p: Array, l2: Array) -> Array:
  """``B`` float32 ``(n, n)`` from the Gram matrix ``(n, n)`` for one ``(p, l2)``
  (Cholesky factor of ``G + Lambda``, then ``P``)."""
  n = gram.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  weight = dropout_p / (1.0 - dropout_p) * jnp.diag(gram) + l2
  factor = jax.scipy.linalg.cho_factor(gram + jnp.diag(weight), lower=True)
  return ease.b_from_p(jax.scipy.linalg.cho_solve(factor, eye))


def params_of(b: Array, dropout_p: float, l2: float) -> dict:
  """:class:`EDLAE`'s parameters holding ``B``."""
  return {**ease.params_of(b, l2), "dropout_p": jnp.asarray(dropout_p, jnp.float32)}


def numpy_edlae(x: Any, dropout_p: float, l2: float) -> np.ndarray:
  """The reference: ``B`` in float64 by ``numpy.linalg.inv`` of a dense or scipy
  ``(n_users, n_items)`` matrix."""
  x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
  g = x.astype(np.float64).T @ x.astype(np.float64)
  weight = dropout_p / (1.0 - dropout_p) * np.diag(g) + l2
  p = np.linalg.inv(g + np.diag(weight))
  b = -p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b


def fit_run(settings: EDLAESettings, problem: model_lib.ClosedFormProblem
            ) -> model_lib.ClosedFormFit:
  """EDLAE's closed-form fit (its :attr:`ModelEntry.fit`): :func:`fit_on_host` when the
  problem's device is a CPU, else :func:`fit_on_device`."""
  if problem.device.platform == "cpu":
    return fit_on_host(settings.grid(), problem)
  return fit_on_device(settings.grid(), problem)


def fit_on_host(grid: list[dict], problem: model_lib.ClosedFormProblem
                ) -> model_lib.ClosedFormFit:
  """EDLAE on the host (:func:`jax_vaecf.models.ease.host_b`, EASE's solvers with the
  per-item diagonal ``Lambda``): each ``(p, l2)`` of ``grid`` fitted and scored on the
  validation users, the best ``B`` kept as EASE's sweep keeps it
  (:func:`jax_vaecf.models.ease.choose_on_host`; two ``n_items^2`` matrices at the peak
  in the primal form, :data:`jax_vaecf.models.ease.HOST_MATRICES_AT_PEAK`)."""
  x = ease.training_rows(problem.train_batches(), problem.n_items)
  form = ease.host_form(x, problem.progress)
  diag_g = gram_solvers.gram_diagonal(x)

  def fitted(c):
    weight = c["dropout_p"] / (1.0 - c["dropout_p"]) * diag_g + c["l2"]
    b = ease.host_b(x, weight, form, f"dropout_p {c['dropout_p']:g}, l2 {c['l2']:g}",
                    problem.progress)
    return params_of(jax.device_put(b, problem.device), c["dropout_p"], c["l2"])

  best, params, fits = ease.choose_on_host(grid, problem, EDLAE(problem.n_items),
                                           fitted, form, x.shape)
  return model_lib.ClosedFormFit(
      params, {"dropout_p": (best["dropout_p"],), "l2": (best["l2"],)},
      f"dropout_p {best['dropout_p']:g}, l2 {best['l2']:g} ({fits} {form} fits on "
      "the host)")


def fit_on_device(grid: list[dict], problem: model_lib.ClosedFormProblem
                  ) -> model_lib.ClosedFormFit:
  """EDLAE with jax's solvers on the problem's device: the Gram matrix once, then each
  ``(p, l2)`` of ``grid`` fitted and scored on the validation users, the best kept."""
  t0 = time.perf_counter()
  gram = ease.gram_matrix(problem.train_batches(), problem.n_items, problem.device)
  jax.block_until_ready(gram)
  gram_s = time.perf_counter() - t0
  scorer = EDLAE(problem.n_items)

  def fitted(c):
    return params_of(fit(gram, jnp.float32(c["dropout_p"]), jnp.float32(c["l2"])),
                     c["dropout_p"], c["l2"])

  best = problem.choose(grid, lambda c: (scorer, fitted(c)))
  return model_lib.ClosedFormFit(
      fitted(best), {"dropout_p": (best["dropout_p"],), "l2": (best["l2"],)},
      f"dropout_p {best['dropout_p']:g}, l2 {best['l2']:g} (gram matrix {gram_s:.2f}s)")


def _build(n_items, settings: EDLAESettings, dropout_rate, dtype) -> EDLAE:
  del settings, dropout_rate  # they shape nothing; no input dropout when scoring
  return EDLAE(n_items, dtype)


def _space():
  from jax_vaecf.models import space  # pylint: disable=g-import-not-at-top
  return (space.Param("dropout_p", "float", "EDLAE's dropout probability p (one value "
                      "per trial).", 0.05, 0.75, read=space.one_value,
                      write=space.as_list, applies="model"),
          space.Param("l2", "float", "EDLAE's L2 weight beside the dropout's (one value "
                      "per trial).", 0.1, 1e4, log=True, read=space.one_value,
                      write=space.as_list, applies="model"))


ENTRY = model_lib.ModelEntry(
    _build, "EDLAE", EDLAESettings, fit=fit_run, space=_space(),
    check_memory=functools.partial(ease.check_fits, title="EDLAE"))
