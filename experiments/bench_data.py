"""Benchmarks the data layer on a synthetic ML-20M-sized ratings.csv.

  python -m experiments.bench_data [--rows=20000000] [--keep=DIR] [--config=ml20m]

Generates (vectorised, a few seconds) a ``ratings.csv`` with the header
``userId,movieId,rating,timestamp``: ~138k users with heavy-tailed activity, ~27k
movies with Zipf popularity, half-star ratings, rows sorted by user then movie like the
real file. Then, in a fresh child process (so its peak memory is its own), it times
reading, the configured data set's split (``--config``/``--dataset``, with the same
setting flags as every tool; ML-20M by default: H = 10,000) and the training batcher at
batch 500 and 10,000 (host side only), and prints a table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's command line: its own flags and the Config flags (:mod:`experiments.cli`).
  Defined when it runs, not at import: other tools have flags of the same names."""
  fv = flag_values
  flags.DEFINE_integer("rows", 20_000_000, "Rows of the synthetic ratings.csv.",
                       flag_values=fv)
  flags.DEFINE_string("keep", None, "Folder to keep (or reuse) ratings.csv in; without it "
                      "the file is written to a temporary folder and removed.",
                      flag_values=fv)
  flags.DEFINE_string("child", None, "Internal: time the data layer on this ratings.csv in "
                      "this process and print one JSON line (the parent runs it in a fresh "
                      "child so the peak memory is the data layer's own).", flag_values=fv)
  cli.define_config_flags(fv)


