"""EASE's fit against NumPy and SciPy, and a fitted run against an independent NumPy EASE.

Timing (synthetic rows of a data set's shape, ML-20M's by default)::

  python -m experiments.bench_ease [--n_items=20108] [--n_users=...] [--n_eval_users=10000]

prints a table: the Gram matrix from the training batches on the device against SciPy's
sparse ``X^T X``; one fit (``jax_vaecf.models.ease.fit``: float32 Cholesky on the device)
against ``numpy.linalg.inv`` and ``scipy.linalg.cho_factor`` / ``cho_solve`` of the same
Gram matrix, each with its largest difference from the float64 NumPy ``B``; and ten
``l2`` values scored on the evaluation users from one eigendecomposition (what a run's
sweep does) against ten single fits, each scoring the same users. Every time is the
best of ``--repeats`` after a compiled warm-up; compare ratios, not seconds, across
machines.

Solvers table (``--solver_sizes``): ``jax_vaecf.models.gram_solvers`` beside NumPy and SciPy::

  python -m experiments.bench_ease --solver_sizes=3000,10000,20000 --noreuse_host_memory \
      [--sweep_users=1000]

For each size ``n`` (synthetic power-law rows: ``3 n`` users with ``--mean_per_user``
items each, and a fewer-users-than-items case of ``n / 10`` users) it times, each in a
forked process that reports its time and peak memory above what it inherited (the data),
one fit from the sparse rows (the Gram matrix included): ``gram_solvers.fit_inverse``
float32 and float64 (the form its cost model picks; in the primal form also float32 by
``potri``, the one-matrix route each fit of a run's sweep takes), ``numpy.linalg.inv`` and SciPy's
``cho_factor`` / ``cho_solve`` in float32 and float64; then ``gram_solvers.choose_l2``
over ``--n_l2`` values scoring ``--sweep_users`` validation users (NDCG@100), beside
what a sweep of one SciPy float32 fit per value costs (that row is the single fit times
``--n_l2``, marked "est.", not run). Ratios are to SciPy float32's fit.

Check of a fitted run (any data set)::

  python -m experiments.bench_ease --check_workdir=runs/ml1m_ease

recomputes ``B`` in float64 with ``numpy.linalg.inv`` for the run's split and ``l2``,
ranks the test users' unseen items with NumPy and prints its test NDCG@100 and
Recall@20 / @50 beside the run's own test record.
"""

from __future__ import annotations

import json
import time

import numpy as np
import scipy.linalg
from absl import app
from absl import flags

