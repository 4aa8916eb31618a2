"""Latest/best checkpoints: round trip, best-K by metric, refusal of another run's files."""

import asyncio
import errno
import os
import sys

import jax
import numpy as np
import pytest

from jax_vaecf.training import checkpoint
from jax_vaecf import model as model_lib
from jax_vaecf.training import steps as train_lib

IDENTITY = {"model": "multvae", "n_items": 30, "hidden_dims": [8], "latent_dim": 3}


def _state(seed=0, n_items=30):
  m = model_lib.build_model("multvae", n_items, hidden_dims=(8,), latent_dim=3)
  return train_lib.create_train_state(m, train_lib.make_optimizer(), jax.random.PRNGKey(seed))


def _assert_same(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_latest_round_trip_keeps_every_field(tmp_path):
  state = _state(1).replace(step=np.int32(17))
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)
  assert ck.restore_latest(_state()) is None
  ck.save_latest(17, state, {"epoch": 3, "step_in_epoch": 2})
  restored, meta = ck.restore_latest(_state())
  _assert_same(restored, state)
  assert isinstance(restored, train_lib.TrainState)
  assert meta["epoch"] == 3 and meta["identity"] == IDENTITY
  ck.close()


def test_best_k_by_metric(tmp_path):
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY, keep_best=2)
  states = {s: _state(s) for s in range(1, 5)}
  for s, v in [(1, 0.30), (2, 0.50), (3, 0.40), (4, 0.10)]:
    ck.save_best(s, states[s], {"epoch": s}, {"ndcg@100": v})
  assert ck.best_step() == 2
  assert sorted(os.listdir(tmp_path / "checkpoints" / "best")) == ["2", "3"]
  restored, meta = ck.restore_best(_state())
  _assert_same(restored.params, states[2].params)
  assert checkpoint.read_best_meta(str(tmp_path))["epoch"] == 2
  with pytest.raises(KeyError):
    ck.save_best(5, states[1], {}, {"recall@20": 0.1})
  ck.close()


def test_another_runs_checkpoint_is_refused(tmp_path):
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)
  ck.save_latest(1, _state(), {})
  ck.close()
  other = dict(IDENTITY, n_items=31)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="n_items: checkpoint has 30"):
    checkpoint.RunCheckpoints(str(tmp_path), other)
  # Facts missing on either side count as differences too.
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match="weight_average: checkpoint has None, this run has True"):
    checkpoint.RunCheckpoints(str(tmp_path), dict(IDENTITY, weight_average=True))
  fewer = {k: v for k, v in IDENTITY.items() if k != "n_items"}
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match="n_items: checkpoint has 30, this run has None"):
    checkpoint.RunCheckpoints(str(tmp_path), fewer)
  # The refused directory is untouched.
  again = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)
  assert again.latest_step() == 1
  again.close()


def test_missing_workdir_has_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.read_best_meta(str(tmp_path / "nowhere"))


def test_unfinished_save_is_ignored(tmp_path):
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)
  ck.save_latest(5, _state(5), {"epoch": 5})
  ck.close()
  # What a save killed mid-way leaves: a temporary folder for a later step.
  tmp = tmp_path / "checkpoints" / "latest" / "6.orbax-checkpoint-tmp-123"
  tmp.mkdir()
  (tmp / "junk").write_text("partial")
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)
  assert ck.latest_step() == 5
  restored, meta = ck.restore_latest(_state())
  assert meta["epoch"] == 5
  _assert_same(restored.params, _state(5).params)
  ck.close()


def test_states_with_and_without_a_weight_average_and_older_checkpoints_restore(tmp_path):
  m = model_lib.build_model("multvae", 30, hidden_dims=(8,), latent_dim=3)
  opt = train_lib.make_optimizer()
  with_average = train_lib.StepOptions(ema_decay=0.9)  # a state that keeps ema_params
  averaged = train_lib.create_train_state(m, opt, jax.random.PRNGKey(1), with_average)
  averaged = averaged.replace(
      ema_params=jax.tree_util.tree_map(lambda a: a + 1.0, averaged.ema_params))
  ck = checkpoint.RunCheckpoints(str(tmp_path / "avg"), IDENTITY)
  ck.save_latest(3, averaged, {})
  got, _ = ck.restore_latest(train_lib.create_train_state(m, opt, jax.random.PRNGKey(0),
                                                          with_average))
  ck.close()
  _assert_same(got, averaged)  # ema_params included, distinct from params
  # A checkpoint written before TrainState had ema_params and per-phase optimiser states
  # (the same fields, as a Flax dataclass without it and with the bare optimiser state,
  # saved by orbax in this module's layout) restores with None and a 1-tuple.
  from flax import struct
  import orbax.checkpoint as ocp

  class OlderTrainState(struct.PyTreeNode):
    step: jax.Array
    params: object
    opt_state: object
    key: jax.Array
    loss_scale: object

  plain = _state(2)
  older = OlderTrainState(plain.step, plain.params, plain.opt_state[0], plain.key,
                          plain.loss_scale)
  mngr = ocp.CheckpointManager(str(tmp_path / "old" / "checkpoints" / "latest"))
  mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(older),
                                       meta=ocp.args.JsonSave({"identity": IDENTITY})))
  mngr.wait_until_finished()
  mngr.close()
  ck = checkpoint.RunCheckpoints(str(tmp_path / "old"), IDENTITY)
  got, _ = ck.restore_latest(_state(0))
  ck.close()
  assert got.ema_params is None
  _assert_same(got, plain)


