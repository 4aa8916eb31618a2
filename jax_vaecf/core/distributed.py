"""Multi-process (multi-host) runs: start-up and each process's share of the data.

One process per node (or per group of local devices) runs the same program. Each calls
:func:`initialize` before any other jax call; after it, ``jax.devices()`` lists every
process's devices and :func:`jax_vaecf.training.parallel.make_parallel_steps` (``mode='sharded'``)
builds one mesh over all of them. Each process then reads or builds only its own shards
of every global batch (:func:`process_shards`) and passes them to ``put_batch``, which
assembles the global arrays with ``jax.make_array_from_process_local_data``.

Launch (see README.md, "Scaling out"):

* explicit: on every node ``--coordinator_address=HOST0:PORT --num_processes=N
  --process_id=i`` (``i = 0`` on the node at ``HOST0``);
* SLURM / Open MPI / other clusters jax knows: no flags; ``srun`` sets the environment
  and jax's cluster detection reads it (:func:`initialize` with no arguments and
  ``environ=os.environ``). jax's SLURM detection gives each task one device
  (``local_device_ids = [SLURM_LOCALID]``), so launch one task per GPU, or pass
  ``local_device_ids`` explicitly.

On CPU the cross-process collectives go through gloo (``cpu_collectives``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from jax_vaecf.core import sparse as sparse_lib

# Environment variables that mean a cluster launcher started this process with
# several tasks, so jax's own cluster detection has something to read.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands in the run: ``process_index`` of ``process_count``."""

  process_index: int
  process_count: int
  local_device_count: int
  device_count: int


def _cluster_size(environ: Mapping[str, str]) -> int:
  for name in _CLUSTER_ENV:
    value = environ.get(name, "")
    if value.isdigit():
      return int(value)
  return 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None, *,
               environ: Mapping[str, str] | None = None,
               cpu_collectives: str | None = "gloo",
               initialization_timeout: int = 300) -> ProcessInfo:
  """Joins this process to a multi-process run (``jax.distributed.initialize``).

  Call once, first thing, before any jax computation. Three cases:

  * ``num_processes == 1``, or all arguments ``None`` outside a multi-task cluster
    launch: a single-process run, nothing to initialise;
  * ``coordinator_address`` (``'host:port'``), ``num_processes`` and ``process_id``
    given: explicit start-up, the same address and count in every process;
  * all ``None`` inside SLURM (``SLURM_NTASKS > 1``), Open MPI or PMI: jax detects
    the coordinator, count and id from the launcher's environment.

  Args:
    coordinator_address: ``'host:port'`` of process 0 (it listens there).
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: devices this process uses (e.g. one process per GPU); ``None``
      for all visible ones.
    environ: the environment to read the cluster size from (the caller passes
      ``os.environ``); ``None`` reads nothing (no auto-detection).
    cpu_collectives: CPU cross-process collectives implementation (``'gloo'``), set
      before the backend starts; ``None`` leaves jax's setting.
    initialization_timeout: seconds to wait for every process to join.

  Returns:
    A :class:`ProcessInfo`.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
  if num_processes == 1 or (all(a is None for a in explicit) and (
      environ is None or _cluster_size(environ) <= 1)):
    return _info()
  if any(a is None for a in explicit) and not all(a is None for a in explicit):
    raise ValueError(
        "give all of coordinator_address, num_processes and process_id, or none of them "
        f"(cluster auto-detection); got {explicit}")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  return _info()


def _info() -> ProcessInfo:
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def shutdown() -> None:
  """Leaves the multi-process run (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def process_slice(n: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous block of ``n`` items (users, shards): sizes differ by <= 1."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return slice(start, start + base + (process_index < extra))


def process_shards(batch, process_index: int, process_count: int):
  """This process's shards of a global sharded batch (a :class:`SparseBatch` or
  :class:`EvalBatch` with a leading shard axis ``S``, ``S`` divisible by
  ``process_count``): shards ``p * S / P ... (p + 1) * S / P``, the block of the mesh
  that :func:`jax_vaecf.training.parallel.resolve_devices` gives process ``p``."""
  rows = batch.fold_in.rows if isinstance(batch, sparse_lib.EvalBatch) else batch.rows
  s = rows.shape[0]
  if rows.ndim != 2 or s % process_count:
    raise ValueError(f"need a leading shard axis divisible by {process_count} processes, "
                     f"got rows of shape {rows.shape}")
  sl = process_slice(s, process_index, process_count)
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[sl], batch)