from experiments import cli
from experiments import synthetic

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues | None = None) -> None:
  """The tool's flags, defined when it runs (importing it defines none)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_integer("n_eval_users", 10_000, "Users scored by each l2 (ML-20M: 10,000).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("n_l2", 10, "l2 values of the sweep row.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("repeats", 1, "Timed runs of each row after the warm-up (best kept).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_list("references", ["numpy32", "scipy32", "numpy64", "scipy64"],
                    "Reference fits to time: numpy32, numpy64 (numpy.linalg.inv), scipy32, "
                    "scipy64 (scipy.linalg.cho_factor + cho_solve).", flag_values=fv)
  flags.DEFINE_string("check_workdir", None, "A fitted EASE run: compare its test record "
                      "with an independent float64 NumPy EASE (no timing).", flag_values=fv)
  flags.DEFINE_string("out", None, "Also write the results as JSON here.", flag_values=fv)
  flags.DEFINE_list("solver_sizes", [], "Item counts of the solvers table (e.g. "
                    "3000,10000,20000); none: the table is not run.", flag_values=fv)
  flags.DEFINE_multi_enum("solver_shapes", ["wide", "tall"], ["wide", "tall"],
                          "Shapes of the solvers table: wide (n / 10 users), tall (3 n).",
                          flag_values=fv)
  flags.DEFINE_bool("solver_sweep", True, "Time the solvers table's l2 sweep too.",
                    flag_values=fv)
  flags.DEFINE_integer("sweep_users", 1000, "Validation users of the solvers table's sweep.",
                       lower_bound=1, flag_values=fv)
  synthetic.define_shape_flags(fv)
  flags.adopt_module_key_flags(synthetic, flag_values=fv)


REFERENCES = ("numpy32", "numpy64", "scipy32", "scipy64")


def _best_time(fn, repeats: int) -> tuple[float, object]:
  fn()  # warm-up: compiles
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return best, out


def _b_of_p(p: np.ndarray) -> np.ndarray:
  b = -p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b


def reference_fit(gram: np.ndarray, l2: float, name: str) -> np.ndarray:
  """``B`` from a Gram matrix by one of :data:`REFERENCES`."""
  dtype = np.float32 if name.endswith("32") else np.float64
  a = gram.astype(dtype) + dtype(l2) * np.eye(gram.shape[0], dtype=dtype)
  if name.startswith("numpy"):
    return _b_of_p(np.linalg.inv(a))
  factor = scipy.linalg.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
  return _b_of_p(scipy.linalg.cho_solve(factor, np.eye(a.shape[0], dtype=dtype),
                                        overwrite_b=True, check_finite=False))


def time_fits(n_users: int, n_items: int, mean_per_user: float, n_eval_users: int,
              n_l2: int, repeats: int, references) -> list[dict]:
  """The benchmark's rows (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax_vaecf import data as data_lib  # pylint: disable=g-import-not-at-top
  from jax_vaecf.models import ease  # pylint: disable=g-import-not-at-top

  train, ev = synthetic.make_dataset(n_users, n_items, n_eval_users, mean_per_user)
  device = jax.devices()[0]
  rows = []
  batcher = data_lib.TrainBatcher(train, 500, seed=0)
  t_gram, gram = _best_time(lambda: jax.block_until_ready(
      ease.gram_matrix(batcher.epoch_batches(0), n_items, device)), repeats)
  t_sparse, host_gram = _best_time(lambda: (train.T @ train).toarray(), repeats)
  assert np.array_equal(np.asarray(gram), host_gram), "Gram matrices differ"
  rows.append({"row": "Gram matrix", "method": "jax_vaecf (CSR batches, device)",
               "seconds": t_gram})
  rows.append({"row": "Gram matrix", "method": "scipy.sparse X^T X (host)",
               "seconds": t_sparse})
  l2 = 500.0
  t_fit, b = _best_time(lambda: jax.block_until_ready(ease.fit(gram, jnp.float32(l2))),
                        repeats)
  b = np.asarray(b)
  want = reference_fit(host_gram, l2, "numpy64") if "numpy64" in references else None
  err = (lambda got: float(np.abs(got - want).max() / np.abs(want).max())
         if want is not None else None)
  rows.append({"row": "one fit", "method": "jax_vaecf ease.fit (float32 Cholesky)",
               "seconds": t_fit, "max_rel_error": err(b)})
  for name in references:
    t, got = _best_time(lambda name=name: reference_fit(host_gram, l2, name), repeats)
    rows.append({"row": "one fit", "method": {
        "numpy32": "numpy.linalg.inv float32", "numpy64": "numpy.linalg.inv float64",
        "scipy32": "scipy cho_factor/cho_solve float32",
        "scipy64": "scipy cho_factor/cho_solve float64"}[name],
                 "seconds": t, "max_rel_error": err(got)})

  values = [float(v) for v in np.geomspace(10.0, 10_000.0, n_l2)]
  x_eval = jax.device_put(jnp.asarray(ev.fold_in.toarray()), device)
  score_sweep = jax.jit(lambda x, p: jnp.dot(jnp.dot(x, p["project"]), p["output"]["kernel"]))
  score_one = jax.jit(lambda x, b: jnp.dot(x, b))

  def sweep():
    s, v = ease.spectrum(jnp.copy(gram))
    return [jax.block_until_ready(score_sweep(x_eval, ease.sweep_params(s, v, jnp.float32(a))))
            for a in values][-1]

  def singles():
    return [jax.block_until_ready(score_one(x_eval, ease.fit(gram, jnp.float32(a))))
            for a in values][-1]

  t_sweep, _ = _best_time(sweep, repeats)
  t_singles, _ = _best_time(singles, repeats)
  rows.append({"row": f"{n_l2} l2 values, {n_eval_users:,} users scored",
               "method": "jax_vaecf sweep (one eigendecomposition)", "seconds": t_sweep})
  rows.append({"row": f"{n_l2} l2 values, {n_eval_users:,} users scored",
               "method": f"{n_l2} x ease.fit", "seconds": t_singles})
  return rows