def _damage(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def test_damaged_checkpoints_are_named_and_the_previous_one_is_used(tmp_path):
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)
  ck.save_latest(1, _state(1), {"epoch": 1})
  ck.save_latest(2, _state(2), {"epoch": 2})
  ck.close()
  root = tmp_path / "checkpoints" / "latest"
  assert sorted(os.listdir(root)) == ["1", "2"]  # the previous one is kept to fall back on
  meta2 = root / "2" / "meta" / "metadata"
  _damage(meta2, 5)
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)  # opening still works
  with pytest.warns(RuntimeWarning, match=f"{meta2}: 5 bytes, the checkpoint wrote"):
    restored, meta = ck.restore_latest(_state())
  assert meta["epoch"] == 1
  _assert_same(restored.params, _state(1).params)
  # Altered content of the same length is caught by the checksum, before orbax reads it.
  data1 = max((p for p in (root / "1" / "state").rglob("*") if p.is_file()
               and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  raw = bytearray(data1.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data1.write_bytes(bytes(raw))
  with pytest.warns(RuntimeWarning), pytest.raises(
      checkpoint.CheckpointUnreadableError,
      match=f"no readable checkpoint: {meta2}: .*; {data1}: content differs"):
    ck.restore_latest(_state())
  ck.close()


def test_a_damaged_best_falls_back_to_the_next_best(tmp_path):
  ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY, keep_best=2)
  ck.save_best(1, _state(1), {"epoch": 1}, {"ndcg@100": 0.3})
  ck.save_best(2, _state(2), {"epoch": 2}, {"ndcg@100": 0.5})
  _damage(tmp_path / "checkpoints" / "best" / "2" / "meta" / "metadata", 3)
  with pytest.warns(RuntimeWarning, match="trying the next best"):
    _, meta = ck.restore_best(_state())
  assert meta["epoch"] == 1
  with pytest.raises(checkpoint.CheckpointUnreadableError, match="best/2/meta/metadata"):
    checkpoint.read_best_meta(str(tmp_path))
  ck.close()


def test_a_save_cut_off_by_the_file_size_limit_says_so_in_one_line(tmp_path):
  resource = pytest.importorskip("resource")
  state = _state(1, n_items=3000)
  ck = checkpoint.RunCheckpoints(str(tmp_path), dict(IDENTITY, n_items=3000))
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))
  try:
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
      ck.save_latest(1, state, {"epoch": 1})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
  message = str(e.value)
  assert "\n" not in message
  assert ("could not save the checkpoint of step 1: a file grew past the file-size limit "
          "(see ulimit -f); the checkpoints saved before are kept") in message
  assert "OCDBT" not in message and "tensorstore" not in message.lower()
  ck.close()


def _write_finished_after_its_loop_closed(loop) -> None:
  """What a failed save leaves behind: tensorstore completes a write whose awaiting
  event loop is already closed, and reports the loop's refusal as unraisable."""
  ts = pytest.importorskip("tensorstore")
  promise, future = ts.Promise.new()

  async def await_it():
    return next(future.__await__())  # registers tensorstore's callback on this loop

  loop.run_until_complete(await_it())
  loop.close()
  promise.set_result(0)


def _closed_loop_error_in_del():
  """The same error text, reported by Python code (a __del__) rather than a native
  callback: a defect the filter must not hide."""
  loop = asyncio.new_event_loop()
  loop.close()

  class Leaky:
    def __del__(self):
      loop.call_soon_threadsafe(print)

  Leaky()  # dropped at once: its __del__ raises, reported as unraisable


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_after_a_failed_save_only_callbacks_into_closed_loops_are_silenced(
    tmp_path, loop_kind):
  new_loop = (asyncio.new_event_loop if loop_kind == "asyncio"
              else pytest.importorskip("uvloop").new_event_loop)
  reported = []
  before = sys.unraisablehook
  sys.unraisablehook = reported.append
  try:
    _write_finished_after_its_loop_closed(new_loop())
    # Not yet filtered. (A late callback of an earlier test's failed save may be
    # reported here too, as the same error.)
    assert reported and {str(u.exc_value) for u in reported} == {"Event loop is closed"}
    ck = checkpoint.RunCheckpoints(str(tmp_path), IDENTITY)

    def failing_save(*args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ck._latest.save = failing_save
    with pytest.raises(checkpoint.CheckpointSaveError, match="no space left"):
      ck.save_latest(1, _state(), {})
    ck.close()
    reported.clear()
    _write_finished_after_its_loop_closed(new_loop())
    assert reported == []
    _closed_loop_error_in_del()  # any other report still reaches the previous hook
    assert len(reported) == 1 and reported[0].object is not None
    assert str(reported[0].exc_value) == "Event loop is closed"
  finally:
    sys.unraisablehook = before
