"""Batch recommendations: ``experiments.recommend --users_file F --out recs.csv``."""

import csv
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jax_vaecf.training import engine as loop
from jax_vaecf.core import progress as progress_lib
from jax_vaecf.serving import bulk as batch_lib
from jax_vaecf.training import run_folder
from jax_vaecf.serving import recommender as recommend

import _tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(trained_run):
  return trained_run


@pytest.fixture(scope="module")
def rec(trained):
  return recommend.Recommender.from_workdir(trained)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.recommend", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=180)


def _read_recs(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["user", "rank", "item", "score"]
  return rows[1:]


def _by_user(rows):
  out = {}
  for user, rank, item, score in rows:
    out.setdefault(user, []).append((int(rank), item, score))
  return out


def _check_rows(rows, users, items, scores):
  """``rows`` hold, in order, each user's ranked items and float32 scores exactly."""
  want = [[u, str(r), str(i), s] for u, its, scs in zip(users, items, scores)
          for r, (i, s) in enumerate(zip(its.tolist(), scs.tolist()), 1)]
  assert [row[:3] for row in rows] == [w[:3] for w in want]
  got = np.array([np.float32(row[3]) for row in rows], np.float32)
  np.testing.assert_array_equal(got, np.array([w[3] for w in want], np.float32))


def test_users_file_gives_recommend_row_for_row(trained, rec, tmp_path):
  ids = [str(i) for i in rec.item_ids.tolist()]
  rng = np.random.default_rng(0)
  names = [f"user-{j}" for j in rng.permutation(1000)[:300]]
  lines = [(u, ids[j]) for u in names
           for j in rng.choice(len(ids), rng.integers(1, 13), replace=False)]
  lines += [(names[5], "nope"), (names[5], "99999"), (names[8], "nope"),
            ("only-unknown", "zzz"), (names[3], lines[0][1])]  # + a repeated interaction
  every_but_2 = [i for j, i in enumerate(ids) if j not in (4, 90)]
  lines += [("greedy", i) for i in every_but_2]
  order = rng.permutation(len(lines))  # users' lines interleaved
  lines = [lines[j] for j in order]
  path = tmp_path / "histories.csv"
  path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in lines))
  histories = {}  # in order of first appearance
  for u, i in lines:
    histories.setdefault(u, []).append(i)
  out = tmp_path / "recs.csv"

  r = _cli("--workdir", trained, "--users_file", str(path), "--out", str(out), "--k",
           "10", "--chunk_users", "128")
  assert r.returncode == 0, r.stderr[-2000:]

  # Row for row what Recommender.recommend gives for the same chunks of 128 users.
  users = list(histories)
  assert len(users) == 302
  rows = _read_recs(out)
  want_items, want_scores = [], []
  for lo in range(0, len(users), 128):
    got = rec.recommend([histories[u] for u in users[lo:lo + 128]], k=10)
    want_items += got.items
    want_scores += got.scores
  _check_rows(rows, users, want_items, want_scores)
  recs = _by_user(rows)
  # A user with all but 2 items gets exactly those 2; every other user k, none seen.
  assert sorted(i for _, i, _ in recs["greedy"]) == sorted([ids[4], ids[90]])
  assert [rank for rank, _, _ in recs["greedy"]] == [1, 2]
  assert all(len(recs[u]) == 10 and not {i for _, i, _ in recs[u]} & set(histories[u])
             for u in users if u != "greedy")
  assert "skipped 4 lines whose item is not in the model's item table (3 distinct ids: " \
         "99999, nope, zzz)" in r.stderr
  assert "1 users have no known item: recommended for an empty history" in r.stderr
  summary = r.stdout.strip().splitlines()
  assert len(summary) == 1 and re.fullmatch(
      rf"302 users, {len(rows)} rows written to {re.escape(str(out))} in [\d.]+ s: "
      r"\d+ users/s \(model loading excluded\), scoring \d+ users/s", summary[0]), r.stdout


def test_held_out_test_users_of_the_runs_split(trained, rec, tmp_path):
  out = tmp_path / "test_recs.csv"
  r = _cli("--workdir", trained, "--users_file=test", "--out", str(out), "--k", "5")
  assert r.returncode == 0, r.stderr[-2000:]
  split = loop.load_data(run_folder.run_config(trained))
  fold_in = split.test.fold_in.tocsr()
  rows = _read_recs(out)
  users = [str(u) for u in split.test.user_ids.tolist()]
  assert len(users) == 30 and list(_by_user(rows)) == users
  columns = [fold_in.indices[fold_in.indptr[u]:fold_in.indptr[u + 1]]
             for u in range(len(users))]
  scores, top = rec.recommend_columns(columns, 5)
  _check_rows(rows, users, [rec.item_ids[t] for t in top], list(scores))
  for u, (user, recs) in enumerate(_by_user(rows).items()):
    assert not {i for _, i, _ in recs} & {str(rec.item_ids[c]) for c in columns[u]}
  assert r.stdout.startswith("30 users, 150 rows written to ")