def _measured(fn) -> tuple[float, float]:
  """The least seconds and the largest peak MiB of ``--repeats`` runs of
  :func:`_measured_once`."""
  runs = [_measured_once(fn) for _ in range(FLAGS.repeats)]
  return min(r[0] for r in runs), max(r[1] for r in runs)


def _measured_once(fn) -> tuple[float, float]:
  """``(seconds, peak MiB above the start)`` of ``fn()`` run in a forked child, so each
  method's peak memory is its own (``VmHWM`` less the ``VmRSS`` it inherited)."""
  import os  # pylint: disable=g-import-not-at-top

  def status(key):
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024

  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: run, report, exit without cleanup
    os.close(r)
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      # Every allocation of 1 MiB or more mapped afresh (M_MMAP_THRESHOLD), none served
      # from memory the parent freed, which VmHWM would not count.
      ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
      base = status("VmRSS")
      t0 = time.perf_counter()
      fn()
      msg = f"{time.perf_counter() - t0} {status('VmHWM') - base}"
    except BaseException as e:  # pylint: disable=broad-except
      msg = f"error {type(e).__name__}: {e}"
    os.write(w, msg.encode())
    os._exit(0)
  os.close(w)
  with os.fdopen(r) as f:
    msg = f.read()
  os.waitpid(pid, 0)
  if msg.startswith("error") or not msg:
    raise RuntimeError(f"benchmark child failed: {msg or 'no report (killed?)'}")
  seconds, mib = msg.split()
  return float(seconds), float(mib)


def _reference_from_rows(x, l2: float, name: str) -> np.ndarray:
  return reference_fit((x.T @ x).toarray(), l2, name)


def solver_rows(n_items: int, n_users: int, mean_per_user: float, sweep_users: int,
                n_l2: int, references) -> list[dict]:
  """The solvers table's rows for one shape (see the module docstring)."""
  from jax_vaecf.models import gram_solvers as gs  # pylint: disable=g-import-not-at-top
  train, ev = synthetic.make_dataset(n_users, n_items, sweep_users, mean_per_user)
  l2 = 500.0
  for dtype in (np.float32, np.float64):  # loads the BLAS and LAPACK paths before forking
    gs.ease_fit(train[:, :64], l2, dtype, form="primal")
    gs.ease_fit(train[:32, :64], l2, dtype, form="dual")
    for name in references:
      _reference_from_rows(train[:, :64], l2, name)
  form = "dual" if gs.use_dual(n_users, n_items) else "primal"
  shape = f"{n_users:,} users x {n_items:,} items"
  rows = []

  def add(row):
    rows.append(row)
    print(f"  {shape}  {row['row']}  {row['method']}: {row['seconds']:.2f} s, "
          f"{row['peak_mib']:.0f} MiB", flush=True)

  for dtype in (np.float32, np.float64):
    t, mib = _measured(lambda dtype=dtype: gs.ease_b_from_p(gs.fit_inverse(train, l2, dtype)))
    add({"shape": shape, "row": "one fit", "seconds": t, "peak_mib": mib,
         "method": f"gram_solvers {form} {np.dtype(dtype).name}"})
  if form == "primal":  # the one-matrix route a run's sweep takes (ease.choose_on_host)
    t, mib = _measured(lambda: gs.ease_b_from_p(gs.fit_inverse(train, l2, np.float32,
                                                               method="potri")))
    add({"shape": shape, "row": "one fit", "seconds": t, "peak_mib": mib,
         "method": "gram_solvers primal float32 potri"})
  for name in references:
    t, mib = _measured(lambda name=name: _reference_from_rows(train, l2, name))
    add({"shape": shape, "row": "one fit", "seconds": t, "peak_mib": mib,
         "method": {"numpy32": "numpy.linalg.inv float32",
                    "numpy64": "numpy.linalg.inv float64",
                    "scipy32": "scipy cho_factor/cho_solve float32",
                    "scipy64": "scipy cho_factor/cho_solve float64"}[name]})
  if not FLAGS.solver_sweep:
    return rows
  values = [float(v) for v in np.geomspace(10.0, 10_000.0, n_l2)]
  metric = lambda s: gs.ndcg_at_k(s, ev.fold_in, ev.heldout, k=100)
  t, mib = _measured(lambda: gs.ease_b_from_p(gs.choose_l2(train, ev.fold_in, metric,
                                                           values).p))
  add({"shape": shape, "row": f"sweep of {n_l2} l2, {sweep_users:,} users",
       "seconds": t, "peak_mib": mib, "method": f"gram_solvers choose_l2 ({form})"})
  scipy32 = [r for r in rows if r["method"].startswith("scipy cho") and "32" in r["method"]]
  if scipy32:
    add({"shape": shape, "row": f"sweep of {n_l2} l2, {sweep_users:,} users",
         "seconds": n_l2 * scipy32[0]["seconds"], "peak_mib": scipy32[0]["peak_mib"],
         "method": f"est. {n_l2} x scipy float32 fit"})
  return rows


