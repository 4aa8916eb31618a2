"""Partitioned data: the on-disk form, its checks, block-order batches that compose into
the same global batches in any process layout, and a 2-process run equal to one."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.training import engine as loop
from jax_vaecf.evaluation import catalogue
from jax_vaecf.core import distributed
from jax_vaecf.evaluation import per_user
from jax_vaecf.core import sparse
from jax_vaecf.data import (BlockBatcher, EvalSplit, Split, TrainBatcher, block_eval_batches,
                            eval_batches, open_part, partition, write_partitions)
from jax_vaecf.data.split import binary_csr

import _distributed_worker
import _tools
import _partition_worker
import _runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = {"dataset": "fixture", "split_seed": 1, "heldout_users_fraction": 0.1}


def _csr(rng, n_users, n_items, lo, hi, exclude=None):
  """Rows of ``lo .. hi - 1`` distinct random items (avoiding ``exclude``'s)."""
  rows, cols = [], []
  for u in range(n_users):
    taken = set() if exclude is None else set(exclude[u].indices.tolist())
    free = np.array([i for i in range(n_items) if i not in taken])
    items = rng.choice(free, rng.integers(lo, hi), replace=False)
    rows += [u] * items.size
    cols += items.tolist()
  return binary_csr(np.array(rows), np.array(cols), (n_users, n_items))


def _split(n_train=41, n_eval=13, n_items=120, validation=True, seed=0):
  """Held-out-users split: 8-15 items a training user, 3-9 fold-in and 1-4 held-out items
  an evaluation user, text item ids."""
  rng = np.random.default_rng(seed)

  def ev(first_id):
    fold_in = _csr(rng, n_eval, n_items, 3, 10)
    return EvalSplit(fold_in, _csr(rng, n_eval, n_items, 1, 5, exclude=fold_in),
                     np.arange(first_id, first_id + n_eval, dtype=np.int64))

  return Split(train=_csr(rng, n_train, n_items, 8, 16),
               validation=ev(1000) if validation else None, test=ev(2000),
               item_ids=np.array([f"i{j:03d}".encode() for j in range(n_items)]),
               train_user_ids=np.arange(n_train, dtype=np.int64) * 7)


@pytest.fixture(scope="module")
def split():
  return _split()


@pytest.fixture(scope="module")
def parts(split, tmp_path_factory):
  out = tmp_path_factory.mktemp("parts") / "p3"
  write_partitions(split, out, 3, settings=SETTINGS, info={"data_dir": "/nowhere"})
  return str(out)


def _blocks(m, p, count):
  return m[distributed.process_slice(m.shape[0], p, count)]


def _same_csr(a, b):
  assert a.shape == b.shape
  np.testing.assert_array_equal(a.toarray(), b.toarray())


# ------------------------------------------------------------------------- on disk


def test_the_data_layer_does_not_import_serving():
  # The data layer sits below serving: jax_vaecf.serving.artefact is the artefact's own loader
  # (copied into every export), and the server and exporter build on the library.
  code = """
import pkgutil, sys, importlib
import jax_vaecf.data
for m in pkgutil.iter_modules(jax_vaecf.data.__path__, "jax_vaecf.data."):
  importlib.import_module(m.name)
print(sorted(n for n in sys.modules if n.startswith("jax_vaecf.data.")))
print(sorted(n for n in ("jax_vaecf.serving.artefact", "jax_vaecf.serving.http", "jax_vaecf.serving.export")
             if n in sys.modules))
"""
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 0, r.stderr[-3000:]
  loaded, serving = r.stdout.strip().splitlines()
  assert "jax_vaecf.data.partition" in loaded
  assert serving == "[]"


def test_round_trip_gives_each_process_its_block(split, parts):
  manifest = json.load(open(os.path.join(parts, "manifest.json")))
  assert manifest["processes"] == 3 and manifest["n_items"] == split.n_items
  assert manifest["settings"] == SETTINGS
  assert sum(manifest["users"]["train"]) == 41 and sum(manifest["nnz"]["train"]) == \
      split.train.nnz
  assert not [n for n in os.listdir(os.path.dirname(parts)) if n.endswith(".tmp")]
  got = [open_part(parts, p, 3, settings=SETTINGS) for p in range(3)]
  for p, part in enumerate(got):
    assert (part.blocks, part.block) == (3, p)
    _same_csr(part.train, _blocks(split.train, p, 3))
    # Memory-mapped, not read: the process holds only what its batches touch.
    assert all(isinstance(a, np.memmap) for a in (part.train.indptr, part.train.indices,
                                                   part.train.data))
    assert (part.train.indptr.dtype, part.train.indices.dtype, part.train.data.dtype) == (
        np.int64, np.int32, np.float32)
    for name in ("validation", "test"):
      mine, whole = getattr(part, name), getattr(split, name)
      _same_csr(mine.fold_in, _blocks(whole.fold_in, p, 3))
      _same_csr(mine.heldout, _blocks(whole.heldout, p, 3))
      np.testing.assert_array_equal(
          mine.user_ids, whole.user_ids[distributed.process_slice(13, p, 3)])
      np.testing.assert_array_equal(mine.fold_in_row_nnz, np.diff(whole.fold_in.indptr))
    np.testing.assert_array_equal(part.train_row_nnz, np.diff(split.train.indptr))
    np.testing.assert_array_equal(part.item_ids, split.item_ids)
    assert part.n_train_users == 41 and part.n_items == split.n_items
  _same_csr(sp.vstack([p.train for p in got]), split.train)
  np.testing.assert_array_equal(np.concatenate([p.train_user_ids for p in got]),
                                split.train_user_ids)


def test_split_without_validation_round_trips(tmp_path):
  s = _split(validation=False)
  write_partitions(s, tmp_path / "p", 2, settings=SETTINGS)
  part = open_part(tmp_path / "p", 1, 2)
  assert part.validation is None
  _same_csr(part.test.heldout, _blocks(s.test.heldout, 1, 2))


def test_existing_out_is_refused(split, parts):
  before = sorted(os.listdir(parts))
  with pytest.raises(ValueError, match="already exists; choose a new --out"):
    write_partitions(split, parts, 2, settings=SETTINGS)
  assert sorted(os.listdir(parts)) == before


def test_wrong_process_count_is_refused(parts):
  with pytest.raises(ValueError, match="written for 3 processes, this run has 2.*"
                                       "--processes=2"):
    open_part(parts, 0, 2)


def test_other_data_settings_are_refused_listing_each(parts):
  with pytest.raises(ValueError) as e:
    open_part(parts, 0, 3, settings={**SETTINGS, "split_seed": 2, "fold": "u1"})
  message = str(e.value)
  assert "made with other data settings" in message
  assert "split_seed: 1 in the folder, 2 in this run" in message
  assert "fold: absent in the folder, 'u1' in this run" in message
  assert "dataset" not in message  # only the differences


def test_damaged_or_missing_file_is_refused(split, tmp_path):
  out = tmp_path / "p"
  write_partitions(split, out, 2, settings=SETTINGS)
  path = out / "part-00001-of-00002" / "train_indices.npy"
  raw = bytearray(path.read_bytes())
  raw[-1] ^= 1
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"part-00001-of-00002/train_indices\.npy: its "
                                       r"sha256 differs"):
    open_part(out, 1, 2)
  open_part(out, 0, 2)  # process 0 reads only its own part (and the shared files)
  os.remove(out / "train_row_nnz.npy")
  with pytest.raises(FileNotFoundError, match=r"train_row_nnz\.npy: missing"):
    open_part(out, 0, 2)
  with pytest.raises(FileNotFoundError, match="manifest.json: missing"):
    open_part(tmp_path, 0, 2)