def _digits(x: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligned decimal digits (n, width) uint8 and a mask without leading zeros."""
  d = np.empty((x.size, width), np.uint8)
  v = x.astype(np.int64).copy()
  for j in range(width - 1, -1, -1):
    d[:, j] = 48 + v % 10
    v //= 10
  n_digits = np.maximum(1, np.floor(np.log10(np.maximum(x, 1))).astype(np.int64) + 1)
  keep = np.arange(width)[None, :] >= (width - n_digits)[:, None]
  return d, keep


def _csv_bytes(users, items, ratings, times) -> bytes:
  n = users.size
  parts, masks = [], []
  for arr, w in ((users, 6), (items, 6)):
    d, k = _digits(arr, w)
    parts += [d, np.full((n, 1), ord(","), np.uint8)]
    masks += [k, np.ones((n, 1), bool)]
  halves = np.rint(ratings * 2).astype(np.int64)
  r = np.stack([48 + halves // 2, np.full(n, ord(".")), 48 + 5 * (halves % 2)],
               axis=1).astype(np.uint8)
  parts += [r, np.full((n, 1), ord(","), np.uint8)]
  masks += [np.ones((n, 3), bool), np.ones((n, 1), bool)]
  d, k = _digits(times, 10)
  parts += [d, np.full((n, 1), 10, np.uint8)]
  masks += [k, np.ones((n, 1), bool)]
  return np.concatenate(parts, axis=1)[np.concatenate(masks, axis=1)].tobytes()


def generate(path: str, rows: int, n_users: int = 138_493, n_items: int = 26_744,
             seed: int = 0) -> int:
  """Writes the synthetic ratings.csv; returns the number of data rows."""
  rng = np.random.default_rng(seed)
  # Smaller --rows (smoke runs) shrink the user count to keep ML-20M's ~144 per user.
  n_users = max(10, min(n_users, rows // 144))
  # Heavy-tailed activity, at least 20 ratings per user (as in ML-20M).
  act = rng.lognormal(0.0, 1.1, n_users)
  counts = 20 + np.floor(act / act.sum() * max(rows * 1.3 - 20 * n_users, 0)).astype(
      np.int64)
  users = np.repeat(np.arange(1, n_users + 1), counts)
  pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
  items = rng.choice(n_items, users.size, p=pop / pop.sum())
  movie_ids = rng.permutation(131_262)[:n_items] + 1
  key = np.unique(users * (1 << 20) + items)[:rows]  # sorted, unique pairs
  users, items = key >> 20, movie_ids[key & ((1 << 20) - 1)]
  order = np.lexsort((items, users))
  users, items = users[order], items[order]
  ratings = rng.choice(np.arange(1, 11) / 2, users.size,
                       p=np.array([1, 3, 2, 7, 4, 20, 12, 27, 8, 16]) / 100)
  times = rng.integers(789_652_009, 1_427_784_002, users.size)
  with open(path + ".tmp", "wb") as f:
    f.write(b"userId,movieId,rating,timestamp\n")
    step = 2_000_000
    for lo in range(0, users.size, step):
      s = slice(lo, lo + step)
      f.write(_csv_bytes(users[s], items[s], ratings[s], times[s]))
  os.replace(path + ".tmp", path)
  return int(users.size)


# The settings this tool reads: the split of the configured data set (whose file the
# synthetic ratings.csv imitates). Any other setting given is refused, not ignored.
def used_settings() -> frozenset:
  from jax_vaecf.training import configs  # pylint: disable=g-import-not-at-top
  return frozenset(configs.tagged("split_file"))


def check_settings(cfg, given: dict) -> None:
  """Raises ``app.UsageError`` for a setting this tool would ignore, or a data set whose
  raw file is not a MovieLens ``ratings.csv`` (the format generated here)."""
  from jax_vaecf.data import registry  # pylint: disable=g-import-not-at-top
  unused = sorted(set(given) - used_settings())
  if unused:
    raise app.UsageError(f"bench_data times reading and splitting only; it does not use "
                         f"--{', --'.join(unused)}")
  entry = registry.get(cfg.dataset)
  if entry.files[:1] != ("ratings.csv",) or cfg.dataset == "ml-20m_alt":
    raise app.UsageError(f"--dataset={cfg.dataset}: bench_data generates a MovieLens "
                         "ratings.csv and times the paper's split of it; use ml-20m, "
                         "ml-latest-small or another ratings.csv data set")


def _child(path: str, cfg) -> dict:
  from jax_vaecf.data import TrainBatcher, preprocess, readers, registry  # pylint: disable=g-import-not-at-top
  out = {}
  t0 = time.perf_counter()
  inter = readers.read_movielens_csv(path)
  out["read_s"] = time.perf_counter() - t0
  t1 = time.perf_counter()
  # The data set's split (ML-20M: H = 10,000, ratings > 3.5, users with >= 5 items);
  # smoke runs with few users hold out at most 10% of them.
  options = dict(registry.get(cfg.dataset).split_defaults)
  if cfg.n_heldout_users:
    options["n_heldout_users"] = cfg.n_heldout_users
  n_users = np.unique(inter.users).size
  if "n_heldout_users" in options:
    options["n_heldout_users"] = min(options["n_heldout_users"], n_users // 10)
  split = preprocess.split_heldout_users(
      inter, heldout_users_fraction=cfg.heldout_users_fraction,
      heldout_items_fraction=cfg.heldout_items_fraction, seed=cfg.split_seed, **options)
  out["split_s"] = time.perf_counter() - t1
  out["preprocess_s"] = time.perf_counter() - t0
  out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  st = split.stats()
  out["users"], out["items"] = st["users"], st["items"]
  out["train_interactions"] = st["train"]["interactions"]
  del inter
  for bs in (500, 10_000):
    b = TrainBatcher(split.train, bs, seed=0)
    t = time.perf_counter()
    n = sum(1 for _ in b.epoch_batches(0))
    dt = time.perf_counter() - t
    out[f"batches_per_s_{bs}"] = n / dt
    out[f"users_per_s_{bs}"] = split.train.shape[0] / dt
    out[f"buckets_{bs}"] = len(b.nnz_buckets)
  return out


def main(argv):
  cli.start(argv, flag_values=FLAGS)
  cfg = cli.config_from_flags(FLAGS)
  check_settings(cfg, cli.config_overrides(FLAGS))
  if FLAGS.child:
    print(json.dumps(_child(FLAGS.child, cfg)))
    return
  folder = FLAGS.keep or tempfile.mkdtemp(prefix="bench_data-")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "ratings.csv")
  gen_s = None
  if not os.path.exists(path):
    t = time.perf_counter()
    rows = generate(path, FLAGS.rows)
    gen_s = time.perf_counter() - t
    print(f"generated {rows:,} rows ({os.path.getsize(path) / 1e6:.0f} MB) in "
          f"{gen_s:.1f} s -> {path}", file=sys.stderr)
  # The child gets the same settings flags (its own process, so its peak memory is its own).
  res = subprocess.run([sys.executable, "-m", "experiments.bench_data", *sys.argv[1:],
                        f"--child={path}"], capture_output=True, text=True)
  if res.returncode:
    sys.exit(f"benchmark child failed:\n{res.stderr}")
  r = json.loads(res.stdout.strip().splitlines()[-1])
  rows = [("file size (MB)", f"{os.path.getsize(path) / 1e6:.0f}")]
  if gen_s is not None:
    rows.append(("generate (s)", f"{gen_s:.1f}"))
  rows += [("read ratings.csv (s)", f"{r['read_s']:.1f}"),
           ("paper split (s)", f"{r['split_s']:.1f}"),
           ("preprocess total (s)", f"{r['preprocess_s']:.1f}"),
           ("peak host memory (GB)", f"{r['peak_rss_gb']:.2f}"),
           ("users / items", f"{r['users']:,} / {r['items']:,}"),
           ("train interactions", f"{r['train_interactions']:,}")]
  for bs in (500, 10_000):
    rows.append((f"batcher B={bs} (batches/s)",
                 f"{r[f'batches_per_s_{bs}']:.1f}  ({r[f'users_per_s_{bs}']:,.0f} users/s, "
                 f"{r[f'buckets_{bs}']} buckets)"))
  w = max(len(k) for k, _ in rows)
  print(f"{'measure':<{w}}  value")
  for k, v in rows:
    print(f"{k:<{w}}  {v}")
  if not FLAGS.keep:
    os.remove(path)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
