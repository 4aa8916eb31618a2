"""What every model builds on, and the registry of models by name.

The layers (:class:`Dense`, :class:`InputDense`, the sparse-or-dense input check), the
interface every model implements (:class:`CFModel`: ``n_items``, ``phases``, ``has_kl``,
``closed_form``; :class:`ModelOutput`, :class:`Phase`), a model's settings type
(:func:`model_setting` fields: default, help, allowed values, whether they shape the
parameters) and its :class:`ModelEntry` (build, settings, search space, closed-form
``fit``), and the registry (:func:`names`, :func:`register`, :func:`model_entry`,
:func:`build_model`). The models themselves live one to a file beside it
(:mod:`jax_vaecf.models.multvae`, ``recvae``, ``ease``, ``edlae``); :mod:`jax_vaecf.model`
is their public face.

Precision and randomness, shared by every model: see :mod:`jax_vaecf.models.multvae`.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_vaecf.core import item_shards as item_shards_lib
from jax_vaecf.core import random as random_lib
from jax_vaecf.core import sparse as sparse_lib

Array = jax.Array
Input = Any  # Array (B, n_items) or sparse_lib.SparseBatch

_L2_EPS = 1e-12  # tf.nn.l2_normalize's epsilon, as in the paper's code.
kernel_init = nn.initializers.glorot_uniform()
bias_init = nn.initializers.truncated_normal(stddev=0.001)


class ModelOutput(NamedTuple):
  """What a model returns.

  Attributes:
    logits: float32 ``(B, n_items)``, unnormalised scores over all items (from
      ``features``: the output layer's input ``(B, width)`` in the model's ``dtype``).
    mu: float32 ``(B, latent_dim)``, posterior mean (``None`` for Mult-DAE).
    logvar: float32 ``(B, latent_dim)``, posterior log-variance (``None`` for Mult-DAE).
    kl: float32 ``(B,)``, each user's KL term of the objective, before its weight
      (``beta`` or ``gamma * |x_u|``); ``None`` when the model has none or it was not
      asked for (evaluation, a phase that trains no encoder).
  """

  logits: Array
  mu: Array | None = None
  logvar: Array | None = None
  kl: Array | None = None


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stage of a model's training round; a round is one epoch of the run.

  A model trains in the phases of its ``phases`` tuple, in order, each for ``passes``
  passes over the training users, with its own optimiser state. Mult-VAE and Mult-DAE
  have one phase that trains everything; RecVAE alternates an encoder phase and a
  decoder phase.

  Attributes:
    name: the phase's name (metrics and logs).
    passes: passes over the training users in each round.
    trains: the top-level parameter groups (keys of ``params``) this phase updates;
      ``None`` = all. The others are constants of the step: no gradient is formed for
      them (the fused output layer skips its kernel or input gradient accordingly).
    dropout: apply input dropout (posterior noise is drawn in every training phase).
    kl: add the KL term (a phase that cannot change it, such as RecVAE's decoder phase,
      skips computing it).
    refresh_frozen: before the phase's first step, set the state's ``frozen`` variables
      to ``model.frozen_from(params)`` (RecVAE's prior encoder).
  """

  name: str = "train"
  passes: int = 1
  trains: tuple[str, ...] | None = None
  dropout: bool = True
  kl: bool = True
  refresh_frozen: bool = False

  def trains_group(self, name: str) -> bool:
    return self.trains is None or name in self.trains


