"""Training and evaluation throughput of Mult-VAE on synthetic data of a real shape.

  python -m experiments.benchmark                       # ML-20M shape, batch 500, fp32
  python -m experiments.benchmark --batch_size=10000 --precision=bf16
  python -m experiments.benchmark --steps=40            # time 40 steps, extrapolate
  python -m experiments.benchmark --sweep_items=5000,20000,80000,295041 --steps=20

The data (:mod:`experiments.synthetic`) is built directly as CSR with ML-20M's shape
by default: 116,677 training users, 20,108 items, ~73 interactions per user, 10,000
held-out users with an 80/20 fold-in split. Batches go through the project's own host
pipeline (:class:`jax_vaecf.data.TrainBatcher` and :func:`jax_vaecf.data.prefetch`), so
the numbers include it.

Timing: every nnz bucket shape is compiled first (one step per shape on an empty batch;
reported as compile time), then ``--epochs`` full epochs are timed, or, with
``--steps=N``, the first N steps of an epoch, extrapolated to the epoch's step count and
marked ``extrapolated``. Metrics are read once, after the timed steps, as the training
loop does. Evaluation: a first pass over the held-out users compiles, a second is timed
(top-100 over all items with the fold-in items removed, via ``make_eval_step``).

Prints a table and one JSON line (also written to ``--json_out``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

from absl import app
from absl import flags

from experiments import cli

_FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 500, "Training users per step.")
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16", "fp16"], "Matmul precision.")
flags.DEFINE_integer("number_of_devices", 1, "Devices to split each batch over.")
flags.DEFINE_integer("n_items", 20_108, "Items (ML-20M: 20,108).")
flags.DEFINE_integer("n_users", 116_677, "Training users (ML-20M: 116,677).")
flags.DEFINE_float("mean_per_user", 73.0, "Mean interactions per user (ML-20M: ~73).")
flags.DEFINE_enum("input_format", "auto", ["auto", "sparse", "dense"],
                  "First-layer input path; auto picks the platform's default.")
flags.DEFINE_integer("output_chunk_size", 1024,
                     "Users per chunk of the output layer in training and evaluation "
                     "(sparse path).")
flags.DEFINE_float("ema_decay", 0.0,
                   "Above 0: also keep the moving average of the weights each step "
                   "(evaluation then scores it).")
flags.DEFINE_integer("epochs", 1, "Full epochs to time (ignored with --steps).")
flags.DEFINE_integer("steps", 0, "If > 0, time this many steps and extrapolate to an epoch.")
flags.DEFINE_integer("eval_users", 10_000, "Held-out users to evaluate (0: skip).")
flags.DEFINE_integer("eval_batch_size", 2_000, "Users per evaluation batch.")
flags.DEFINE_list("sweep_items", [], "Item counts: report epoch time for each (uses --steps).")
flags.DEFINE_string("json_out", "", "Also write the JSON result(s) to this path.")
flags.DEFINE_integer("seed", 0, "Seed of the data and the model.")
flags.DEFINE_string("model", "multvae", "multvae or multdae.")
flags.DEFINE_bool("serving", False, "Instead of training: latency at batch 1 and "
                  "throughput at batch 10,000 of the Recommender and of an exported "
                  "artefact, for the paper's model at --n_items (random weights: the "
                  "cost does not depend on them).")


def run_serving(n_items: int, model_name: str, seed: int, k: int = 10) -> list[dict]:
  """Both serving paths timed on a freshly initialised paper-sized model."""
  import tempfile

  import jax
  import numpy as np

  from experiments import export as export_cli
  from jax_vaecf import export as export_lib
  from jax_vaecf import model as model_lib
  from jax_vaecf import recommend as recommend_lib
  from jax_vaecf import train as train_lib

  model = model_lib.build_model(model_name, n_items)
  params = train_lib.init_params(model, jax.random.PRNGKey(seed))
  rec = recommend_lib.Recommender(model, params, np.arange(n_items, dtype=np.int64))
  with tempfile.TemporaryDirectory() as tmp:
    out = f"{tmp}/artefact"
    export_lib.write_artifact(out, model, params, rec.item_ids, k,
                              model_info={"model": model_name})
    rows = export_cli.benchmark(rec, out, k)
  for r in rows:
    r.update(n_items=n_items, model=model_name, device_kind=jax.devices()[0].device_kind)
  return rows


def _versions() -> dict:
  import flax
  import jax
  import jaxlib
  import numpy as np
  import optax
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "python": platform.python_version(), "cpu_model": cpu,
          "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _peak_host_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _peak_device_gb(devices) -> float | None:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"] / 2**30)
  return max(peaks) if peaks else None


def run_one(n_items: int, *, steps: int, epochs: int, eval_users: int) -> dict:
  """Builds the data and the steps for one configuration and times them."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from experiments import synthetic
  from jax_vaecf import data as data_lib
  from jax_vaecf import model as model_lib
  from jax_vaecf import precision as precision_lib
  from jax_vaecf import schedules
  from jax_vaecf import sparse as sparse_lib
  from jax_vaecf import train as train_lib

  f = _FLAGS
  platform_name = jax.default_backend()
  devices = jax.devices()[:f.number_of_devices]
  if len(devices) < f.number_of_devices:
    raise ValueError(f"--number_of_devices={f.number_of_devices} but only "
                     f"{len(jax.devices())} {platform_name} devices exist")
  input_format = f.input_format
  if input_format == "auto":
    input_format = train_lib.default_input_format(platform_name)
  k = f.number_of_devices
  shards = None if k == 1 else k

  t0 = time.perf_counter()
  train_csr, eval_split = synthetic.make_dataset(
      n_users=f.n_users, n_items=n_items, n_eval_users=max(eval_users, 1),
      mean_per_user=f.mean_per_user, seed=f.seed)
  data_s = time.perf_counter() - t0

  policy = precision_lib.get_policy(f.precision)
  model = model_lib.build_model(f.model, n_items, dtype=policy.compute_dtype)
  opt = train_lib.make_optimizer(1e-3)
  state = train_lib.create_train_state(model, opt, jax.random.PRNGKey(f.seed),
                                       loss_scaling=policy.loss_scaling,
                                       weight_average=f.ema_decay > 0)
  step_fn = train_lib.make_train_step(model, opt, schedules.linear_schedule(0.2, 200_000),
                                      input_format=input_format,
                                      output_chunk_size=f.output_chunk_size,
                                      loss_scaling=policy.loss_scaling,
                                      ema_decay=f.ema_decay)
  eval_fn = train_lib.make_eval_step(model, (100,), input_format=input_format,
                                     output_chunk_size=f.output_chunk_size)
  if shards:
    # The steps vmap over the leading shard axis; splitting it over a mesh makes jit
    # run one shard per device and sum the gradients across them.
    mesh = Mesh(np.array(devices), ("data",))
    split = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    put = lambda b: jax.device_put(b, split)
    state = jax.device_put(state, replicated)
  else:
    put = lambda b: jax.device_put(b, devices[0])
    state = jax.device_put(state, devices[0])
  train_step = jax.jit(step_fn, donate_argnums=0)
  eval_step = jax.jit(eval_fn)

  batcher = data_lib.TrainBatcher(train_csr, f.batch_size, f.seed, num_shards=shards)
  # Compile every shape an epoch can produce, on empty batches (all rows padding).
  t0 = time.perf_counter()
  lead = () if shards is None else (k,)
  rows_per = f.batch_size // k
  for nnz in batcher.nnz_buckets:
    empty = sparse_lib.SparseBatch(np.zeros(lead + (nnz,), np.int32),
                                   np.zeros(lead + (nnz,), np.int32),
                                   np.zeros(lead + (nnz,), np.float32),
                                   np.zeros(lead + (rows_per,), np.float32))
    state, m = train_step(state, put(empty))
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t0

  n_steps = batcher.steps_per_epoch
  timed_steps = min(steps, n_steps) if steps > 0 else n_steps * epochs
  t0 = time.perf_counter()
  done = 0
  metrics = None
  for epoch in range(1 if steps > 0 else epochs):
    batches = batcher.epoch_batches(epoch + 1)
    for batch in data_lib.prefetch(batches, size=2, put=put):
      state, metrics = train_step(state, batch)
      done += 1
      if done == timed_steps:
        break
  loss = float(jax.device_get(metrics["loss"]))  # the one host sync, as in the loop
  train_s = time.perf_counter() - t0
  step_s = train_s / done
  epoch_s = step_s * n_steps
  users_s = f.n_users / epoch_s

  out = {
      "n_users": f.n_users, "n_items": n_items, "batch_size": f.batch_size,
      "precision": f.precision, "input_format": input_format,
      "output_chunk_size": f.output_chunk_size, "model": f.model,
      "ema_decay": f.ema_decay,
      "number_of_devices": k, "platform": platform_name,
      "device_kind": devices[0].device_kind,
      "train_nnz": int(train_csr.nnz), "steps_per_epoch": n_steps,
      "timed_steps": done, "extrapolated": steps > 0 and done < n_steps,
      "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 2),
      "epoch_s": round(epoch_s, 2), "train_users_per_s": round(users_s, 1),
      "final_loss": loss, "data_gen_s": round(data_s, 2),
      "nnz_buckets": list(batcher.nnz_buckets),
  }
  if not np.isfinite(loss):
    raise FloatingPointError(f"training loss is {loss}")

  if eval_users > 0:
    params = state.eval_params

    def eval_pass():
      outs = []
      for b in data_lib.prefetch(
          data_lib.eval_batches(eval_split, f.eval_batch_size, num_shards=shards),
          size=2, put=put):
        outs.append(eval_step(params, b)["ndcg@100"])
      return jax.device_get(outs)

    t0 = time.perf_counter()
    eval_pass()  # compiles every shape
    eval_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_pass()
    eval_s = time.perf_counter() - t0
    out.update(eval_users=eval_users, eval_s=round(eval_s, 3),
               eval_users_per_s=round(eval_users / eval_s, 1),
               eval_first_pass_s=round(eval_compile_s, 2))
  out["peak_host_gb"] = round(_peak_host_gb(), 2)
  dev = _peak_device_gb(devices)
  if dev is not None and platform_name != "cpu":
    out["peak_device_gb"] = round(dev, 2)
  return out