def print_solver_rows(rows: list[dict]) -> None:
  """The solvers table as Markdown: seconds, peak MiB, ratio to SciPy float32's fit, and
  for ours the ratio to our own float32 fit."""
  print("| shape | row | method | seconds | peak MiB | / scipy f32 fit | / our f32 fit |")
  print("|---|---|---|---:|---:|---:|---:|")
  for shape in dict.fromkeys(r["shape"] for r in rows):
    these = [r for r in rows if r["shape"] == shape]
    ref = next((r["seconds"] for r in these if r["method"].startswith("scipy cho")
                and "float32" in r["method"]), None)
    ours = next(r["seconds"] for r in these if r["method"].startswith("gram_solvers"))
    for r in these:
      to_ref = f"{r['seconds'] / ref:.2f}" if ref else ""
      print(f"| {shape} | {r['row']} | {r['method']} | {r['seconds']:.2f} | "
            f"{r['peak_mib']:.0f} | {to_ref} | {r['seconds'] / ours:.2f} |", flush=True)


def _ndcg_recall(scores: np.ndarray, heldout: list[set], k_ndcg: int, ks_recall) -> dict:
  """Plain NumPy: NDCG@k (binary gains, ideal over min(|held|, k)) and Recall@k (hits over
  min(|held|, k)) per user, averaged over users with held-out items."""
  order = np.argsort(-scores, axis=1, kind="stable")
  out = {f"ndcg@{k_ndcg}": [], **{f"recall@{k}": [] for k in ks_recall}}
  discount = 1.0 / np.log2(np.arange(2, k_ndcg + 2))
  for u, held in enumerate(heldout):
    if not held:
      continue
    hits = np.array([j in held for j in order[u, :max(k_ndcg, *ks_recall)]], float)
    ideal = discount[:min(len(held), k_ndcg)].sum()
    out[f"ndcg@{k_ndcg}"].append(float(hits[:k_ndcg] @ discount / ideal))
    for k in ks_recall:
      out[f"recall@{k}"].append(float(hits[:k].sum() / min(len(held), k)))
  return {k: float(np.mean(v)) for k, v in out.items()}


