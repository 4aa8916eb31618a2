"""Host-side batching of CSR rows into padded :class:`~jax_vaecf.sparse.SparseBatch`es.

Shapes are kept to a handful so jit compiles a few programs:

* rows: always ``batch_size`` (a last partial batch is padded with ``row_mask = 0``
  rows, never dropped);
* nnz: rounded up to one of at most 8 bucket sizes. The buckets are a geometric ladder
  with ratio 1.25 anchored at the expected nnz of a full batch (``batch_size`` times
  the mean row length): ``mean * 1.25**k`` for ``k = -3..3`` (rounded up to a multiple
  of 128), plus the largest nnz any batch can have (the sum of the ``batch_size``
  longest rows). Shuffled full batches concentrate near the mean, so padding wastes at
  most 25% for them; a rare huge batch falls in the top bucket and the small last batch
  in the bottom one.

With ``num_shards=k`` (data parallelism) every array gains a leading axis of size k:
shard j holds users ``j*R .. (j+1)*R - 1`` of the batch with row ids local to the
shard, and all shards share one nnz bucket (ladder built for ``R`` rows), where
``R = ceil(B / k)``. When ``k`` does not divide ``B`` the batch still holds ``B`` users
and is padded to ``k * R`` rows with ``row_mask = 0``, so every device gets one shape
and the users of each step do not depend on the number of devices.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
import scipy.sparse as sp

from jax_vaecf.sparse import EvalBatch, SparseBatch

_RATIO = 1.25
_ALIGN = 128


def _round_up(x: float) -> int:
  return max(_ALIGN, int(-(-int(np.ceil(x)) // _ALIGN) * _ALIGN))


def bucket_ladder(row_nnz: np.ndarray, rows_per_batch: int) -> tuple[int, ...]:
  """The bucket ladder (see the module docstring) for rows of the given lengths."""
  row_nnz = np.asarray(row_nnz)
  top = int(np.sort(row_nnz)[::-1][:rows_per_batch].sum()) if row_nnz.size else 0
  mean = float(row_nnz.mean()) * rows_per_batch if row_nnz.size else 0.0
  sizes = {_round_up(mean * _RATIO**k) for k in range(-3, 4)}
  sizes = {s for s in sizes if s < top} | {_round_up(top)}
  return tuple(sorted(sizes))


def _bucket(n: int, buckets: Sequence[int]) -> int:
  i = int(np.searchsorted(buckets, n))
  if i == len(buckets):
    raise ValueError(f"batch nnz {n} exceeds the largest bucket {buckets[-1]}")
  return int(buckets[i])


def _gather(m: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                          np.ndarray]:
  """(local row, col, val) of the CSR rows ``users`` (in that order), vectorised."""
  starts = m.indptr[users].astype(np.int64)
  counts = m.indptr[users + 1].astype(np.int64) - starts
  total = int(counts.sum())
  offsets = np.cumsum(counts) - counts
  src = np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, counts)
  rows = np.repeat(np.arange(users.size, dtype=np.int32), counts)
  return rows, m.indices[src].astype(np.int32, copy=False), m.data[src].astype(
      np.float32, copy=False)


def _check_shards(batch_size: int, num_shards: int | None) -> int:
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  k = 1 if num_shards is None else int(num_shards)
  if k < 1:
    raise ValueError(f"num_shards must be positive, got {num_shards}")
  return k


def padded_rows(batch_size: int, num_shards: int | None) -> int:
  """Rows of a batch of ``batch_size`` users split into ``num_shards`` equal shards."""
  k = _check_shards(batch_size, num_shards)
  return -(-batch_size // k) * k


def make_batch(m: sp.csr_matrix, users: np.ndarray, batch_size: int,
               buckets: Sequence[int], num_shards: int | None = None) -> SparseBatch:
  """The padded batch of CSR rows ``users`` (at most ``batch_size`` of them).

  ``batch_size`` must be divisible by ``num_shards`` (see :func:`padded_rows`).
  """
  k = _check_shards(batch_size, num_shards)
  if batch_size % k:
    raise ValueError(f"batch_size {batch_size} is not divisible by num_shards {k}; "
                     "pad it with padded_rows")
  per = batch_size // k
  users = np.asarray(users, np.int64)
  mask = np.zeros(batch_size, np.float32)
  mask[:users.size] = 1.0
  # Padding users are absent: shards past the real users simply get fewer rows.
  parts = [users[j * per:(j + 1) * per] for j in range(k)]
  gathered = [_gather(m, p) for p in parts]
  nnz = _bucket(max(g[0].size for g in gathered), buckets)
  rows = np.zeros((k, nnz), np.int32)
  cols = np.zeros((k, nnz), np.int32)
  vals = np.zeros((k, nnz), np.float32)
  for j, (r, c, v) in enumerate(gathered):
    rows[j, :r.size], cols[j, :r.size], vals[j, :r.size] = r, c, v
  if num_shards is None:
    return SparseBatch(rows[0], cols[0], vals[0], mask)
  return SparseBatch(rows, cols, vals, mask.reshape(k, per))


class TrainBatcher:
  """Shuffled training batches, reproducible from (seed, epoch, step).

  Args:
    matrix: CSR (n_users, n_items) training rows.
    batch_size: users per batch (B).
    seed: the epoch order is ``np.random.default_rng([seed, epoch]).permutation``.
    num_shards: split every batch into this many shards (see the module docstring).
    nnz_buckets: explicit bucket sizes, or None for the default ladder.
  """

  def __init__(self, matrix: sp.csr_matrix, batch_size: int, seed: int,
               num_shards: int | None = None, nnz_buckets: Sequence[int] | None = None):
    k = _check_shards(batch_size, num_shards)
    self.matrix = sp.csr_matrix(matrix)
    self.batch_size = int(batch_size)
    self.rows_per_batch = padded_rows(batch_size, num_shards)
    self.seed = int(seed)
    self.num_shards = num_shards
    row_nnz = np.diff(self.matrix.indptr)
    if nnz_buckets is None:
      self.nnz_buckets = bucket_ladder(row_nnz, self.rows_per_batch // k)
    else:
      self.nnz_buckets = tuple(sorted(int(b) for b in nnz_buckets))
      biggest = int(np.sort(row_nnz)[::-1][:self.rows_per_batch // k].sum())
      if self.nnz_buckets[-1] < biggest:
        raise ValueError(f"nnz_buckets {self.nnz_buckets}: the largest must hold the "
                         f"biggest possible batch ({biggest} entries)")

  @property
  def n_users(self) -> int:
    return self.matrix.shape[0]

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.n_users // self.batch_size)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The user permutation of ``epoch`` (int64 (n_users,))."""
    return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_users)

  def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[SparseBatch]:
    """Batches ``start_step ..`` of ``epoch``; the same for a resumed run."""
    order = self.epoch_order(epoch)
    for step in range(int(start_step), self.steps_per_epoch):
      users = order[step * self.batch_size:(step + 1) * self.batch_size]
      yield make_batch(self.matrix, users, self.rows_per_batch, self.nnz_buckets,
                       self.num_shards)


