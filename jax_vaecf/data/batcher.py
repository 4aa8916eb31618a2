"""Host-side batching of CSR rows into padded :class:`~jax_vaecf.core.sparse.SparseBatch`es.

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

Partitioned data (:mod:`jax_vaecf.data.partition`): the users form ``P`` fixed
contiguous blocks (:func:`jax_vaecf.core.distributed.process_slice`), one per process, and
:class:`BlockBatcher` / :func:`block_eval_batches` make global batch ``b`` the
concatenation over blocks ``p = 0 .. P-1`` of block ``p``'s ``b``-th local batch. A
process holding one block builds only that block's rows (its shards) and, from every
block's row lengths, the nnz bucket every process agrees on; one process holding all
blocks builds the same global batches whole.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
import scipy.sparse as sp

from jax_vaecf.core import distributed
from jax_vaecf.core.sparse import EvalBatch, SparseBatch

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



class _BlockLayout:
  """Where the rows of ``blocks`` contiguous blocks of ``n_users`` users sit in a global
  batch: block ``q``'s next ``users`` users (``users`` per step) fill rows
  ``q * per_block ..`` of its ``per_block >= users`` rows (the rest, and the rows of a
  block that has run out, are padding), and the ``blocks * per_block`` rows are cut
  into ``shards`` shards of ``shard_rows`` rows (the last padded). ``block``: the one
  block this process holds (it builds rows ``[row_lo, row_hi)``, whole shards), or None
  for all of them."""

  def __init__(self, n_users: int, blocks: int, per_block: int, shards: int,
               block: int | None, users: int | None = None):
    if blocks < 1:
      raise ValueError(f"blocks must be >= 1, got {blocks}")
    bounds = [distributed.process_slice(n_users, q, blocks) for q in range(blocks)]
    self.starts = np.array([b.start for b in bounds], np.int64)
    self.sizes = np.array([b.stop - b.start for b in bounds], np.int64)
    self.blocks, self.per_block, self.shards, self.block = blocks, per_block, shards, block
    self.users = per_block if users is None else users
    self.shard_rows = -(-blocks * per_block // shards)
    self.steps = -(-int(self.sizes.max()) // self.users)
    if block is None:
      self.row_lo, self.row_hi = 0, shards * self.shard_rows
      self.owned = range(blocks)
      return
    if not 0 <= block < blocks:
      raise ValueError(f"block {block} not in [0, {blocks})")
    if shards % blocks or per_block % (shards // blocks):
      raise ValueError(
          f"a process holding one of {blocks} blocks feeds {per_block} users of each batch "
          f"to its {shards / blocks:g} of the {shards} shards (devices): the users must "
          f"split evenly over them; use a batch size that is a multiple of {shards}")
    self.row_lo, self.row_hi = block * per_block, (block + 1) * per_block
    self.owned = range(block, block + 1)

  def local_rows(self, n_rows: int) -> tuple[int, int]:
    """The global user numbers ``[lo, hi)`` of the rows a matrix of ``n_rows`` holds."""
    if self.block is None:
      lo, hi = 0, int(self.sizes.sum())
    else:
      lo = int(self.starts[self.block])
      hi = lo + int(self.sizes[self.block])
    if n_rows != hi - lo:
      raise ValueError(f"the matrix has {n_rows} rows; block "
                       f"{'(all)' if self.block is None else self.block} has {hi - lo} users")
    return lo, hi

  def max_shard_nnz(self, lengths: Sequence[np.ndarray]) -> np.ndarray:
    """int64 ``(steps,)``: the largest shard's entries in each global batch, from every
    block's row lengths in the order the block is batched (``lengths[q]``)."""
    per, u, steps = self.per_block, self.users, self.steps
    grid = np.zeros((steps, self.shards * self.shard_rows), np.int32)
    for q, lens in enumerate(lengths):
      col = np.zeros(steps * u, np.int32)
      col[:lens.size] = lens
      grid[:, q * per:q * per + u] = col.reshape(steps, u)
    return grid.reshape(steps, self.shards, self.shard_rows).sum(-1, dtype=np.int64).max(
        -1, initial=0)

  def batch(self, m: sp.csr_matrix, local: dict, step: int, nnz: int,
            sharded: bool) -> SparseBatch:
    """Rows ``[row_lo, row_hi)`` of global batch ``step``: block ``q``'s users
    ``local[q][step * users:][:users]`` (rows of ``m``), ``nnz`` entries per shard; shape
    ``(shards_held, nnz)`` (or unsharded ``(nnz,)`` when not ``sharded``)."""
    per, u = self.per_block, self.users
    users = [local[q][step * u:(step + 1) * u] for q in self.owned]
    positions = np.concatenate([q * per + np.arange(x.size) for q, x in
                                zip(self.owned, users)]) - self.row_lo
    r, c, v = _gather(m, np.concatenate(users).astype(np.int64))
    pos = positions[r]
    k, size = (self.row_hi - self.row_lo) // self.shard_rows, self.shard_rows
    shard = pos // size
    counts = np.bincount(shard, minlength=k)
    if counts.max(initial=0) > nnz:
      raise ValueError(f"a shard of {counts.max()} entries exceeds the bucket {nnz}")
    # Entries come in row order, so each shard's are contiguous: slot within the shard.
    slot = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = np.zeros((k, nnz), np.int32)
    cols = np.zeros((k, nnz), np.int32)
    vals = np.zeros((k, nnz), np.float32)
    rows[shard, slot], cols[shard, slot], vals[shard, slot] = pos - shard * size, c, v
    mask = np.zeros(k * size, np.float32)
    mask[positions] = 1.0
    if not sharded:
      return SparseBatch(rows[0], cols[0], vals[0], mask)
    return SparseBatch(rows, cols, vals, mask.reshape(k, size))


