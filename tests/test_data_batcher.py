"""Batches: padding and masks, shards, buckets, resumable order, prefetch."""

import threading

import jax
import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.core import sparse
from jax_vaecf.data import EvalSplit, TrainBatcher, eval_batches, make_batch, prefetch


def _matrix(n_users=103, n_items=40, seed=0):
  m = sp.random(n_users, n_items, density=0.15, format="csr", random_state=seed,
                dtype=np.float32)
  m.data[:] = 1.0
  m.data[m.indptr[5]:m.indptr[6]] = 0  # an empty user
  m.eliminate_zeros()
  return sp.csr_matrix(m)


def _dense(batch, n_items):
  return np.asarray(sparse.densify(jax.tree.map(np.asarray, batch), n_items))


@pytest.mark.parametrize("num_shards", [None, 2])
def test_batches_cover_rows_with_padding(num_shards):
  m = _matrix()
  b = TrainBatcher(m, batch_size=20, seed=3, num_shards=num_shards)
  assert b.steps_per_epoch == 6
  order = b.epoch_order(0)
  batches = list(b.epoch_batches(0))
  assert len(batches) == 6
  for step, batch in enumerate(batches):
    users = order[step * 20:(step + 1) * 20]
    if num_shards is None:
      assert batch.row_mask.shape == (20,) and batch.rows.dtype == np.int32
      sparse.check_sparse_batch(batch, 40)
      dense = _dense(batch, 40)
      mask = batch.row_mask
    else:
      assert batch.rows.shape[0] == 2 and batch.row_mask.shape == (2, 10)
      assert batch.rows.max() < 10  # local row ids
      dense = np.concatenate([_dense(sparse.SparseBatch(*(a[j] for a in batch)), 40)
                              for j in range(2)])
      mask = batch.row_mask.reshape(-1)
    assert mask.sum() == users.size  # last batch: 3 real users, 17 padding rows
    np.testing.assert_array_equal(dense[:users.size], m[users].toarray())
    assert not dense[users.size:].any()
  assert batches[-1].row_mask.reshape(-1)[:3].all()


def test_bucket_count_small():
  rng = np.random.default_rng(0)
  # Heavy-tailed row lengths, like real users.
  lengths = np.minimum(rng.zipf(1.8, 5000) * 5, 800)
  rows = np.repeat(np.arange(5000), lengths)
  cols = rng.integers(0, 1000, rows.size)
  m = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(5000, 1000))
  b = TrainBatcher(m, batch_size=100, seed=0)
  assert len(b.nnz_buckets) <= 8
  shapes = {x.rows.shape for e in range(3) for x in b.epoch_batches(e)}
  assert len(shapes) <= 8
  # Every batch fits its bucket and wastes at most the bucket ratio on full batches.
  for x in b.epoch_batches(0):
    nnz = int((x.vals != 0).sum())
    assert x.rows.size >= nnz


def test_resume_reproduces_order():
  m = _matrix()
  a = list(TrainBatcher(m, 16, seed=7).epoch_batches(2))
  r = list(TrainBatcher(m, 16, seed=7).epoch_batches(2, start_step=4))
  assert len(r) == len(a) - 4
  for x, y in zip(a[4:], r):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)
  other = list(TrainBatcher(m, 16, seed=7).epoch_batches(3))
  assert any(not np.array_equal(x.cols, y.cols) for x, y in zip(a, other))


def test_batch_that_does_not_divide_over_shards_is_padded():
  m = _matrix()
  b = TrainBatcher(m, 15, seed=0, num_shards=2)
  one = TrainBatcher(m, 15, seed=0)
  assert b.steps_per_epoch == one.steps_per_epoch
  for sharded, single in zip(b.epoch_batches(0), one.epoch_batches(0)):
    assert sharded.row_mask.shape == (2, 8)
    assert sharded.row_mask.sum() == single.row_mask.sum()  # the same users per step
    # Shard 0 holds the first 8 users, shard 1 the rest, then one padding row.
    dense = np.zeros((16, m.shape[1]), np.float32)
    for j in range(2):
      np.add.at(dense, (sharded.rows[j] + 8 * j, sharded.cols[j]), sharded.vals[j])
    want = np.zeros((15, m.shape[1]), np.float32)
    np.add.at(want, (single.rows, single.cols), single.vals)
    np.testing.assert_array_equal(dense[:15], want)
    assert not dense[15].any() and sharded.row_mask[1, -1] == 0
  with pytest.raises(ValueError, match="not divisible"):
    make_batch(m, np.arange(3), 15, (1024,), num_shards=2)


@pytest.mark.parametrize("num_shards", [None, 2])
def test_eval_batches(num_shards):
  f, h = _matrix(seed=1), _matrix(seed=2)
  ev = EvalSplit(fold_in=f, heldout=h, user_ids=np.arange(f.shape[0]))
  got_f, got_h = [], []
  for batch in eval_batches(ev, 50, num_shards=num_shards):
    for half, out in ((batch.fold_in, got_f), (batch.heldout, got_h)):
      if num_shards:
        d = np.concatenate([_dense(sparse.SparseBatch(*(a[j] for a in half)), 40)
                            for j in range(num_shards)])
      else:
        d = _dense(half, 40)
      out.append(d[half.row_mask.reshape(-1) > 0])
  np.testing.assert_array_equal(np.concatenate(got_f), f.toarray())
  np.testing.assert_array_equal(np.concatenate(got_h), h.toarray())


def test_prefetch_order_and_put():
  seen = []
  out = list(prefetch(iter(range(10)), size=2, put=lambda x: seen.append(x) or x * 2))
  assert out == [2 * i for i in range(10)] and seen == list(range(10))


def test_prefetch_propagates_errors():
  def gen():
    yield 1
    raise RuntimeError("producer broke")
  it = prefetch(gen(), put=lambda x: x)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="producer broke"):
    next(it)


def test_prefetch_early_stop_does_not_hang():
  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1
  before = threading.active_count()
  it = prefetch(endless(), size=2, put=lambda x: x)
  assert next(it) == 0
  it.close()
  assert threading.active_count() <= before
  n = len(produced)
  assert n <= 5  # the producer stopped, bounded by the queue size


def test_prefetch_device_put():
  m = _matrix()
  b = TrainBatcher(m, 32, seed=0)
  for x in prefetch(b.epoch_batches(0)):
    assert isinstance(x.rows, jax.Array)
