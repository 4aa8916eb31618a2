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
rebuilt from its ``config.json``, their fold-in items as histories. Users are scored
``--chunk_users`` at a time and the file is written atomically: a failure leaves none.
Rows with unknown items are skipped and counted on stderr; a user left with no known
item is recommended for an empty history. Stdout gets one summary line with the users/s
of the whole command (model loading excluded) and of the scoring alone.
"""

from __future__ import annotations

import csv
import dataclasses
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
from jax_vaecf import progress as progress_lib
from jax_vaecf import files as files_lib
from jax_vaecf import recommend as recommend_lib
from jax_vaecf.data import readers

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_list("items", [], "Raw ids of the items the user interacted with.")
flags.DEFINE_integer("k", 10, "How many items to recommend.")
flags.DEFINE_string("titles", "", "movies.csv, movies.dat or u.item ('' = look next to "
                    "the run's data).")
flags.DEFINE_bool("benchmark", False, "Measure latency at batch 1 and throughput at "
                  "batch 10,000 instead of recommending.")
flags.DEFINE_string("users_file", "", "Batch mode: a user,item file of histories (one "
                    "interaction per line, further columns ignored), or 'validation' / "
                    "'test' for the held-out users of the run's own split (a file so "
                    "named: ./test). Needs --out.")
flags.DEFINE_string("out", "", "Batch mode: the CSV to write (user,rank,item,score).")
flags.DEFINE_string("users_delimiter", ",", "--users_file's field separator ('tab' for "
                    "a tab).")
flags.DEFINE_string("users_header", "auto", "Whether --users_file's line 1 is a header: "
                    "auto, yes or no.")
flags.DEFINE_integer("chunk_users", 4096, "Batch mode: users scored and written at a time.")

HELD_OUT_PARTS = ("validation", "test")


def _open_text(path: str):
  """A titles file as text: UTF-8 for movies.csv and any file with a byte-order mark
  (dropped), else Latin-1 (ML-1M's movies.dat and ml-100k's u.item)."""
  with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
    data = f.read()
  utf8 = data.startswith(b"\xef\xbb\xbf") or path.endswith(("movies.csv", "movies.csv.gz"))
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  return io.StringIO(data.decode("utf-8" if utf8 else "latin-1", "replace"), newline="")


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


@dataclasses.dataclass
class Users:
  """Users to recommend for, in output order, with their histories as item columns.

  Attributes:
    ids: (n,) raw user ids (text for a users file, as written).
    indptr, indices: CSR of the histories: user ``u``'s distinct, sorted int32 columns
      are ``indices[indptr[u]:indptr[u + 1]]``.
    unknown_rows: lines whose item is not in the model's item table (skipped).
    unknown_ids: the distinct raw ids of those items, sorted.
    no_known: users left with no known item (recommended for an empty history).
  """

  ids: np.ndarray
  indptr: np.ndarray
  indices: np.ndarray
  unknown_rows: int = 0
  unknown_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, str))
  no_known: int = 0

  def __len__(self) -> int:
    return len(self.ids)

  def columns(self, lo: int, hi: int) -> list[np.ndarray]:
    """The histories of users ``lo`` to ``hi - 1``, as recommend_columns takes them."""
    return [self.indices[self.indptr[u]:self.indptr[u + 1]] for u in range(lo, hi)]


def read_users_file(path: str, delimiter: str = ",", header: str = "auto"
                    ) -> readers.Interactions:
  """The ``user,item`` lines of a users file, ids as text (``read_delimited``'s codes).

  Raises FileNotFoundError or ValueError (file, line, what was expected).
  """
  try:
    return readers.read_delimited(
        path, delimiter="\t" if delimiter in ("tab", "\\t") else delimiter,
        columns=(0, 1), header={"auto": None, "yes": True, "no": False}[header],
        string_ids=True)
  except ValueError as e:
    if "cannot tell whether" in str(e):
      # read_delimited names its own argument; point at this command's flag instead.
      raise ValueError(f"{str(e).split('; say which')[0]}; say which with "
                       "--users_header=yes or --users_header=no") from None
    raise


def column_lookup(item_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """int64 column of each raw id in the item table, -1 where it is not there.

  Ids are compared by their text, as ``Recommender.columns_of`` does (``str`` of each
  table entry), so ``7`` in a file matches the int64 item 7 and ``007`` matches nothing.
  Vectorised: one binary search per raw id.
  """
  table = np.array([str(i) for i in np.asarray(item_ids).tolist()])
  raw = np.asarray(raw).astype(str)
  if table.size == 0 or raw.size == 0:
    return np.full(raw.shape, -1, np.int64)
  order = np.argsort(table, kind="stable")
  pos = np.minimum(np.searchsorted(table, raw, sorter=order), table.size - 1)
  return np.where(table[order[pos]] == raw, order[pos], -1).astype(np.int64)


def users_from_file(inter: readers.Interactions, item_ids: np.ndarray) -> Users:
  """A users file's lines as :class:`Users`: users in order of first appearance, each
  distinct raw item mapped once, unknown items skipped and counted."""
  n_items = len(item_ids)
  n_user_codes = len(inter.user_vocab) if inter.user_vocab is not None else 0
  rows = np.arange(len(inter), dtype=np.int64)
  first = np.full(n_user_codes, len(inter), np.int64)
  np.minimum.at(first, inter.users, rows)
  by_first = np.argsort(first, kind="stable")  # user codes in order of first appearance
  position = np.empty(n_user_codes, np.int64)
  position[by_first] = np.arange(n_user_codes)
  n_item_codes = len(inter.item_vocab) if inter.item_vocab is not None else 0
  col_of_code = column_lookup(item_ids, inter.raw_item_ids(np.arange(n_item_codes)))
  cols = col_of_code[inter.items]
  known = cols >= 0
  # One key per (user, column) pair, sorted by user then column; repeats collapse.
  keys = np.sort(position[inter.users[known]] * n_items + cols[known])
  keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys
  per_user = np.bincount(keys // n_items, minlength=n_user_codes)
  unknown_codes = np.unique(inter.items[~known])
  return Users(ids=inter.raw_user_ids(by_first),
               indptr=np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64),
               indices=(keys % n_items).astype(np.int32),
               unknown_rows=int((~known).sum()),
               unknown_ids=inter.raw_item_ids(unknown_codes),
               no_known=int((per_user == 0).sum()))


def run_config(workdir: str):
  """The run's settings, from its ``config.json`` (a ``configs.Config``).

  Keys this version does not know are ignored: the split is checked against the
  model's item table afterwards, which catches any that mattered.
  """
  from jax_vaecf import configs
  from jax_vaecf import run_folder
  try:
    saved = run_folder.read_run_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; the run's split is rebuilt from its settings") from None
  fields = {f.name for f in dataclasses.fields(configs.Config)}
  # JSON has no tuples; the Config's sequence fields are tuples.
  return configs.Config(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in saved.items() if k in fields})


def held_out_users(workdir: str, part: str, item_ids: np.ndarray) -> Users:
  """The ``validation`` or ``test`` users of the run's split, their fold-in items as
  histories.

  Raises ValueError when the split's item table is not the model's (the data changed
  since training, so columns would name other items), or has no such part.
  """
  from jax_vaecf import loop
  cfg = run_config(workdir)
  try:
    split = loop.load_data(cfg)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"--users_file={part}: cannot rebuild the split of {workdir} from "
                     f"its config.json: {e}") from None
  ev = getattr(split, part)
  if ev is None:
    raise ValueError(f"--users_file={part}: the run's split has no {part} users "
                     f"(protocol {split.protocol})")
  theirs = [str(i) for i in np.asarray(split.item_ids).tolist()]
  ours = [str(i) for i in np.asarray(item_ids).tolist()]
  if theirs != ours:
    if len(theirs) != len(ours):
      what = f"{len(theirs)} items, the model has {len(ours)}"
    else:
      j = next(j for j, (a, b) in enumerate(zip(theirs, ours)) if a != b)
      what = f"column {j} is item {theirs[j]} there, {ours[j]} in the model"
    raise ValueError(f"--users_file={part}: the split rebuilt from {cfg.data_dir} has "
                     f"other items than the model's item table ({what}): the data "
                     "changed since training; recommend from a users file instead")
  fold_in = ev.fold_in.tocsr()
  fold_in.sort_indices()
  return Users(ids=np.asarray(ev.user_ids), indptr=fold_in.indptr.astype(np.int64),
               indices=fold_in.indices.astype(np.int32),
               no_known=int((np.diff(fold_in.indptr) == 0).sum()))


def csv_field(text: str) -> str:
  """``text`` as one CSV field (quoted as the csv module does, only when needed)."""
  if any(c in text for c in ',"\r\n'):
    return '"' + text.replace('"', '""') + '"'
  return text


def write_recommendations(rec: recommend_lib.Recommender, users: Users, k: int,
                          out: str, chunk_users: int = 4096, progress=None
                          ) -> tuple[int, float]:
  """Writes ``user,rank,item,score`` rows for every user to ``out``, atomically.

  Users are scored ``chunk_users`` at a time and their rows written before the next
  chunk, so memory stays bounded. Fillers past a user's unseen items are dropped.

  Returns ``(rows written, seconds spent scoring)``. Raises NonFiniteModelError (a
  ``ValueError``) on non-finite scores and OSError when ``out`` cannot be written;
  either way ``out`` is left as it was.
  """
  # Formatted once: per row only the rank and the score are printed.
  item_text = [csv_field(str(i)) for i in rec.item_ids.tolist()]
  n, rows, scoring = len(users), 0, 0.0
  # Ids go out as the bytes they were read from (see jax_vaecf.data._text.ID_ERRORS).
  with files_lib.atomic_write(out, "w", newline="", errors="surrogateescape") as f:
    f.write("user,rank,item,score\n")
    for lo in range(0, n, chunk_users):
      hi = min(lo + chunk_users, n)
      t0 = time.perf_counter()
      scores, top = rec.recommend_columns(users.columns(lo, hi), k)
      scoring += time.perf_counter() - t0
      lines = []
      for uid, s_row, c_row in zip(users.ids[lo:hi].tolist(), scores.tolist(),
                                   top.tolist()):
        u = csv_field(str(uid))
        # Fillers (-1) come after every real item: their score is -inf.
        lines.extend(f"{u},{r},{item_text[c]},{s:.9g}\n"
                     for r, (s, c) in enumerate(zip(s_row, c_row), 1) if c >= 0)
      f.write("".join(lines))
      rows += len(lines)
      if progress is not None:
        progress.update(hi - lo)
  return rows, scoring


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


def batch(rec: recommend_lib.Recommender, users: Users, started: float,
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
      rows, scoring = write_recommendations(rec, users, FLAGS.k, FLAGS.out,
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


def main(argv):
  cli.start(argv, required=("workdir",))
  if FLAGS.k < 1:
    raise app.UsageError(f"--k must be >= 1, got {FLAGS.k}")
  _check_batch_flags()
  inter, setup_s = None, 0.0
  if FLAGS.users_file:
    _check_out(FLAGS.out)
    if FLAGS.users_file not in HELD_OUT_PARTS:
      # Read before the model is loaded, so a bad file fails fast.
      t0 = time.perf_counter()
      try:
        inter = read_users_file(FLAGS.users_file, FLAGS.users_delimiter,
                                FLAGS.users_header)
      except (FileNotFoundError, ValueError) as e:
        _fail(f"--users_file: {e}")
      setup_s = time.perf_counter() - t0
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
  if FLAGS.users_file:
    started = time.perf_counter()
    try:
      users = (users_from_file(inter, rec.item_ids) if inter is not None else
               held_out_users(FLAGS.workdir, FLAGS.users_file, rec.item_ids))
    except (FileNotFoundError, ValueError) as e:
      _fail(str(e))
    batch(rec, users, started, setup_s)
    return
  titles_path = FLAGS.titles or find_titles(FLAGS.workdir)
  try:
    titles = read_titles(titles_path) if titles_path else {}
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


if __name__ == "__main__":
  cli.run(main)
