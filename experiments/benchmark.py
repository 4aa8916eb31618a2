"""Training and evaluation throughput of a model on synthetic data of a real shape.

  python -m experiments.benchmark                       # ML-20M shape, batch 500, fp32
  python -m experiments.benchmark --model=recvae --steps=20  # a RecVAE round vs Mult-VAE
  python -m experiments.benchmark --batch_size_train=10000 --precision=bf16
  python -m experiments.benchmark --steps=40            # time 40 steps, extrapolate
  python -m experiments.benchmark --sweep_items=5000,20000,80000,295041 --steps=20
  python -m experiments.benchmark --config=ml1m --n_items=3416 --n_users=4838
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m experiments.benchmark --mesh=1x8 --n_items=295041 --steps=3  # item-sharded

The model, optimiser, KL schedule, batch sizes, precision, input format, output chunks,
weight average, seed and devices are ``experiments.train``'s settings, taken the same way
(``--config=PRESET``, default ``ml20m``, and the flag of any Config field; ``--help``
lists them), so the benchmark times what ``train`` would run with the same flags. The
other Config settings (data set, split, epochs, validation, checkpoints) do not apply to
it and are refused when given. ``--batch_size`` and ``--eval_batch_size`` are deprecated
names of ``--batch_size_train`` and ``--batch_size_validation``.

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

``--mesh=DxM`` runs the steps on a ``(data, model)`` mesh (:mod:`jax_vaecf.training.parallel`); the
table reports the mesh and the bytes of the train state (parameters, Adam moments,
weight average, frozen copies) held by one device, which falls as ``1 / M`` for the
item-indexed arrays.

Work per step: XLA's own count of floating-point operations and bytes accessed by each
phase's compiled step (``cost_analysis``, on the middle nnz bucket's shape; a loop body,
such as the CPU first layer's entry loop, is counted once), averaged over a round's
passes and summed over the devices, and the rate it implies (``xla_gflop_per_step`` /
``step_ms``). For a model other than Mult-VAE the table also gives its round's
operations as a ratio of the Mult-VAE epoch's: the time ratio the two would have if
they ran at the same rate. Steps that are not a plain ``jax.jit`` (item-sharded meshes),
or a backend that reports no count, give none.

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
from experiments import synthetic

_FLAGS = flags.FLAGS

# The benchmark's names before it took the Config flags; kept so old commands still run.
ALIASES = {"batch_size": "batch_size_train", "eval_batch_size": "batch_size_validation"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's command line: the data's shape (:mod:`experiments.synthetic`), its own
  flags and the Config flags with :data:`ALIASES`. Defined when it runs, not at import:
  other tools have flags of the same names."""
  fv = flag_values
  synthetic.define_shape_flags(fv)
  flags.adopt_module_key_flags(synthetic, flag_values=fv)
  flags.DEFINE_integer("epochs", 1, "Full epochs to time (ignored with --steps).",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 0, "If > 0, time this many steps and extrapolate to an "
                       "epoch.", flag_values=fv)
  flags.DEFINE_integer("eval_users", 10_000, "Held-out users to evaluate (0: skip).",
                       flag_values=fv)
  flags.DEFINE_list("sweep_items", [], "Item counts: report epoch time for each (uses "
                    "--steps).", flag_values=fv)
  flags.DEFINE_string("json_out", "", "Also write the JSON result(s) to this path.",
                      flag_values=fv)
  flags.DEFINE_bool("compare_multvae", True, "With --model other than multvae: first time "
                    "a Mult-VAE epoch (the paper's widths, the same other settings) in the "
                    "same run and report the model's epoch as a ratio of it.",
                    flag_values=fv)
  flags.DEFINE_bool("serving", False, "Instead of training: latency at batch 1 and "
                    "throughput at batch 10,000 of the Recommender and of an exported "
                    "artefact, for the configured model at --n_items (random weights: the "
                    "cost does not depend on them).", flag_values=fv)
  cli.define_config_flags(fv, aliases=ALIASES)


# The Config settings the benchmark reads. Any other one given on the command line is
# refused, not ignored: the synthetic data has no data set, split or checkpoints, and a
# setting that silently did nothing would make a number look like something it is not.
def used_settings() -> frozenset:
  from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
  return frozenset(configs.tagged("synthetic")) | frozenset(configs.model_setting_names())


