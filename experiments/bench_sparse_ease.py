"""Sparse EASE (``jax_vaecf.models.sparse_ease``) beside its peer ``sansa``: fit time,
peak memory, accuracy and scoring speed, both sides in one run.

::

  nice -n 10 python -m experiments.bench_sparse_ease --sections=ml1m,yelp2018,synthetic,scoring \\
      --data_dir_ml1m=../shared/data/ml-1m --noreuse_host_memory

prints one table per section:

* ``ml1m``: the project's ``ml1m_ease`` split (the paper's protocol: held-out users, 80%
  of each test user's items folded in), test NDCG@100 and Recall@20 by
  :func:`jax_vaecf.evaluation.metrics.ranking_metrics` for a float64 NumPy dense EASE,
  dense EASE's ``B`` cut to each column's largest entries (the best any ``B`` of that
  density can do by this cut), sparse EASE and ``sansa`` at each density, all at the
  same ``l2``.
* ``yelp2018``: NGCF / LightGCN's Yelp2018 files (``--data_dir_yelp2018``: ``train.txt``
  and ``test.txt``; 31,668 users x 38,048 items), every training row fitted (the refit's
  data) at the dense EASE's validated ``l2`` (400), tested on ``test.txt`` with the
  LightGCN papers' metrics (NDCG@20, Recall@20 as hits / n) and NDCG@100: the project's
  dense EASE (float32, the users x users form on the host), sparse EASE and ``sansa``
  at each density, with each fit's time and peak resident memory.
* ``synthetic``: an Amazon-Book shape (52,600 users x 91,600 items, about 2.98M
  interactions, Zipf item popularity) and a 200,000-item shape, built by
  :mod:`experiments.synthetic`; each side's fit wall time and the process's resident
  memory high-water mark during the fit (``VmHWM`` of ``/proc/self/status``, reset
  before each fit by writing 5 to ``/proc/self/clear_refs``; it includes the data, so
  run with ``--noreuse_host_memory``).
* ``scoring``: ``x @ B = x + (x @ M^T) @ W`` for ``--score_users`` users of the data
  of the other sections (sparse EASE's factors of the last fit of each): two host CSR
  products (:func:`jax_vaecf.models.sparse_ease.score`), two jax ``BCOO`` matmuls, and
  the model's scatter-adds and gathers from the users' sparse rows
  (:func:`jax_vaecf.models.sparse_ease.sparse_scatter_product`, ``column_product``: what
  a run, the recommender and exported artefacts use), each the best of ``--repeats``
  after one warm-up call.

``sansa`` (``pip install .[sparse]``: scikit-sparse needs SuiteSparse's headers) is the
peer; when it does not import, its rows say why and the rest runs. Both keep ``B`` as
two sparse factors (``sansa``: ``W^T W_r``, each of ``weight_matrix_density``; sparse
EASE: ``I + M^T W``, each ``target_density``); the ``weights`` column counts both.
"""

from __future__ import annotations

import functools
import time

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from experiments import synthetic
from jax_vaecf.models import sparse_ease

FLAGS = flags.FLAGS

SECTIONS = ("ml1m", "yelp2018", "synthetic", "scoring")

# (users, items, mean interactions per user, fewest per user): Amazon-Book (LightGCN's
# split: 52,643 users, 91,599 items, 2,984,108 interactions, 10-core) and a catalogue
# twice as wide with the same per-user activity.
SHAPES = {"amazon_book": (52_600, 91_600, 56.7, 10),
          "items_200k": (110_000, 200_000, 56.7, 10)}