def eval_batches(split, batch_size: int, num_shards: int | None = None
                 ) -> Iterator[EvalBatch]:
  """``EvalBatch(fold_in, heldout)`` over the rows of an EvalSplit, in row order.

  Fold-in and held-out halves have their own bucket ladders; they share the row mask.
  """
  k = _check_shards(batch_size, num_shards)
  rows = padded_rows(batch_size, num_shards)
  fold_in = sp.csr_matrix(split.fold_in)
  heldout = sp.csr_matrix(split.heldout)
  b_in = bucket_ladder(np.diff(fold_in.indptr), rows // k)
  b_out = bucket_ladder(np.diff(heldout.indptr), rows // k)
  n = fold_in.shape[0]
  for lo in range(0, n, batch_size):
    users = np.arange(lo, min(lo + batch_size, n))
    yield EvalBatch(make_batch(fold_in, users, rows, b_in, num_shards),
                    make_batch(heldout, users, rows, b_out, num_shards))


_DONE = object()


class _Failure:

  def __init__(self, exc: BaseException):
    self.exc = exc


def prefetch(iterator, size: int = 2, put: Callable = jax.device_put) -> Iterator:
  """Runs ``put`` (host to device copy) on the next ``size`` items in a background thread.

  Exceptions raised by the producer (or ``put``) are re-raised in the consumer; closing
  the returned generator early (break, garbage collection) stops the thread.
  """
  q: queue.Queue = queue.Queue(maxsize=max(1, int(size)))
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not offer(put(item)):
          return
      offer(_DONE)
    except BaseException as e:  # pylint: disable=broad-except
      offer(_Failure(e))

  thread = threading.Thread(target=produce, daemon=True, name="prefetch")
  thread.start()

  def consume():
    try:
      while True:
        item = q.get()
        if item is _DONE:
          return
        if isinstance(item, _Failure):
          raise item.exc
        yield item
    finally:
      stop.set()
      thread.join(timeout=5)

  return consume()