def _checked_lengths(m: sp.csr_matrix, row_nnz: np.ndarray, layout: _BlockLayout,
                     what: str) -> np.ndarray:
  row_nnz = np.asarray(row_nnz)
  lo, hi = layout.local_rows(m.shape[0])
  if not np.array_equal(np.diff(m.indptr), row_nnz[lo:hi]):
    raise ValueError(f"{what}: the matrix's row lengths differ from row_nnz[{lo}:{hi}]")
  return row_nnz


class BlockBatcher:
  """Shuffled training batches in the block order of partitioned data, the same global
  batches whether one process holds every block or each process one.

  Users form ``blocks = P`` contiguous blocks (:func:`jax_vaecf.core.distributed.process_slice`
  of the ``n_users = row_nnz.size`` training users). In epoch ``e`` block ``q`` is shuffled
  by ``numpy.random.default_rng([seed, e, q]).permutation`` (with one block
  ``default_rng([seed, e])``: :class:`TrainBatcher`'s order); global batch ``b`` is the
  concatenation over ``q`` of the block's ``b``-th ``B / P`` users, padding rows where a
  block has run out, so every block has ``ceil(max block / (B / P))`` steps per epoch.
  The nnz bucket of a step is that of the largest of all ``num_shards`` shards, computed
  from every block's row lengths, so every process picks the same one without talking.

  Args:
    matrix: CSR ``(rows, n_items)``: every block's training rows, block after block
      (``block=None``), or block ``block``'s only (scipy CSR over memory-mapped arrays is
      fine; rows are read as batches need them).
    batch_size: users per global batch ``B``, a multiple of ``blocks``.
    seed: seed of the order.
    row_nnz: int ``(n_users,)``: the row lengths of every block's rows, block after block.
    blocks: ``P``.
    block: the block ``matrix`` holds (this process's), or None for all.
    num_shards: shards ``S`` of the global batch (devices over all processes), or None for
      unsharded batches. Holding one block needs the block's ``B / P`` rows to be whole
      shards: ``S % P == 0`` and ``(B / P) % (S / P) == 0`` (``B`` a multiple of ``S``).

  Batches: :class:`SparseBatch` of ``(S_held, nnz)`` int32 / int32 / float32 leaves and a
  ``(S_held, ceil(B / S))`` float32 ``row_mask``, with local row ids, where ``S_held`` is
  ``S`` (every block) or ``S / P`` (one block: this process's shards, for
  ``ParallelSteps.put_batch``).
  """

  def __init__(self, matrix: sp.csr_matrix, batch_size: int, seed: int, *,
               row_nnz: np.ndarray, blocks: int, block: int | None = None,
               num_shards: int | None = None):
    k = _check_shards(batch_size, num_shards)
    if batch_size % blocks:
      raise ValueError(f"batch_size {batch_size} is not a multiple of the {blocks} blocks "
                       f"of the partitioned data (one per process): every block gives "
                       f"batch_size / {blocks} users to each batch")
    self.layout = _BlockLayout(np.asarray(row_nnz).size, blocks, batch_size // blocks, k,
                               block)
    self.matrix = matrix
    self.row_nnz = _checked_lengths(matrix, row_nnz, self.layout, "BlockBatcher")
    self.batch_size, self.seed, self.num_shards = int(batch_size), int(seed), num_shards
    self.nnz_buckets = bucket_ladder(self.row_nnz, self.layout.shard_rows)

  @property
  def process_local(self) -> bool:
    """Whether the batches hold only this process's shards (one block held)."""
    return self.layout.block is not None

  @property
  def n_users(self) -> int:
    return int(self.row_nnz.size)

  @property
  def steps_per_epoch(self) -> int:
    return self.layout.steps

  def block_order(self, epoch: int, block: int) -> np.ndarray:
    """Block ``block``'s user permutation in ``epoch`` (int64, users within the block)."""
    key = [self.seed, int(epoch)] + ([int(block)] if self.layout.blocks > 1 else [])
    return np.random.default_rng(key).permutation(int(self.layout.sizes[block]))

  def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[SparseBatch]:
    """Batches ``start_step ..`` of ``epoch`` (see the class docstring)."""
    lay = self.layout
    orders = [self.block_order(epoch, q) for q in range(lay.blocks)]
    nnz = lay.max_shard_nnz([self.row_nnz[lay.starts[q] + o] for q, o in enumerate(orders)])
    base = 0 if lay.block is None else lay.starts[lay.block]
    local = {q: lay.starts[q] - base + orders[q] for q in lay.owned}
    for step in range(int(start_step), lay.steps):
      yield lay.batch(self.matrix, local, step, _bucket(int(nnz[step]), self.nnz_buckets),
                      self.num_shards is not None)