# ------------------------------------------------------------------------- batches


def _cat(batches):
  """The shards of several processes' batches, in process order (leading axis)."""
  return jax.tree.map(lambda *a: np.concatenate(a), *batches)


def _assert_same(a, b):
  for x, y in zip(a, b):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _dense_rows(batch, n_items):
  """The global batch's rows, shards concatenated: float (S * R, n_items) and mask."""
  d = [np.asarray(sparse.densify(sparse.SparseBatch(*(a[j] for a in batch)), n_items))
       for j in range(batch.rows.shape[0])]
  return np.concatenate(d), batch.row_mask.reshape(-1)


@pytest.mark.parametrize("blocks, num_shards, batch_size", [
    (2, 4, 8), (3, 6, 12), (3, 3, 9), (2, 2, 6)])
def test_blocks_compose_into_the_global_batches(split, blocks, num_shards, batch_size):
  m, row_nnz = split.train, np.diff(split.train.indptr)
  whole = BlockBatcher(m, batch_size, 5, row_nnz=row_nnz, blocks=blocks,
                       num_shards=num_shards)
  procs = [BlockBatcher(_blocks(m, p, blocks), batch_size, 5, row_nnz=row_nnz,
                        blocks=blocks, block=p, num_shards=num_shards)
           for p in range(blocks)]
  assert not whole.process_local and all(b.process_local for b in procs)
  per = batch_size // blocks
  sizes = [distributed.process_slice(41, q, blocks) for q in range(blocks)]
  assert whole.steps_per_epoch == -(-max(s.stop - s.start for s in sizes) // per) == \
      -(-41 // batch_size)
  for epoch in (0, 1):
    got = list(whole.epoch_batches(epoch))
    mine = [list(b.epoch_batches(epoch)) for b in procs]
    assert len(got) == whole.steps_per_epoch and all(len(x) == len(got) for x in mine)
    seen = []
    for step, batch in enumerate(got):
      assert batch.rows.shape[0] == num_shards
      _assert_same(_cat([x[step] for x in mine]), batch)
      # Rows q * per ...: block q's next users in its own order.
      dense, mask = _dense_rows(batch, m.shape[1])
      for q, s in enumerate(sizes):
        users = s.start + whole.block_order(epoch, q)[step * per:(step + 1) * per]
        np.testing.assert_array_equal(dense[q * per:q * per + users.size],
                                      m[users].toarray())
        assert mask[q * per:q * per + users.size].all()
        assert not mask[q * per + users.size:(q + 1) * per].any()
        seen += users.tolist()
      assert not mask[blocks * per:].any()
    assert sorted(seen) == list(range(41))  # every user once an epoch
  # The order is a function of (seed, epoch, block) only.
  other = list(BlockBatcher(m, batch_size, 6, row_nnz=row_nnz, blocks=blocks,
                            num_shards=num_shards).epoch_batches(0))
  assert any(not np.array_equal(a.cols, b.cols) for a, b in zip(other, got))


def test_device_count_changes_only_the_sharding(split):
  m, row_nnz = split.train, np.diff(split.train.indptr)
  one = list(BlockBatcher(m, 12, 5, row_nnz=row_nnz, blocks=3).epoch_batches(1))
  six = list(BlockBatcher(m, 12, 5, row_nnz=row_nnz, blocks=3, num_shards=6
                          ).epoch_batches(1))
  for a, b in zip(one, six):
    assert a.rows.ndim == 1 and a.row_mask.shape == (12,)
    np.testing.assert_array_equal(np.asarray(sparse.densify(a, 120)),
                                  _dense_rows(b, 120)[0])


@pytest.mark.parametrize("num_shards, batch_size", [(None, 16), (2, 16), (2, 15)])
def test_one_block_is_the_train_batcher(split, num_shards, batch_size):
  m = split.train
  a = TrainBatcher(m, batch_size, 4, num_shards=num_shards)
  b = BlockBatcher(m, batch_size, 4, row_nnz=np.diff(m.indptr), blocks=1,
                   num_shards=num_shards)
  assert a.nnz_buckets == b.nnz_buckets and a.steps_per_epoch == b.steps_per_epoch
  for x, y in zip(a.epoch_batches(2), b.epoch_batches(2), strict=True):
    _assert_same(x, y)


def test_bad_batch_layouts_are_refused(split):
  m, row_nnz = split.train, np.diff(split.train.indptr)
  with pytest.raises(ValueError, match="batch_size 10 is not a multiple of the 3 blocks"):
    BlockBatcher(m, 10, 0, row_nnz=row_nnz, blocks=3)
  # 6 users a block over the 2 devices of each of 2 processes: fine; 3 users are not.
  BlockBatcher(_blocks(m, 0, 2), 12, 0, row_nnz=row_nnz, blocks=2, block=0, num_shards=4)
  with pytest.raises(ValueError, match="must split evenly.*multiple of 4"):
    BlockBatcher(_blocks(m, 0, 2), 6, 0, row_nnz=row_nnz, blocks=2, block=0, num_shards=4)
  with pytest.raises(ValueError, match="the matrix has 41 rows; block 1 has 20 users"):
    BlockBatcher(m, 4, 0, row_nnz=row_nnz, blocks=2, block=1, num_shards=2)


@pytest.mark.parametrize("blocks, num_shards, batch_size", [(3, 6, 5), (2, 4, 8), (2, 4, 6)])
def test_eval_blocks_compose_and_one_block_is_eval_batches(split, blocks, num_shards,
                                                           batch_size):
  ev = split.validation
  kw = dict(fold_in_row_nnz=np.diff(ev.fold_in.indptr),
            heldout_row_nnz=np.diff(ev.heldout.indptr), num_shards=num_shards)
  whole = list(block_eval_batches(ev.fold_in, ev.heldout, batch_size, blocks=blocks, **kw))
  mine = [list(block_eval_batches(_blocks(ev.fold_in, p, blocks),
                                  _blocks(ev.heldout, p, blocks), batch_size,
                                  blocks=blocks, block=p, **kw)) for p in range(blocks)]
  users = []
  for step, batch in enumerate(whole):
    for half in (0, 1):
      _assert_same(_cat([x[step][half] for x in mine]), batch[half])
    fold_in, mask = _dense_rows(batch.fold_in, 120)
    heldout, _ = _dense_rows(batch.heldout, 120)
    assert not (fold_in * heldout).any()
    users += [int(np.flatnonzero((ev.fold_in.toarray() == row).all(1))[0])
              for row in fold_in[mask > 0]]
  assert sorted(users) == list(range(13))
  one = block_eval_batches(ev.fold_in, ev.heldout, batch_size, blocks=1, **kw)
  for x, y in zip(eval_batches(ev, batch_size, num_shards), one, strict=True):
    _assert_same(x.fold_in, y.fold_in)
    _assert_same(x.heldout, y.heldout)


# ------------------------------------------------------------------ multi-process




@pytest.mark.parametrize("model_shards", [1, 2])
def test_two_processes_on_their_parts_train_like_one(tmp_path, model_shards):
  """2 processes x 2 devices on their own parts: data parallel, or a 2 x 2 mesh with
  the items split over each process's devices."""
  s = _split(n_train=41, n_eval=13)
  data = tmp_path / "parts"
  write_partitions(s, data, 2, settings=SETTINGS)
  _distributed_worker.run_processes("_partition_worker.py", str(tmp_path), f"--data={data}",
                                    f"--model_shards={model_shards}")

  # One process, 4 devices (tests/conftest.py), every block, the same global batches;
  # evaluation of the whole validation set the usual way.
  batcher = BlockBatcher(s.train, _partition_worker.BATCH, _partition_worker.SEED,
                         row_nnz=np.diff(s.train.indptr), blocks=2, num_shards=4)
  params, losses, result = _partition_worker.train(batcher, s.validation, s.n_items)
  want = _distributed_worker.flat(params)
  for i in range(2):
    got = np.load(tmp_path / f"process_{i}.npz")
    # Each process held its half of the training rows.
    assert int(got["train_users"]) == [21, 20][i]
    assert abs(int(got["train_nnz"]) - s.train.nnz / 2) < 0.1 * s.train.nnz / 2
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    assert sorted(k[len("param:"):] for k in got.files if k.startswith("param:")) == \
        sorted(want)
    for k, v in want.items():
      np.testing.assert_allclose(got["param:" + k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(got["metric:n_users"]) == result["n_users"] == 13
    for k in ("ndcg@10", "recall@10"):
      np.testing.assert_allclose(got["metric:" + k], result[k], rtol=1e-5, err_msg=k)


# --------------------------------------------------------------- command and loop


def test_command_writes_parts_and_one_part_trains_like_the_whole_data(tmp_path):
  data_dir = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data_dir, cache_dir=str(tmp_path / "cache"), number_of_epochs=2,
                           anneal_epochs=1.0)
  out = tmp_path / "parts"
  args = ["--config=ml-latest-small", f"--data_dir={data_dir}",
          f"--cache_dir={tmp_path / 'cache'}", "--processes=1", f"--out={out}"]
  r = subprocess.run([sys.executable, "-m", "experiments.partition", *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "wrote" in r.stdout and (out / "part-00000-of-00001").is_dir()
  again = _tools.run("experiments.partition", *args)
  assert again.returncode == 2 and "already exists" in again.stderr

  part = loop.load_data(cfg.replace(partitioned_data=str(out)))
  assert isinstance(part, partition.PartSplit)
  assert isinstance(loop.train_batcher(cfg, part, 1), BlockBatcher)
  whole = loop.run(cfg, str(tmp_path / "whole"))
  parted = loop.run(cfg.replace(partitioned_data=str(out)), str(tmp_path / "parted"))
  # Every metric of the whole run; the catalogue metrics need the whole training data's
  # item popularity, which a process of partitioned data does not hold.
  assert parted["test"] == {k: v for k, v in whole["test"].items()
                            if k.split("@")[0] not in catalogue.CATALOGUE_METRICS}
  assert "coverage@10" in whole["test"]
  assert os.path.exists(tmp_path / "whole" / per_user.FILE)
  assert not os.path.exists(tmp_path / "parted" / per_user.FILE)
  assert parted["train"]["best_validation"] == whole["train"]["best_validation"]
  for name in ("whole", "parted"):
    assert os.path.exists(tmp_path / name / "item_ids.npy")
  with pytest.raises(ValueError, match="made with other data settings.*split_seed"):
    loop.load_data(cfg.replace(partitioned_data=str(out), split_seed=1))
