"""Item sharding on 8 virtual CPU devices, for tests/test_item_sharding.py.

Run as ``python tests/_mesh8_worker.py TMP_DIR OUT_JSON`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Writes::

  {"step": {mesh: {"loss", "max_state_diff"}},       # one step vs mesh 1x1
   "curves": {mesh: [validation ndcg@100 per epoch]},  # 4-epoch runs of the loop
   "resumed": {mesh: [...]}}                            # saved on 2x4 after 2 epochs,
                                                        # resumed on mesh for 2 more
"""

import json
import os
import shutil
import sys


def one_step(meshes):
  import jax
  import numpy as np
  from jax_vaecf import model as model_lib
  from jax_vaecf.training import parallel
  from jax_vaecf.core import schedules
  from jax_vaecf.core import sparse as sparse_lib
  from jax_vaecf.training import steps as train_lib

  n_items = 61  # no model axis divides it
  m = model_lib.build_model("multvae", n_items, hidden_dims=(16,), latent_dim=8)
  options = train_lib.StepOptions(beta_schedule=schedules.linear_schedule(0.2, 10),
                                  lam=0.01)
  state = train_lib.create_train_state(m, train_lib.make_optimizer(1e-2),
                                       jax.random.PRNGKey(3), options)
  rng = np.random.default_rng(1)
  x = (rng.random((21, n_items)) < 0.2).astype(np.float32)  # 21 rows: padding rows
  out, ref = {}, None
  for mesh in meshes:
    d, k = parallel.parse_mesh(mesh)
    ps = parallel.make_parallel_steps(m, options, devices=parallel.resolve_devices(d * k),
                                      ks=(10,), model_shards=k)
    st, met = ps.train_step(ps.init_state(state), ps.put_batch(
        parallel.pad_and_shard(sparse_lib.from_dense(x), ps.num_shards)))
    host = jax.tree_util.tree_leaves(ps.to_host(st))
    ref = host if ref is None else ref
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(host, ref))
    out[mesh] = {"loss": float(ps.metrics_to_host(met)["loss"]), "max_state_diff": diff}
  return out


def curve(workdir):
  import _runs
  return [r["ndcg@100"] for r in _runs.records(workdir) if r.get("split") == "validation"]


def main():
  tmp, out_path = sys.argv[1], sys.argv[2]
  import _runs
  from jax_vaecf.training import engine as loop

  result = {"step": one_step(("1x1", "8x1", "2x4", "1x8"))}
  data = os.path.join(tmp, "data")
  os.makedirs(data)
  import _synthetic
  _synthetic.write_movielens_csv(data)  # 150 items: padding columns on 4 and 8 shards
  cfg = _runs.small_config(data, cache_dir=os.path.join(tmp, "cache"), test=False,
                           batch_size_train=40, batch_size_validation=40)
  result["curves"] = {}
  for mesh in ("1x1", "8x1", "2x4", "1x8"):
    workdir = os.path.join(tmp, f"run_{mesh}")
    loop.run(cfg.replace(mesh=mesh, number_of_epochs=4), workdir)
    result["curves"][mesh] = curve(workdir)
  saved = os.path.join(tmp, "saved_2x4")
  loop.run(cfg.replace(mesh="2x4", number_of_epochs=2), saved)
  result["resumed"] = {"2x4": result["curves"]["2x4"]}
  for mesh in ("8x1", "1x1"):
    workdir = os.path.join(tmp, f"resumed_{mesh}")
    shutil.copytree(saved, workdir)
    loop.run(cfg.replace(mesh=mesh, number_of_epochs=4), workdir)
    result["resumed"][mesh] = curve(workdir)
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