def test_held_out_users_refused_when_the_data_changed(trained, rec):
  val = batch_lib.held_out_users(trained, "validation", rec.item_ids)
  split = loop.load_data(run_folder.run_config(trained))
  np.testing.assert_array_equal(val.ids, split.validation.user_ids)
  assert val.indices.size == split.validation.fold_in.nnz
  changed = rec.item_ids.copy()
  changed[[3, 7]] = changed[[7, 3]]
  with pytest.raises(ValueError, match=(
      "--users_file=test: the split rebuilt from .* has other items than the model's item "
      rf"table \(column 3 is item {rec.item_ids[3]} there, {rec.item_ids[7]} in the "
      r"model\): the data changed since training")):
    batch_lib.held_out_users(trained, "test", changed)
  with pytest.raises(ValueError, match="150 items, the model has 149"):
    batch_lib.held_out_users(trained, "test", rec.item_ids[:-1])


def test_items_are_matched_by_their_text():
  table = np.array([7, 70, 2**63 - 1], np.int64)
  np.testing.assert_array_equal(
      batch_lib.column_lookup(table, np.array(["70", "007", "7", str(2**63 - 1), "x"])),
      [1, -1, 0, 2, -1])
  text = np.array(["b", "SKU-1", "007"])
  np.testing.assert_array_equal(batch_lib.column_lookup(text, np.array(["007", "7", "b"])),
                                [2, -1, 0])


def test_users_file_delimiter_and_header(tmp_path):
  table = np.array([10, 20, 30], np.int64)
  p = tmp_path / "h.tsv"
  p.write_text("b\t20\na\t10\nb\t30\nb\t10\nb\t30\na\t99\n")
  users = batch_lib.users_from_file(batch_lib.read_users_file(str(p), "tab"), table)
  assert users.ids.tolist() == ["b", "a"]  # first appearance, not sorted
  assert [c.tolist() for c in users.columns(0, 2)] == [[0, 1, 2], [0]]  # repeat collapsed
  assert (users.unknown_rows, users.unknown_ids.tolist(), users.no_known) == (1, ["99"], 0)
  # Forced: line 1 is a header, so user b's first line is gone.
  users = batch_lib.users_from_file(batch_lib.read_users_file(str(p), "tab", "yes"), table)
  assert users.ids.tolist() == ["a", "b"]
  assert [c.tolist() for c in users.columns(0, 2)] == [[0], [0, 2]]
  p.write_text("u,i\nv,w\n")
  with pytest.raises(ValueError, match="--users_header=yes or --users_header=no"):
    batch_lib.read_users_file(str(p))
  users = batch_lib.users_from_file(batch_lib.read_users_file(str(p), ",", "no"), table)
  assert users.ids.tolist() == ["u", "v"]
  assert (users.unknown_rows, users.unknown_ids.size, users.no_known) == (2, 2, 2)


def test_write_is_atomic_and_reports_progress(rec, tmp_path):
  users = batch_lib.Users(ids=np.array(["a", 'b,"c"', "d"]), indptr=np.array([0, 2, 3, 3]),
                        indices=np.array([0, 5, 9], np.int32))
  out = tmp_path / "recs.csv"
  stream = io.StringIO()
  bar = progress_lib.Progress(len(users), "recommending", force=True, stream=stream)
  rows, scoring = batch_lib.write_recommendations(rec, users, 3, str(out), 2, bar)
  assert rows == 9 and scoring > 0
  assert "1/3" not in stream.getvalue() and "3/3" in stream.getvalue()
  assert "2/3" in stream.getvalue()  # one update per chunk of 2
  assert [row[0] for row in _read_recs(out)] == ["a"] * 3 + ['b,"c"'] * 3 + ["d"] * 3
  # A failure in a later chunk leaves the previous file and no temporary file.
  calls = []

  class Failing:
    item_ids = rec.item_ids

    def recommend_columns(self, columns, k):
      calls.append(len(columns))
      if len(calls) == 2:
        raise ValueError("non-finite scores")
      return rec.recommend_columns(columns, k)

  before = out.read_bytes()
  with pytest.raises(ValueError, match="non-finite"):
    batch_lib.write_recommendations(Failing(), users, 3, str(out), 2)
  assert out.read_bytes() == before and os.listdir(tmp_path) == ["recs.csv"]


@pytest.mark.parametrize("case", ["missing", "one_column", "no_out", "with_items"])
def test_bad_batch_input_fails_with_one_clean_line(trained, tmp_path, case):
  users = tmp_path / "users.csv"
  users.write_text("1\n2\n")  # one column
  out = tmp_path / "recs.csv"
  args = {"missing": ["--users_file", str(tmp_path / "nothing.csv"), "--out", str(out)],
          "one_column": ["--users_file", str(users), "--out", str(out)],
          "no_out": ["--users_file", str(users)],
          "with_items": ["--users_file", str(users), "--out", str(out), "--items", "1"]}
  r = _tools.run("experiments.recommend", "--workdir", trained, *args[case])
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and r.stderr.startswith("error: "), r.stderr
  assert errors[0].startswith({
      "missing": f"error: --users_file: {tmp_path / 'nothing.csv'}: no such file",
      "one_column": f"error: --users_file: {users}, line 1: expected at least 2 fields",
      "no_out": "error: --users_file needs --out, the CSV to write",
      "with_items": "error: --items and --users_file are exclusive: give one user's "
                    "items or a file of users"}[case]), errors[0]
  assert os.listdir(tmp_path) == ["users.csv"]