def check_settings(given: dict) -> None:
  """Raises ``app.UsageError`` for given Config settings the benchmark does not use."""
  unused = [name for name in given if name not in used_settings()]
  if unused:
    raise app.UsageError(
        f"{', '.join('--' + n for n in unused)}: not used by the benchmark (synthetic data "
        "of --n_users x --n_items, timed for --epochs or --steps; no split, validation "
        "or checkpoints)")
  # Its steps are jit over a device mesh, i.e. the sharded mode.
  if given.get("parallel", "sharded") != "sharded":
    raise app.UsageError("--parallel: the benchmark times the sharded mode only")


def select_devices(cfg) -> list:
  """The run's devices as the engine selects them (:func:`jax_vaecf.training.engine.select_devices`:
  ``--mesh``, ``--gpu_number`` or ``--number_of_devices``), a refusal as a usage error."""
  from jax_vaecf.training import engine as loop

  try:
    return loop.select_devices(cfg)
  except ValueError as e:
    hint = (" (more virtual CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
            if cfg.mesh or cfg.number_of_devices > 1 else "")
    raise app.UsageError(f"{e}{hint}") from None


def run_serving(cfg, n_items: int, k: int = 10) -> list[dict]:
  """Both serving paths timed on a freshly initialised model of ``cfg``'s shape."""
  import tempfile

  import jax
  import numpy as np

  from experiments import serve_bench
  from jax_vaecf.serving import export as export_lib
  from jax_vaecf.serving import recommender as recommend_lib
  from jax_vaecf.training import steps as train_lib

  model_name = cfg.model
  from jax_vaecf.training import engine as loop
  model = loop.build_model(loop.resolve_precision(cfg), n_items)
  params = train_lib.init_params(model, jax.random.PRNGKey(cfg.seed))
  rec = recommend_lib.Recommender(model, params, np.arange(n_items, dtype=np.int64))
  with tempfile.TemporaryDirectory() as tmp:
    out = f"{tmp}/artefact"
    export_lib.write_artifact(out, model, params, rec.item_ids, k,
                              model_info={"model": model_name})
    rows = serve_bench.time_paths(rec, out, k)
  for r in rows:
    r.update(n_items=n_items, model=model_name, device_kind=jax.devices()[0].device_kind)
  return rows


def _versions() -> dict:
  import flax
  import jax
  import jaxlib
  import numpy as np
  import optax

  from jax_vaecf.core import machine
  from jax_vaecf.core import host_memory
  cpu = machine.cpu_model()
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "python": platform.python_version(), "cpu_model": cpu,
          "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "reuse_host_memory": host_memory.applied()}


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


def xla_work_per_step(par, state, batch, n_devices: int) -> dict:
  """XLA's count of a step's work on ``batch``, summed over the ``n_devices`` devices
  (XLA counts one device's partitioned program): ``'xla_gflop_per_step'`` and
  ``'xla_gb_per_step'``, the phases' compiled steps weighted by their passes in a
  round, and for a model of several phases ``'xla_phases'`` (name -> ``{'gflop',
  'gb'}``, one step of that phase). ``{}`` where a step cannot be lowered on its own
  (item-sharded steps) or the backend reports no operation count."""
  phases = {}
  for phase, step in zip(par.phases, par.train_steps):
    if not hasattr(step, "lower"):
      return {}
    cost = step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "flops" not in cost or "bytes accessed" not in cost:
      return {}
    phases[phase.name] = (phase.passes, n_devices * float(cost["flops"]) / 1e9,
                          n_devices * float(cost["bytes accessed"]) / 1e9)
  passes = sum(p for p, _, _ in phases.values())
  work = {"xla_gflop_per_step": round(sum(p * g for p, g, _ in phases.values()) / passes, 3),
          "xla_gb_per_step": round(sum(p * b for p, _, b in phases.values()) / passes, 3)}
  if len(phases) > 1:
    work["xla_phases"] = {name: {"gflop": round(g, 3), "gb": round(b, 3)}
                          for name, (_, g, b) in phases.items()}
  return work


_START = time.perf_counter()


