"""Data parallelism over devices: one global batch split into shards, one per device.

Two modes run the same pure :func:`jax_vaecf.training.steps.make_train_step`:

* ``'sharded'`` (default): ``jax.jit`` over a 1-D device mesh (axis ``'data'``). The
  batch's leading shard axis is split over the mesh (``P('data')``); parameters,
  optimiser state, step, key and loss scale are replicated (``P()``) and donated. XLA
  inserts the gradient all-reduce. Works across processes (multi-host): the mesh spans
  every process's devices and each process supplies only its own shards.
* ``'pmap'``: ``jax.pmap`` of the step built with ``axis_name='batch'``, state
  replicated along a leading device axis, gradients summed by the ``psum`` in
  ``train.py``. Single process only.

Both give the same updates as one device on the same global batch (the dropout masks
and noise are functions of the global row, :mod:`jax_vaecf.core.random`), up to the order of
floating-point sums.

Batch layout: a host :class:`SparseBatch` with a leading shard axis ``S`` (leaves
``(S, nnz)`` and ``(S, B / S)``, local row ids per shard, shard ``s`` holding global
rows ``s * B / S ...``). ``S`` must be a multiple of the number of devices this process
feeds; :func:`pad_and_shard` makes such a batch from an unsharded one, padding rows with
``row_mask = 0`` when ``B`` does not divide (also when ``B`` is smaller than the number
of devices: the extra devices then see only padding rows, which add nothing).

Item sharding (model parallelism): with ``model_shards = M > 1`` the devices form a 2-D
mesh ``(data, model)`` of ``N / M`` by ``M`` devices (``--mesh=DxM``). The item-indexed
arrays of the state (first-layer kernel rows, output kernel columns and bias, their Adam
moments, weight average and frozen copies; found by
:func:`jax_vaecf.core.item_shards.item_axes`) are split over ``model``, zero-padded to a
multiple of ``M`` items; everything else is replicated. The steps run under
``shard_map``: each device takes its data row's batch shard with its item columns, and
the model's layers combine shards with collectives (:mod:`jax_vaecf.core.item_shards`), so
no device holds a full ``(B, n_items)`` row or a full item-indexed array. The batch is
split over ``data`` as above (``S`` a multiple of ``N / M``) and replicated over
``model``. :meth:`ParallelSteps.to_host` returns unpadded global arrays, so a checkpoint
restores on any mesh shape.

The CLI flags map 1:1: ``--mesh`` -> ``model_shards`` (and the device count),
``--parallel`` -> ``mode``, ``--number_of_devices`` ->
:func:`resolve_devices`, ``--precision`` -> the model dtype and the options'
``loss_scaling`` (:mod:`jax_vaecf.core.precision`). The steps are built by
:mod:`jax_vaecf.training.steps` from one :class:`jax_vaecf.training.steps.StepOptions`; this module only
places them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_vaecf.core import item_shards as item_shards_lib
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

MODES = ("sharded", "pmap")
MESH_AXIS = "data"
ITEM_AXIS = "model"
PMAP_AXIS = "batch"


def parse_mesh(text: str) -> tuple[int, int]:
  """``'DxM'`` -> ``(D, M)``: the mesh's data and model axis sizes (``--mesh``)."""
  parts = text.lower().split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"a mesh is DATAxMODEL, e.g. 2x4, got {text!r}")
  d, m = (int(p) for p in parts)
  if d < 1 or m < 1:
    raise ValueError(f"mesh axes must be >= 1, got {text!r}")
  return d, m


def resolve_devices(number_of_devices: int = 0, *, backend: str | None = None
                    ) -> list[jax.Device]:
  """The devices a run uses: the first ``number_of_devices`` of each process.

  Args:
    number_of_devices: devices per process; ``0`` means all of this process's local
      devices. In a multi-process run every process must pass the same number.
    backend: ``'gpu'``, ``'cpu'``, ... or ``None`` for jax's default backend.

  Returns:
    The global list (all processes' chosen devices), ordered by process then by local
    position, so process ``p`` owns a contiguous block of the mesh.

  Raises:
    ValueError: a negative number or more devices than a process has.
  """
  if number_of_devices < 0:
    raise ValueError(f"number_of_devices must be >= 0 (0 = all), got {number_of_devices}")
  local = jax.local_devices(backend=backend)
  if number_of_devices > len(local):
    raise ValueError(
        f"asked for {number_of_devices} devices but this process has {len(local)} "
        f"({local[0].platform}): {[str(d) for d in local]}")
  n = number_of_devices or len(local)
  by_process: dict[int, list[jax.Device]] = {}
  for d in jax.devices(backend=backend):
    by_process.setdefault(d.process_index, []).append(d)
  out = []
  for p in sorted(by_process):
    devs = sorted(by_process[p], key=lambda d: d.id)
    if len(devs) < n:
      raise ValueError(f"process {p} has {len(devs)} devices, fewer than {n}")
    out.extend(devs[:n])
  return out


