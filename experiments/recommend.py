"""Recommend items for new users from a trained run's workdir.

  python -m experiments.recommend --workdir runs/demo --items 1,50,260 --k 10
  python -m experiments.recommend --workdir runs/demo --users_file histories.csv \\
      --out recs.csv --k 10
  python -m experiments.recommend --workdir runs/demo --users_file test --out recs.csv
  python -m experiments.recommend --workdir runs/demo --benchmark

Prints raw item ids, scores and, for MovieLens data, titles (found next to the run's
data, or given with ``--titles``). Unknown item ids are reported and skipped. Items of
the history are never recommended: a user with fewer than ``--k`` other items gets
those only, with a line saying so.
``--benchmark`` reports latency at batch 1 and throughput at batch 10,000.

Batch mode (``--users_file`` with ``--out``) writes a CSV ``user,rank,item,score``: one
row per user and rank (1 = best), items as the raw ids of the model's item table, scores
as float32 printed with 9 significant digits (they parse back to the same float32). The
users are either a ``user,item`` file (one interaction per line; further columns are
ignored; items matched by their text against the item table; users in order of first
appearance), or ``validation`` / ``test``: the held-out users of the run's own split,
rebuilt from its ``config.json``, their fold-in items as histories. batch_lib.Users are scored
``--chunk_users`` at a time and the file is written atomically: a failure leaves none.
Rows with unknown items are skipped and counted on stderr; a user left with no known
item is recommended for an empty history. Stdout gets one summary line with the users/s
of the whole command (model loading excluded) and of the scoring alone.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.serving import bulk as batch_lib
from jax_vaecf.core import progress as progress_lib
from jax_vaecf.serving import recommender as recommend_lib
from jax_vaecf.data import readers

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags; defined when it runs, not at import (``experiments.export`` has
  flags of the same names)."""
  fv = flag_values
  flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=fv)
  flags.DEFINE_list("items", [], "Raw ids of the items the user interacted with.",
                    flag_values=fv)
  flags.DEFINE_integer("k", 10, "How many items to recommend.", flag_values=fv)
  flags.DEFINE_string("titles", "", "movies.csv, movies.dat or u.item ('' = look next to "
                      "the run's data).", flag_values=fv)
  flags.DEFINE_bool("benchmark", False, "Measure latency at batch 1 and throughput at "
                    "batch 10,000 instead of recommending.", flag_values=fv)
  flags.DEFINE_string("users_file", "", "Batch mode: a user,item file of histories (one "
                      "interaction per line, further columns ignored), or 'validation' / "
                      "'test' for the held-out users of the run's own split (a file so "
                      "named: ./test). Needs --out.", flag_values=fv)
  flags.DEFINE_string("out", "", "Batch mode: the CSV to write (user,rank,item,score).",
                      flag_values=fv)
  flags.DEFINE_string("users_delimiter", ",", "--users_file's field separator ('tab' "
                      "for a tab).", flag_values=fv)
  flags.DEFINE_string("users_header", "auto", "Whether --users_file's line 1 is a "
                      "header: auto, yes or no.", flag_values=fv)
  flags.DEFINE_integer("chunk_users", 4096, "Batch mode: users scored and written at a "
                       "time.", flag_values=fv)


HELD_OUT_PARTS = batch_lib.HELD_OUT_PARTS


def _fail(message: str) -> None:
  """Prints ``error: <message>`` on stderr and exits with status 1.

  The threads the command started are joined first, as interpreter exit would, but
  before exit hooks shut the thread pools down: orbax's CheckpointManager cleans its
  folder in such a thread, which close() does not wait for and which, cut off, prints a
  traceback.
  """
  print(f"error: {message}", file=sys.stderr)
  for t in cli.threads_started():
    t.join()
  sys.exit(1)


def _check_batch_flags() -> None:
  """Usage errors of batch mode, before anything is loaded."""
  if FLAGS.users_file and FLAGS.items:
    raise app.UsageError("--items and --users_file are exclusive: give one user's items "
                         "or a file of users")
  if FLAGS.users_file and FLAGS.benchmark:
    raise app.UsageError("--benchmark and --users_file are exclusive")
  if FLAGS.users_file and not FLAGS.out:
    raise app.UsageError("--users_file needs --out, the CSV to write")
  if FLAGS.out and not FLAGS.users_file:
    raise app.UsageError("--out is for batch mode: give --users_file too")
  if FLAGS.users_header not in ("auto", "yes", "no"):
    raise app.UsageError(f"--users_header must be auto, yes or no, got "
                         f"{FLAGS.users_header!r}")
  if FLAGS.chunk_users < 1:
    raise app.UsageError(f"--chunk_users must be >= 1, got {FLAGS.chunk_users}")


def _check_out(out: str) -> None:
  """Fails before any work when ``--out`` cannot be a new file."""
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out):
    _fail(f"--out={out}: this is a folder, expected the CSV file to write")
  if not os.path.isdir(folder):
    _fail(f"--out={out}: the folder {folder} does not exist")


