"""Item sharding on a (data, model) mesh: every mesh shape gives one device's updates.

In-process tests use the suite's 4 virtual CPU devices (meshes 1x1, 4x1, 2x2, 1x4);
``test_eight_devices`` runs ``_mesh8_worker.py`` with 8 (1x1, 8x1, 2x4, 1x8, training
runs and a checkpoint moved between mesh shapes).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_vaecf.core import item_shards
from jax_vaecf import model as model_lib
from jax_vaecf.training import parallel
from jax_vaecf.core import schedules
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_ITEMS = 63  # divides by none of the model axes: the last shard has padding columns
OPT = train_lib.make_optimizer(1e-2)
OPTIONS = train_lib.StepOptions(beta_schedule=schedules.linear_schedule(0.2, 10),
                                lam=0.01, ema_decay=0.9)
MODELS = ("multvae", "multdae", "recvae")


def _model(name, n_items=N_ITEMS):
  dims = (16, 16) if name == "recvae" else (16,)
  return model_lib.build_model(name, n_items, hidden_dims=dims, latent_dim=8)


def _batches():
  rng = np.random.default_rng(0)
  # 14 users do not divide over 4 data shards (padding rows); 3 users leave whole
  # shards empty.
  train = [(rng.random((b, N_ITEMS)) < 0.15).astype(np.float32) for b in (14, 14, 3)]
  x = (rng.random((10, N_ITEMS)) < 0.2).astype(np.float32)
  held = (rng.random((10, N_ITEMS)) < 0.1).astype(np.float32) * (1 - x)
  return train, (x, held)


def _steps(name, mesh, n_items=N_ITEMS):
  d, m = mesh
  return parallel.make_parallel_steps(
      _model(name, n_items), OPTIONS, ks=(5, 10),
      devices=parallel.resolve_devices(d * m), model_shards=m)


def _train(ps, name, state, xs):
  """Host losses and the placed state after one round of the model's phases per batch."""
  phases = _model(name).phases
  losses = []
  for xb in xs:
    for i, phase in enumerate(phases):
      if phase.refresh_frozen:
        state = ps.refresh_frozen(state)
      batch = ps.put_batch(parallel.pad_and_shard(sparse_lib.from_dense(xb), ps.num_shards))
      state, met = ps.train_steps[i](state, batch)
      losses.append(float(ps.metrics_to_host(met)["loss"]))
  return losses, state


def _evaluate(ps, state, eval_data):
  x, held = eval_data
  batch = sparse_lib.EvalBatch(parallel.pad_and_shard(sparse_lib.from_dense(x), ps.num_shards),
                               parallel.pad_and_shard(sparse_lib.from_dense(held),
                                                      ps.num_shards))
  return ps.metrics_to_host(ps.eval_step(state, batch))


def _fresh(name):
  return train_lib.create_train_state(_model(name), OPT, jax.random.PRNGKey(7), OPTIONS)


@functools.lru_cache(maxsize=None)
def _run(name, mesh):
  ps = _steps(name, mesh)
  train, eval_data = _batches()
  losses, state = _train(ps, name, ps.init_state(_fresh(name)), train)
  return losses, ps.to_host(state), _evaluate(ps, state, eval_data)


def _assert_trees_close(a, b, atol):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)


# Each case compiles a model on a mesh of the four devices: the fast tier keeps the 2 x 2
# mesh (both axes) of one model.
SLOW_TESTS = [f"test_every_mesh_gives_one_devices_updates[mesh{m}-{n}]"
              for m in range(3) for n in MODELS if (m, n) != (1, "multdae")]
SLOW_TESTS += ["test_no_device_holds_a_whole_item_array_and_padding_stays_zero"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mesh", [(4, 1), (2, 2), (1, 4)])
def test_every_mesh_gives_one_devices_updates(name, mesh):
  ref_losses, ref_state, ref_eval = _run(name, (1, 1))
  losses, state, evaluated = _run(name, mesh)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Parameters, both Adam moments and counts, the weight average, RecVAE's prior copy.
  _assert_trees_close(state, ref_state, atol=1e-6)
  for k in ("ndcg@5", "ndcg@10", "recall@10", "n_heldout", "valid"):
    np.testing.assert_allclose(evaluated[k][:10], ref_eval[k][:10], atol=1e-6)  # 10 users


def test_item_axes_are_found_for_every_model():
  for name in MODELS:
    m = _model(name)
    axes = item_shards.item_axes(
        lambda n, m=m: train_lib.init_params(m.clone(n_items=n), jax.random.PRNGKey(0)),
        N_ITEMS)
    flat = {jax.tree_util.keystr(p): a for p, a in
            jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda v: v is None)[0]}
    first = "['encoder']['input']['kernel']" if name == "recvae" else "['encoder_in']['kernel']"
    out = f"['{m.output_layer}']"
    assert flat[first] == 0
    assert flat[out + "['kernel']"] == 1 and flat[out + "['bias']"] == 0
    split = {k for k, a in flat.items() if a is not None}
    assert split == {first, out + "['kernel']", out + "['bias']"}, name