ONE_PHASE = (Phase(),)


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
  """``y + bias`` for float32 ``y`` ``(B, F)`` and ``bias`` ``(F,)``; returns ``(B, F)``.

  The same function as ``y + bias``; only its gradient is computed differently. The
  bias gradient is a sum over the batch; written as the matrix-vector product
  ``ones(B) @ g`` it runs as one streaming pass, where XLA CPU's fused reduction of a
  ``(500, 20108)`` gradient was measured ~2x slower than the whole logsumexp backward.
  """
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  ones = jnp.ones((g.shape[0],), g.dtype)
  return g, jnp.dot(ones, g)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """``y = x @ kernel + bias`` computed in ``dtype``, accumulated and returned in float32."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=jnp.float32)
    return add_bias(y, bias.astype(jnp.float32))


class InputDense(nn.Module):
  """The first layer: L2 normalisation, input dropout and ``x @ kernel + bias``.

  Accepts a dense ``(B, n_items)`` array or a :class:`SparseBatch`. For sparse input the
  matmul is a gather of the kernel rows of each user's items, weighted by the normalised
  (and dropped-out) values and summed per user: ``O(nnz * features)`` work instead of
  ``O(B * n_items * features)``, taken ``gather_chunk_size`` entries at a time
  (:func:`jax_vaecf.core.sparse.matmul`). Its gradient with respect to the kernel is a
  scatter-add over the same rows.

  The dropout mask of entry ``(u, i)`` is a hash of ``(key, row_offset + u, i)``, so both
  paths drop the same entries.

  With ``item_shards`` (inside ``shard_map``, :mod:`jax_vaecf.core.item_shards`) the kernel
  holds this device's rows only (``n_items`` is then the shard's width): the rows are
  normalised and dropped out over all their items, each device gathers the entries that
  fall in its shard, and the partial products are summed over the mesh axis. Sparse
  input only.
  """

  n_items: int
  features: int
  dropout_rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gather_chunk_size: int = 65_536  # sparse input: entries gathered at a time
  item_shards: item_shards_lib.ItemShards | None = None

  @nn.compact
  def __call__(self, x: Input, *, train: bool, row_offset=0) -> Array:
    kernel = self.param("kernel", kernel_init, (self.n_items, self.features),
                        self.param_dtype)
    bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
    keep = 1.0 - self.dropout_rate
    use_dropout = train and self.dropout_rate > 0.0
    if isinstance(x, sparse_lib.SparseBatch):
      vals = x.vals.astype(jnp.float32)
      sq = jax.ops.segment_sum(vals * vals, x.rows, num_segments=x.batch_size)
      vals = vals * jax.lax.rsqrt(jnp.maximum(sq, _L2_EPS))[x.rows]
      if use_dropout:
        seed = random_lib.key_to_seed(self.make_rng("dropout"))
        mask = random_lib.keep_mask(seed, x.rows + row_offset, x.cols, keep)
        vals = jnp.where(mask, vals / keep, 0.0)
      cols = x.cols
      if self.item_shards is not None:
        cols, inside = self.item_shards.local(cols)
        vals = jnp.where(inside, vals, 0.0)
      # A gather-and-sum has no matmul to speed up, so it runs in float32 whatever
      # `dtype` is.
      y = sparse_lib.matmul(x.rows, cols, vals, kernel, x.batch_size,
                            chunk_size=self.gather_chunk_size)
      if self.item_shards is not None:
        y = jax.lax.psum(y, self.item_shards.axis)
    else:
      if self.item_shards is not None:
        raise ValueError("item-sharded models take sparse input only (input_format="
                         "'sparse')")
      x = x.astype(jnp.float32)
      sq = jnp.sum(x * x, axis=-1, keepdims=True)
      x = x * jax.lax.rsqrt(jnp.maximum(sq, _L2_EPS))
      if use_dropout:
        seed = random_lib.key_to_seed(self.make_rng("dropout"))
        rows = jnp.arange(x.shape[0])[:, None] + row_offset
        mask = random_lib.keep_mask(seed, rows, jnp.arange(x.shape[1])[None, :], keep)
        x = jnp.where(mask, x / keep, 0.0)
      y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                  preferred_element_type=jnp.float32)
    return y + bias.astype(jnp.float32)


def check_input(x: Input, n_items: int) -> None:
  if isinstance(x, sparse_lib.SparseBatch):
    sparse_lib.check_sparse_batch(x, n_items)
    return
  if not hasattr(x, "ndim") or x.ndim != 2 or x.shape[-1] != n_items:
    raise ValueError(
        f"expected input of shape (batch, n_items={n_items}) or a SparseBatch, got "
        f"{getattr(x, 'shape', type(x).__name__)}")
  if not jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.bool_ and (
      not jnp.issubdtype(x.dtype, jnp.integer)):
    raise ValueError(f"expected a numeric input array, got dtype {x.dtype}")


class CFModel(nn.Module):
  """What every model of the library declares; the train step, the parallel modes,
  precision, weight averaging, checkpoints, the recommender and the CLI take any
  subclass without knowing which model it is.

  A subclass has the fields ``n_items``, ``dtype`` and ``param_dtype`` and implements:

  * ``features(x, *, train, row_offset=0, dropout=True, frozen=None, kl=True)`` ->
    :class:`ModelOutput` whose ``logits`` holds the output layer's input ``(B, width)``
    in ``dtype`` and whose ``kl`` holds each user's KL term (when ``train`` and ``kl``);
    ``dropout=False`` turns input dropout off in a training pass; ``frozen`` is the
    state's ``frozen`` variables (see below);
  * ``__call__(x, *, train=False, row_offset=0)`` -> :class:`ModelOutput` with float32
    logits ``(B, n_items)`` (evaluation and serving use ``train=False``, which needs
    only ``params``);
  * ``output_layer``: the key of ``params`` holding the output layer's ``kernel``
    ``(width, n_items)`` and ``bias`` ``(n_items,)``, fused with the likelihood by the
    training step (:func:`jax_vaecf.core.losses.output_layer_nll`).

  and may override:

  * ``phases``: its training round (default: one phase training every parameter);
  * ``has_kl``: whether it has a KL term (default True; Mult-DAE has none);
  * ``init_frozen(params, key)`` / ``frozen_from(params)``: variables kept beside the
    parameters that no optimiser updates (default: none).

  Input rows are dense ``(B, n_items)`` arrays or a :class:`SparseBatch`; ``row_offset``
  is the global position of the batch's first row (dropout masks and noise are
  functions of the global row). RNG streams ``'dropout'`` and ``'noise'``.

  A model-parallel step (:mod:`jax_vaecf.training.parallel`, a mesh with a ``model`` axis) runs
  ``model.clone(n_items=shards.per_shard, item_shards=shards)`` inside ``shard_map``:
  a model passes its ``item_shards`` field to its :class:`InputDense`, and nothing else
  changes (the item-indexed arrays are found by :func:`jax_vaecf.core.item_shards.item_axes`).
  """

  # True for a model fitted in closed form (its entry's ``fit``): it has no phases, and
  # the tools that average or split trained weights refuse it.
  closed_form = False

  @property
  def phases(self) -> tuple[Phase, ...]:
    return ONE_PHASE

  @property
  def has_kl(self) -> bool:
    """Whether ``features`` returns a KL term when training (False: an autoencoder)."""
    return True

  def init_frozen(self, params: Any, key: Array) -> Any:
    """The frozen variables of a fresh state (``None``: the model keeps none)."""
    del params, key
    return None

  def frozen_from(self, params: Any) -> Any:
    """The frozen variables a phase with ``refresh_frozen`` sets from the parameters."""
    del params
    return None


def sample_posterior(module: nn.Module, mu: Array, logvar: Array, row_offset) -> Array:
  """``z = mu + eps * exp(logvar / 2)`` with ``eps`` a function of the global row."""
  rows = jnp.arange(mu.shape[0]) + row_offset
  eps = random_lib.row_normal(module.make_rng("noise"), rows, mu.shape[-1])
  return mu + eps * jnp.exp(0.5 * logvar)


def model_setting(default, help: str, *, element: type = int, choices: tuple = (),
                  shapes: bool = False, empty_means_default: bool = False):
  """A field of a model's settings type: its default, one-line help (``--NAME`` and the
  docs), the element type of a tuple value, the allowed values (``choices``, empty: any),
  whether it shapes the parameters (a run folder's checkpoint identity records it, and
  resume, the recommender and export rebuild the model from it), and whether an empty
  list given by name (a flag, a settings file of the flat layout) means the default
  (``--hidden_dims=`` = the paper's widths)."""
  return dataclasses.field(default=default, metadata={
      "help": help, "element": element, "choices": tuple(choices), "shapes": shapes,
      "empty_means_default": empty_means_default})


def setting_fields(settings_type: type) -> tuple[dataclasses.Field, ...]:
  """The fields of a model's settings type, in declaration order."""
  return dataclasses.fields(settings_type)


def check_choices(settings: Any) -> None:
  """Raises ``ValueError`` naming a setting whose value is not one of its ``choices``."""
  for f in setting_fields(type(settings)):
    allowed = f.metadata.get("choices", ())
    if allowed and getattr(settings, f.name) not in allowed:
      raise ValueError(f"{f.name} must be one of {allowed}, got "
                       f"{getattr(settings, f.name)!r}")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A model the library can build by name (``--model=NAME``): the model's one place.

  Attributes:
    build: ``(n_items, settings, dropout_rate, dtype) -> CFModel``.
    title: the model's name in prose.
    settings: the model's settings type: a frozen dataclass whose fields are
      :func:`model_setting` s (checks of their values in its ``__post_init__``); the
      run's ``Config`` holds one as ``model_settings``, and every tool's flags, help,
      presets, run-folder identity, resume, recommender and export read it from here.
    check_memory: ``(n_items, device) -> None``, raising ``MemoryError`` with the
      figures when the model over ``n_items`` items cannot fit ``device`` (run before
      any work on the model); ``None``: no check.
    fit: ``None`` for a model trained by the iterative engine (its phases and steps);
      else its closed-form fit, ``fit(settings, problem: ClosedFormProblem) ->
      ClosedFormFit`` (the run calls it instead of training epochs).
    space: the tuner's parameters of the model's own settings
      (:class:`jax_vaecf.models.space.Param`).
  """

  build: Callable[..., CFModel]
  title: str
  settings: type
  check_memory: Callable[[int, Any], None] | None = None
  fit: Callable[..., Any] | None = None
  space: tuple = ()

  def __post_init__(self):
    if not dataclasses.is_dataclass(self.settings):
      raise TypeError(f"ModelEntry {self.title!r}: settings must be a dataclass type")
    names = {f.name for f in setting_fields(self.settings)}
    odd = [p.name for p in self.space if p.name not in names]
    if odd:
      raise ValueError(f"ModelEntry {self.title!r}: space names {odd}, which are not "
                       "its settings")

  @property
  def shape(self) -> tuple[str, ...]:
    """The settings that decide the shapes of the parameters besides ``n_items``."""
    return tuple(f.name for f in setting_fields(self.settings) if f.metadata["shapes"])


@dataclasses.dataclass(frozen=True)
class ClosedFormProblem:
  """What a closed-form :attr:`ModelEntry.fit` is given.

  Attributes:
    train_batches: ``() -> iterable of SparseBatch``: one pass over the training rows.
    n_items: number of items.
    n_train_users: number of training users.
    device: the device to fit on.
    score: ``(model, params) -> metrics`` on the validation users (a dict with
      ``ndcg@100``, ``recall@20``, ``recall@50``); ``None`` when the split has none.
    report: ``record -> None``: a sweep's record (``{"split": "sweep", ...}``), logged
      and printed by the run.
    progress: ``message -> None``: a note on a long fit's progress (a stage done and its
      time), shown by the run but not logged; ``None``: nowhere.
  """

  train_batches: Callable[[], Any]
  n_items: int
  n_train_users: int
  device: Any
  score: Callable[[CFModel, Any], dict] | None
  report: Callable[[dict], None]
  progress: Callable[[str], None] | None = None

  def choose(self, candidates: Sequence[dict],
             scorer: Callable[[dict], tuple[CFModel, Any]],
             search: Callable[[Callable[[int], float], int], int] | None = None) -> dict:
    """The candidate settings (``{name: value}`` each) with the best validation
    NDCG@100: each one's ``scorer(candidate) -> (model, params)`` scored on the
    validation users and reported as a ``{"split": "sweep", "swept": candidate, ...}``
    record. One candidate is returned unscored; several need validation users
    (``ValueError`` otherwise). ``search(value, n) -> index`` picks which to score
    (``value(i)`` scores candidate ``i`` and returns its NDCG@100), e.g. a golden-section
    search along candidates sorted by one setting; ``None``: every one, in order."""
    if len(candidates) == 1:
      return dict(candidates[0])
    if self.score is None:
      raise ValueError(f"bad setting: {len(candidates)} settings to choose from ("
                       f"{', '.join(sorted(candidates[0]))}) but the split has no "
                       "validation data; give one value each (or validation users: "
                       "--validation_fraction above 0 in the per-user protocol)")

    def value(i: int) -> float:
      t0 = time.perf_counter()
      vm = self.score(*scorer(candidates[i]))
      self.report({"split": "sweep", "swept": dict(candidates[i]),
                   **{f"val_{k}": float(vm[k]) for k in ("ndcg@100", "recall@20",
                                                          "recall@50")},
                   "val_time_s": time.perf_counter() - t0})
      return vm["ndcg@100"]

    return dict(candidates[(search or first_best)(value, len(candidates))])


def first_best(value: Callable[[int], float], n: int) -> int:
  """The index of the largest ``value(i)`` over ``0..n-1``, each called once in order
  (the first of equal ones)."""
  best, best_value = None, -float("inf")
  for i in range(n):
    v = value(i)
    if v > best_value:
      best, best_value = i, v
  return best


class ClosedFormFit(NamedTuple):
  """What a closed-form fit returns: the parameters of the model built from the chosen
  settings, the settings it chose (``{name: value}``, e.g. ``{"l2": (500.0,)}``: a
  refit or a resumed run uses them), and a line for the log."""

  params: Any
  chosen: dict
  summary: str



# Every model by name: "module:attribute" of its ModelEntry (a model in its own file
# builds on this module's layers, so its entry is imported when first asked for), or the
# entry itself (register).
_ENTRIES: dict[str, str | ModelEntry] = {
    "multvae": "jax_vaecf.models.multvae:MULTVAE",
    "multdae": "jax_vaecf.models.multvae:MULTDAE",
    "recvae": "jax_vaecf.models.recvae:ENTRY",
    "ease": "jax_vaecf.models.ease:ENTRY",
    "edlae": "jax_vaecf.models.edlae:ENTRY",
    "sparse_ease": "jax_vaecf.models.sparse_ease:ENTRY",
}
MODELS = tuple(_ENTRIES)  # the built-in models; names() also lists registered ones


def names() -> tuple[str, ...]:
  """Every model's name (``--model``), the built-in ones first."""
  return tuple(_ENTRIES)