def format_table(rows: list[dict]) -> str:
  cols = [("n_items", "items"), ("batch_size", "batch"), ("precision", "prec"),
          ("input_format", "input"), ("compile_s", "compile s"), ("step_ms", "step ms"),
          ("epoch_s", "epoch s"), ("train_users_per_s", "train users/s"),
          ("eval_users_per_s", "eval users/s"), ("peak_host_gb", "host GB"),
          ("peak_device_gb", "device GB")]
  cols = [c for c in cols if any(c[0] in r for r in rows)]
  lines = ["| " + " | ".join(h for _, h in cols) + " | note |",
           "|" + "---|" * (len(cols) + 1)]
  for r in rows:
    note = (f"extrapolated from {r['timed_steps']} of {r['steps_per_epoch']} steps"
            if r["extrapolated"] else f"{r['timed_steps']} steps timed")
    lines.append("| " + " | ".join(str(r.get(c, "")) for c, _ in cols) + f" | {note} |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = _FLAGS
  if f.serving:
    from experiments import export as export_cli
    rows = run_serving(f.n_items, f.model, f.seed)
    info = _versions()
    print(f"machine: {info['cpu_model']} ({info['cpu_count']} cores), device "
          f"{rows[0]['device_kind']}; {f.model} over {f.n_items:,} items, top 10, 20 "
          "items per user")
    print(export_cli.format_benchmark(rows))
    record = {"serving": rows, "versions": info, "argv": sys.argv[1:]}
    print(json.dumps(record))
    if f.json_out:
      with open(f.json_out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return
  if f.batch_size % f.number_of_devices:
    raise app.UsageError("--batch_size must be divisible by --number_of_devices")
  items = [int(x) for x in f.sweep_items] or [f.n_items]
  results = []
  for n in items:
    r = run_one(n, steps=f.steps, epochs=f.epochs,
                eval_users=f.eval_users if not f.sweep_items else 0)
    results.append(r)
    print(json.dumps(r), flush=True)
  info = _versions()
  print(f"\nmachine: {info['cpu_model']} ({info['cpu_count']} cores), device "
        f"{results[0]['device_kind']}; jax {info['jax']}, jaxlib {info['jaxlib']}, flax "
        f"{info['flax']}, optax {info['optax']}, numpy {info['numpy']}, python "
        f"{info['python']}")
  print(format_table(results))
  record = {"results": results, "versions": info, "argv": sys.argv[1:]}
  line = json.dumps(record)
  print(line)
  if f.json_out:
    with open(f.json_out, "a") as fh:
      fh.write(line + "\n")


if __name__ == "__main__":
  cli.run(main)
