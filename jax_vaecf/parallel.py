"""Data parallelism over devices: one global batch split into shards, one per device.

Two modes run the same pure :func:`jax_vaecf.train.make_train_step`:

* ``'sharded'`` (default): ``jax.jit`` over a 1-D device mesh (axis ``'data'``). The
  batch's leading shard axis is split over the mesh (``P('data')``); parameters,
  optimiser state, step, key and loss scale are replicated (``P()``) and donated. XLA
  inserts the gradient all-reduce. Works across processes (multi-host): the mesh spans
  every process's devices and each process supplies only its own shards.
* ``'pmap'``: ``jax.pmap`` of the step built with ``axis_name='batch'``, state
  replicated along a leading device axis, gradients summed by the ``psum`` in
  ``train.py``. Single process only.

Both give the same updates as one device on the same global batch (the dropout masks
and noise are functions of the global row, :mod:`jax_vaecf.random`), up to the order of
floating-point sums.

Batch layout: a host :class:`SparseBatch` with a leading shard axis ``S`` (leaves
``(S, nnz)`` and ``(S, B / S)``, local row ids per shard, shard ``s`` holding global
rows ``s * B / S ...``). ``S`` must be a multiple of the number of devices this process
feeds; :func:`pad_and_shard` makes such a batch from an unsharded one, padding rows with
``row_mask = 0`` when ``B`` does not divide (also when ``B`` is smaller than the number
of devices: the extra devices then see only padding rows, which add nothing).

The CLI flags map 1:1: ``--parallel`` -> ``mode``, ``--number_of_devices`` ->
:func:`resolve_devices`, ``--precision`` -> the model dtype and the options'
``loss_scaling`` (:mod:`jax_vaecf.precision`). The steps are built by
:mod:`jax_vaecf.train` from one :class:`jax_vaecf.train.StepOptions`; this module only
places them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_vaecf import sparse as sparse_lib
from jax_vaecf import train as train_lib

MODES = ("sharded", "pmap")
MESH_AXIS = "data"
PMAP_AXIS = "batch"


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
    num_shards: devices in the run, over all processes.
    num_local_shards: devices this process feeds; the leading axis of the host batches
      passed to :meth:`put_batch` must be a multiple of it.
    mesh: the 1-D mesh (``'sharded'``) or ``None``.
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
      that :meth:`jax_vaecf.metrics.MetricAccumulator.add` refuses
      (:func:`jax_vaecf.train.make_eval_step`).
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
    if self.mode == "pmap":
      host = jax.tree_util.tree_map(
          lambda a: np.broadcast_to(a, (self.num_shards,) + a.shape), host)
      return jax.device_put(host, self._batch_sharding)
    # make_array_from_callback works when the mesh spans other processes' devices too,
    # where device_put of host values would need every device to be addressable.
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(a.shape, self._replicated,
                                               lambda idx, a=a: a[idx]), host)

  def put_batch(self, host_batch):
    """Host -> device transfer of this process's shards, split over the devices.

    Args:
      host_batch: a :class:`SparseBatch` or :class:`EvalBatch` of numpy arrays with a
        leading shard axis that is a multiple of ``num_local_shards`` (the shards of
        this process, see :func:`jax_vaecf.distributed.process_shards`).

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

    Works in every process (replicated leaves are read from a local device).
    """
    if self.mode == "pmap":
      return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0))[0], tree)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)

  def metrics_to_host(self, metrics):
    """Host numpy metrics: scalars for train metrics, ``(B,)`` per-user eval metrics."""
    if self.mode == "pmap":
      def host(a):
        a = np.asarray(a)
        return a[0] if a.ndim == 1 else a.reshape((-1,) + a.shape[2:])
      return jax.tree_util.tree_map(host, metrics)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), metrics)


def make_parallel_steps(model: nn.Module, options: train_lib.StepOptions | None = None, *,
                        mode: str = "sharded",
                        devices: Sequence[jax.Device] | None = None,
                        ks: Sequence[int] = (20, 50, 100)) -> ParallelSteps:
  """Places the model's train steps (one per phase) and its eval step on devices.

  Args:
    model: any :class:`jax_vaecf.model.CFModel`.
    options: the :class:`jax_vaecf.train.StepOptions` of the run (the steps are built
      from it, unchanged).
    mode: ``'sharded'`` or ``'pmap'``.
    devices: from :func:`resolve_devices`; ``None`` = all devices.
    ks: cut-offs of the eval metrics.

  Returns:
    A :class:`ParallelSteps`.
  """
  options = options or train_lib.StepOptions()
  if mode not in MODES:
    raise ValueError(f"unknown parallel mode {mode!r}: expected one of {MODES}")
  devices = tuple(resolve_devices(0) if devices is None else devices)
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

  axis_name = PMAP_AXIS if mode == "pmap" else None
  steps = [train_lib.make_train_step(model, options, phase=i, axis_name=axis_name)
           for i in range(len(model.phases))]
  eval_fn = train_lib.make_eval_step(model, ks, input_format=options.input_format,
                                     output_chunk_size=options.output_chunk_size)
  evaluate = lambda params, b: eval_fn(_params_of(params), b)
  refresh = functools.partial(train_lib.refresh_frozen, model)

  if mode == "pmap":
    # A mesh of the same devices names the layout of arrays with a leading device
    # axis, so device_put places shard i on devices[i], as pmap expects.
    pmesh = Mesh(np.array(devices), (PMAP_AXIS,))
    place = lambda fn, **kw: jax.pmap(fn, axis_name=PMAP_AXIS, devices=list(devices), **kw)
    return ParallelSteps(mode, devices, len(devices), len(local), None, model.phases,
                         tuple(place(s, donate_argnums=0) for s in steps),
                         place(refresh, donate_argnums=0), place(evaluate), None,
                         NamedSharding(pmesh, P(PMAP_AXIS)))

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
  return ParallelSteps(mode, devices, len(devices), len(local), mesh, model.phases,
                       j_train, j_refresh, j_eval, replicated, sharded)
