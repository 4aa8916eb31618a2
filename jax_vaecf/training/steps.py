"""Train state and the pure ``train_step`` / ``eval_step`` functions.

A step takes a :class:`SparseBatch` of host or device arrays, either one batch (leaves
``(nnz,)`` and ``(B,)``) or a batch split into ``S`` shards along a leading axis (leaves
``(S, nnz)`` and ``(S, B / S)``, shard ``s`` holding global rows ``s * B / S ...`` with
local row ids). Shards are mapped with ``vmap``, so the same function runs on one device,
under ``jax.jit`` with the shard axis split over a device mesh, or under ``jax.pmap``
with ``axis_name`` set (then each device sees one shard and gradients are summed with
``psum``). Densification, when the dense input path is chosen, happens here, on device.

The objective is the mean over the real users of the whole (global) batch:
``mean_u[nll_u] + beta(step) * mean_u[kl_u] + l2_penalty(params, lam)`` (with
``kl_gamma``: ``mean_u[gamma * |x_u| * kl_u]``), where ``kl_u`` is the model's own KL
term (``ModelOutput.kl``). A model trains in phases (``model.phases``); each phase has
its own step, updating its parameter groups with its own optimiser state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jax_vaecf.core import item_shards as item_shards_lib
from jax_vaecf.core import losses
from jax_vaecf.evaluation import metrics as metrics_lib
from jax_vaecf import model as model_lib
from jax_vaecf.core import precision
from jax_vaecf.core import sparse as sparse_lib

Array = jax.Array
INPUT_FORMATS = ("sparse", "dense")


class TrainState(struct.PyTreeNode):
  """Everything a training run carries from step to step.

  Attributes:
    step: int32 scalar, number of updates applied (over all phases).
    params: model parameters (float32 pytree).
    opt_state: one optax state per phase of ``model.phases`` (a tuple), each over the
      parameter groups that phase trains.
    key: PRNG key data, uint32 ``(2,)``; step ``t`` uses ``fold_in(key, t)``.
    loss_scale: :class:`jax_vaecf.core.precision.LossScale` (constant 1 unless fp16).
    ema_params: ``None``, or the exponential moving average of ``params`` over the
      steps taken (same pytree; see :func:`update_weight_average`).
    frozen: ``None``, or the variables the model keeps beside its parameters that no
      optimiser updates (RecVAE's prior encoder; ``model.init_frozen``).
    tx: the optimiser (not a pytree leaf: not checkpointed, fixed by the run's settings).
  """

  step: Array
  params: Any
  opt_state: Any
  key: Array
  loss_scale: precision.LossScale
  ema_params: Any = None
  frozen: Any = None
  tx: optax.GradientTransformation | None = struct.field(pytree_node=False, default=None)

  @property
  def eval_params(self) -> Any:
    """The parameters to evaluate and serve: the weight average when it is kept."""
    return self.params if self.ema_params is None else self.ema_params


def _zero_beta(step):
  del step
  return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Everything that decides how a step turns a batch into an update, in one object that
  :func:`create_train_state`, :func:`make_train_step` and
  :func:`jax_vaecf.training.parallel.make_parallel_steps` share (so the state and the step cannot
  disagree about weight averaging or loss scaling); the eval step is built from its
  ``input_format`` and ``output_chunk_size``.

  Attributes:
    beta_schedule: KL weight as a function of ``state.step`` (unused with ``kl_gamma``).
    kl_gamma: above 0, each user's KL term is weighted by ``kl_gamma * |x_u|`` (the sum
      of the user's input row, RecVAE's rule) instead of ``beta_schedule``.
    lam: L2 weight (:func:`jax_vaecf.core.losses.l2_penalty`) on the trained kernels.
    input_format: ``'sparse'`` (first layer as gather-and-sum; output layer and loss
      fused, :func:`jax_vaecf.core.losses.output_layer_nll`, so no ``(B, n_items)`` array is
      formed) or ``'dense'`` (densify on device, plain matmuls, log-softmax and autodiff).
      Same math.
    loss_scaling: dynamic loss scaling (fp16): non-finite steps are skipped and the
      scale lowered (:mod:`jax_vaecf.core.precision`).
    loss_scale_period: finite steps before a dynamic loss scale doubles.
    output_chunk_size: users per chunk of the fused output layer and of evaluation's
      logits (sparse path).
    ema_decay: in ``[0, 1)``; above 0 the state keeps ``ema_params``
      (:func:`update_weight_average`), which evaluation then uses.
  """

  beta_schedule: Callable[[Array], Array] = _zero_beta
  kl_gamma: float = 0.0
  lam: float = 0.0
  input_format: str = "sparse"
  loss_scaling: bool = False
  loss_scale_period: int = 2000
  output_chunk_size: int = 1024
  ema_decay: float = 0.0

  def __post_init__(self):
    _check_format(self.input_format)
    if self.output_chunk_size < 1:
      raise ValueError(f"output_chunk_size must be >= 1, got {self.output_chunk_size}")
    if self.lam < 0:
      raise ValueError(f"lam must be >= 0, got {self.lam}")
    if self.kl_gamma < 0:
      raise ValueError(f"kl_gamma must be >= 0, got {self.kl_gamma}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.loss_scale_period < 1:
      raise ValueError(f"loss_scale_period must be >= 1, got {self.loss_scale_period}")

  @property
  def weight_average(self) -> bool:
    return self.ema_decay > 0


def make_optimizer(learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam, as the paper (TensorFlow's defaults)."""
  if learning_rate <= 0:
    raise ValueError(f"learning rate must be positive, got {learning_rate}")
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def init_params(model: nn.Module, key: Array) -> Any:
  """Initial parameters of ``model`` (shapes depend only on ``model.n_items``)."""
  x = jnp.zeros((1, model.n_items), jnp.float32)
  return model.init({"params": key}, x, train=False)["params"]


def param_item_axes(model: nn.Module) -> Any:
  """The item axis of each parameter of an item-sharded model (``None``: replicated).

  ``model.item_shards`` must be set; the axes are those of the whole (global) model.
  """
  shards = model.item_shards
  return item_shards_lib.item_axes(
      lambda n: init_params(model.clone(n_items=n, item_shards=None),
                            jax.random.PRNGKey(0)), shards.n_items)


def trained_part(params: Any, phase: model_lib.Phase) -> Any:
  """The parameter groups ``phase`` updates (all of ``params`` when it trains all)."""
  if phase.trains is None:
    return params
  missing = [g for g in phase.trains if g not in params]
  if missing:
    raise ValueError(f"phase {phase.name!r} trains {missing}, which are not parameter "
                     f"groups of the model ({sorted(params)})")
  return {g: params[g] for g in phase.trains}


def _merge(params: Any, part: Any, phase: model_lib.Phase) -> Any:
  if phase.trains is None:
    return part
  return {**params, **part}


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                       key: Array, options: StepOptions | None = None) -> TrainState:
  """A fresh state: parameters (and the model's frozen variables) from ``key``, a
  data-independent step key derived from it, one optimiser state per phase, and what
  ``options`` asks for (``ema_params`` with weight averaging, a loss scale with loss
  scaling).
  """
  options = options or StepOptions()
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  init_key, step_key = jax.random.split(key)
  params = init_params(model, init_key)
  frozen = model.init_frozen(params, jax.random.fold_in(init_key, 1))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tuple(optimizer.init(trained_part(params, ph)) for ph in model.phases),
      key=step_key,
      loss_scale=precision.init_loss_scale(options.loss_scaling),
      ema_params=(jax.tree_util.tree_map(jnp.copy, params) if options.weight_average
                  else None),
      frozen=frozen,
      tx=optimizer)


def refresh_frozen(model: nn.Module, state: TrainState) -> TrainState:
  """The state with ``frozen = model.frozen_from(params)`` (a phase's
  ``refresh_frozen``); pure, to jit."""
  return state.replace(frozen=model.frozen_from(state.params))


def update_weight_average(ema_params: Any, params: Any, step: Array, decay: float) -> Any:
  """The bias-corrected exponential moving average of the parameters after ``step`` updates.

  ``ema_t = ema_{t-1} + w_t (params_t - ema_{t-1})`` with
  ``w_t = (1 - decay) / (1 - decay ** t)``: the same as averaging ``params_1 .. params_t``
  with weights ``decay ** (t - s)`` and dividing by their sum (optax's ``debias``), so the
  initial parameters carry no weight (``w_1 = 1``) and early steps are not pulled towards
  them. ``step`` (int scalar, >= 1) counts updates including this one; ``decay`` in
  ``[0, 1)``; leaves are float32.
  """
  t = jnp.asarray(step, jnp.float32)
  w = (1.0 - decay) / (1.0 - jnp.power(jnp.float32(decay), t))
  return jax.tree_util.tree_map(lambda e, p: e + w * (p - e), ema_params, params)


def _with_shard_axis(batch):
  """Adds a leading shard axis of 1 to an unsharded batch."""
  rows = batch.fold_in.rows if isinstance(batch, sparse_lib.EvalBatch) else batch.rows
  if rows.ndim == 1:
    return jax.tree_util.tree_map(lambda a: a[None], batch)
  if rows.ndim != 2:
    raise ValueError(f"batch leaves must be (nnz,) or (shards, nnz), got {rows.shape}")
  return batch


def _check_format(input_format: str) -> None:
  if input_format not in INPUT_FORMATS:
    raise ValueError(f"unknown input format {input_format!r}: expected {INPUT_FORMATS}")


def _output_grads(model: nn.Module, phase: model_lib.Phase) -> str:
  """Which gradients of the fused output layer ``phase`` needs (see output_layer_nll)."""
  if phase.trains is None:
    return "all"
  layer = phase.trains_group(model.output_layer)
  upstream = any(g != model.output_layer for g in phase.trains)
  if layer and upstream:
    return "all"
  return "params" if layer else "input"


def _shard_loss_sums(model: nn.Module, options: StepOptions, phase: model_lib.Phase,
                     output_grads: str, params: Any, frozen: Any,
                     shard: sparse_lib.SparseBatch, key: Array, row_offset: Array | int
                     ) -> tuple[Array, Array]:
  """One shard's data terms, summed over its real users, not yet averaged.

  Args:
    model, options, phase: the step's; ``output_grads`` is :func:`_output_grads` of the
      phase.
    params: the whole model's parameters, the phase's trained part included.
    frozen: the state's frozen variables (or ``None``).
    shard: a :class:`SparseBatch` with leaves ``(nnz,)`` and ``(b,)``, rows numbered
      from 0.
    key: the step's PRNG key (dropout and posterior noise).
    row_offset: int32 scalar, the global row of the shard's first user: the model draws
      each user's noise from its global row, so the draws do not depend on the split.

  Returns:
    float32 scalars ``(sum_u nll_u, sum_u w_u * kl_u)`` over the real users
    (``row_mask``), ``w_u = 1``, or ``|x_u|`` with ``kl_gamma``; the KL sum is 0 when
    the model or the phase has no KL term. Sparse input: the model stops before its
    output layer, which :func:`jax_vaecf.core.losses.output_layer_nll` fuses with the NLL
    (on an item-sharded model, over this device's columns). Dense input: the rows are
    densified and the model's logits go through
    :func:`jax_vaecf.core.losses.multinomial_nll`.
  """
  dropout_key, noise_key = jax.random.split(key)
  rngs = {"dropout": dropout_key, "noise": noise_key}
  variables = {"params": params}
  kw = dict(train=True, row_offset=row_offset, rngs=rngs, dropout=phase.dropout,
            frozen=frozen, kl=phase.kl)
  gamma = options.kl_gamma
  m = shard.row_mask.astype(jnp.float32)
  if options.input_format == "sparse":
    out = model.apply(variables, shard, method="features", **kw)
    layer = params[model.output_layer]
    nll_sum = losses.output_layer_nll(out.logits, layer["kernel"], layer["bias"], shard,
                                      options.output_chunk_size, model.dtype,
                                      output_grads, getattr(model, "item_shards", None))
    counts = (jax.ops.segment_sum(shard.vals.astype(jnp.float32), shard.rows,
                                  num_segments=shard.batch_size) if gamma > 0 else None)
  else:
    x = sparse_lib.densify(shard, model.n_items)
    out = model.apply(variables, x, **kw)
    nll_sum = jnp.sum(losses.multinomial_nll(out.logits, x) * m)
    counts = jnp.sum(x, axis=-1) if gamma > 0 else None
  if out.kl is None:
    kl_sum = 0.0 * nll_sum
  elif counts is None:
    kl_sum = jnp.sum(out.kl * m)
  else:
    kl_sum = jnp.sum(out.kl * counts * m)
  return nll_sum, kl_sum


def _batch_sums(shard_sums: Callable, params: Any, frozen: Any,
                batch: sparse_lib.SparseBatch, key: Array, device_offset: Array | int
                ) -> tuple[Array, Array]:
  """A batch's data terms: ``shard_sums`` (:func:`_shard_loss_sums` with the step's
  settings bound) of each of its ``S`` shards, summed over the shards.

  ``batch`` has leaves ``(S, nnz)`` and ``(S, b)``; shard ``s``'s first row is global
  row ``device_offset + s * b``. Returns float32 scalars ``(nll_sum, kl_sum)``.
  """
  n_shards, rows_per_shard = batch.row_mask.shape
  if n_shards == 1:
    # Without the vmap XLA CPU keeps plain 2-D gathers, scatters and matmuls; the
    # batched forms of a size-1 axis were measured 1.5x slower at batch 10,000.
    one = jax.tree_util.tree_map(lambda a: a[0], batch)
    nll_sum, kl_sum = shard_sums(params, frozen, one, key, device_offset)
  else:
    offsets = device_offset + jnp.arange(n_shards) * rows_per_shard
    nll_sum, kl_sum = jax.vmap(shard_sums, in_axes=(None, None, 0, None, 0))(
        params, frozen, batch, key, offsets)
  return jnp.sum(nll_sum), jnp.sum(kl_sum)


def _kl_weight(model: nn.Module, phase: model_lib.Phase, options: StepOptions,
               step: Array) -> Array:
  """float32 scalar: the KL term's weight ``beta`` at ``step`` (``kl_gamma`` when set)."""
  if not (model.has_kl and phase.kl):
    return jnp.zeros((), jnp.float32)  # no KL term to weigh: reported as 0
  if options.kl_gamma > 0:
    return jnp.asarray(options.kl_gamma, jnp.float32)
  return options.beta_schedule(step)


def _check_state(state: TrainState, options: StepOptions, n_phases: int) -> None:
  """Raises when ``state`` was not made for a step of these options and phases."""
  if options.weight_average != (state.ema_params is not None):
    raise ValueError(
        f"ema_decay={options.ema_decay} needs a state "
        + ("with" if options.weight_average else "without")
        + " ema_params: make it with create_train_state(..., options) of these options")
  if state.tx is None:
    raise ValueError("the state carries no optimiser: make it with create_train_state")
  if len(state.opt_state) != n_phases:
    raise ValueError(f"the state has {len(state.opt_state)} optimiser states, the "
                     f"model {n_phases} phases")


@dataclasses.dataclass(frozen=True)
class _OneDevice:
  """How a step that sees the whole batch forms its objective: no collectives.

  The device modes differ only in these methods; :class:`_DataParallel` and
  :class:`_ItemSharded` override them.
  """

  def placement(self, batch: sparse_lib.SparseBatch) -> tuple[Array, Any, Any]:
    """``(n_users, n_replicas, device_offset)`` of a batch with a shard axis:
    float32 real users of the global batch, the devices that each add a share of the
    L2 penalty, and the global row of this device's first row."""
    n_users = jnp.sum(batch.row_mask.astype(jnp.float32))
    return n_users, 1, 0

  def objective(self, nll: Array, kl: Array, beta: Array, part: Any, lam: float,
                n_replicas: Any) -> tuple[Array, Array]:
    """``(loss, l2)``: this device's term of the global objective (float32 scalar) from
    the batch's mean ``nll`` and ``kl``, and its share ``l2`` of the penalty of the
    trained parameters ``part``."""
    # Each replica adds its share, so the psum of their gradients counts it once.
    l2 = losses.l2_penalty(part, lam) / n_replicas
    return nll + beta * kl + l2, l2

  def reduce(self, grads: Any, nll: Array, kl: Array, l2: Array
             ) -> tuple[Any, Array, Array, Array]:
    """The global gradients and terms ``(grads, nll, kl, l2)`` from this device's."""
    return grads, nll, kl, l2

  def all_finite(self, grads: Any) -> Array:
    """bool scalar: the step's gradients (all of them, on every device) are finite."""
    return precision.all_finite(grads)


@dataclasses.dataclass(frozen=True)
class _DataParallel(_OneDevice):
  """Each device holds the whole model and ``B / devices`` users (``jax.pmap``, or
  :mod:`jax_vaecf.training.parallel`'s data axis): counts, terms and gradients are summed over
  ``axis_name``."""

  axis_name: str

  def placement(self, batch):
    n_users = jnp.sum(batch.row_mask.astype(jnp.float32))
    n_users = jax.lax.psum(n_users, self.axis_name)
    n_replicas = jax.lax.psum(1, self.axis_name)
    device_offset = jax.lax.axis_index(self.axis_name) * batch.row_mask.size
    return n_users, n_replicas, device_offset

  def reduce(self, grads, nll, kl, l2):
    grads = jax.lax.psum(grads, self.axis_name)
    nll, kl = jax.lax.psum((nll, kl), self.axis_name)
    l2 = jax.lax.psum(l2, self.axis_name)
    return grads, nll, kl, l2


@dataclasses.dataclass(frozen=True)
class _ItemSharded(_DataParallel):
  """Inside ``shard_map`` on a ``(data, model)`` mesh: each device holds its data
  shard's users and its item shard's columns (``items``); ``part_axes`` holds the item
  axis of each trained parameter (``None``: replicated). How the objective is shared
  out over the devices and the gradients summed: :func:`make_train_step`.
  """

  items: item_shards_lib.ItemShards
  part_axes: Any

  def objective(self, nll, kl, beta, part, lam, n_replicas):
    replicated = item_shards_lib.map_with_axes(lambda x, a: x if a is None else None,
                                               part, self.part_axes)
    split = item_shards_lib.map_with_axes(lambda x, a: None if a is None else x, part,
                                          self.part_axes)
    l2 = (losses.l2_penalty(replicated, lam) / (n_replicas * self.items.count)
          + losses.l2_penalty(split, lam) / n_replicas)
    return (nll + beta * kl) / self.items.count + l2, l2

  def reduce(self, grads, nll, kl, l2):
    grads = item_shards_lib.map_with_axes(
        lambda g, a: jax.lax.psum(g, self.axis_name if a is not None
                                  else (self.axis_name, self.items.axis)),
        grads, self.part_axes)
    nll, kl = jax.lax.psum((nll, kl), self.axis_name)
    l2 = jax.lax.psum(l2, (self.axis_name, self.items.axis))
    return grads, nll, kl, l2

  def all_finite(self, grads):
    # Every shard of the item-split gradients must agree.
    finite = precision.all_finite(grads)
    return jax.lax.psum((~finite).astype(jnp.int32), self.items.axis) == 0


def _device_mode(model: nn.Module, options: StepOptions, phase: model_lib.Phase,
                 axis_name: str | None) -> _OneDevice:
  """The step's device mode (:class:`_OneDevice` or a subclass), its settings checked."""
  items = getattr(model, "item_shards", None)
  if items is None:
    return _OneDevice() if axis_name is None else _DataParallel(axis_name)
  if axis_name is None:
    raise ValueError("an item-sharded step runs inside shard_map: give the data axis "
                     "as axis_name")
  if options.input_format != "sparse":
    raise ValueError("item sharding needs input_format='sparse'")
  return _ItemSharded(axis_name, items, trained_part(param_item_axes(model), phase))


def _scaled_loss(shard_sums: Callable, ph: model_lib.Phase, mode: _OneDevice,
                 lam: float, part, params, frozen, batch, key, beta, n_users, scale,
                 device_offset, n_replicas):
  """The step's objective times the loss scale, differentiated in ``part`` (the phase's
  trained parameter groups); aux: the mean NLL, mean weighted KL and L2 term."""
  nll_sum, kl_sum = _batch_sums(shard_sums, _merge(params, part, ph), frozen, batch,
                                key, device_offset)
  denom = jnp.maximum(n_users, 1.0)
  nll = nll_sum / denom
  kl = kl_sum / denom
  loss, l2 = mode.objective(nll, kl, beta, part, lam, n_replicas)
  return loss * scale, (nll, kl, l2)


def _apply_gradients(state: TrainState, grads: Any, part: Any, phase: int,
                     ph: model_lib.Phase, options: StepOptions, mode: _OneDevice
                     ) -> TrainState:
  """The state after one Adam update of ``part`` (phase ``phase``'s parameter groups)
  with the reduced, unscaled ``grads``: loss-scale bookkeeping, the merge back into the
  full parameters, the phase's optimiser state and the weight average."""
  phase_opt = state.opt_state[phase]
  updates, new_opt = state.tx.update(grads, phase_opt, part)
  new_part = optax.apply_updates(part, updates)
  loss_scale = state.loss_scale
  # Without loss scaling a non-finite step is applied, so a NaN surfaces, not hides.
  if options.loss_scaling:
    finite = mode.all_finite(grads)
    new_part = precision.select_tree(finite, new_part, part)
    new_opt = precision.select_tree(finite, new_opt, phase_opt)
    loss_scale = precision.update_loss_scale(loss_scale, finite,
                                             period=options.loss_scale_period)
  params = _merge(state.params, new_part, ph)
  opt_state = tuple(new_opt if i == phase else o for i, o in enumerate(state.opt_state))
  ema_params = state.ema_params
  if options.weight_average:
    ema_params = update_weight_average(ema_params, params, state.step + 1,
                                       options.ema_decay)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       loss_scale=loss_scale, ema_params=ema_params)


def make_train_step(model: nn.Module, options: StepOptions | None = None, *,
                    phase: int = 0, axis_name: str | None = None
                    ) -> Callable[[TrainState, sparse_lib.SparseBatch],
                                  tuple[TrainState, dict[str, Array]]]:
  """Builds ``train_step(state, batch) -> (state, metrics)``, a pure function to jit.

  Args:
    model: any :class:`jax_vaecf.model.CFModel` (Mult-VAE, Mult-DAE, RecVAE).
    options: the :class:`StepOptions` the state was made with.
    phase: index into ``model.phases``: the step updates that phase's parameter groups
      with its optimiser state (``state.opt_state[phase]``), using ``state.tx``.
    axis_name: the ``pmap`` axis name when run under ``jax.pmap``, or the data axis
      of a ``shard_map`` (:mod:`jax_vaecf.training.parallel`), else ``None``.

  With ``model.item_shards`` set (a shard's clone, run inside ``shard_map`` over a mesh
  with the data axis ``axis_name`` and the item axis ``model.item_shards.axis``), each
  device computes its data shard's terms with its item columns; following
  ``shard_map``'s convention that each device's loss is one term of a global sum, the
  data term is divided by the number of item shards, the L2 penalty of replicated
  kernels by the number of devices and that of item-split kernels by the data axis
  size; gradients of replicated parameters are summed over both axes, those of
  item-split parameters over the data axis only.

  Returns:
    The step. ``metrics`` holds float32 scalars ``loss``, ``nll``, ``kl`` (the weighted
    KL term's mean), ``beta``, ``n_users``, ``loss_scale`` and int32 ``skipped_steps``.
  """
  options = options or StepOptions()
  phases = model.phases
  if not 0 <= phase < len(phases):
    raise ValueError(f"phase must be in [0, {len(phases)}), got {phase}")
  ph = phases[phase]
  mode = _device_mode(model, options, ph, axis_name)
  loss_fn = functools.partial(_scaled_loss, functools.partial(
      _shard_loss_sums, model, options, ph, _output_grads(model, ph)), ph, mode,
                              options.lam)

  def train_step(state: TrainState, batch: sparse_lib.SparseBatch):
    _check_state(state, options, len(phases))
    batch = _with_shard_axis(batch)
    n_users, n_replicas, device_offset = mode.placement(batch)
    beta = _kl_weight(model, ph, options, state.step)
    key = jax.random.fold_in(state.key, state.step)
    # Without loss scaling the scale is the constant 1, which XLA folds away: no pass
    # over the gradients multiplies or divides by the state's (always 1.0) scale.
    scale = state.loss_scale.scale if options.loss_scaling else 1.0
    part = trained_part(state.params, ph)
    grads, (nll, kl, l2) = jax.grad(loss_fn, has_aux=True)(
        part, state.params, state.frozen, batch, key, beta, n_users, scale, device_offset,
        n_replicas)
    grads, nll, kl, l2 = mode.reduce(grads, nll, kl, l2)
    grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
    new_state = _apply_gradients(state, grads, part, phase, ph, options, mode)
    return new_state, {
        "loss": nll + beta * kl + l2, "nll": nll, "kl": kl, "beta": beta,
        "n_users": n_users, "loss_scale": state.loss_scale.scale,
        "skipped_steps": new_state.loss_scale.skipped_steps}

  return train_step


def _chunked_metrics(model: nn.Module, output_chunk_size: int, chunk_metrics: Callable,
                     params: Any, batch: sparse_lib.EvalBatch) -> dict[str, Array]:
  """Per-user metrics of one shard of ``B`` users on the sparse input path, its logits
  formed ``output_chunk_size`` users at a time.

  The model runs to its output layer's input ``(B, width)``; for each chunk ``c`` of
  ``size`` users (the last padded) the float32 logits ``(size, n_items)`` go to
  ``chunk_metrics(logits, batch, c, size, row_mask)`` (:func:`_chunk_metrics` or
  :func:`_item_shard_chunk_metrics`), which returns ``(size,)`` arrays; the chunks'
  results are joined and cut back to ``(B,)``.
  """
  fi = batch.fold_in
  h = model.apply({"params": params}, fi, train=False, method="features").logits
  # A model whose output layer is no dense kernel (sparse EASE) forms its own logits.
  output_logits = getattr(model, "output_logits", None)
  if output_logits is None:
    layer = params[model.output_layer]
    kernel = layer["kernel"].astype(model.dtype)
    bias = layer["bias"].astype(jnp.float32)
    output_logits = lambda _, h_c: jnp.dot(h_c, kernel,
                                           preferred_element_type=jnp.float32) + bias
  b = h.shape[0]
  n_chunks, size = sparse_lib.equal_chunks(b, output_chunk_size)
  pad = n_chunks * size - b
  hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, size, h.shape[1])
  mask = jnp.pad(fi.row_mask, (0, pad)).reshape(n_chunks, size)

  def one_chunk(args):
    h_c, mask_c, c = args
    logits = output_logits(params, h_c)
    return chunk_metrics(logits, batch, c, size, mask_c)

  out = jax.lax.map(one_chunk, (hs, mask, jnp.arange(n_chunks)))
  return jax.tree_util.tree_map(
      lambda a: a.reshape((n_chunks * size,) + a.shape[2:])[:b], out)


def _chunk_metrics(logits: Array, batch: sparse_lib.EvalBatch, c: Array, size: int,
                   row_mask: Array, *, ks: tuple[int, ...]) -> dict[str, Array]:
  """Per-user metrics of the users ``c * size ...`` of ``batch`` from their float32
  logits ``(size, n_items)`` over the whole catalogue; ``row_mask`` ``(size,)``."""
  fi, ho = batch.fold_in, batch.heldout
  bad = metrics_lib.nonfinite_rows(logits)  # before the fold-in items become -inf
  logits = logits.at[sparse_lib.rows_of_chunk(fi.rows, c, size), fi.cols].min(
      jnp.where(fi.vals > 0, -jnp.inf, jnp.inf), mode="drop")
  heldout = jnp.zeros(logits.shape, jnp.bool_).at[
      sparse_lib.rows_of_chunk(ho.rows, c, size), ho.cols].max(ho.vals > 0, mode="drop")
  return metrics_lib.ranking_metrics(logits, heldout, None, ks, row_mask=row_mask,
                                     nonfinite=bad)


def _item_shard_chunk_metrics(logits: Array, batch: sparse_lib.EvalBatch, c: Array,
                              size: int, row_mask: Array, *, ks: tuple[int, ...],
                              items: item_shards_lib.ItemShards) -> dict[str, Array]:
  """:func:`_chunk_metrics` inside ``shard_map``, from logits ``(size, per_shard)``
  over this device's item shard; every device returns the same values.

  Padding columns (not :meth:`~jax_vaecf.core.item_shards.ItemShards.real_columns`) are
  neither checked for NaN nor ranked; the batch's global item indices become local
  columns, those of other shards dropped; held-out counts and NaN flags are summed over
  the item axis; each device ranks its own items and
  :func:`jax_vaecf.core.item_shards.merge_top_k` merges the candidates into the ranking.
  """
  fi, ho = batch.fold_in, batch.heldout
  real = items.real_columns()
  bad = jax.lax.psum(jnp.any(~jnp.isfinite(logits) & real, axis=1).astype(jnp.int32),
                     items.axis) > 0
  logits = jnp.where(real, logits, -jnp.inf)
  cols, inside = items.local(fi.cols)
  logits = logits.at[sparse_lib.rows_of_chunk(fi.rows, c, size), cols].min(
      jnp.where(inside & (fi.vals > 0), -jnp.inf, jnp.inf), mode="drop")
  cols, inside = items.local(ho.cols)
  heldout = jnp.zeros(logits.shape, jnp.bool_).at[
      sparse_lib.rows_of_chunk(ho.rows, c, size), cols].max(
          inside & (ho.vals > 0), mode="drop")
  n_heldout = jax.lax.psum(jnp.sum(heldout, axis=1, dtype=jnp.int32), items.axis)
  top, where = jax.lax.top_k(logits, min(ks[-1], items.per_shard))
  hits = jnp.take_along_axis(heldout, where, axis=1)
  _, ranked, hits = item_shards_lib.merge_top_k(top, where + items.offset(), hits,
                                                ks[-1], items.axis)
  return metrics_lib.metrics_from_hits(hits, n_heldout, ks, row_mask, bad, ranked)


def _dense_metrics(model: nn.Module, ks: tuple[int, ...], params: Any,
                   batch: sparse_lib.EvalBatch) -> dict[str, Array]:
  """Per-user metrics of one shard of ``B`` users from the whole ``(B, n_items)`` logits
  of the dense input path."""
  fi, ho = batch.fold_in, batch.heldout
  x = sparse_lib.densify(fi, model.n_items)
  logits = model.apply({"params": params}, x, train=False).logits
  bad = metrics_lib.nonfinite_rows(logits)  # before the fold-in items become -inf
  # Fold-in items are masked by a scatter into the logits and the held-out rows are
  # densified as bool, so a wide catalogue holds one float32 (B, n_items) array, not
  # three (padding entries write (0, 0) with its own value / False: no-ops).
  logits = logits.at[fi.rows, fi.cols].set(
      jnp.where(fi.vals > 0, -jnp.inf, logits[fi.rows, fi.cols]))
  heldout = jnp.zeros(logits.shape, jnp.bool_).at[ho.rows, ho.cols].max(ho.vals > 0)
  return metrics_lib.ranking_metrics(logits, heldout, None, ks, row_mask=fi.row_mask,
                                     nonfinite=bad)


def make_eval_step(model: nn.Module, ks: Sequence[int] = (20, 50, 100), *,
                   input_format: str = "sparse", output_chunk_size: int = 1024
                   ) -> Callable[[Any, sparse_lib.EvalBatch], dict[str, Array]]:
  # Takes the two step options it uses, not a StepOptions: evaluation has no state to
  # agree with, and serving code builds it without any training settings.
  """Builds ``eval_step(params, batch) -> per-user metrics``, a pure function to jit.

  The fold-in rows go through the model in evaluation mode (no dropout, posterior mean),
  fold-in items are removed from the ranking, and
  :func:`jax_vaecf.evaluation.metrics.ranking_metrics` scores the held-out items. Returns the dict
  of per-user ``(B,)`` arrays (``B`` summed over shards); padded rows are not ``valid``.
  Its bool ``nonfinite`` flags the real users whose logits (before the fold-in items
  are set to ``-inf``) hold a NaN or inf, i.e. a diverged model;
  :meth:`jax_vaecf.evaluation.metrics.MetricAccumulator.add` raises on them.

  On the sparse path the model stops before its output layer and the logits, masks and
  top-k are formed ``output_chunk_size`` users at a time, so memory holds a few
  ``(output_chunk_size, n_items)`` arrays whatever the evaluation batch size; the dense
  path forms the whole batch's (same metrics; see ``tests/test_train.py``).
  """
  _check_format(input_format)
  if output_chunk_size < 1:
    raise ValueError(f"output_chunk_size must be >= 1, got {output_chunk_size}")
  ks = tuple(sorted(set(int(k) for k in ks)))
  items = getattr(model, "item_shards", None)
  all_items = model.n_items if items is None else items.n_items
  if not ks or ks[0] < 1 or ks[-1] > all_items:
    raise ValueError(f"every k must be in [1, n_items={all_items}], got {ks}")
  if items is not None and input_format != "sparse":
    raise ValueError("item sharding needs input_format='sparse'")
  if input_format == "dense":
    shard_metrics = functools.partial(_dense_metrics, model, ks)
  else:
    chunk_metrics = (functools.partial(_chunk_metrics, ks=ks) if items is None else
                     functools.partial(_item_shard_chunk_metrics, ks=ks, items=items))
    shard_metrics = functools.partial(_chunked_metrics, model, output_chunk_size,
                                      chunk_metrics)

  def eval_step(params, batch: sparse_lib.EvalBatch):
    batch = _with_shard_axis(batch)
    if batch.fold_in.rows.shape[0] == 1:  # one shard: no vmap (see _batch_sums)
      return shard_metrics(params, jax.tree_util.tree_map(lambda a: a[0], batch))
    out = jax.vmap(shard_metrics, in_axes=(None, 0))(params, batch)
    return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), out)

  return eval_step
