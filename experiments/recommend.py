"""Recommend items for a new user from a trained run's workdir.

  python -m experiments.recommend --workdir runs/demo --items 1,50,260 --k 10
  python -m experiments.recommend --workdir runs/demo --benchmark

Prints raw item ids, scores and, for MovieLens data, titles (found next to the run's
data, or given with ``--titles``). Unknown item ids are reported and skipped. Items of
the history are never recommended: a user with fewer than ``--k`` other items gets
those only, with a line saying so.
``--benchmark`` reports latency at batch 1 and throughput at batch 10,000.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
import threading
import time

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from jax_vaecf import recommend as recommend_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_list("items", [], "Raw ids of the items the user interacted with.")
flags.DEFINE_integer("k", 10, "How many items to recommend.")
flags.DEFINE_string("titles", "", "movies.csv, movies.dat or u.item ('' = look next to "
                    "the run's data).")
flags.DEFINE_bool("benchmark", False, "Measure latency at batch 1 and throughput at "
                  "batch 10,000 instead of recommending.")


def _open_text(path: str):
  raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
  return io.TextIOWrapper(raw, encoding="latin-1" if not path.endswith(
      ("movies.csv", "movies.csv.gz")) else "utf-8", newline="")


def read_titles(path: str) -> dict[str, str]:
  """Raw item id -> title from a MovieLens movies.csv, movies.dat or u.item file."""
  name = os.path.basename(path)
  titles = {}
  with _open_text(path) as f:
    if name.startswith("movies.csv"):
      reader = csv.reader(f)
      next(reader, None)
      for row in reader:
        if len(row) >= 2:
          titles[row[0]] = row[1]
    else:
      sep = "::" if name.startswith("movies.dat") else "|"
      for line in f:
        parts = line.rstrip("\r\n").split(sep)
        if len(parts) >= 2:
          titles[parts[0]] = parts[1]
  return titles


def find_titles(workdir: str) -> str | None:
  """The titles file next to the data the run was trained on, if there is one."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    return None
  with open(cfg_path) as f:
    data_dir = json.load(f).get("data_dir", "")
  folder = data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir)
  for name in ("movies.csv", "movies.dat", "u.item"):
    for cand in (name, name + ".gz"):
      p = os.path.join(folder, cand)
      if os.path.exists(p):
        return p
  return None


def benchmark(rec: recommend_lib.Recommender, k: int) -> dict:
  """Median latency of one user and throughput at 10,000 users (after warm-up)."""
  rng = np.random.default_rng(0)
  ids = rec.item_ids
  one = [list(ids[rng.choice(len(ids), 20, replace=False)])]
  many = [list(ids[rng.choice(len(ids), 20, replace=False)]) for _ in range(10_000)]
  rec.recommend(one, k)
  lat = []
  for _ in range(50):
    t0 = time.perf_counter()
    rec.recommend(one, k)
    lat.append(time.perf_counter() - t0)
  rec.recommend(many, k)
  t0 = time.perf_counter()
  rec.recommend(many, k)
  dt = time.perf_counter() - t0
  return {"batch1_latency_ms": 1000 * float(np.median(lat)),
          "batch1_users_per_s": 1 / float(np.median(lat)),
          "batch10000_users_per_s": 10_000 / dt}


def _fail(message: str) -> None:
  """Prints ``error: <message>`` on stderr and exits with status 1.

  Non-daemon threads are joined first, as interpreter exit would, but before exit
  hooks shut the thread pools down: orbax's CheckpointManager cleans its folder in such
  a thread, which close() does not wait for and which, cut off, prints a traceback.
  """
  print(f"error: {message}", file=sys.stderr)
  for t in threading.enumerate():
    if t is not threading.main_thread() and not t.daemon:
      t.join()
  sys.exit(1)


def main(argv):
  cli.start(argv, required=("workdir",))
  if FLAGS.k < 1:
    raise app.UsageError(f"--k must be >= 1, got {FLAGS.k}")
  try:
    rec = recommend_lib.Recommender.from_workdir(FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  if FLAGS.k > rec.model.n_items:
    raise app.UsageError(f"--k={FLAGS.k} exceeds the {rec.model.n_items} items")
  if FLAGS.benchmark:
    res = benchmark(rec, FLAGS.k)
    print(f"batch 1: {res['batch1_latency_ms']:.2f} ms per request "
          f"({res['batch1_users_per_s']:.0f} users/s); batch 10,000: "
          f"{res['batch10000_users_per_s']:.0f} users/s")
    return
  try:
    out = rec.recommend([FLAGS.items], FLAGS.k)
  except ValueError as e:  # a model whose scores are not finite
    _fail(str(e))
  if out.unknown[0]:
    print(f"unknown item ids, skipped: {', '.join(map(str, out.unknown[0]))}")
  titles_path = FLAGS.titles or find_titles(FLAGS.workdir)
  titles = read_titles(titles_path) if titles_path else {}
  known = [i for i in FLAGS.items if i not in set(map(str, out.unknown[0]))]
  if known:
    print("history: " + "; ".join(f"{i} {titles.get(str(i), '')}".strip() for i in known))
  if len(out.items[0]) < FLAGS.k:
    print(f"only {len(out.items[0])} of the {rec.model.n_items} items are not in the "
          "history")
  for rank, (item, score) in enumerate(zip(out.items[0], out.scores[0]), 1):
    title = titles.get(str(item), "")
    print(f"{rank:3d}. {item}  {score:8.3f}  {title}".rstrip())


if __name__ == "__main__":
  cli.run(main)
