"""Sparse EASE (``jax_vaecf.models.sparse_ease``): fit time, peak memory and accuracy, one run.

::

  nice -n 10 python -m experiments.bench_sparse_ease --sections=synthetic,ml1m \\
      --data_dir_ml1m=../shared/data/ml-1m

prints two tables:

* ``synthetic``: rows of an Amazon-Book shape (52,600 users x 91,600 items, about 2.98M
  interactions, Zipf item popularity) and a 200,000-item shape, built by
  :mod:`experiments.synthetic`; for each, the fit's wall time and the process's resident
  memory high-water mark during the fit (``VmHWM`` of ``/proc/self/status``, reset
  before each fit by writing 5 to ``/proc/self/clear_refs``; it includes the data).
* ``ml1m``: the project's ``ml1m_ease`` split (the paper's protocol: held-out users, 80%
  of each test user's items folded in), test NDCG@100 and Recall@20 by
  :func:`jax_vaecf.evaluation.metrics.ranking_metrics`, for a float64 NumPy dense EASE and sparse
  EASE at several densities, all at the same ``l2``.

The peer, the ``sansa`` package, is run when it imports; otherwise the line printed says
why (here: ``pip install sansa`` fails because its dependency scikit-sparse is published
on PyPI as source only and its build needs SuiteSparse's ``cholmod.h``).
"""

from __future__ import annotations

import time

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from experiments import synthetic
from jax_vaecf.models import sparse_ease

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["synthetic", "ml1m"], "Tables to print: synthetic, ml1m.")
flags.DEFINE_list("shapes", ["amazon_book", "items_200k"], "Synthetic shapes to fit.")
flags.DEFINE_float("synthetic_density", 1e-4, "target_density of the synthetic fits.")
flags.DEFINE_float("synthetic_l2", 50.0, "l2 of the synthetic fits.")
flags.DEFINE_string("data_dir_ml1m", "../shared/data/ml-1m", "The ml-1m files.")
flags.DEFINE_string("cache_dir", "/tmp/bench_sparse_ease_cache", "Processed splits.")
flags.DEFINE_float("ml1m_l2", 500.0, "l2 of every ML-1M fit (ml1m_ease's choice).")
flags.DEFINE_list("ml1m_densities", ["0.01", "0.02"],
                  "target_density values of the ML-1M sparse fits.")
flags.DEFINE_float("ml1m_gram_ratio", 1000.0, "gram_ratio of the ML-1M fits (1000: the "
                   "whole Gram matrix; cut to 4x B's entries it lost definiteness).")

# (users, items, mean interactions per user, fewest per user): Amazon-Book (LightGCN's
# split: 52,643 users, 91,599 items, 2,984,108 interactions, 10-core) and a catalogue
# twice as wide with the same per-user activity.
SHAPES = {"amazon_book": (52_600, 91_600, 56.7, 10),
          "items_200k": (110_000, 200_000, 56.7, 10)}

SANSA_MISSING = ("sansa: not run. `pip install sansa` fails here: its dependency "
                 "scikit-sparse is published on PyPI as source only (0.5.0) and its build "
                 "needs SuiteSparse's cholmod.h, which this machine lacks (no system "
                 "package manager reachable)")


def _peak_rss_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024 / 1e9
  return float("nan")


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size


def timed_fit(x, settings: sparse_ease.Settings):
  """``(B, seconds, peak resident GB during the fit)``."""
  _reset_peak()
  t0 = time.perf_counter()
  b = sparse_ease.fit(x, settings)
  return b, time.perf_counter() - t0, _peak_rss_gb()


