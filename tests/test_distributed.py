"""Multi-process runs: two local CPU processes (gloo collectives) equal one process."""

import numpy as np
import pytest

from jax_vaecf.core import distributed
from jax_vaecf.training import parallel
from jax_vaecf.core import sparse as sparse_lib

import _distributed_worker


@pytest.mark.parametrize("model_shards", [1, 2])
def test_two_processes_train_like_one(tmp_path, model_shards):
  """2 processes x 2 devices, data parallel or a 2 x 2 mesh with the items split over
  each process's two devices (gathered across processes by ``to_host``)."""
  _distributed_worker.run_processes("_distributed_worker.py", str(tmp_path),
                                    f"--model_shards={model_shards}")

  # One process, 4 devices (tests/conftest.py), the same global batches and shards.
  params, ndcg, losses = _distributed_worker.run(4, 0, 1)
  want = _distributed_worker.flat(params)
  for i in range(2):
    got = np.load(tmp_path / f"process_{i}.npz")
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
    # The 10 users (padding rows follow; their count depends on the shards).
    np.testing.assert_allclose(got["ndcg"][:10], ndcg[:10], rtol=1e-5, atol=1e-7)
    assert sorted(k[len("param:"):] for k in got.files if k.startswith("param:")) == \
        sorted(want)
    for k, v in want.items():
      np.testing.assert_allclose(got["param:" + k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_single_process_initialize_is_a_no_op():
  info = distributed.initialize(num_processes=1)
  assert (info.process_index, info.process_count) == (0, 1)
  assert info.device_count == 4
  # No arguments and no multi-task cluster launch in the environment: single process.
  assert distributed.initialize(environ={"SLURM_NTASKS": "1"}).process_count == 1
  assert distributed.initialize(environ={}).process_count == 1


def test_initialize_rejects_partial_or_bad_arguments():
  with pytest.raises(ValueError, match="all of coordinator_address"):
    distributed.initialize("127.0.0.1:1234", num_processes=2)
  with pytest.raises(ValueError, match="process_id must be in"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="num_processes must be >= 1"):
    distributed.initialize("127.0.0.1:1234", 0, 0)


def test_process_slice_covers_everything_once():
  for n, p in ((10, 3), (4, 4), (2, 3), (0, 2)):
    parts = [distributed.process_slice(n, i, p) for i in range(p)]
    got = np.concatenate([np.arange(n)[s] for s in parts])
    np.testing.assert_array_equal(got, np.arange(n))
    sizes = [s.stop - s.start for s in parts]
    assert max(sizes) - min(sizes) <= 1
  with pytest.raises(ValueError):
    distributed.process_slice(10, 3, 3)


def test_process_shards_are_the_processes_block_of_the_mesh():
  x = (np.random.default_rng(0).random((8, 20)) < 0.3).astype(np.float32)
  b = parallel.pad_and_shard(sparse_lib.from_dense(x), 4)
  first = distributed.process_shards(b, 0, 2)
  second = distributed.process_shards(b, 1, 2)
  assert first.rows.shape[0] == second.rows.shape[0] == 2
  np.testing.assert_array_equal(np.concatenate([first.rows, second.rows]), b.rows)
  eb = distributed.process_shards(sparse_lib.EvalBatch(b, b), 1, 2)
  np.testing.assert_array_equal(eb.heldout.cols, second.cols)
  with pytest.raises(ValueError, match="divisible by 3"):
    distributed.process_shards(b, 0, 3)
