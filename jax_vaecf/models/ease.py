"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

A closed-form item-item model: with ``X`` the ``(n_users, n_items)`` training matrix and
``G = X^T X`` its Gram matrix,

    P = (G + l2 * I)^-1,    B = I - P diag(1 / diag(P))    (so diag(B) = 0),

and a user with history row ``x`` gets the scores ``x @ B``. There is no optimiser and
no epoch: a run reads the same CSR batches the VAEs train on, and fits in one of two ways
(:func:`fit_run`, by the problem's device):

* On a CPU device (:func:`fit_on_host`): the batches become a sparse matrix on the host
  (:func:`training_rows`; never a dense user x item matrix) and every ``B`` comes from
  :mod:`jax_vaecf.models.gram_solvers`' in-place LAPACK solvers: the Gram matrix written
  straight into a dense matrix, its Cholesky factor and inverse in place (ONE ``n x n``
  matrix; a sweep keeps the best ``B`` beside it), or the users x users (Woodbury) form when it costs fewer flops
  (fewer users than items). Several ``l2``: one fit per scored value, the values searched
  by golden section along the sorted grid (about 5 of 10 scored; it assumes the
  validation NDCG rises then falls); the best ``B`` so far is kept beside the next
  value's fit (primal form: a one-matrix fit; dual form: when the memory allows,
  :func:`keeps_best_b`), else the chosen value fitted again.
* On an accelerator (:func:`fit_on_device`): ``G`` on the device (:func:`gram_matrix`);
  one ``l2`` by :func:`fit` (Cholesky factor of ``G + l2 I``, then ``P`` from it);
  several from one eigendecomposition ``G = V diag(s) V^T`` (:func:`spectrum`):
  ``P = V diag(d) V^T`` with ``d = 1 / (s + l2)``, and on a user's unseen items
  ``x @ B = -(x P) / diag(P)``, so the validation scores of one ``l2`` are
  ``((x V) * d) @ (V^T / -diag(P))``: ``n_validation * n_items^2`` work each and no
  inverse (:func:`sweep_params` for :class:`Spectral`, scored by the ordinary eval step).
  The best value's ``B`` comes from the same decomposition (:func:`fit_from_spectrum`).

The model (:class:`EASE`) is an ordinary :class:`jax_vaecf.model.CFModel` whose
output-layer input is the dense history row and whose output layer is ``B`` (zero bias),
so evaluation, checkpoints, the :class:`jax_vaecf.serving.recommender.Recommender` and exported
artefacts take it unchanged: a new user folds in as ``x @ B`` with the user's own items
excluded, as for every model. Its parameters: ``output/kernel`` ``B`` float32
``(n_items, n_items)``, ``output/bias`` zeros ``(n_items,)`` and ``l2`` (float32 scalar,
the value it was fitted with).

Memory: ``n_items^2`` float32 values per matrix, :func:`matrices_at_peak` of them at
once (:func:`device_bytes_needed`: 2 on a CPU device, 5 on an accelerator); MSD's 41,140
items need 6.3 GiB per matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jax_vaecf.models import base as model_lib
from jax_vaecf.models import gram_solvers
from jax_vaecf.core import host_memory
from jax_vaecf.core import sparse as sparse_lib

Array = jax.Array

# The l2 values swept when none is given: a log grid over the range the EASE paper and
# its follow-ups report (ML-20M 500, Netflix 1,000, MSD 200; ML-1M's best lies between).
DEFAULT_L2_GRID = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)

# n_items^2 float32 matrices held at once at the peak of a fit on an accelerator (jax's
# solvers): the Gram matrix or its eigenvectors, the factorisation's work space
# (LAPACK's syevd asks for about two), the scoring matrix of one l2 and B itself.
DEVICE_MATRICES_AT_PEAK = 5

# The same on a CPU device (gram_solvers on the host, one fit per l2, one or several):
# the Gram matrix (factored, inverted and turned into B in place) and the best B of a
# sweep kept beside it in the primal form; P and the users x items W (fewer users than
# items) in the dual form. The B handed to jax shares its memory
# (gram_solvers.aligned_empty).
HOST_MATRICES_AT_PEAK = 2

_HIGHEST = jax.lax.Precision.HIGHEST