def pad_and_shard(batch: sparse_lib.SparseBatch, num_shards: int, *,
                  nnz_per_shard: int | None = None, nnz_multiple: int = 64
                  ) -> sparse_lib.SparseBatch:
  """Splits an unsharded host batch into ``num_shards`` shards with local row ids.

  Args:
    batch: numpy leaves ``rows, cols, vals (nnz,)`` and ``row_mask (B,)``.
    num_shards: ``S``, e.g. the number of devices.
    nnz_per_shard: entries per shard; by default the largest shard's count rounded up
      to a multiple of ``nnz_multiple`` (so jit sees few shapes).
    nnz_multiple: rounding of the default ``nnz_per_shard``.

  Returns:
    A batch with leaves ``(S, nnz_per_shard)`` and ``(S, ceil(B / S))`` (int32, int32,
    float32, float32). Rows ``B ...`` added to make ``B`` divisible have ``row_mask 0``
    and no entries; padding entries have value 0 at local ``(0, 0)``.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  rows, cols, vals, mask = (np.asarray(a) for a in batch)
  if rows.ndim != 1 or mask.ndim != 1:
    raise ValueError(f"pad_and_shard takes an unsharded batch, got rows {rows.shape}, "
                     f"row_mask {mask.shape}")
  b = mask.shape[0]
  if b == 0:
    raise ValueError("pad_and_shard: the batch has no rows")
  per = -(-b // num_shards)
  real = vals != 0  # padding entries carry value 0 and add nothing
  rows, cols, vals = rows[real], cols[real], vals[real]
  shard_of = rows // per
  counts = np.bincount(shard_of, minlength=num_shards)
  need = int(counts.max()) if counts.size else 0
  if nnz_per_shard is None:
    nnz_per_shard = max(nnz_multiple, -(-need // nnz_multiple) * nnz_multiple)
  elif nnz_per_shard < need:
    raise ValueError(f"nnz_per_shard={nnz_per_shard} < {need}, the largest shard's count")
  out_rows = np.zeros((num_shards, nnz_per_shard), np.int32)
  out_cols = np.zeros((num_shards, nnz_per_shard), np.int32)
  out_vals = np.zeros((num_shards, nnz_per_shard), np.float32)
  out_mask = np.zeros((num_shards * per,), np.float32)
  out_mask[:b] = mask
  for s in range(num_shards):
    sel = shard_of == s
    k = int(sel.sum())
    out_rows[s, :k] = rows[sel] - s * per
    out_cols[s, :k] = cols[sel]
    out_vals[s, :k] = vals[sel]
  return sparse_lib.SparseBatch(out_rows, out_cols, out_vals,
                                out_mask.reshape(num_shards, per))


def _num_shards_of(batch) -> int:
  rows = batch.fold_in.rows if isinstance(batch, sparse_lib.EvalBatch) else batch.rows
  if rows.ndim != 2:
    raise ValueError(
        f"a parallel step needs a batch with a leading shard axis (S, nnz), got rows of "
        f"shape {rows.shape}; see pad_and_shard")
  return rows.shape[0]


def _params_of(params_or_state):
  """Evaluation parameters: a state's ``eval_params`` (its weight average when kept)."""
  return (params_or_state.eval_params
          if isinstance(params_or_state, train_lib.TrainState) else params_or_state)