def register(name: str, entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
  """Adds a model to the registry under ``name``: every tool (``--model=name``), the
  run folder, the recommender and export then take it. ``ValueError`` for a taken name
  unless ``replace``."""
  if not isinstance(entry, ModelEntry):
    raise TypeError(f"register: expected a ModelEntry, got {type(entry).__name__}")
  if name in _ENTRIES and not replace:
    raise ValueError(f"model {name!r} is registered already (replace=True replaces it)")
  _ENTRIES[name] = entry
  return entry


def unregister(name: str) -> None:
  """Removes a model :func:`register` added (built-in models stay)."""
  if name in MODELS:
    raise ValueError(f"{name!r} is a built-in model")
  _ENTRIES.pop(name, None)


def model_entry(name: str) -> ModelEntry:
  """The :class:`ModelEntry` called ``name`` (one of :func:`names`)."""
  if name not in _ENTRIES:
    raise ValueError(f"unknown model {name!r}: expected one of {names()}")
  ref = _ENTRIES[name]
  if isinstance(ref, ModelEntry):
    return ref
  module, attribute = ref.split(":")
  return getattr(importlib.import_module(module), attribute)


def _json_value(value):
  return list(value) if isinstance(value, tuple) else value


def _typed_value(f: dataclasses.Field, value, source: str):
  """A JSON or Python value as the setting ``f`` holds it; ``ValueError`` naming
  ``source`` for one of the wrong type."""
  default = f.default
  if isinstance(default, tuple):
    kinds = (int, float) if f.metadata["element"] is float else (int,)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, kinds) and not isinstance(v, bool) for v in value):
      return tuple(f.metadata["element"](v) for v in value)
  elif isinstance(default, bool):
    if isinstance(value, bool):
      return value
  elif isinstance(default, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif isinstance(value, type(default)) and not isinstance(value, bool):
    return value
  expected = (f"a list of {f.metadata['element'].__name__}" if isinstance(default, tuple)
              else type(default).__name__)
  raise ValueError(f"{source}: {f.name} = {value!r}, expected {expected}")


def make_settings(name: str, values: dict | None = None, *, source: str = "settings",
                  flat: bool = False, base: Any = None) -> Any:
  """The settings of model ``name`` with ``values`` (``{setting: value}``, JSON or
  Python values) over ``base`` (settings of the model) or its defaults. ``flat``: the
  values were given by name (a flag, a settings file of the flat layout), where an empty list of a setting declared
  ``empty_means_default`` means its default. ``ValueError`` naming ``source`` for a
  setting the model does not have, a value of the wrong type or one its checks refuse."""
  entry = model_entry(name)
  fields = {f.name: f for f in setting_fields(entry.settings)}
  values = dict(values or {})
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{source}: {entry.title} (--model={name}) has no setting "
                     f"{', '.join(unknown)}")
  typed = {}
  for key, value in values.items():
    value = _typed_value(fields[key], value, source)
    if flat and value == () and fields[key].metadata["empty_means_default"]:
      continue
    typed[key] = value
  try:
    settings = (dataclasses.replace(base, **typed) if base is not None
                else entry.settings(**typed))
    check_choices(settings)
  except ValueError as e:
    raise ValueError(f"{source}: {entry.title}: {e}") from None
  return settings