def define_flags(flag_values: flags.FlagValues | None = None) -> None:
  """The tool's flags, defined when it runs (importing it defines none)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_list("sections", list(SECTIONS), f"Tables to print: {', '.join(SECTIONS)}.",
                    flag_values=fv)
  flags.DEFINE_list("sides", ["ours", "sansa"], "Which fits to run: ours and/or sansa.",
                    flag_values=fv)
  flags.DEFINE_list("shapes", ["amazon_book"], f"Synthetic shapes: {sorted(SHAPES)}.",
                    flag_values=fv)
  flags.DEFINE_float("synthetic_density", 1e-4, "target_density of the synthetic fits.",
                     flag_values=fv)
  flags.DEFINE_float("synthetic_l2", 50.0, "l2 of the synthetic fits.", flag_values=fv)
  flags.DEFINE_string("data_dir_ml1m", "../shared/data/ml-1m", "The ml-1m files.",
                      flag_values=fv)
  flags.DEFINE_string("cache_dir", "/tmp/bench_sparse_ease_cache", "Processed splits.",
                      flag_values=fv)
  flags.DEFINE_string("data_dir_yelp2018", "../shared/data/yelp2018-lightgcn",
                      "NGCF / LightGCN's Yelp2018 train.txt and test.txt.", flag_values=fv)
  flags.DEFINE_float("yelp2018_l2", 400.0, "l2 of every Yelp2018 fit (dense EASE's "
                     "validated choice).", flag_values=fv)
  flags.DEFINE_list("yelp2018_densities", ["0.0005", "0.001"],
                    "target_density of the sparse Yelp2018 fits.", flag_values=fv)
  flags.DEFINE_float("ml1m_l2", 500.0, "l2 of every ML-1M fit (ml1m_ease's choice).",
                     flag_values=fv)
  flags.DEFINE_list("ml1m_densities", ["0.01", "0.05", "0.1"],
                    "target_density values of the ML-1M sparse fits.", flag_values=fv)
  flags.DEFINE_float("gram_ratio", 4.0, "Sparse EASE's gram_ratio (every fit).",
                     flag_values=fv)
  flags.DEFINE_enum("ordering", "colamd", ["colamd", "mmd"],
                    "Sparse EASE's ordering (every fit).", flag_values=fv)
  flags.DEFINE_enum("sansa_factorizer", "auto", ["auto", "cholmod", "icf"],
                    "sansa's factorisation (auto: CHOLMOD on ML-1M, ICF on the "
                    "synthetic shapes, as its README advises).", flag_values=fv)
  flags.DEFINE_integer("score_users", 2_000, "Users scored by each scorer.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "Timed calls of each scorer (the best is shown).",
                       lower_bound=1, flag_values=fv)


def sansa_problem() -> str | None:
  """Why ``sansa`` cannot run here (one line), ``None`` when it imports."""
  try:
    import sansa  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return (f"sansa: not run ({e}); `pip install .[sparse]` needs SuiteSparse's headers "
            "(apt-get install libsuitesparse-dev) to build scikit-sparse")
  return None


def _peak_rss_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024 / 1e9
  return float("nan")


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size


def timed(fn, *args):
  """``(fn(*args), seconds, peak resident GB during the call)``."""
  _reset_peak()
  t0 = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - t0, _peak_rss_gb()


def fit_ours(x, l2: float, density: float):
  """Sparse EASE's :class:`~jax_vaecf.models.sparse_ease.Factors`, their weights'
  entries (both factors) and a scorer ``rows -> float32 (batch, n)``."""
  f = sparse_ease.fit(x, sparse_ease.Settings(l2=l2, target_density=density,
                                              gram_ratio=FLAGS.gram_ratio,
                                              ordering=FLAGS.ordering))
  if f.shift:
    print(f"(sparse EASE: the factorisation's diagonal was raised by {f.shift:.1%})")
  return f, 2 * int(np.count_nonzero(f.encode)), lambda rows: sparse_ease.score(f, rows)


def fit_sansa(x, l2: float, density: float, factorizer: str):
  """``sansa``'s model, its weights' entries (both factors) and a scorer."""
  import sansa  # pylint: disable=g-import-not-at-top
  factor = (sansa.CHOLMODGramianFactorizerConfig() if factorizer == "cholmod"
            else sansa.ICFGramianFactorizerConfig())
  model = sansa.SANSA(sansa.SANSAConfig(
      l2=l2, weight_matrix_density=density, gramian_factorizer_config=factor,
      lower_triangle_inverter_config=sansa.UMRUnitLowerTriangleInverterConfig(
          scans=1, finetune_steps=5)))
  model.fit(sparse_ease.sp.csr_matrix(x, dtype=np.float32))
  nnz = sum(w.nnz for w in model.weights)
  return model, nnz, lambda rows: np.asarray(
      model.forward(sparse_ease.sp.csr_matrix(rows, dtype=np.float32)).toarray(),
      np.float32)


def _sides(factorizer: str):
  """``[(label, fit(x, l2, density) -> (B or model, nnz, scorer) or a reason)]``."""
  sides = []
  if "ours" in FLAGS.sides:
    sides.append((f"sparse EASE (gram_ratio {FLAGS.gram_ratio:g}, {FLAGS.ordering})",
                  fit_ours))
  if "sansa" in FLAGS.sides:
    why = sansa_problem()
    if FLAGS.sansa_factorizer != "auto":
      factorizer = FLAGS.sansa_factorizer
    sides.append((f"sansa ({factorizer.upper()}, UMR)",
                  why or (lambda x, l2, d, f=factorizer: fit_sansa(x, l2, d, f))))
  return sides


def _test_metrics(score_fn, test, names=("ndcg@100", "recall@20")) -> dict[str, float]:
  """Mean test metrics ``names`` (NDCG@100 and Recall@20 by default) over users with
  held-out items (the project's metric functions; the users' own items are not
  ranked)."""
  from jax_vaecf.evaluation import metrics  # pylint: disable=g-import-not-at-top
  sums, users = {k: 0.0 for k in names}, 0
  for start in range(0, test.n_users, 1000):
    rows = test.fold_in[start:start + 1000]
    out = metrics.ranking_metrics(score_fn(rows), test.heldout[start:start + 1000].toarray(),
                                  rows.toarray(), ks={int(k.split("@")[1]) for k in names})
    valid = np.asarray(out["valid"])
    users += int(valid.sum())
    for k in sums:
      sums[k] += float(np.asarray(out[k])[valid].sum())
  return {k: v / users for k, v in sums.items()}


def _metric_row(label, density, nnz, seconds, got, dense) -> str:
  change = got["ndcg@100"] / dense["ndcg@100"] - 1.0
  return (f"| {label} | {density:g} | {nnz:,} | {seconds} | {got['ndcg@100']:.4f} "
          f"| {got['recall@20']:.4f} | {100 * change:+.2f}% |")


def ml1m_table(kept: dict) -> None:
  from jax_vaecf.models import ease  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import engine as loop  # pylint: disable=g-import-not-at-top
  cfg = configs.ml1m_ease().replace(data_dir=FLAGS.data_dir_ml1m, cache_dir=FLAGS.cache_dir)
  split = loop.load_data(cfg)
  n, l2 = split.n_items, FLAGS.ml1m_l2
  dense_b, dense_s, _ = timed(lambda: ease.numpy_ease(split.train, l2).astype(np.float32))
  dense = _test_metrics(lambda rows: rows.toarray() @ dense_b, split.test)
  print(f"ML-1M ({split.train.shape[0]:,} training users, {n:,} items, "
        f"{split.test.n_users:,} test users), l2 {l2:g}")
  print("| model | density | weights | fit s | NDCG@100 | Recall@20 | NDCG@100 vs dense |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  print(_metric_row("dense EASE (NumPy float64)", 1, n * (n - 1), f"{dense_s:.1f}", dense,
                    dense), flush=True)
  for density in (float(d) for d in FLAGS.ml1m_densities):
    cut = sparse_ease.keep_top_per_column(sparse_ease.sp.csc_matrix(dense_b),
                                          sparse_ease.per_column(density, 1.0, n))
    got = _test_metrics(lambda rows, b=cut: np.asarray((rows @ b).toarray(), np.float32),
                        split.test)
    print(_metric_row("dense EASE's B cut to k per column", density, cut.nnz, "", got,
                      dense))
    for label, fit in _sides("cholmod"):
      if isinstance(fit, str):
        print(f"| {label} | {density:g} | {fit} | | | | |", flush=True)
        continue
      try:
        (b, nnz, score), seconds, _ = timed(fit, split.train, l2, density)
      except ValueError as e:  # a refused fit is a result of the table
        print(f"| {label} | {density:g} | refused: {e} | | | | |", flush=True)
        continue
      got = _test_metrics(score, split.test)
      print(_metric_row(label, density, nnz, f"{seconds:.1f}", got, dense), flush=True)
      if fit is fit_ours:
        kept["ML-1M"] = (b, split.test.fold_in)


def _dense_scores(b: np.ndarray, rows) -> np.ndarray:
  return np.asarray(rows @ b, np.float32)  # sparse rows: nnz * n multiply-adds


def yelp2018_table(kept: dict) -> None:
  from jax_vaecf.models import ease  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import engine as loop  # pylint: disable=g-import-not-at-top
  cfg = configs.yelp2018().replace(model="ease", data_dir=FLAGS.data_dir_yelp2018,
                                   cache_dir=FLAGS.cache_dir)
  test = loop.load_data(cfg).test  # fold-in: every user's training items
  x, l2, n = test.fold_in.astype(np.float32), FLAGS.yelp2018_l2, test.fold_in.shape[1]
  names = ("ndcg@20", "recalln@20", "ndcg@100")
  print(f"Yelp2018 ({x.shape[0]:,} users, {n:,} items, {x.nnz:,} training interactions, "
        f"{test.heldout.nnz:,} test), l2 {l2:g}")
  print("| model | density | weights | fit s | peak RSS GB | NDCG@20 | Recall@20 (hits/n) "
        "| NDCG@100 | NDCG@20 vs dense |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

  def row(label, density, nnz, seconds, peak, got, dense):
    return (f"| {label} | {density:g} | {nnz:,} | {seconds:.1f} | {peak:.2f} | "
            f"{got['ndcg@20']:.4f} | {got['recalln@20']:.4f} | {got['ndcg@100']:.4f} | "
            f"{100 * (got['ndcg@20'] / dense['ndcg@20'] - 1):+.2f}% |")

  form = ease.host_form(x)
  dense_b, seconds, peak = timed(lambda: ease.host_b(x, l2, form, f"l2 {l2:g}"))
  dense = _test_metrics(functools.partial(_dense_scores, dense_b), test, names)
  print(row(f"dense EASE (float32, {form} form)", 1, n * (n - 1), seconds, peak, dense,
            dense), flush=True)
  del dense_b
  for density in (float(d) for d in FLAGS.yelp2018_densities):
    for label, fit in _sides("icf"):
      if isinstance(fit, str):
        print(f"| {label} | {density:g} | {fit} | | | | | | |", flush=True)
        continue
      try:
        (b, nnz, score), seconds, peak = timed(fit, x, l2, density)
      except (ValueError, MemoryError) as e:
        print(f"| {label} | {density:g} | refused: {e} | | | | | | |", flush=True)
        continue
      got = _test_metrics(score, test, names)
      print(row(label, density, nnz, seconds, peak, got, dense), flush=True)
      if fit is fit_ours:
        kept["Yelp2018"] = (b, test.fold_in)
      del b


def synthetic_table(kept: dict) -> None:
  print(f"Synthetic shapes, l2 {FLAGS.synthetic_l2:g}, density "
        f"{FLAGS.synthetic_density:g}")
  print("| shape | users | items | interactions | model | weights | fit s | peak RSS GB |")
  print("|---|---:|---:|---:|---|---:|---:|---:|")
  for name in FLAGS.shapes:
    n_users, n_items, mean, least = SHAPES[name]
    x, ev = synthetic.make_dataset(n_users=n_users, n_items=n_items,
                                   n_eval_users=FLAGS.score_users, mean_per_user=mean,
                                   min_per_user=least, zipf=0.9)
    head = f"| {name} | {n_users:,} | {n_items:,} | {x.nnz:,}"
    for label, fit in _sides("icf"):
      if isinstance(fit, str):
        print(f"{head} | {label} | {fit} | | |", flush=True)
        continue
      t0 = time.perf_counter()
      try:
        (b, nnz, _), seconds, peak = timed(fit, x, FLAGS.synthetic_l2,
                                           FLAGS.synthetic_density)
      except (ValueError, MemoryError) as e:
        print(f"{head} | {label} | refused after {time.perf_counter() - t0:.0f} s: {e} "
              f"| | {_peak_rss_gb():.2f} |", flush=True)
        continue
      print(f"{head} | {label} | {nnz:,} | {seconds:.1f} | {peak:.2f} |", flush=True)
      if fit is fit_ours:
        kept[name] = (b, ev.fold_in)
      del b


def scorers(f: sparse_ease.Factors) -> dict:
  """``{name: rows (CSR) -> float32 (batch, n) scores}`` of ``x @ B = x + (x @ M^T) @ W``:
  two host CSR products, two jax BCOO matmuls, the model's scatter-adds and gathers
  (each jitted once per shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import sparse as jsparse  # pylint: disable=g-import-not-at-top
  from jax_vaecf.core import sparse as sparse_lib  # pylint: disable=g-import-not-at-top
  m, w = f.matrices()
  mt = jsparse.BCOO.from_scipy_sparse(m.T.tocsr())
  wb = jsparse.BCOO.from_scipy_sparse(w.tocsr())
  bcoo = jax.jit(lambda h, mt, wb: h + (h @ mt) @ wb)
  rows, enc, dec = (jnp.asarray(a) for a in (f.rows, f.encode, f.decode))

  def model(batch, rows, enc, dec):
    h = sparse_ease.sparse_scatter_product(batch, rows, enc)
    return sparse_lib.densify(batch, rows.shape[1]) + sparse_ease.column_product(
        h, rows, dec)

  jitted = jax.jit(model)

  def on_device_bcoo(x):
    return np.asarray(bcoo(jnp.asarray(x.toarray(), jnp.float32), mt, wb))

  def on_device_model(x):
    batch = sparse_lib.from_dense(x.toarray())
    return np.asarray(jitted(batch, rows, enc, dec))

  return {"host CSR products (SciPy)": lambda x: sparse_ease.score(f, x),
          "jax BCOO matmuls": on_device_bcoo,
          "jax scatter-adds and gathers (the model's)": on_device_model}


def scoring_table(kept: dict) -> None:
  print(f"Scoring {FLAGS.score_users:,} users: x @ B as float32 (users, items), best of "
        f"{FLAGS.repeats} after a warm-up")
  print("| data | items | weights | scorer | ms | users/s | max difference to the host |")
  print("|---|---:|---:|---|---:|---:|---:|")
  for name, (f, fold_in) in kept.items():
    # Fewer users than asked (ML-1M's test users): each taken again in turn.
    x = fold_in[np.arange(FLAGS.score_users) % fold_in.shape[0]]
    head = f"| {name} | {f.rows.shape[1]:,} | {2 * np.count_nonzero(f.encode):,}"
    want = None
    for scorer, fn in scorers(f).items():
      try:
        got = fn(x)
        times = []
        for _ in range(FLAGS.repeats):
          t0 = time.perf_counter()
          fn(x)
          times.append(time.perf_counter() - t0)
      except Exception as e:  # pylint: disable=broad-except  (out of memory is a result)
        print(f"{head} | {scorer} | failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:120]} | | |", flush=True)
        continue
      want = got if want is None else want
      print(f"{head} | {scorer} | {1e3 * min(times):,.1f} | {x.shape[0] / min(times):,.0f} "
            f"| {np.abs(got - want).max():.1e} |", flush=True)


def main(argv):
  cli.start(argv)
  bad = sorted(set(FLAGS.sections) - set(SECTIONS))
  if bad:
    raise app.UsageError(f"--sections: unknown {bad}; expected some of {SECTIONS}")
  unknown = sorted(set(FLAGS.shapes) - set(SHAPES))
  if unknown:
    raise app.UsageError(f"--shapes: unknown {unknown}; expected some of {sorted(SHAPES)}")
  odd = sorted(set(FLAGS.sides) - {"ours", "sansa"})
  if odd:
    raise app.UsageError(f"--sides: unknown {odd}; expected ours and/or sansa")
  if "scoring" in FLAGS.sections and "ours" not in FLAGS.sides:
    raise app.UsageError("--sections=scoring scores sparse EASE's B: keep ours in --sides")
  print(sansa_problem() or "sansa: imported")
  kept: dict = {}
  if "ml1m" in FLAGS.sections:
    ml1m_table(kept)
  if "yelp2018" in FLAGS.sections:
    yelp2018_table(kept)
  if "synthetic" in FLAGS.sections:
    synthetic_table(kept)
  if "scoring" in FLAGS.sections:
    scoring_table(kept)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