@dataclasses.dataclass(frozen=True)
class ParallelSteps:
  """Train and eval steps bound to a set of devices (build with :func:`make_parallel_steps`).

  Attributes:
    mode: ``'sharded'`` or ``'pmap'``.
    devices: the global device list (all processes).
    num_shards: batch shards of the run (the devices, over all processes, divided by
      ``model_shards``).
    num_local_shards: batch shards this process feeds; the leading axis of the host
      batches passed to :meth:`put_batch` must be a multiple of it.
    mesh: the 1-D mesh (``'sharded'``), the ``(data, model)`` mesh (item sharding) or
      ``None``.
    phases: the model's training phases (``model.phases``).
    train_steps: one ``(state, batch) -> (state, metrics)`` per phase; ``state`` as made
      by :meth:`init_state` (donated), ``batch`` from :meth:`put_batch`. Metrics are
      float32 / int32 scalars (sharded) or ``(num_shards,)`` copies (pmap; see
      :meth:`metrics_to_host`).
    refresh_frozen: ``state -> state`` with the model's frozen variables set from its
      parameters (run before a phase with ``refresh_frozen``).
    eval_step: ``(params_or_state, eval_batch) -> per-user metrics``, each ``(B,)``
      over the whole global batch (pmap: ``(num_shards, B / num_shards)``; use
      :meth:`metrics_to_host`), with the bool ``nonfinite`` flags of a diverged model
      that :meth:`jax_vaecf.evaluation.metrics.MetricAccumulator.add` refuses
      (:func:`jax_vaecf.training.steps.make_eval_step`).
  """

  mode: str
  devices: tuple
  num_shards: int
  num_local_shards: int
  mesh: Mesh | None
  phases: tuple
  train_steps: tuple
  refresh_frozen: Callable
  eval_step: Callable
  _replicated: Any
  _batch_sharding: Any
  item_shards: item_shards_lib.ItemShards | None = None
  _state_axes: Callable | None = None  # tx -> item axes of a host state (item sharding)
  _create: Callable | None = None  # (tx, key) -> a fresh placed state

  def create_state(self, optimizer, key) -> train_lib.TrainState:
    """A fresh state made on the devices, as :func:`jax_vaecf.training.steps.create_train_state`
    of the model and options the steps were built from would make it, then
    :meth:`init_state`: the same values. Under item sharding every device computes only
    its share (one jit with the state's shardings as outputs), so no device ever holds a
    whole item-indexed array."""
    return self._create(optimizer, key)

  @property
  def model_shards(self) -> int:
    """Devices the items are split over (1: every device holds the whole model)."""
    return 1 if self.item_shards is None else self.item_shards.count

  @property
  def train_step(self) -> Callable:
    """The train step of a model with one phase (Mult-VAE, Mult-DAE)."""
    if len(self.train_steps) != 1:
      raise ValueError(f"the model trains in {len(self.train_steps)} phases "
                       f"({[p.name for p in self.phases]}): use train_steps[i]")
    return self.train_steps[0]

  def init_state(self, state: train_lib.TrainState) -> train_lib.TrainState:
    """Places a single-device or host state (e.g. freshly made or restored) on the devices.

    ``state`` is copied, not donated (it stays usable); it must not have been donated
    to an earlier step. Every process must pass the same values. ``'sharded'``: every
    leaf replicated (``P()``). ``'pmap'``: every leaf gets a leading axis of
    ``num_shards`` copies.
    """
    host = jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), state)
    if self.item_shards is not None:
      axes = self._state_axes(state.tx)
      host = item_shards_lib.pad(host, axes, self.item_shards)
      return item_shards_lib.map_with_axes(
          lambda a, ax: jax.make_array_from_callback(
              a.shape, NamedSharding(self.mesh, _item_spec(ax)),
              lambda idx, a=a: a[idx]), host, axes)
    if self.mode == "pmap":
      host = jax.tree_util.tree_map(
          lambda a: np.broadcast_to(a, (self.num_shards,) + a.shape), host)
      return jax.device_put(host, self._batch_sharding)
    # make_array_from_callback works when the mesh spans other processes' devices too,
    # where device_put of host values would need every device to be addressable.
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(a.shape, self._replicated,
                                               lambda idx, a=a: a[idx]), host)

  def replicate(self, tree):
    """A pytree of arrays (on any one device, or on the host) copied to every device as
    the eval step takes parameters: replicated (``'sharded'``) or one copy per device
    with a leading device axis (``'pmap'``). Not for item-sharded steps (use
    :meth:`init_state`)."""
    if self.item_shards is not None:
      raise ValueError("replicate: item-sharded steps take states made by init_state")
    if self.mode == "pmap":
      return jax.device_put(jax.tree_util.tree_map(
          lambda a: jnp.broadcast_to(a, (self.num_shards,) + a.shape), tree),
          self._batch_sharding)
    return jax.device_put(tree, self._replicated)

  def put_batch(self, host_batch):
    """Host -> device transfer of this process's shards, split over the devices.

    Args:
      host_batch: a :class:`SparseBatch` or :class:`EvalBatch` of numpy arrays with a
        leading shard axis that is a multiple of ``num_local_shards`` (the shards of
        this process, see :func:`jax_vaecf.core.distributed.process_shards`).

    Returns:
      The same pytree of global device arrays (leading axis ``S * process_count``).
    """
    s = _num_shards_of(host_batch)
    if s % self.num_local_shards:
      raise ValueError(
          f"the batch has {s} shards, not a multiple of the {self.num_local_shards} "
          f"devices of this process; pad it (pad_and_shard)")
    if self.mode == "pmap":
      k = s // self.num_local_shards
      host_batch = jax.tree_util.tree_map(
          lambda a: np.asarray(a).reshape((self.num_local_shards, k) + a.shape[1:]),
          host_batch)
      return jax.device_put(host_batch, self._batch_sharding)
    n_proc = self.num_shards // self.num_local_shards

    def put(a):
      a = np.asarray(a)
      return jax.make_array_from_process_local_data(
          self._batch_sharding, a, (a.shape[0] * n_proc,) + a.shape[1:])

    return jax.tree_util.tree_map(put, host_batch)

  def to_host(self, tree):
    """A host numpy copy of a placed state (or params): one copy, no device axis.

    Works in every process (replicated leaves are read from a local device). Under item
    sharding the split arrays are gathered and cut back to the real items.
    """
    if self.item_shards is not None:
      return jax.tree_util.tree_map(self._gather_items, tree)
    if self.mode == "pmap":
      return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0))[0], tree)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)

  def _gather_items(self, a):
    spec = tuple(a.sharding.spec) if isinstance(a.sharding, NamedSharding) else ()
    if ITEM_AXIS not in spec:
      return np.asarray(a.addressable_data(0))
    if a.is_fully_addressable:
      host = np.asarray(a)
    else:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      host = np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return item_shards_lib.unpad(host, spec.index(ITEM_AXIS), self.item_shards.n_items)

  def device_bytes(self, tree) -> int:
    """Bytes of a placed pytree (e.g. a state from :meth:`init_state`) held by the
    first device of the run: its share of the item-split arrays plus every replicated
    one (pmap: one device's copy)."""
    first = self.devices[0]
    total = 0
    for a in jax.tree_util.tree_leaves(tree):
      total += sum(s.data.nbytes for s in a.addressable_shards if s.device == first)
    return total

  def metrics_to_host(self, metrics):
    """Host numpy metrics: scalars for train metrics, ``(B,)`` per-user eval metrics."""
    if self.mode == "pmap":
      def host(a):
        a = np.asarray(a)
        return a[0] if a.ndim == 1 else a.reshape((-1,) + a.shape[2:])
      return jax.tree_util.tree_map(host, metrics)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), metrics)