def batch(rec: recommend_lib.Recommender, users: batch_lib.Users, started: float,
          setup_s: float) -> None:
  """Writes ``--out`` for ``users`` and prints the summary line.

  ``setup_s``: seconds of this command's own work before ``started`` (reading the users
  file), counted in the throughput; model loading is not.
  """
  if users.unknown_rows:
    shown = ", ".join(map(str, users.unknown_ids[:5].tolist()))
    more = ", ..." if len(users.unknown_ids) > 5 else ""
    print(f"{FLAGS.users_file}: skipped {users.unknown_rows} lines whose item is not in "
          f"the model's item table ({len(users.unknown_ids)} distinct ids: "
          f"{shown}{more})", file=sys.stderr)
  if users.no_known:
    print(f"{users.no_known} users have no known item: recommended for an empty "
          "history", file=sys.stderr)
  try:
    with progress_lib.Progress(len(users), "recommending") as bar:
      rows, scoring = batch_lib.write_recommendations(rec, users, FLAGS.k, FLAGS.out,
                                            FLAGS.chunk_users, bar)
  except ValueError as e:  # a model whose scores are not finite
    _fail(str(e))
  except OSError as e:
    _fail(f"--out={FLAGS.out}: cannot write ({e.strerror or e})")
  elapsed = setup_s + time.perf_counter() - started
  n = len(users)
  print(f"{n} users, {rows} rows written to {FLAGS.out} in {elapsed:.2f} s: "
        f"{n / max(elapsed, 1e-9):.0f} users/s (model loading excluded), scoring "
        f"{n / max(scoring, 1e-9):.0f} users/s")


def _read_users_file() -> tuple[readers.Interactions | None, float]:
  """``(interactions of --users_file, seconds taken)``, read before the model is loaded
  so a bad file fails fast; ``(None, 0.0)`` without one or for a held-out part."""
  if not FLAGS.users_file or FLAGS.users_file in HELD_OUT_PARTS:
    return None, 0.0
  t0 = time.perf_counter()
  try:
    inter = batch_lib.read_users_file(FLAGS.users_file, FLAGS.users_delimiter,
                                      FLAGS.users_header)
  except (FileNotFoundError, ValueError) as e:
    _fail(f"--users_file: {e}")
  return inter, time.perf_counter() - t0


def _benchmark(rec: recommend_lib.Recommender) -> None:
  """``--benchmark``: prints the latency at batch 1 and the throughput at 10,000."""
  from experiments import serve_bench  # pylint: disable=g-import-not-at-top
  (res,) = serve_bench.time_paths(rec, None, FLAGS.k)
  print(f"batch 1: {res['batch1_latency_ms']:.2f} ms per request "
        f"({res['batch1_users_per_s']:.0f} users/s); batch 10,000: "
        f"{res['batch10000_users_per_s']:.0f} users/s")


def _batch_mode(rec: recommend_lib.Recommender, inter: readers.Interactions | None,
                setup_s: float) -> None:
  """``--users_file``: the users of the file read (``inter``) or of the run's held-out
  part, recommended into ``--out``."""
  started = time.perf_counter()
  try:
    users = (batch_lib.users_from_file(inter, rec.item_ids) if inter is not None else
             batch_lib.held_out_users(FLAGS.workdir, FLAGS.users_file, rec.item_ids))
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  batch(rec, users, started, setup_s)


def _one_user(rec: recommend_lib.Recommender) -> None:
  """``--items``: prints one user's recommendations, with titles when known."""
  titles_path = FLAGS.titles or batch_lib.find_titles(FLAGS.workdir)
  try:
    titles = batch_lib.read_titles(titles_path) if titles_path else {}
  except OSError as e:
    _fail(f"--titles={titles_path}: cannot read it ({e.strerror or e})")
  try:
    out = rec.recommend([FLAGS.items], FLAGS.k)
  except ValueError as e:  # a model whose scores are not finite
    _fail(str(e))
  if not FLAGS.items:
    print("no --items given: recommending for an empty history (what the model ranks "
          "first for a user it knows nothing about)")
  if out.unknown[0]:
    print(f"unknown item ids, skipped: {', '.join(map(str, out.unknown[0]))}")
  if FLAGS.items and len(out.unknown[0]) == len(FLAGS.items):
    print("none of the --items is in the model's item table: recommending for an empty "
          "history")
  known = [i for i in FLAGS.items if i not in set(map(str, out.unknown[0]))]
  if known:
    print("history: " + "; ".join(f"{i} {titles.get(str(i), '')}".strip() for i in known))
  if len(out.items[0]) < FLAGS.k:
    print(f"only {len(out.items[0])} of the {rec.model.n_items} items are not in the "
          "history")
  for rank, (item, score) in enumerate(zip(out.items[0], out.scores[0]), 1):
    title = titles.get(str(item), "")
    print(f"{rank:3d}. {item}  {score:8.3f}  {title}".rstrip())


def main(argv):
  cli.start(argv, required=("workdir",), flag_values=FLAGS)
  if FLAGS.k < 1:
    raise app.UsageError(f"--k must be >= 1, got {FLAGS.k}")
  _check_batch_flags()
  if FLAGS.users_file:
    _check_out(FLAGS.out)
  inter, setup_s = _read_users_file()
  try:
    rec = recommend_lib.Recommender.from_workdir(FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  if FLAGS.k > rec.model.n_items:
    raise app.UsageError(f"--k={FLAGS.k} exceeds the {rec.model.n_items} items")
  if FLAGS.benchmark:
    _benchmark(rec)
  elif FLAGS.users_file:
    _batch_mode(rec, inter, setup_s)
  else:
    _one_user(rec)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