def check_workdir(workdir: str) -> dict:
  """The run's test record beside a float64 NumPy EASE on the same split and ``l2``."""
  from jax_vaecf.training import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import engine as loop  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import reporting  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import run_folder  # pylint: disable=g-import-not-at-top

  cfg = run_folder.run_config(workdir)
  if cfg.model != "ease":
    raise app.UsageError(f"--check_workdir={workdir}: a run of {cfg.model}, not ease")
  (l2,) = checkpoint_lib.read_best_meta(workdir)["chosen"]["l2"]
  tests = [r for r in run_folder.MetricsLog(workdir).records() if r.get("split") == "test"]
  if not tests:
    raise app.UsageError(f"--check_workdir={workdir}: the run has no test record yet")
  split = loop.load_data(cfg, reporting.print_record)
  x = split.train.astype(np.float64)
  gram = (x.T @ x).toarray()
  b = reference_fit(gram, l2, "numpy64")
  fold_in = split.test.fold_in
  scores = fold_in.toarray().astype(np.float64) @ b
  scores[fold_in.toarray() > 0] = -np.inf
  held = [set(split.test.heldout[u].indices.tolist()) for u in range(fold_in.shape[0])]
  ref = _ndcg_recall(scores, held, 100, (20, 50))
  run = {k: tests[-1][k] for k in ref}
  return {"l2": l2, "n_items": split.n_items, "numpy_float64": ref, "run": run,
          "difference": {k: run[k] - ref[k] for k in ref}}


def main(argv):
  cli.start(argv)
  if FLAGS.check_workdir:
    result = check_workdir(FLAGS.check_workdir)
    print(f"l2 {result['l2']:g}, {result['n_items']:,} items")
    print(f"{'metric':12s} {'this run':>10s} {'numpy f64':>10s} {'difference':>11s}")
    for k, v in result["numpy_float64"].items():
      print(f"{k:12s} {result['run'][k]:10.4f} {v:10.4f} {result['difference'][k]:+11.5f}")
  elif FLAGS.solver_sizes:
    if FLAGS.reuse_host_memory:
      raise app.UsageError("--solver_sizes measures peak memory: run it with "
                           "--noreuse_host_memory (freed memory kept for reuse hides it)")
    bad = sorted(set(FLAGS.references) - set(REFERENCES))
    if bad:
      raise app.UsageError(f"--references: unknown {bad}; expected some of {REFERENCES}")
    rows = []
    for size in FLAGS.solver_sizes:
      if not size.isdigit() or int(size) < 2:
        raise app.UsageError(f"--solver_sizes: {size!r} is not an item count above 1")
      n = int(size)
      shapes = {"wide": max(2, n // 10), "tall": 3 * n}
      for users in (shapes[k] for k in ("wide", "tall") if k in FLAGS.solver_shapes):
        rows += solver_rows(n, users, FLAGS.mean_per_user, FLAGS.sweep_users, FLAGS.n_l2,
                            FLAGS.references)
    print()
    print_solver_rows(rows)
    result = {"rows": rows}
  else:
    bad = sorted(set(FLAGS.references) - set(REFERENCES))
    if bad:
      raise app.UsageError(f"--references: unknown {bad}; expected some of {REFERENCES}")
    rows = time_fits(FLAGS.n_users, FLAGS.n_items, FLAGS.mean_per_user,
                     FLAGS.n_eval_users, FLAGS.n_l2, FLAGS.repeats, FLAGS.references)
    import jax  # pylint: disable=g-import-not-at-top
    result = {"n_items": FLAGS.n_items, "n_users": FLAGS.n_users,
              "device": jax.devices()[0].device_kind, "rows": rows}
    print(f"EASE at {FLAGS.n_items:,} items, {FLAGS.n_users:,} users "
          f"({result['device']})")
    print(f"{'':44s} {'method':44s} {'seconds':>9s} {'x ours':>7s} {'max rel err':>12s}")
    ours = {}
    for r in rows:
      ours.setdefault(r["row"], r["seconds"])
      err = r.get("max_rel_error")
      print(f"{r['row']:44s} {r['method']:44s} {r['seconds']:9.3f} "
            f"{r['seconds'] / ours[r['row']]:7.2f} "
            f"{'' if err is None else f'{err:.1e}':>12s}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