def _item_spec(axis: int | None) -> P:
  return P() if axis is None else P(*([None] * axis), ITEM_AXIS)


def make_parallel_steps(model: nn.Module, options: train_lib.StepOptions | None = None, *,
                        mode: str = "sharded",
                        devices: Sequence[jax.Device] | None = None,
                        ks: Sequence[int] = (20, 50, 100),
                        model_shards: int = 1) -> ParallelSteps:
  """Places the model's train steps (one per phase) and its eval step on devices.

  Args:
    model: any :class:`jax_vaecf.model.CFModel`.
    options: the :class:`jax_vaecf.training.steps.StepOptions` of the run (the steps are built
      from it, unchanged).
    mode: ``'sharded'`` or ``'pmap'``.
    devices: from :func:`resolve_devices`; ``None`` = all devices.
    ks: cut-offs of the eval metrics.
    model_shards: ``M``, devices the items are split over (the mesh's ``model`` axis;
      ``1``: data parallelism only). ``M > 1`` needs ``mode='sharded'``, the sparse
      input format, and a multiple of ``M`` devices in every process.

  Returns:
    A :class:`ParallelSteps`.
  """
  options = options or train_lib.StepOptions()
  if mode not in MODES:
    raise ValueError(f"unknown parallel mode {mode!r}: expected one of {MODES}")
  devices = tuple(resolve_devices(0) if devices is None else devices)
  local = _local_devices(devices, mode)
  if model_shards < 1:
    raise ValueError(f"model_shards must be >= 1, got {model_shards}")
  if model_shards > 1:
    if mode != "sharded":
      raise ValueError(f"item sharding (model_shards={model_shards}) runs in mode "
                       f"'sharded', not {mode!r}")
    return _item_sharded_steps(model, options, devices, local, ks, model_shards)

  axis_name = PMAP_AXIS if mode == "pmap" else None
  steps = [train_lib.make_train_step(model, options, phase=i, axis_name=axis_name)
           for i in range(len(model.phases))]
  eval_fn = train_lib.make_eval_step(model, ks, input_format=options.input_format,
                                     output_chunk_size=options.output_chunk_size)
  evaluate = lambda params, b: eval_fn(_params_of(params), b)
  refresh = functools.partial(train_lib.refresh_frozen, model)
  place = _pmap_steps if mode == "pmap" else _data_sharded_steps
  ps = place(devices, len(local), model.phases, steps, refresh, evaluate)
  return dataclasses.replace(ps, _create=lambda tx, key: ps.init_state(
      train_lib.create_train_state(model, tx, key, options)))