class _ItemItem(nn.Module):
  """``y = x @ kernel + bias`` with an ``(n_items, n_items)`` kernel, both zero at init
  (the state's layout only: EASE's weights are fitted, never drawn). ``x`` is a dense
  ``(B, n_items)`` array or a :class:`SparseBatch` (:func:`sparse_rows_product`)."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x) -> Array:
    width = self.features if isinstance(x, sparse_lib.SparseBatch) else x.shape[-1]
    kernel = self.param("kernel", nn.initializers.zeros, (width, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    if isinstance(x, sparse_lib.SparseBatch):
      y = sparse_rows_product(x, kernel.astype(self.dtype))
    else:
      y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                  preferred_element_type=jnp.float32)
    return y + bias.astype(jnp.float32)


# EASE scores a sparse batch by sparse_rows_product instead of the dense product when the
# items exceed this many times the stored entries per row. Measured on a 2-core CPU (500
# rows, jax 0.10): the dense product took 0.9x the sparse one's time at 27 items per
# entry (ML-1M's rows), 1.5x at 41, 2.2x at 80, 8.3x at 175 (ML-20M's) and 46x at 1,090
# (Yelp2018's, 38,048 items; 2,000 rows).
GATHER_ITEMS_PER_ENTRY = 32


def sparse_rows_product(x: sparse_lib.SparseBatch, kernel: Array) -> Array:
  """``densify(x) @ kernel`` float32 ``(B, n)`` without the dense rows: each stored
  entry adds its value times its kernel row to its user's row
  (:func:`jax_vaecf.core.sparse.matmul`; ``nnz * n`` multiply-adds against the dense
  product's ``B * n_items * n``). ``kernel`` ``(n_items, n)`` in the product's dtype,
  accumulated in float32; padding entries (value 0) add nothing."""
  return sparse_lib.matmul(x.rows, x.cols, x.vals.astype(kernel.dtype), kernel,
                           x.batch_size)


def gathers_cheaper(x: model_lib.Input, n_items: int) -> bool:
  """Whether ``x`` (a :class:`SparseBatch`) is scored faster by
  :func:`sparse_rows_product` than densified (:data:`GATHER_ITEMS_PER_ENTRY`); decided
  from static shapes, at trace time (never for symbolic ones)."""
  if not isinstance(x, sparse_lib.SparseBatch):
    return False
  entries, rows = x.rows.shape[0], x.batch_size
  if not (isinstance(entries, int) and isinstance(rows, int)):
    return False  # symbolic shapes (an exported program): the dense product, any size
  return n_items > GATHER_ITEMS_PER_ENTRY * entries / max(rows, 1)


def _dense_rows(x: model_lib.Input, n_items: int, dtype) -> Array:
  """A batch's history rows as a dense ``(B, n_items)`` array of ``dtype``, densified on
  the device (EASE scores the raw rows: no normalisation, no dropout)."""
  model_lib.check_input(x, n_items)
  if isinstance(x, sparse_lib.SparseBatch):
    return sparse_lib.densify(x, n_items, dtype)
  return jnp.asarray(x).astype(dtype)


class _ClosedForm(model_lib.CFModel):
  """What EASE and its sweep scorer share: no training round, no KL term, an output
  layer ``output`` over the features."""

  closed_form = True  # fitted by this module's functions, not by train steps

  @property
  def output_layer(self) -> str:
    return "output"

  @property
  def phases(self) -> tuple[model_lib.Phase, ...]:
    return ()  # no optimiser, no training round

  @property
  def has_kl(self) -> bool:
    return False

  def __call__(self, x: model_lib.Input, *, train: bool = False, row_offset=0, **kwargs
               ) -> model_lib.ModelOutput:
    """Float32 scores ``(B, n_items)``: the output layer over :meth:`features`."""
    h = self.features(x, train=train, row_offset=row_offset, **kwargs).logits
    return model_lib.ModelOutput(self.output(h))


class EASE(_ClosedForm):
  """EASE's scorer ``x @ B`` as a model of the library.

  Attributes:
    n_items: number of items.
    dtype: matmul dtype of the scores (float32, bfloat16 or float16); accumulated and
      returned in float32.
    param_dtype: parameter dtype (float32).
    item_shards: always ``None`` (``B``'s two item axes are not split over devices).
  """

  n_items: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: Any = None

  def setup(self):
    self.output = _ItemItem(self.n_items, self.dtype, self.param_dtype)
    self.l2 = self.param("l2", nn.initializers.zeros, (), self.param_dtype)

  def features(self, x: model_lib.Input, *, train: bool = False, row_offset=0,
               dropout: bool = True, frozen: Any = None, kl: bool = True
               ) -> model_lib.ModelOutput:
    """``logits``: the scores ``x @ B`` float32 ``(B, n_items)`` already (the output layer
    is applied here, so a sparse batch can be scored by gathers of ``B``'s rows when
    :func:`gathers_cheaper`; :meth:`output_logits` passes them on)."""
    del train, row_offset, dropout, frozen, kl
    if gathers_cheaper(x, self.n_items):
      model_lib.check_input(x, self.n_items)
      return model_lib.ModelOutput(self.output(x))
    return model_lib.ModelOutput(self.output(_dense_rows(x, self.n_items, self.dtype)))

  def __call__(self, x: model_lib.Input, *, train: bool = False, row_offset=0, **kwargs
               ) -> model_lib.ModelOutput:
    """Float32 scores ``(B, n_items)``: :meth:`features`' logits."""
    return self.features(x, train=train, row_offset=row_offset, **kwargs)

  def output_logits(self, params: Any, h: Array) -> Array:
    """The evaluation's logits of a chunk of :meth:`features`' rows: those rows."""
    del params
    return h


class Spectral(_ClosedForm):
  """One ``l2``'s validation scores from the Gram matrix's eigendecomposition:
  ``(x @ project) @ output/kernel``, parameters from :func:`sweep_params`. Equal to
  :class:`EASE`'s scores on every item the user does not have (the only ones ranked)."""

  n_items: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: Any = None

  def setup(self):
    self.project = self.param("project", nn.initializers.zeros,
                              (self.n_items, self.n_items), self.param_dtype)
    self.output = _ItemItem(self.n_items, self.dtype, self.param_dtype)

  def features(self, x: model_lib.Input, *, train: bool = False, row_offset=0,
               dropout: bool = True, frozen: Any = None, kl: bool = True
               ) -> model_lib.ModelOutput:
    del train, row_offset, dropout, frozen, kl
    h = _dense_rows(x, self.n_items, jnp.float32)
    return model_lib.ModelOutput(jnp.dot(h, self.project, precision=_HIGHEST))


@dataclasses.dataclass(frozen=True)
class EASESettings:
  """EASE's own settings."""

  l2: tuple = model_lib.model_setting(
      (), "The L2 weight lambda, or comma-separated values to try on the validation "
      "data (the best is kept; '' = a grid from 10 to 10,000).", element=float)

  def __post_init__(self):
    l2_values(self.l2)


def _build(n_items, settings: EASESettings, dropout_rate, dtype) -> EASE:
  del settings, dropout_rate  # l2 shapes nothing; no input dropout
  return EASE(n_items, dtype)


def check_fits(n_items: int, device: jax.Device, title: str = "EASE") -> None:
  """Raises ``MemoryError`` naming the figures when a fit of ``n_items`` items cannot fit
  ``device``'s memory (before any work)."""
  need = device_bytes_needed(n_items, device)
  have = device_memory_bytes(device)
  if have is not None and need > have:
    raise MemoryError(
        f"{title} on {n_items:,} items needs about {need / 2**30:.1f} GiB on the device "
        f"({matrices_at_peak(device)} matrices of {n_items:,} x {n_items:,} float32, "
        f"{4 * n_items**2 / 2**30:.2f} GiB each); this {device.platform} device has "
        f"{have / 2**30:.1f} GiB. Run it where there is more memory, or keep fewer items "
        f"(a stricter item filter)")


def _space():
  from jax_vaecf.models import space  # pylint: disable=g-import-not-at-top
  return (space.Param("l2", "float", "EASE's L2 weight lambda (one value per trial).",
                      1.0, 1e5, log=True, applies="model", read=space.one_value,
                      write=space.as_list),)


def fit_run(settings: EASESettings, problem: model_lib.ClosedFormProblem
            ) -> model_lib.ClosedFormFit:
  """EASE's closed-form fit (its :attr:`ModelEntry.fit`): :func:`fit_on_host` when the
  problem's device is a CPU, else :func:`fit_on_device`."""
  grid = l2_values(settings.l2)
  if problem.device.platform == "cpu":
    return fit_on_host(grid, problem)
  return fit_on_device(grid, problem)


def fit_on_host(grid: tuple[float, ...], problem: model_lib.ClosedFormProblem
                ) -> model_lib.ClosedFormFit:
  """EASE on the host (:mod:`jax_vaecf.models.gram_solvers`): one ``l2`` fitted, or the
  sorted ``grid`` searched by golden section on the validation users, one fit per
  scored value and the best ``B`` kept (:func:`choose_on_host`)."""
  x = training_rows(problem.train_batches(), problem.n_items)
  form = host_form(x, problem.progress)

  def fitted(c):
    b = host_b(x, c["l2"], form, f"l2 {c['l2']:g}", problem.progress)
    return params_of(jax.device_put(b, problem.device), c["l2"])

  best, params, fits = choose_on_host([{"l2": v} for v in grid], problem, EASE(
      problem.n_items), fitted, form, x.shape, search=gram_solvers.golden_grid_search)
  return model_lib.ClosedFormFit(params, {"l2": (best["l2"],)},
                                 f"l2 {best['l2']:g} ({fits} {form} fits on the host)")


def dual_bytes_at_peak(n_users: int, n_items: int) -> int:
  """Bytes of float32 dense matrices at the peak of one users x users fit:
  ``K^-1`` ``(m, m)`` beside ``W`` ``(n, m)``, then ``W`` beside ``P`` ``(n, n)``."""
  m, n = int(n_users), int(n_items)
  return 4 * max(m * m + n * m, n * m + n * n)


def keeps_best_b(form: str, shape: tuple[int, int], progress=None) -> bool:
  """Whether a host sweep keeps the best ``B`` so far beside the next fit rather than
  fitting the chosen setting again at the end (one fit more). Primal form: always (a
  fit is one matrix, LAPACK's ``potri`` in place, so the kept ``B`` is the second). Users x users form: when this process can allocate, beside a fit's peak
  (:func:`dual_bytes_at_peak`), the kept ``B`` and the two ``n x n`` copies of a
  candidate's ``B`` that scoring and checkpointing it make in jax's memory (the eval
  step's replicated parameters, the run's state), with a tenth to spare: on Yelp2018
  (31,668 users x 38,048 items) a run that kept ``B`` counting only the first reached
  22.9 GiB resident on a machine with 23 GiB. Said to ``progress`` either way."""
  if form == "primal":
    return True
  n = shape[1]
  need = (dual_bytes_at_peak(*shape) + 3 * 4 * n * n) * 1.1
  have = host_memory_bytes()
  keep = have is not None and have >= need
  if progress is not None:
    progress(f"the best B so far is {'kept beside each fit' if keep else 'not kept'}: "
             f"{need / 2**30:.1f} GiB needed, "
             f"{'unknown' if have is None else f'{have / 2**30:.1f} GiB'} free"
             f"{'' if keep else '; the chosen setting is fitted again'}")
  return keep


def choose_on_host(candidates: list[dict], problem: model_lib.ClosedFormProblem,
                   model: nn.Module, fitted, form: str, shape: tuple[int, int],
                   search=None) -> tuple[dict, dict, int]:
  """The host sweep of a closed-form model: each candidate fitted by
  ``fitted(candidate) -> params`` (:func:`host_b`) and scored by ``problem.choose``
  (``search`` picks which; ``None``: all). The best ``B`` so far is kept beside the next
  fit when :func:`keeps_best_b` says so (a primal fit is one matrix, ``potri``), so the
  sweep costs one fit per scored candidate; else the chosen one is fitted again.

  Returns ``(chosen candidate, its params, fits made)``. ``shape``: the training rows'
  ``(n_users, n_items)``."""
  keep = len(candidates) > 1 and keeps_best_b(form, shape, problem.progress)
  latest, kept, fits = {}, {}, [0]

  def scorer(c):
    fits[0] += 1
    latest["params"] = fitted(c)
    return model, latest["params"]

  def keeping(value, n):
    def value_keeping_the_best(i):  # the searches' own rule: the first largest value
      v = value(i)
      if keep and v > kept.get("ndcg", -float("inf")):
        kept.clear()
        kept.update(ndcg=v, index=i, params=latest["params"])
      latest.clear()  # a worse B is freed before the next fit
      return v
    return (search or model_lib.first_best)(value_keeping_the_best, n)

  best = problem.choose(candidates, scorer, search=keeping)
  if "index" in kept and candidates[kept["index"]] == best:
    params = kept.pop("params")
  else:
    kept.clear()
    fits[0] += 1
    params = fitted(best)
  return best, params, fits[0]


def fit_on_device(grid: tuple[float, ...], problem: model_lib.ClosedFormProblem
                  ) -> model_lib.ClosedFormFit:
  """EASE with jax's solvers on the problem's device: the Gram matrix of the training
  rows there, then one ``l2`` fitted by Cholesky, or each of several scored on the
  validation users from one eigendecomposition and the best kept (``B`` from the same
  decomposition). :data:`DEVICE_MATRICES_AT_PEAK` matrices."""
  t0 = time.perf_counter()
  gram = gram_matrix(problem.train_batches(), problem.n_items, problem.device)
  jax.block_until_ready(gram)
  gram_s = time.perf_counter() - t0
  if len(grid) == 1:
    l2 = grid[0]
    b = fit(gram, jnp.float32(l2))
  else:
    s, v = spectrum(gram)  # gram donated
    del gram
    scorer = Spectral(problem.n_items)
    best = problem.choose([{"l2": value} for value in grid],
                          lambda c: (scorer, sweep_params(s, v, jnp.float32(c["l2"]))))
    l2 = best["l2"]
    b = fit_from_spectrum(s, v, jnp.float32(l2))
    del s, v
  return model_lib.ClosedFormFit(params_of(b, l2), {"l2": (l2,)},
                                 f"l2 {l2:g} (gram matrix {gram_s:.2f}s)")


ENTRY = model_lib.ModelEntry(_build, "EASE", EASESettings, check_memory=check_fits,
                             fit=fit_run, space=_space())


# ------------------------------------------------------------------------------- fit


# EASE's l2 where a float32 solve of (G + l2 I) P = I stays meaningful. Below: the Gram
# matrix G counts users, its smallest eigenvalues are 0 for an item nobody has or two
# items with the same users, and float32 (7 digits) rounding of entries in the thousands
# leaves G + l2 I numerically singular (the fit "diverges"). Above: a co-occurrence of
# one user (an entry 1 of G) is within a few float32 roundings of l2, so B = I - P/diag(P)
# ranks by rounding noise, and from about 1e19 on P's entries (~G / l2^2) underflow to 0
# and every item scores alike. The EASE papers' values (200 to 1,000) and the default
# grid (10 to 10,000) lie well inside.
L2_RANGE = (1.0, 1e6)


def l2_values(l2: Iterable[float]) -> tuple[float, ...]:
  """The ``l2`` values a run fits: those given (sorted, each once), or
  :data:`DEFAULT_L2_GRID` when none is. Raises ``ValueError`` for a value outside
  :data:`L2_RANGE`, with the reason, before any fit."""
  values = tuple(float(v) for v in l2)
  lo, hi = L2_RANGE
  bad = [v for v in values if not lo <= v <= hi]
  if bad:
    raise ValueError(
        f"l2 must be in [{lo:g}, {hi:g}], got {bad}: below, float32 rounding "
        "makes G + l2 I singular; above, one co-occurrence is lost in l2's rounding and "
        "the scores are noise (jax_vaecf.models.ease.L2_RANGE)")
  return tuple(sorted(set(values))) or DEFAULT_L2_GRID


def matrices_at_peak(device: jax.Device) -> int:
  """``n_items^2`` float32 matrices a fit on ``device`` holds at its peak:
  :data:`HOST_MATRICES_AT_PEAK` on a CPU device, else :data:`DEVICE_MATRICES_AT_PEAK`."""
  return HOST_MATRICES_AT_PEAK if device.platform == "cpu" else DEVICE_MATRICES_AT_PEAK


def device_bytes_needed(n_items: int, device: jax.Device) -> int:
  """Bytes a fit of ``n_items`` items on ``device`` needs at its peak
  (:func:`matrices_at_peak`)."""
  return matrices_at_peak(device) * 4 * int(n_items) ** 2


def training_rows(batches: Iterable[sparse_lib.SparseBatch], n_items: int
                  ) -> sp.csr_matrix:
  """The training rows in ``batches`` (host :class:`SparseBatch` es covering each row
  once, 1-D or with a leading shard axis) as a float32 CSR ``(n_users, n_items)`` on the
  host; rows without an item (padding) are left out, duplicate entries add up."""
  rows, cols, vals, offset = [], [], [], 0
  for batch in batches:
    r, mask = np.asarray(batch.rows, np.int64), np.asarray(batch.row_mask)
    if r.ndim == 2:  # each shard counts its rows from 0
      r = r + (np.arange(r.shape[0]) * mask.shape[-1])[:, None]
    v = np.asarray(batch.vals, np.float32).ravel()
    real = v != 0  # padding entries hold 0 at (0, 0)
    rows.append(r.ravel()[real] + offset)
    cols.append(np.asarray(batch.cols).ravel()[real])
    vals.append(v[real])
    offset += mask.size
  if not rows:
    raise ValueError("training_rows: no batch (the split has no training rows)")
  x = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                    shape=(offset, n_items), dtype=np.float32)
  return x[np.diff(x.indptr) > 0]


def host_form(x: sp.csr_matrix, progress=None) -> str:
  """``"dual"`` (users x users system) when it costs fewer flops than ``"primal"`` for
  the sparse ``(n_users, n_items)`` ``x`` (:func:`gram_solvers.use_dual`), said to
  ``progress`` with a fit's cost."""
  m, n = x.shape
  form = "dual" if gram_solvers.use_dual(m, n) else "primal"
  flops = (gram_solvers.dual_flops if form == "dual" else gram_solvers.primal_flops)(m, n)
  if progress is not None:
    progress(f"{form} form for {m:,} users x {n:,} items, {flops / 1e9:,.0f} GFLOP a fit")
  return form


def host_b(x: sp.csr_matrix, diag_add, form: str, setting: str, progress=None,
           method: str = "potri") -> np.ndarray:
  """``B = I - P / diag(P)`` float32 ``(n, n)`` with ``P = (X^T X + diag(diag_add))^-1``
  from the sparse ``(m, n)`` ``x`` by :func:`gram_solvers.fit_inverse` in ``form``
  (``"primal"`` or ``"dual"``), in the memory ``P`` was computed in (C-ordered, aligned
  for ``jax.device_put`` to share it). ``diag_add``: scalar or ``(n,)``, above 0.
  ``numpy.linalg.LinAlgError`` naming ``setting`` (e.g. ``"l2 10"``) when the matrix is
  not positive definite in float32. ``method``: the primal form's inverse (``"potri"``:
  one matrix, in place; ``"blas3"``: two at the peak)."""
  try:
    p = gram_solvers.fit_inverse(x, diag_add, np.float32, form, progress, method=method)
  except np.linalg.LinAlgError as e:
    raise np.linalg.LinAlgError(
        f"the fit with {setting} failed in float32 ({e}): give a larger l2") from None
  return gram_solvers.ease_b_from_p(p)


@functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
def _add_gram(gram: Array, batch: sparse_lib.SparseBatch, n_items: int) -> Array:
  x = sparse_lib.densify(batch, n_items)

  def sparse_side(x):
    # X^T x as the sparse matrix X^T times the dense rows: nnz * n_items additions
    # (an entry loop on CPU, where the dense product's B * n_items^2 was 3x slower
    # than SciPy's sparse one at ML-1M's shape).
    return sparse_lib.matmul(batch.cols, batch.rows, batch.vals, x, n_items)

  def dense(x):
    return jnp.dot(x.T, x, precision=_HIGHEST)

  return gram + jax.lax.platform_dependent(x, cpu=sparse_side, default=dense)


def gram_matrix(batches: Iterable[sparse_lib.SparseBatch], n_items: int,
                device: jax.Device | None = None) -> Array:
  """``X^T X``, float32 ``(n_items, n_items)`` on ``device``, summed over the batches.

  Args:
    batches: host :class:`SparseBatch` es (one shard: leaves ``(nnz,)`` and ``(B,)``)
      covering every training row once; each is copied to the device and densified
      there, ``(B, n_items)`` at a time.
    n_items: the catalogue's width.
    device: where the sum lives (default: the first device).

  Binary rows give integer sums, exact in float32 up to 2^24 users.
  """
  device = device or jax.devices()[0]
  gram = jax.device_put(jnp.zeros((n_items, n_items), jnp.float32), device)
  for batch in batches:
    gram = _add_gram(gram, jax.device_put(batch, device), n_items)  # host -> device
  return gram


@jax.jit
def fit(gram: Array, l2: Array) -> Array:
  """``B`` float32 ``(n, n)`` for one ``l2`` from the Gram matrix ``(n, n)``: the
  Cholesky factor of ``G + l2 I`` gives ``P``, then ``B = I - P / diag(P)`` (columns)
  with a zero diagonal. A matrix that is not positive definite gives NaN."""
  n = gram.shape[0]
  eye = jnp.eye(n, dtype=jnp.float32)
  factor = jax.scipy.linalg.cho_factor(gram + l2 * eye, lower=True)
  p = jax.scipy.linalg.cho_solve(factor, eye)
  return b_from_p(p)


def b_from_p(p: Array) -> Array:
  """``B = -P / diag(P)`` (columns) with a zero diagonal, from ``P`` float32 ``(n, n)``."""
  p = 0.5 * (p + p.T)  # symmetric to rounding: each column's scale from its own diagonal
  b = -p / jnp.diag(p)[None, :]
  return b.at[jnp.diag_indices(p.shape[0])].set(0.0)


@functools.partial(jax.jit, donate_argnums=0)
def spectrum(gram: Array) -> tuple[Array, Array]:
  """``(s float32 (n,), V float32 (n, n))`` with ``G = V diag(s) V^T`` (the Gram matrix
  is donated: its memory holds the result)."""
  # Unsorted: the sweep needs no order, and the sort is an extra pass.
  v, s = jax.lax.linalg.eigh(gram, symmetrize_input=True, sort_eigenvalues=False)
  return s, v


@jax.jit
def sweep_params(s: Array, v: Array, l2: Array) -> dict:
  """The :class:`Spectral` parameters of one ``l2``: ``project = V`` and
  ``output/kernel = diag(d) V^T / -diag(P)`` with ``d = 1 / (s + l2)`` and
  ``diag(P) = (V * V) @ d``."""
  d = 1.0 / (s + l2)
  diag_p = jnp.dot(v * v, d, precision=_HIGHEST)
  return {"project": v,
          "output": {"kernel": (d[:, None] * v.T) / -diag_p[None, :],
                     "bias": jnp.zeros_like(s)}}


@jax.jit
def fit_from_spectrum(s: Array, v: Array, l2: Array) -> Array:
  """``B`` for one ``l2`` from the eigendecomposition (as :func:`fit` from ``G``)."""
  p = jnp.dot(v * (1.0 / (s + l2))[None, :], v.T, precision=_HIGHEST)
  return b_from_p(p)


def params_of(b: Array, l2: float) -> dict:
  """:class:`EASE`'s parameters holding ``B``."""
  return {"output": {"kernel": b, "bias": jnp.zeros((b.shape[0],), jnp.float32)},
          "l2": jnp.asarray(l2, jnp.float32)}


def host_memory_bytes() -> int | None:
  """The memory this process can allocate in bytes: the host's available memory
  (``MemAvailable``) plus what the process freed and keeps for reuse
  (:func:`jax_vaecf.core.host_memory.free_heap_bytes`: a run's refit, in the process of
  the validated run, would otherwise not count the memory that run let go); ``None``
  when unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024 + host_memory.free_heap_bytes()
  except OSError:
    pass
  return None


def device_memory_bytes(device: jax.Device) -> int | None:
  """What ``device`` can hold in bytes: its allocator's limit on an accelerator, the
  host's available memory on CPU; ``None`` when unknown."""
  if device.platform == "cpu":
    return host_memory_bytes()
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def numpy_ease(x: Any, l2: float) -> np.ndarray:
  """The reference: ``B`` in float64 by ``numpy.linalg.inv`` of a dense or scipy
  ``(n_users, n_items)`` matrix (tests and benchmarks compare :func:`fit` with it)."""
  x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
  x = x.astype(np.float64)
  g = x.T @ x
  p = np.linalg.inv(g + l2 * np.eye(g.shape[0]))
  b = -p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b