def settings_json(settings: Any) -> dict:
  """A model's settings as a JSON object (tuples as lists)."""
  return {f.name: _json_value(getattr(settings, f.name))
          for f in setting_fields(type(settings))}


def shape_settings(name: str, settings: Any) -> dict:
  """The model's :attr:`ModelEntry.shape` settings as JSON values (what a run folder's
  checkpoint identity records), read from its settings."""
  return {key: _json_value(getattr(settings, key)) for key in model_entry(name).shape}


_LEGACY_PARAMETERS = ("hidden_dims", "latent_dim")


def build_model(name: str, n_items: int, *, settings: Any = None,
                dropout_rate: float = 0.5, dtype: Any = jnp.float32,
                **values) -> CFModel:
  """The model called ``name`` (one of :func:`names`) over ``n_items`` items.

  ``settings``: the model's settings (its entry's settings type); or give its settings
  by name in ``values`` (``hidden_dims=(600,)``, ``l2=(500.0,)``), each over its
  default (Mult-VAE ``(600,)``, Mult-DAE ``(200,)``, RecVAE five of 600);
  ``hidden_dims=None`` is the default too. A setting the model does not have is an error
  (but ``hidden_dims`` and ``latent_dim``, which every model once took, are ignored by a
  model without them).
  """
  if n_items <= 0:
    raise ValueError(f"n_items must be positive, got {n_items}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  entry = model_entry(name)
  if settings is None:
    # hidden_dims and latent_dim were parameters of every model here before models had
    # settings types; a model without them ignores them, as it always did.
    values = {k: v for k, v in values.items() if v is not None and not (
        k in _LEGACY_PARAMETERS and k not in entry.settings.__dataclass_fields__)}
    settings = make_settings(name, values, source=f"build_model({name!r})")
  elif values:
    raise ValueError("build_model: give settings or settings by name, not both")
  elif not isinstance(settings, entry.settings):
    raise TypeError(f"build_model({name!r}): settings must be a "
                    f"{entry.settings.__name__}, got {type(settings).__name__}")
  return entry.build(n_items, settings, dropout_rate, dtype)


def model_from_identity(ident: dict) -> CFModel:
  """The float32 model of a run folder's checkpoint identity (its ``model``,
  ``n_items`` and shape settings); ``ValueError`` for an identity that lacks them."""
  name = ident.get("model")
  shape = model_entry(name).shape if name in _ENTRIES else ()
  if name not in _ENTRIES or "n_items" not in ident or any(k not in ident for k in shape):
    raise ValueError(f"the run's checkpoint identity {sorted(ident)} does not give the "
                     f"model's name, n_items and shape settings (a run folder of an older "
                     "layout: train it again)")
  settings = make_settings(name, {k: ident[k] for k in shape}, source="checkpoint identity")
  return build_model(name, int(ident["n_items"]), settings=settings)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
