"""Messy input and faults that once gave a silently wrong result or a corrupted run
folder: ids that are not UTF-8, a byte-order mark, NUL bytes, quoted csv fields, two
processes on one run folder, a full disk, and the messages of the rough edges."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import checkpoint
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.training import run_folder
from jax_vaecf.data import preprocess, readers
from jax_vaecf.data.split import Split, check_distinct_ids

import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(n_users=60, n_items=40, per_user=8, seed=0):
  """(user, item index) pairs: each user with ``per_user`` distinct items."""
  rng = np.random.default_rng(seed)
  return [(u, int(i)) for u in range(1, n_users + 1)
          for i in rng.choice(n_items, per_user, replace=False)]


# ------------------------------------------------------------- ids that are not UTF-8


def _latin1_csv(path):
  """A headerless user,item,rating csv whose item ids are bytes: items 0 and 1 are
  ``\\xff9`` and ``\\xfe9`` (not UTF-8, different), the others ``i<k>``."""
  name = lambda i: {0: b"\xff9", 1: b"\xfe9"}.get(i, b"i%d" % i)
  rows = b"".join(b"%d,%s,5\n" % (u, name(i))
                  for u, i in _lines(n_users=150, n_items=120, per_user=10))
  path.write_bytes(rows)
  return str(path)


def test_ids_that_are_not_utf8_stay_distinct_and_byte_exact(tmp_path):
  path = _latin1_csv(tmp_path / "r.csv")
  x = readers.read_delimited(path)
  s = preprocess.split_per_user(x, threshold=3.5)
  ids = s.item_ids.tolist()
  assert len(set(ids)) == len(ids) == 120
  # Each id encodes back to the bytes of the file.
  back = {i.encode("utf-8", "surrogateescape") for i in ids}
  assert {b"\xff9", b"\xfe9"} <= back
  # The recommender maps each to its own column.
  cols = {i: j for j, i in enumerate(ids)}
  a, b = cols["\udcff9"], cols["\udcfe9"]
  assert a != b


def test_a_split_with_two_items_under_one_id_is_refused():
  check_distinct_ids(np.array(["a", "b"]), "item")
  with pytest.raises(ValueError, match="item id '\ufffd9' names both column 1 and "
                     "column 3; every item needs an id of its own"):
    check_distinct_ids(np.array(["a", "\ufffd9", "c", "\ufffd9"]), "item")
  import scipy.sparse as sp
  from jax_vaecf.data.split import EvalSplit
  m = sp.csr_matrix(np.ones((2, 3), np.float32))
  ev = EvalSplit(fold_in=m, heldout=m, user_ids=np.array([1, 2]))
  with pytest.raises(ValueError, match="item id 7 names both column 0 and column 2"):
    Split(train=m, validation=None, test=ev, item_ids=np.array([7, 8, 7]),
          train_user_ids=np.array([1, 2]))


def test_non_utf8_ids_through_training_recommending_and_the_cli(tmp_path):
  data = _latin1_csv(tmp_path / "r.csv")
  workdir = str(tmp_path / "run")
  cfg = _runs.small_config(data, dataset="csv", protocol="per_user", csv_header="no",
                           cache_dir=str(tmp_path / "cache"), number_of_epochs=1,
                           test=False, test_ks=(5,))
  loop.run(cfg, workdir)
  ids = np.load(os.path.join(workdir, "item_ids.npy")).tolist()
  assert len(set(ids)) == len(ids) == 120
  rec = recommend.Recommender.from_workdir(workdir)
  out = rec.recommend([["\udcff9"], ["\udcfe9"]], k=119)
  assert out.unknown == [[], []]
  assert "\udcff9" not in out.items[0].tolist() and "\udcff9" in out.items[1].tolist()
  # From the shell: the id's bytes in, the same bytes out.
  r = subprocess.run([sys.executable.encode(), b"-m", b"experiments.recommend",
                      b"--workdir", workdir.encode(), b"--items", b"\xff9", b"--k", b"119"],
                     cwd=REPO, capture_output=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert b"history: \xff9\n" in r.stdout and b"unknown" not in r.stdout
  listed = [line.split()[1] for line in r.stdout.splitlines()
            if line.strip()[:1].isdigit()]
  assert b"\xfe9" in listed and b"\xff9" not in listed and len(listed) == 119
  # A batch file of recommendations writes them back as they were read.
  users = tmp_path / "users.csv"
  users.write_bytes(b"u1,\xff9\nu2,\xfe9\n")
  out_csv = tmp_path / "recs.csv"
  r = subprocess.run([sys.executable, "-m", "experiments.recommend", "--workdir", workdir,
                      "--users_file", str(users), "--users_header=no", "--out", str(out_csv),
                      "--k", "119"],
                     cwd=REPO, capture_output=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = out_csv.read_bytes().splitlines()[1:]
  assert {row.split(b",")[2] for row in rows if row.startswith(b"u1,")} == {
      i.encode("utf-8", "surrogateescape") for i in ids} - {b"\xff9"}


# ----------------------------------------------------------------- byte-order mark


def test_a_byte_order_mark_never_hides_the_first_row(tmp_path):
  rows = _lines()
  text = "".join(f"{u},{i},5\n" for u, i in rows)
  path = tmp_path / "bom.csv"
  path.write_bytes(b"\xef\xbb\xbf" + text.encode())
  x = readers.read_delimited(str(path))  # header=None: guessed
  assert len(x) == len(rows) and x.user_vocab is None and x.users[0] == 1
  # Every reader: MovieLens ratings.csv with its header, ratings.dat, u.data.
  ml = tmp_path / "ratings.csv"
  ml.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n"
                 + "".join(f"{u},{i},5,0\n" for u, i in rows).encode())
  assert len(readers.read_movielens_csv(str(ml))) == len(rows)
  dat = tmp_path / "ratings.dat"
  dat.write_bytes(b"\xef\xbb\xbf" + "".join(f"{u}::{i}::5::0\n" for u, i in rows).encode())
  y = readers.read_ml1m(str(dat))
  assert y.user_vocab is None and y.users.tolist() == [u for u, _ in rows]
  tsv = tmp_path / "u.data"
  tsv.write_bytes(b"\xef\xbb\xbf" + "".join(f"{u}\t{i}\t5\t0\n" for u, i in rows).encode())
  assert readers.read_ml100k(str(tsv)).user_vocab is None
  lines = tmp_path / "train.txt"
  lines.write_bytes(b"\xef\xbb\xbf1 2 3\n2 3 4\n")
  assert readers.read_user_lines(str(lines)).users.tolist() == [1, 1, 2, 2]
  # The titles of recommendations too.
  from jax_vaecf.serving import bulk as batch_lib
  titles = tmp_path / "movies.dat"
  titles.write_bytes(b"\xef\xbb\xbf1::Toy Story (1995)::Animation\n2::Caf\xc3\xa9::Drama\n")
  assert batch_lib.read_titles(str(titles)) == {"1": "Toy Story (1995)", "2": "Caf\u00e9"}


# ------------------------------------------------------------------------ NUL bytes


def test_a_nul_byte_is_refused_with_file_and_line(tmp_path):
  path = tmp_path / "nul.csv"
  path.write_bytes(b"1,10,5\n2,1\x001,5\n")
  with pytest.raises(ValueError, match=r"nul.csv, line 2: holds a NUL byte \(0x00\) at "
                     "column 4; expected text"):
    readers.read_delimited(str(path))
  (tmp_path / "ratings.dat").write_bytes(b"1::10::5::0\n\x00")
  with pytest.raises(ValueError, match=r"ratings.dat, line 2: holds a NUL byte"):
    readers.read_ml1m(str(tmp_path / "ratings.dat"))


# ------------------------------------------------------------------- quoted fields


def test_quoted_csv_fields_are_read_as_rfc_4180(tmp_path):
  # Every field quoted, as spreadsheets export, and a quoted field holding the
  # delimiter and a doubled quote.
  path = tmp_path / "q.csv"
  path.write_text('"user","item","rating"\n"1","a,b","5"\n"2","x""y","4"\n3,z,1\n')
  x = readers.read_delimited(str(path))
  assert x.raw_item_ids(x.items).tolist() == ["a,b", 'x"y', "z"]
  assert x.users.tolist() == [1, 2, 3] and x.ratings.tolist() == [5, 4, 1]
  # Unquoted files keep reading quotes inside a field as characters.
  plain = tmp_path / "p.csv"
  plain.write_text('1,a"b,5\n2,c,4\n')
  assert readers.read_delimited(str(plain)).item_vocab.tolist() == [b'a"b', b"c"]
  bad = tmp_path / "bad.csv"
  bad.write_text('1,x,5\n19,"a"b,5\n')
  with pytest.raises(ValueError, match=r"bad.csv, line 2: malformed quoted field"):
    readers.read_delimited(str(bad))
  multi = tmp_path / "multi.csv"
  multi.write_text('1,x,5\n2,"a\nb",5\n')
  with pytest.raises(ValueError, match=r"multi.csv, line 2: a quoted field holds a line "
                     "break"):
    readers.read_delimited(str(multi))
  short = tmp_path / "short.csv"
  short.write_text('"1","x","5"\n"2","y"\n')
  with pytest.raises(ValueError, match=r"short.csv, line 2: expected at least 3 fields"):
    readers.read_delimited(str(short), header=False)


# ---------------------------------------------------------- messages of rough edges


def test_a_header_only_csv_says_there_is_no_data_line(tmp_path):
  path = tmp_path / "h.csv"
  path.write_text("userId,movieId\n")
  with pytest.raises(ValueError) as e:
    readers.read_delimited(str(path))
  assert str(e.value) == (f"{path}: no data lines: the file's only line is "
                          "'userId,movieId', text in every field used (a header "
                          "alone?); expected data lines")
  assert "next line" not in str(e.value)


@pytest.mark.parametrize("n_users", [1, 3])
def test_too_few_users_says_how_many_are_needed(n_users):
  x = readers.Interactions(users=np.repeat(np.arange(n_users), 5),
                           items=np.tile(np.arange(5), n_users),
                           ratings=np.full(5 * n_users, 5, np.float32), source="few")
  with pytest.raises(ValueError) as e:
    preprocess.split_heldout_users(x)
  text = str(e.value)
  assert f"few: {n_users} users left after filtering" in text
  assert "needs at least 2 * H + 1 users, 3 at the least" in text
  assert f"heldout_users_fraction 0.1 of them is {round(0.1 * n_users)}" in text
  assert "2 * 0" not in text


def test_a_data_error_leaves_no_workdir_behind(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("1,2,x\n")
  workdir = tmp_path / "new" / "run"
  cfg = _runs.small_config(str(bad), dataset="csv", cache_dir=str(tmp_path / "cache"),
                           csv_header="no")
  with pytest.raises(ValueError, match="expected a numeric rating"):
    loop.run(cfg, str(workdir))
  assert not workdir.exists()
  # A folder that existed stays, as it was.
  workdir.mkdir(parents=True)
  (workdir / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="expected a numeric rating"):
    loop.run(cfg, str(workdir))
  assert sorted(os.listdir(workdir)) == [".lock", "notes.txt"]


def test_zero_epochs_with_training_on_is_refused_before_any_work(tmp_path):
  cfg = _runs.small_config(str(tmp_path / "nowhere"), number_of_epochs=0)
  with pytest.raises(ValueError, match=r"bad setting: number_of_epochs=0 with --train "
                     "trains nothing: give at least 1, or --notrain --test"):
    loop.run(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  configs.validate(cfg.replace(train=False))  # testing alone is fine


# ------------------------------------------------------------------------ full disk


def test_a_full_disk_during_a_save_is_one_line_naming_the_folder(tmp_path, monkeypatch):
  data = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data, cache_dir=str(tmp_path / "cache"), number_of_epochs=2,
                           test=False)
  workdir = str(tmp_path / "run")
  real = shutil.disk_usage
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda p: real(p)._replace(free=1000))
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    loop.run(cfg, workdir)
  text = str(e.value)
  assert "\n" not in text
  assert text.startswith(os.path.join(workdir, "checkpoints", "best") + ": could not save "
                         "the checkpoint of step")
  assert "no space left on the device (0.0 MiB free" in text
  # A disk that fills while orbax writes: its long message becomes the same one line.
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", real)
  import orbax.checkpoint as ocp

  def fails(self, *a, **k):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing ... No space left on device "
                     "[os_error_code='28']\nTraceback (most recent call last):\n  ...")
  monkeypatch.setattr(ocp.CheckpointManager, "save", fails)
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    loop.run(cfg, workdir)
  assert "\n" not in str(e.value) and "no space left on the device;" in str(e.value)
  monkeypatch.undo()
  loop.run(cfg, workdir)  # with space again the same command trains
  assert [r["epoch"] for r in _runs.records(workdir) if r["split"] == "train"] == [1, 2]


# ---------------------------------------------------------------- one run, one folder


def _train_flags(data_dir, workdir, **kw):
  flags = {"config": "ml-latest-small", "data_dir": data_dir,
           "cache_dir": os.path.join(data_dir, "cache"), "workdir": workdir,
           "batch_size_train": 64, "batch_size_validation": 64, "hidden_dims": 16,
           "latent_dim": 4, "total_anneal_steps": 50, "test_ks": "5,10", "prefetch": 1,
           **kw}
  return [f"--{k}={v}" for k, v in flags.items()]


def _train(args, timeout=180):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path):
  data = _runs.movielens_dir_plain(tmp_path)
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(
      [sys.executable, "-m", "experiments.train",
       *_train_flags(data, workdir, number_of_epochs=100_000, test=False)],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    log = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 150
    while not (os.path.exists(log) and '"train"' in open(log).read()):
      assert first.poll() is None, first.stderr.read()[-2000:]
      assert time.time() < deadline, "the first run trained no epoch"
      time.sleep(0.2)
    config_before = open(os.path.join(workdir, "config.json")).read()
    expected = (f"error: {workdir}: in use by another run (pid {first.pid}); wait for it "
                "to end or use another folder")
    # Another training run (other settings), and a test run: both writers.
    for extra in ({"lr": 0.002, "number_of_epochs": 3}, {"train": False, "test": True}):
      t0 = time.time()
      r = _train(_train_flags(data, workdir, **extra))
      assert r.returncode == 1, r.stderr[-2000:]
      assert r.stderr.strip().splitlines()[-1] == expected
      assert "preprocessing" not in r.stderr  # stopped before any data work
      assert time.time() - t0 < 120
    assert open(os.path.join(workdir, "config.json")).read() == config_before
    assert first.poll() is None  # undisturbed
  finally:
    first.kill()
    first.wait()
  # Killed: the lock went with the process; the next run resumes in the folder. (The
  # kill may fall after an epoch's checkpoint and before its log line: ask for two more
  # epochs than the log shows, so the resumed run trains at least one.)
  done = max(r["epoch"] for r in _runs.records(workdir) if r["split"] == "train")
  r = _train(_train_flags(data, workdir, number_of_epochs=100_000, test=False)[:-2]
             + [f"--number_of_epochs={done + 2}", "--notest"])
  assert r.returncode == 0, r.stderr[-2000:]
  epochs = [r["epoch"] for r in _runs.records(workdir) if r["split"] == "train"]
  assert epochs == sorted(epochs) and epochs[-1] == done + 2


def test_the_lock_is_refused_to_a_second_holder_and_left_by_a_dead_one(tmp_path):
  folder = str(tmp_path / "f")
  code = ("import sys, time; from jax_vaecf.training import run_folder; "
          "run_folder.RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
          "time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code, folder], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_folder.RunFolderBusyError,
                       match=f"in use by another run \\(pid {holder.pid}\\)"):
      run_folder.RunLock(folder).acquire()
    # A training run in-process (a tuning trial runs this way) stops the same way.
    cfg = _runs.small_config(str(tmp_path / "nowhere"))
    with pytest.raises(run_folder.RunFolderBusyError):
      loop.run(cfg, folder)
  finally:
    holder.kill()
    holder.wait()
  with run_folder.RunLock(folder) as lock:
    assert lock.held
    assert open(os.path.join(folder, ".lock")).read().split()[0] == str(os.getpid())
  assert os.path.isdir(folder)  # not created by this lock: kept


def test_a_reader_refuses_item_ids_of_another_run(tmp_path_factory):
  workdir = _runs.trained_workdir(tmp_path_factory, "ids")
  ids = np.load(os.path.join(workdir, "item_ids.npy"))
  recommend.Recommender.from_workdir(workdir)
  np.save(os.path.join(workdir, "item_ids.npy"), ids[::-1])
  with pytest.raises(ValueError, match="item_ids.npy: not the item table the best "
                     "checkpoint was trained on"):
    recommend.Recommender.from_workdir(workdir)


# ---------------------------------------------------------------------- recommend CLI


def test_recommend_says_when_the_history_is_empty_and_names_a_missing_titles_file(
    trained_run, tmp_path_factory):
  workdir = trained_run
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.recommend",
                                   "--workdir", workdir, *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
  r = run("--k", "3")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.splitlines()[0].startswith("no --items given: recommending for an "
                                             "empty history")
  r = run("--items", "999999", "--k", "3")
  assert "none of the --items is in the model's item table" in r.stdout
  missing = str(tmp_path_factory.mktemp("t") / "movies.csv")
  r = run("--items", "1", "--titles", missing)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      f"error: --titles={missing}: cannot read it (No such file or directory)"]