def _note(message: str) -> None:
  """A progress line on stderr (stdout holds the results), with the seconds so far."""
  print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def run_one(cfg, devices: list, n_items: int, *, steps: int, epochs: int,
            eval_users: int) -> dict:
  """Builds the data and the steps of ``cfg`` for ``n_items`` items and times them: one
  result (a row of the table) with the training times, the evaluation times when
  ``eval_users`` is above 0, and the peak memory. ``FloatingPointError`` when the loss
  after the timed steps is not finite."""
  import numpy as np

  f = _FLAGS
  t0 = time.perf_counter()
  _note(f"{cfg.model}, {n_items:,} items: making {f.n_users:,} synthetic users")
  train_csr, eval_split = synthetic.make_dataset(
      n_users=f.n_users, n_items=n_items, n_eval_users=max(eval_users, 1),
      mean_per_user=f.mean_per_user, seed=cfg.seed)
  data_s = time.perf_counter() - t0
  out, par, state = _timed_training(cfg, devices, train_csr, data_s, steps=steps,
                                    epochs=epochs)
  loss = out["final_loss"]
  if not np.isfinite(loss):
    raise FloatingPointError(f"training loss is {loss}")
  _note(f"trained: {out['step_ms']:.1f} ms a step, final loss {loss:.4f}")
  if eval_users > 0:
    _note(f"timing the evaluation of {eval_users:,} users")
    out.update(_timed_evaluation(par, state, eval_split, cfg.batch_size_validation,
                                 eval_users))
  out.update(_peak_memory(devices))
  return out


def _timed_training(cfg, devices: list, train_csr, data_s: float, *, steps: int,
                    epochs: int) -> tuple[dict, object, object]:
  """Compiles and times the training steps of ``cfg`` on ``train_csr`` (CSR float32,
  ``(n_users, n_items)``): the result's settings and training times (``data_s``, the
  seconds the data took, among them), the steps and the trained state."""
  import jax

  from jax_vaecf.training import engine as loop
  from jax_vaecf import data as data_lib

  f = _FLAGS
  n_items = train_csr.shape[1]
  # The model, optimiser, steps, placement and epoch loop of a training run: the
  # loop's own functions, so these numbers are the loop's numbers.
  built = loop.build(cfg, n_items, train_csr.shape[0])
  par = built.steps
  state = loop.placed_fresh_state(cfg, built)
  batcher = data_lib.TrainBatcher(train_csr, cfg.batch_size_train, cfg.seed,
                                  num_shards=par.num_shards)
  _note(f"compiling the step for {len(batcher.nnz_buckets)} batch shapes")
  state, compile_s, work = _compile_every_shape(par, state, batcher, cfg.batch_size_train,
                                                len(devices))
  _note(f"compiled in {compile_s:.1f}s; timing "
        + (f"{min(steps, batcher.steps_per_epoch)} steps" if steps > 0
           else f"{epochs} epochs"))
  n_steps = batcher.steps_per_epoch
  # One epoch is one round of the model's phases: passes_per_epoch passes of the data.
  passes = loop.passes_per_epoch(par)
  per_pass = min(steps, n_steps) if steps > 0 else n_steps
  state, loss, done, train_s = _train_epochs(
      par, state, batcher, cfg.prefetch, epochs=1 if steps > 0 else epochs,
      max_steps=per_pass if steps > 0 else None)
  step_s = train_s / done
  # Every pass of the round was cut to per_pass steps, so the round scales as a whole.
  epoch_s = train_s / (done / passes) * n_steps
  users_s = f.n_users / epoch_s
  out = {
      "n_users": f.n_users, "n_items": n_items, "batch_size": cfg.batch_size_train,
      "precision": cfg.precision, "input_format": cfg.input_format,
      "output_chunk_size": cfg.output_chunk_size, "model": cfg.model,
      "ema_decay": cfg.ema_decay,
      "number_of_devices": len(devices), "mesh": f"{par.num_shards}x{par.model_shards}",
      "state_mb_per_device": round(par.device_bytes(state) / 2**20, 2),
      "platform": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "train_nnz": int(train_csr.nnz), "steps_per_epoch": n_steps,
      "passes_per_epoch": passes,
      "timed_steps": done, "extrapolated": steps > 0 and per_pass < n_steps,
      "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 2),
      "epoch_s": round(epoch_s, 2), "train_users_per_s": round(users_s, 1),
      "final_loss": loss, "data_gen_s": round(data_s, 2),
      "nnz_buckets": list(batcher.nnz_buckets),
      **work,
  }
  if work:
    out["xla_gflop_per_s"] = round(work["xla_gflop_per_step"] / step_s, 1)
  return out, par, state