def _local_devices(devices: Sequence[jax.Device], mode: str) -> list[jax.Device]:
  """This process's share of ``devices``, after checking that every process gives the
  same number and that ``pmap`` stays in one process."""
  if not devices:
    raise ValueError("no devices given")
  me = jax.process_index()
  local = [d for d in devices if d.process_index == me]
  if not local:
    raise ValueError(f"none of the devices belongs to this process ({me})")
  n_processes = len({d.process_index for d in devices})
  if len(devices) != len(local) * n_processes:
    raise ValueError("every process must contribute the same number of devices")
  if mode == "pmap" and n_processes > 1:
    raise ValueError("mode='pmap' is single-process here; use mode='sharded' to span "
                     "processes (multi-host)")
  return local


def _pmap_steps(devices, n_local, phases, steps, refresh, evaluate) -> ParallelSteps:
  """The steps under ``jax.pmap`` over ``devices`` (one process)."""
  # A mesh of the same devices names the layout of arrays with a leading device
  # axis, so device_put places shard i on devices[i], as pmap expects.
  pmesh = Mesh(np.array(devices), (PMAP_AXIS,))
  place = lambda fn, **kw: jax.pmap(fn, axis_name=PMAP_AXIS, devices=list(devices), **kw)
  return ParallelSteps("pmap", devices, len(devices), n_local, None, phases,
                       tuple(place(s, donate_argnums=0) for s in steps),
                       place(refresh, donate_argnums=0), place(evaluate), None,
                       NamedSharding(pmesh, P(PMAP_AXIS)))


def _data_sharded_steps(devices, n_local, phases, steps, refresh, evaluate
                        ) -> ParallelSteps:
  """The steps jit-compiled over a one-axis mesh: the batch split, the state replicated."""
  kw = {}
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    # Auto: the compiler propagates shardings through the vmapped step (the step has
    # no sharding annotations of its own, which Explicit axes would ask for).
    kw["axis_types"] = (axis_type.Auto,)
  mesh = Mesh(np.array(devices), (MESH_AXIS,), **kw)
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(MESH_AXIS))
  j_train = tuple(jax.jit(s, in_shardings=(replicated, sharded),
                          out_shardings=(replicated, replicated), donate_argnums=0)
                  for s in steps)
  j_refresh = jax.jit(refresh, in_shardings=replicated, out_shardings=replicated,
                      donate_argnums=0)
  # Per-user eval metrics come back replicated (a small all-gather of (B,) vectors), so
  # every process can read all users' values.
  j_eval = jax.jit(evaluate, in_shardings=(replicated, sharded), out_shardings=replicated)
  return ParallelSteps("sharded", devices, len(devices), n_local, mesh, phases,
                       j_train, j_refresh, j_eval, replicated, sharded)