def test_no_device_holds_a_whole_item_array_and_padding_stays_zero():
  ps = _steps("recvae", (2, 2))
  state = ps.init_state(_fresh("recvae"))
  _, state = _train(ps, "recvae", state, _batches()[0])
  per = ps.item_shards.per_shard
  assert per * 2 == 64 and ps.item_shards.padded > N_ITEMS
  checked = 0
  for path, a in jax.tree_util.tree_flatten_with_path(state)[0]:
    spec = tuple(a.sharding.spec)
    if parallel.ITEM_AXIS not in spec:
      continue
    axis = spec.index(parallel.ITEM_AXIS)
    for shard in a.addressable_shards:
      assert shard.data.shape[axis] == per, jax.tree_util.keystr(path)
    full = np.asarray(a)
    padding = np.take(full, np.arange(N_ITEMS, ps.item_shards.padded), axis=axis)
    assert np.all(padding == 0), jax.tree_util.keystr(path)
    checked += 1
  # params, ema, prior copy: 1 + 2 + 0 ... first layer, output kernel and bias, with
  # Adam mu and nu of each phase that trains them.
  assert checked >= 10


def test_state_bytes_per_device_fall_as_one_over_the_model_axis():
  name, n_items = "multvae", 4000
  host = train_lib.create_train_state(_model(name, n_items), OPT, jax.random.PRNGKey(0),
                                      OPTIONS)
  sizes = {}
  for m in (1, 2, 4):
    ps = _steps(name, (1, m), n_items)
    sizes[m] = ps.device_bytes(ps.init_state(host))
  for m in (2, 4):
    assert sizes[m] / sizes[1] == pytest.approx(1 / m, rel=0.1), sizes


# Compiles the state on every mesh shape; the module's other checks stay fast.
SLOW_TESTS += ["test_state_moves_between_mesh_shapes"]


def test_state_moves_between_mesh_shapes():
  name = "multvae"
  train, eval_data = _batches()
  ps22 = _steps(name, (2, 2))
  _, state = _train(ps22, name, ps22.init_state(_fresh(name)), train[:2])
  host = ps22.to_host(state)
  assert host.params[_model(name).output_layer]["bias"].shape == (N_ITEMS,)  # unpadded
  finals = []
  for mesh in ((2, 2), (1, 4), (1, 1)):
    ps = _steps(name, mesh)
    losses, st = _train(ps, name, ps.init_state(host), train[2:])
    finals.append((losses, ps.to_host(st), _evaluate(ps, st, eval_data)["ndcg@10"][:10]))
  for losses, st, ndcg in finals[1:]:
    np.testing.assert_allclose(losses, finals[0][0], rtol=1e-5)
    _assert_trees_close(st, finals[0][1], atol=1e-6)
    np.testing.assert_allclose(ndcg, finals[0][2], atol=1e-6)


def test_a_diverged_shard_is_flagged_in_evaluation():
  ps = _steps("multvae", (1, 4))
  host = _fresh("multvae")
  layer = _model("multvae").output_layer
  kernel = np.array(host.params[layer]["kernel"])
  kernel[:, N_ITEMS - 1] = np.nan  # an item of the last shard only
  host = host.replace(params={**host.params, layer: {**host.params[layer],
                                                     "kernel": kernel}},
                      ema_params=None)
  x, held = _batches()[1]
  batch = sparse_lib.EvalBatch(parallel.pad_and_shard(sparse_lib.from_dense(x), 1),
                               parallel.pad_and_shard(sparse_lib.from_dense(held), 1))
  placed = ps.init_state(host.replace(ema_params=host.params))
  out = ps.metrics_to_host(ps.eval_step(placed.params, ps.put_batch(batch)))
  assert out["nonfinite"][:10].all()


