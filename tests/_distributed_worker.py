"""One process of a multi-process data-parallel run, for tests/test_distributed.py.

Run as ``python tests/_distributed_worker.py --process_id=i --num_processes=N
--port=P --devices=D --out=DIR [--model_shards=M]``: joins the run through 127.0.0.1:P, trains a small
Mult-VAE for a few steps in ``mode='sharded'`` on the global batches of
:func:`problem` (feeding only its own shards), evaluates, and writes
``DIR/process_<i>.npz`` with the final parameters and the per-user NDCG.
"""

import argparse
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 120


def free_port():
  """A TCP port on 127.0.0.1 that is free now (for the coordinator)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(script, out, *args, processes=2, devices=2, timeout=TIMEOUT_S):
  """Runs ``processes`` copies of the worker ``script`` (a file of this folder) as one
  multi-process run of ``devices`` CPU devices each, writing to ``out``, and asserts
  that every one exits 0 (their logs' tails in the message)."""
  import subprocess
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # each worker sets its own device count
  port = free_port()
  procs, logs = [], []
  for i in range(processes):
    logs.append(open(os.path.join(out, f"log{i}.txt"), "w+"))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), f"--process_id={i}",
         f"--num_processes={processes}", f"--port={port}", f"--devices={devices}",
         f"--out={out}", *args], env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = ""
  for i, log in enumerate(logs):
    log.seek(0)
    text += f"--- process {i} ---\n{log.read()[-3000:]}\n"
    log.close()
  assert codes is not None, f"{script}: timed out after {timeout} s\n{text}"
  assert codes == [0] * processes, f"{script}: exit codes {codes}\n{text}"


def worker_parser():
  """The flags every worker takes (:func:`run_processes` passes them)."""
  p = argparse.ArgumentParser()
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--out", required=True)
  p.add_argument("--model_shards", type=int, default=1)
  return p


def join(a):
  """Gives this process ``a.devices`` CPU devices and joins the run; its ProcessInfo."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  from jax_vaecf.core import distributed
  info = distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id,
                                initialization_timeout=60)
  assert info.process_count == a.num_processes, info
  assert info.device_count == a.num_processes * a.devices, info
  return info


def flat(params):
  """A parameter pytree as ``{'a/b/kernel': numpy array}``."""
  import jax
  import numpy as np
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def problem(num_shards):
  """The model, step options, state and global batches, identical in every process."""
  import jax
  import numpy as np
  from jax_vaecf import model as model_lib
  from jax_vaecf.training import parallel
  from jax_vaecf.core import schedules
  from jax_vaecf.core import sparse as sparse_lib
  from jax_vaecf.training import steps as train_lib

  n_items = 64
  m = model_lib.build_model("multvae", n_items, hidden_dims=(16,), latent_dim=8)
  opt = train_lib.make_optimizer(1e-2)
  options = train_lib.StepOptions(beta_schedule=schedules.linear_schedule(0.2, 10))
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(7), options)
  rng = np.random.default_rng(0)
  # 14 users: not a multiple of 4 shards, so the last shard carries padding rows.
  batches = [parallel.pad_and_shard(sparse_lib.from_dense(
      (rng.random((14, n_items)) < 0.15).astype(np.float32)), num_shards)
             for _ in range(4)]
  x = (rng.random((10, n_items)) < 0.2).astype(np.float32)
  held = (rng.random((10, n_items)) < 0.1).astype(np.float32) * (1 - x)
  eval_batch = sparse_lib.EvalBatch(
      parallel.pad_and_shard(sparse_lib.from_dense(x), num_shards),
      parallel.pad_and_shard(sparse_lib.from_dense(held), num_shards))
  return m, options, state, batches, eval_batch


def run(steps, process_index, process_count, model_shards=1):
  """Trains on ``steps`` and returns host ``(params, per-user ndcg@10, losses)``;
  ``model_shards > 1``: on a (data, model) mesh with the items split over ``model``."""
  import numpy as np
  from jax_vaecf.core import distributed
  from jax_vaecf.training import parallel

  devices = parallel.resolve_devices(0)
  m, options, state, batches, eval_batch = problem(len(devices) // model_shards)
  ps = parallel.make_parallel_steps(m, options, mode="sharded", devices=devices,
                                    ks=(10,), model_shards=model_shards)
  st = ps.init_state(state)
  losses = []
  for b in batches[:steps]:
    st, met = ps.train_step(st, ps.put_batch(
        distributed.process_shards(b, process_index, process_count)))
    losses.append(float(ps.metrics_to_host(met)["loss"]))
  ev = ps.metrics_to_host(ps.eval_step(st, ps.put_batch(
      distributed.process_shards(eval_batch, process_index, process_count))))
  params = ps.to_host(st.params)
  return params, ev["ndcg@10"], np.asarray(losses)


def main():
  p = worker_parser()
  p.add_argument("--steps", type=int, default=4)
  a = p.parse_args()
  info = join(a)
  import numpy as np
  from jax_vaecf.core import distributed

  params, ndcg, losses = run(a.steps, info.process_index, info.process_count,
                             a.model_shards)
  np.savez(os.path.join(a.out, f"process_{a.process_id}.npz"), ndcg=ndcg, losses=losses,
           **{"param:" + k: v for k, v in flat(params).items()})
  distributed.shutdown()
  print(f"process {a.process_id}: done", file=sys.stderr)


if __name__ == "__main__":
  main()
