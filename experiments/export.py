"""Export a trained run as a scorer artefact that needs no project code.

  python -m experiments.export --workdir runs/demo --out exported/demo --k 100

Writes the folder ``--out`` (``manifest.json``, ``scorer.jax``, ``params.npz``,
``item_ids.npy``, ``serve.py``; ``docs/serving.md``) from the best checkpoint of
``--workdir``: its served weights only (the weight average when the run keeps one), the
fold-in top-k program serialised with ``jax.export`` for any number of users, and the
checkpoint's validation and test metrics. Load it with ``import serve;
serve.load(DIR).recommend(histories)``.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf import export as export_lib
from jax_vaecf import recommend as recommend_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_string("out", None, "The artefact folder to create (new or empty).")
flags.DEFINE_integer("k", 100, "Recommendations per user the artefact returns (at most; "
                     "callers may ask for fewer).")
flags.DEFINE_list("platforms", ["cpu"], "Backends to lower the program for, e.g. "
                  "cpu,cuda.")
flags.DEFINE_bool("benchmark", False, "After exporting, time the Recommender and the "
                  "loaded artefact at batch 1 and batch 10,000 on this machine.")

# NVIDIA's VAE-CF README, inference on one A100 80GB, TF32: batch 1.
REFERENCE_BATCH1 = {"users_per_s": 1181, "latency_ms": 0.85}


def benchmark(rec: recommend_lib.Recommender, artefact: str, k: int,
              repeats: int = 50) -> list[dict]:
  """Median batch-1 latency and batch-10,000 throughput of both serving paths.

  Users are 20 random items each; each path is warmed up (compiled) before timing.
  """
  import time

  import numpy as np

  from jax_vaecf import serve as serve_lib

  rng = np.random.default_rng(0)
  ids = [str(i) for i in rec.item_ids.tolist()]
  pick = lambda: [ids[j] for j in rng.choice(len(ids), min(20, len(ids) - 1),
                                             replace=False)]
  one, many = [pick()], [pick() for _ in range(10_000)]
  scorer = serve_lib.load(artefact)
  paths = {"Recommender (jit, project installed)": lambda h: rec.recommend(h, k),
           "exported artefact (serve.py)": lambda h: scorer.recommend(h, k)}
  rows = []
  for name, fn in paths.items():
    fn(one), fn(many)  # compile both shapes
    lat = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn(one)
      lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fn(many)
    many_s = time.perf_counter() - t0
    ms = 1000 * float(np.median(lat))
    rows.append({"path": name, "batch1_latency_ms": ms, "batch1_users_per_s": 1000 / ms,
                 "batch10000_users_per_s": 10_000 / many_s})
  return rows


def format_benchmark(rows: list[dict]) -> str:
  lines = ["| path | batch 1 latency (ms) | batch 1 users/s | batch 10,000 users/s |",
           "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['path']} | {r['batch1_latency_ms']:.2f} | "
                 f"{r['batch1_users_per_s']:,.0f} | {r['batch10000_users_per_s']:,.0f} |")
  ref = REFERENCE_BATCH1
  lines.append(f"| NVIDIA VAE-CF, A100 TF32 (published) | {ref['latency_ms']} | "
               f"{ref['users_per_s']:,} | - |")
  return "\n".join(lines)


def main(argv):
  cli.start(argv, required=("workdir", "out"))
  if FLAGS.k < 1:
    raise app.UsageError(f"--k must be >= 1, got {FLAGS.k}")
  try:
    rec = recommend_lib.Recommender.from_workdir(FLAGS.workdir)
    if FLAGS.k > rec.model.n_items:
      raise app.UsageError(f"--k={FLAGS.k} exceeds the {rec.model.n_items} items")
    manifest = export_lib.export_run(FLAGS.workdir, FLAGS.out, FLAGS.k,
                                     platforms=FLAGS.platforms, recommender=rec)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"wrote {FLAGS.out}: {manifest['model']['model']} over {manifest['n_items']:,} "
        f"items, top {manifest['k']}, {size / 1e6:.1f} MB, platforms "
        f"{','.join(manifest['platforms'])}")
  if FLAGS.benchmark:
    print(format_benchmark(benchmark(rec, FLAGS.out, min(10, FLAGS.k))))


if __name__ == "__main__":
  cli.run(main)