def _item_mesh(grid: np.ndarray) -> Mesh:
  """The ``(data, model)`` mesh over a ``(D, M)`` grid of devices."""
  kw = {}
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    kw["axis_types"] = (axis_type.Auto, axis_type.Auto)
  return Mesh(grid, (MESH_AXIS, ITEM_AXIS), **kw)


def _placed_on(mesh: Mesh, body: Callable, out_specs_of: Callable, donate: bool,
               out_shardings=None) -> Callable:
  """``jit(shard_map(body))`` over ``mesh``, built once per layout of the first argument
  (a state or parameters placed on the mesh; the other arguments split over data)."""
  cache = {}

  def call(tree, *rest):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not all(isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding)
               and a.sharding.mesh == mesh for a in leaves):
      raise ValueError("an item-sharded step takes a state (or parameters) placed on "
                       "its mesh: make it with ParallelSteps.init_state or create_state")
    key_ = (treedef, tuple(a.sharding.spec for a in leaves))
    if key_ not in cache:
      # A placed tree carries its layout: each array's sharding names its item axis.
      specs = jax.tree_util.tree_map(lambda a: a.sharding.spec, tree)
      in_specs = (specs,) + tuple(P(MESH_AXIS) for _ in rest)
      fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs_of(specs), check_vma=False)
      cache[key_] = jax.jit(fn, donate_argnums=(0,) if donate else (),
                            out_shardings=out_shardings)
    return cache[key_](tree, *rest)

  return call


def _item_sharded_steps(model, options, devices, local, ks, model_shards) -> ParallelSteps:
  """The steps on a ``(data, model)`` mesh under ``shard_map`` (see the module docstring)."""
  if len(local) % model_shards:
    raise ValueError(
        f"the model axis ({model_shards}) must divide each process's {len(local)} "
        f"devices, so a process feeds whole rows of the mesh")
  if options.input_format != "sparse":
    raise ValueError("item sharding needs input_format='sparse'")
  shards = item_shards_lib.ItemShards(ITEM_AXIS, model_shards, model.n_items)
  local_model = model.clone(n_items=shards.per_shard, item_shards=shards)
  grid = np.array(devices).reshape(len(devices) // model_shards, model_shards)
  mesh = _item_mesh(grid)
  placed = functools.partial(_placed_on, mesh)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(MESH_AXIS))
  key = np.zeros((2,), np.uint32)

  @functools.lru_cache(maxsize=8)
  def state_axes(tx):
    return item_shards_lib.item_axes(
        lambda n: train_lib.create_train_state(model.clone(n_items=n), tx, key, options),
        model.n_items)

  train_steps = tuple(
      placed(train_lib.make_train_step(local_model, options, phase=i,
                                       axis_name=MESH_AXIS),
             lambda specs: (specs, P()), donate=True)
      for i in range(len(model.phases)))
  refresh = placed(functools.partial(train_lib.refresh_frozen, local_model),
                   lambda specs: specs, donate=True)
  eval_fn = train_lib.make_eval_step(local_model, ks, input_format=options.input_format,
                                     output_chunk_size=options.output_chunk_size)
  # Per-user metrics come back replicated, as in the data-parallel mode.
  evaluate = placed(lambda params, b: eval_fn(_params_of(params), b),
                    lambda specs: P(MESH_AXIS), donate=False, out_shardings=replicated)

  def create(tx, key):
    axes = state_axes(tx)

    def padded_state(key):
      state = train_lib.create_train_state(model, tx, key, options)
      return item_shards_lib.map_with_axes(
          lambda a, ax: a if ax is None else jnp.pad(
              a, [(0, shards.padded - shards.n_items) if i == ax else (0, 0)
                  for i in range(a.ndim)]), state, axes)

    shardings = item_shards_lib.map_with_axes(
        lambda a, ax: NamedSharding(mesh, _item_spec(ax)),
        jax.eval_shape(padded_state, key), axes)
    return jax.jit(padded_state, out_shardings=shardings)(key)

  return ParallelSteps("sharded", tuple(devices), grid.shape[0],
                       len(local) // model_shards, mesh, model.phases, train_steps,
                       refresh, evaluate, replicated, batch_sharding, shards, state_axes,
                       create)