def block_eval_batches(fold_in: sp.csr_matrix, heldout: sp.csr_matrix, batch_size: int, *,
                       fold_in_row_nnz: np.ndarray, heldout_row_nnz: np.ndarray,
                       blocks: int, block: int | None = None,
                       num_shards: int | None = None) -> Iterator[EvalBatch]:
  """``EvalBatch(fold_in, heldout)`` of evaluation users in block order, in row order
  within each block: global batch ``b`` holds block ``q``'s users ``b * L .. (b + 1) * L
  - 1`` for every ``q``, ``L = ceil(batch_size / P)``, in rows ``q * L'``, ``L'`` being
  ``L`` rounded up to whole shards of a process (``S / P`` of them when ``P`` divides
  ``S``). With one block this is :func:`eval_batches`.

  ``fold_in`` / ``heldout``: CSR rows of every block (``block=None``) or of block
  ``block``; ``*_row_nnz``: every block's row lengths. Leaves as
  :class:`BlockBatcher`'s; fold-in and held-out have their own bucket ladders.
  """
  k = _check_shards(batch_size, num_shards)
  users = rows = -(-batch_size // blocks)
  if k % blocks == 0:
    rows = -(-users // (k // blocks)) * (k // blocks)
  lay = _BlockLayout(np.asarray(fold_in_row_nnz).size, blocks, rows, k, block, users)
  lengths = {name: _checked_lengths(m, n, lay, f"block_eval_batches ({name})")
             for name, m, n in (("fold-in", fold_in, fold_in_row_nnz),
                                ("held-out", heldout, heldout_row_nnz))}
  base = 0 if block is None else lay.starts[block]
  local = {q: np.arange(lay.sizes[q]) + lay.starts[q] - base for q in lay.owned}
  plans = []
  for m, lens in ((fold_in, lengths["fold-in"]), (heldout, lengths["held-out"])):
    nnz = lay.max_shard_nnz([lens[lay.starts[q]:lay.starts[q] + lay.sizes[q]]
                             for q in range(blocks)])
    plans.append((m, nnz, bucket_ladder(lens, lay.shard_rows)))
  for step in range(lay.steps):
    yield EvalBatch(*(lay.batch(m, local, step, _bucket(int(nnz[step]), buckets),
                                num_shards is not None) for m, nnz, buckets in plans))


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