def _compile_every_shape(par, state, batcher, batch_size: int,
                         n_devices: int) -> tuple[object, float, dict]:
  """Compiles every phase's step for every nnz bucket shape an epoch can produce, by
  running it on an empty batch (all rows padding): the state after, the seconds it took,
  and XLA's count of a step's work (:func:`xla_work_per_step`, on the middle bucket)."""
  import jax
  import numpy as np

  from jax_vaecf.core import sparse as sparse_lib

  t0 = time.perf_counter()
  # A batch that does not divide over the shards is padded, as in training.
  rows_per = -(-batch_size // par.num_shards)

  def empty_batch(nnz):
    return par.put_batch(sparse_lib.SparseBatch(
        np.zeros((par.num_shards, nnz), np.int32), np.zeros((par.num_shards, nnz), np.int32),
        np.zeros((par.num_shards, nnz), np.float32),
        np.zeros((par.num_shards, rows_per), np.float32)))

  for nnz in batcher.nnz_buckets:
    for train_step in par.train_steps:  # every phase's step
      state, m = train_step(state, empty_batch(nnz))
  if any(p.refresh_frozen for p in par.phases):
    state = par.refresh_frozen(state)
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t0
  work = xla_work_per_step(
      par, state, empty_batch(batcher.nnz_buckets[len(batcher.nnz_buckets) // 2]), n_devices)
  return state, compile_s, work


def _train_epochs(par, state, batcher, prefetch: int, *, epochs: int,
                  max_steps: int | None) -> tuple[object, float, int, float]:
  """Runs ``epochs`` epochs of the training loop (each pass cut to ``max_steps`` steps
  unless None): the state after, the last step's loss, the steps run and the seconds
  they took."""
  from jax_vaecf.training import engine as loop

  train_s, done, host_metrics = 0.0, 0, []
  for epoch in range(epochs):
    # Epoch numbers from 1: the warm-up above is not an epoch of the data.
    state, host_metrics, seconds = loop.train_epoch(
        par, state, batcher, epoch + 1, prefetch, max_steps=max_steps)
    train_s += seconds
    done += len(host_metrics)
  return state, float(host_metrics[-1]["loss"]), done, train_s


def _timed_evaluation(par, state, eval_split, batch_size: int, eval_users: int) -> dict:
  """Evaluates ``eval_split``'s users twice (the first pass compiles every shape, the
  second is timed): the result's evaluation fields."""
  from jax_vaecf.training import engine as loop

  def eval_pass():
    return loop.evaluate(par, state, eval_split, batch_size)

  t0 = time.perf_counter()
  eval_pass()  # compiles every shape
  eval_compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  eval_pass()
  eval_s = time.perf_counter() - t0
  return dict(eval_users=eval_users, eval_s=round(eval_s, 3),
              eval_users_per_s=round(eval_users / eval_s, 1),
              eval_first_pass_s=round(eval_compile_s, 2))


def _peak_memory(devices: list) -> dict:
  """The result's peak memory fields: the host's, and the devices' largest (not on the
  CPU backend, where it is the host's)."""
  import jax

  out = {"peak_host_gb": round(_peak_host_gb(), 2)}
  dev = _peak_device_gb(devices)
  if dev is not None and jax.default_backend() != "cpu":
    out["peak_device_gb"] = round(dev, 2)
  return out


def format_table(rows: list[dict]) -> str:
  cols = [("model", "model"), ("n_items", "items"), ("batch_size", "batch"),
          ("precision", "prec"), ("mesh", "mesh"),
          ("state_mb_per_device", "state MB/device"),
          ("input_format", "input"), ("compile_s", "compile s"), ("step_ms", "step ms"),
          ("epoch_s", "epoch s"), ("train_users_per_s", "train users/s"),
          ("xla_gflop_per_step", "GFLOP/step"), ("xla_gflop_per_s", "GFLOP/s"),
          ("eval_users_per_s", "eval users/s"), ("peak_host_gb", "host GB"),
          ("peak_device_gb", "device GB")]
  cols = [c for c in cols if any(c[0] in r for r in rows)]
  lines = ["| " + " | ".join(h for _, h in cols) + " | note |",
           "|" + "---|" * (len(cols) + 1)]
  for r in rows:
    passes = r.get("passes_per_epoch", 1)
    of = r["steps_per_epoch"] * passes
    note = (f"extrapolated from {r['timed_steps']} of {of} steps"
            if r["extrapolated"] else f"{r['timed_steps']} steps timed")
    if passes > 1:
      note += f"; an epoch is a round of {passes} passes"
    if "vs_multvae_epoch" in r:
      note += f"; {r['vs_multvae_epoch']:.2f}x the Mult-VAE epoch above"
      if "vs_multvae_epoch_gflop" in r:
        note += f" ({r['vs_multvae_epoch_gflop']:.2f}x its floating-point operations)"
    lines.append("| " + " | ".join(str(r.get(c, "")) for c, _ in cols) + f" | {note} |")
  return "\n".join(lines)


def main(argv):
  """Times the configured model's training and evaluation (or, with ``--serving``, its
  serving paths) and prints the table and the JSON record."""
  cli.start(argv, flag_values=_FLAGS)
  cfg = cli.config_from_flags(_FLAGS)
  check_settings(cli.config_overrides(_FLAGS))
  from jax_vaecf import model as model_lib

  if _FLAGS.serving:
    _serving_main(cfg)
    return
  if model_lib.model_entry(cfg.model).fit is not None:
    raise app.UsageError(f"--model={cfg.model} is fitted in closed form, with no "
                         "training step to time: python -m experiments.bench_ease "
                         "times its fit")
  devices = select_devices(cfg)
  from jax_vaecf.training import engine as loop
  from jax_vaecf.training import reporting
  cfg = loop.resolve_precision(cfg, reporting.print_record)
  results = _timed_results(cfg, devices)
  info = _versions()
  print(f"\nmachine: {info['cpu_model']} ({info['cpu_count']} cores), device "
        f"{results[0]['device_kind']}; jax {info['jax']}, jaxlib {info['jaxlib']}, flax "
        f"{info['flax']}, optax {info['optax']}, numpy {info['numpy']}, python "
        f"{info['python']}")
  print(format_table(results))
  record = {"results": results, "versions": info, "argv": sys.argv[1:]}
  line = json.dumps(record)
  print(line)
  _append_to_json_out(line)


def _serving_main(cfg) -> None:
  """``--serving``: times both serving paths of ``cfg``'s model at ``--n_items`` and
  prints their table and the JSON record."""
  from experiments import serve_bench

  f = _FLAGS
  rows = run_serving(cfg, f.n_items)
  info = _versions()
  print(f"machine: {info['cpu_model']} ({info['cpu_count']} cores), device "
        f"{rows[0]['device_kind']}; {cfg.model} over {f.n_items:,} items, top 10, 20 "
        "items per user")
  print(serve_bench.format_paths(rows))
  record = {"serving": rows, "versions": info, "argv": sys.argv[1:]}
  print(json.dumps(record))
  _append_to_json_out(json.dumps(record))


def _append_to_json_out(line: str) -> None:
  """Appends the JSON ``line`` to ``--json_out``, when given."""
  if _FLAGS.json_out:
    with open(_FLAGS.json_out, "a") as fh:
      fh.write(line + "\n")


def _timed_results(cfg, devices: list) -> list[dict]:
  """A result (:func:`run_one`) for each item count (``--sweep_items``, else
  ``--n_items``), each preceded, for a model other than Mult-VAE, by a Mult-VAE result
  of the same other settings it is compared with (``--compare_multvae``); each printed
  as a JSON line as it comes."""
  f = _FLAGS
  items = [int(x) for x in f.sweep_items] or [f.n_items]
  results = []
  # The model's own settings go back to their defaults; every other setting is kept.
  baseline = cfg.replace(model="multvae", model_settings=None)
  for n in items:
    base = None
    if cfg.model != "multvae" and f.compare_multvae:
      base = run_one(baseline, devices, n, steps=f.steps, epochs=f.epochs, eval_users=0)
      results.append(base)
      print(json.dumps(base), flush=True)
    r = run_one(cfg, devices, n, steps=f.steps, epochs=f.epochs,
                eval_users=f.eval_users if not f.sweep_items else 0)
    if base is not None:
      r.update(_vs_multvae(r, base))
    results.append(r)
    print(json.dumps(r), flush=True)
  return results


def _vs_multvae(r: dict, base: dict) -> dict:
  """The result ``r``'s epoch as a ratio of the Mult-VAE result ``base``'s: in time, and
  in floating-point operations where both have XLA's count."""
  ratios = {"vs_multvae_epoch": round(r["epoch_s"] / base["epoch_s"], 3)}
  if "xla_gflop_per_step" in r and "xla_gflop_per_step" in base:
    # Both epochs cover every user once per pass: the round's operations over the
    # epoch's are passes x (GFLOP per step) over GFLOP per step.
    ratios["vs_multvae_epoch_gflop"] = round(
        r["passes_per_epoch"] * r["xla_gflop_per_step"]
        / (base["passes_per_epoch"] * base["xla_gflop_per_step"]), 3)
  return ratios


if __name__ == "__main__":
  define_flags()
  cli.run(main)