def test_merge_top_k_breaks_ties_by_the_lower_item():
  mesh = parallel.Mesh(np.array(jax.devices()[:2]), ("model",))
  scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0, 1.0]], np.float32)

  def body(s):
    shards = item_shards.ItemShards("model", 2, 8)
    top, where = jax.lax.top_k(s, 3)
    _, items, _ = item_shards.merge_top_k(top, where + shards.offset(), top, 3, "model")
    return items

  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=parallel.P(None, "model"),
                              out_specs=parallel.P(), check_vma=False))(scores)
  assert np.asarray(got).tolist() == [[1, 2, 4]]
  assert np.asarray(jax.lax.top_k(scores, 3)[1]).tolist() == [[1, 2, 4]]


def test_bad_item_sharding_requests():
  m = _model("multvae")
  with pytest.raises(ValueError, match="mode 'sharded'"):
    parallel.make_parallel_steps(m, OPTIONS, mode="pmap", model_shards=2,
                                 devices=parallel.resolve_devices(2))
  with pytest.raises(ValueError, match="must divide"):
    parallel.make_parallel_steps(m, OPTIONS, model_shards=3,
                                 devices=parallel.resolve_devices(4))
  dense = train_lib.StepOptions(input_format="dense")
  with pytest.raises(ValueError, match="sparse"):
    parallel.make_parallel_steps(m, dense, model_shards=2,
                                 devices=parallel.resolve_devices(2))
  with pytest.raises(ValueError, match="cannot be split"):
    item_shards.ItemShards("model", 8, 5)
  for text in ("2x", "x2", "0x1", "2*4", ""):
    with pytest.raises(ValueError):
      parallel.parse_mesh(text)
  assert parallel.parse_mesh("2x4") == (2, 4)
  ps = _steps("multvae", (1, 2))
  with pytest.raises(ValueError, match="placed on its mesh"):
    ps.eval_step(_fresh("multvae").params, None)  # host arrays, not the mesh's


def test_bad_mesh_settings_are_refused_before_any_work():
  from jax_vaecf.training import configs
  configs.validate(configs.Config().replace(mesh="2x4"))
  for changes, message in (
      ({"mesh": "2x"}, "mesh must be DATAxMODEL"),
      ({"mesh": "0x4"}, "mesh must be DATAxMODEL"),
      ({"mesh": "1x2", "gpu_number": 0}, "not both"),
      ({"mesh": "1x2", "input_format": "dense"}, "input_format=sparse"),
      ({"mesh": "1x2", "parallel": "pmap"}, "parallel=sharded")):
    with pytest.raises(ValueError, match=message):
      configs.validate(configs.Config().replace(**changes))
  configs.validate(configs.Config().replace(mesh="4x1", input_format="dense"))


def test_eight_devices(tmp_path):
  """Meshes 1x1, 8x1, 2x4 and 1x8: one step, a training run's validation curve, and a
  run saved on 2x4 resumed on 8x1 and on 1x1 (see _mesh8_worker.py)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = tmp_path / "result.json"
  proc = subprocess.run([sys.executable, os.path.join(HERE, "_mesh8_worker.py"),
                         str(tmp_path), str(out)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  ref = result["step"]["1x1"]
  for mesh in ("8x1", "2x4", "1x8"):
    got = result["step"][mesh]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), mesh
    assert got["max_state_diff"] < 1e-6, mesh
  curves = result["curves"]
  for mesh in ("8x1", "2x4", "1x8"):
    np.testing.assert_allclose(curves[mesh], curves["1x1"], atol=2e-4, err_msg=mesh)
  resumed = result["resumed"]
  for mesh in ("8x1", "1x1"):
    np.testing.assert_allclose(resumed[mesh], resumed["2x4"], atol=2e-4, err_msg=mesh)


@pytest.mark.parametrize("name", MODELS)
def test_state_made_on_the_mesh_equals_the_host_state(name):
  host = _fresh(name)
  for mesh in ((1, 1), (2, 2), (1, 4)):
    ps = _steps(name, mesh)
    made = ps.create_state(OPT, jax.random.PRNGKey(7))
    if mesh[1] > 1:  # item arrays split: each device holds its shard only
      layer = _model(name).output_layer
      kernel = made.params[layer]["kernel"]
      assert {s.data.shape for s in kernel.addressable_shards} == {
          (16 if name != "recvae" else 8, ps.item_shards.per_shard)}
    for a, b in zip(jax.tree_util.tree_leaves(ps.to_host(made)),
                    jax.tree_util.tree_leaves(host)):
      np.testing.assert_array_equal(a, np.asarray(b))


# RecVAE's state on the mesh (8 s); Mult-VAE's and Mult-DAE's stay in the fast tier.
SLOW_TESTS += ['test_state_made_on_the_mesh_equals_the_host_state[recvae]']