def synthetic_table() -> None:
  print(f"| shape | users | items | interactions | density | nnz(B) | fit s | peak RSS GB |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name in FLAGS.shapes:
    n_users, n_items, mean, least = SHAPES[name]
    x, _ = synthetic.make_dataset(n_users=n_users, n_items=n_items, n_eval_users=1,
                                  mean_per_user=mean, min_per_user=least, zipf=0.9)
    settings = sparse_ease.Settings(l2=FLAGS.synthetic_l2,
                                    target_density=FLAGS.synthetic_density)
    t0 = time.perf_counter()
    try:
      b, seconds, peak = timed_fit(x, settings)
    except ValueError as e:  # a refused fit is a result of the table, not the run's end
      print(f"| {name} | {n_users:,} | {n_items:,} | {x.nnz:,} | {settings.target_density:g} "
            f"| refused after {time.perf_counter() - t0:.0f} s: {e} | | {_peak_rss_gb():.2f} |",
            flush=True)
      continue
    print(f"| {name} | {n_users:,} | {n_items:,} | {x.nnz:,} | {settings.target_density:g} "
          f"| {b.nnz:,} | {seconds:.1f} | {peak:.2f} |", flush=True)


def _test_metrics(score_fn, test) -> dict[str, float]:
  """Mean test NDCG@100 and Recall@20 over users with held-out items (the project's
  metric functions; the users' own items are not ranked)."""
  from jax_vaecf.evaluation import metrics  # pylint: disable=g-import-not-at-top
  sums, users = {"ndcg@100": 0.0, "recall@20": 0.0}, 0
  for start in range(0, test.n_users, 1000):
    rows = test.fold_in[start:start + 1000]
    out = metrics.ranking_metrics(score_fn(rows), test.heldout[start:start + 1000].toarray(),
                                  rows.toarray(), ks=(20, 100))
    valid = np.asarray(out["valid"])
    users += int(valid.sum())
    for k in sums:
      sums[k] += float(np.asarray(out[k])[valid].sum())
  return {k: v / users for k, v in sums.items()}


def ml1m_table() -> None:
  from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
  from jax_vaecf.models import ease  # pylint: disable=g-import-not-at-top
  from jax_vaecf.training import engine as loop  # pylint: disable=g-import-not-at-top
  cfg = configs.ml1m_ease().replace(data_dir=FLAGS.data_dir_ml1m, cache_dir=FLAGS.cache_dir)
  split = loop.load_data(cfg)
  n = split.n_items
  l2 = FLAGS.ml1m_l2
  t0 = time.perf_counter()
  dense_b = ease.numpy_ease(split.train, l2).astype(np.float32)
  dense_s = time.perf_counter() - t0
  dense = _test_metrics(lambda rows: rows.toarray() @ dense_b, split.test)
  print(f"ML-1M ({split.train.shape[0]:,} training users, {n:,} items, "
        f"{split.test.n_users:,} test users), l2 {l2:g}")
  print("| model | density | nnz(B) | fit s | NDCG@100 | Recall@20 | NDCG@100 vs dense |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  print(f"| dense EASE (NumPy float64) | 1 | {n * (n - 1):,} | {dense_s:.1f} "
        f"| {dense['ndcg@100']:.4f} | {dense['recall@20']:.4f} | |", flush=True)
  for density in (float(d) for d in FLAGS.ml1m_densities):
    # The bound of any B of this density: dense EASE's B cut to each column's k largest.
    cut = sparse_ease.keep_top_per_column(sparse_ease.sp.csc_matrix(dense_b),
                                          sparse_ease.per_column(density, 1.0, n))
    got = _test_metrics(lambda rows, b=cut: sparse_ease.score(b, rows), split.test)
    change = got["ndcg@100"] / dense["ndcg@100"] - 1.0
    print(f"| dense EASE cut to the density | {density:g} | {cut.nnz:,} | | "
          f"{got['ndcg@100']:.4f} | {got['recall@20']:.4f} | {100 * change:+.2f}% |")
    b, seconds, _ = timed_fit(split.train, sparse_ease.Settings(
        l2=l2, target_density=density, gram_ratio=FLAGS.ml1m_gram_ratio))
    got = _test_metrics(lambda rows, b=b: sparse_ease.score(b, rows), split.test)
    change = got["ndcg@100"] / dense["ndcg@100"] - 1.0
    print(f"| sparse EASE | {density:g} | {b.nnz:,} | {seconds:.1f} | {got['ndcg@100']:.4f} "
          f"| {got['recall@20']:.4f} | {100 * change:+.2f}% |", flush=True)


def main(argv):
  cli.start(argv)
  try:
    import sansa  # pylint: disable=g-import-not-at-top,unused-import
    print("sansa: importable, but this script has no runner for it yet")
  except ImportError:
    print(SANSA_MISSING)
  bad = sorted(set(FLAGS.sections) - {"synthetic", "ml1m"})
  if bad:
    raise app.UsageError(f"--sections: unknown {bad}; expected synthetic and/or ml1m")
  unknown = sorted(set(FLAGS.shapes) - set(SHAPES))
  if unknown:
    raise app.UsageError(f"--shapes: unknown {unknown}; expected some of {sorted(SHAPES)}")
  if "ml1m" in FLAGS.sections:
    ml1m_table()
  if "synthetic" in FLAGS.sections:
    synthetic_table()


if __name__ == "__main__":
  cli.run(main)
