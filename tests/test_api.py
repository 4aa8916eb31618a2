"""The Python API (``jax_vaecf.fit`` / ``load``): the notebook page runs as written, the
in-process fit gives the command line's numbers, and the model answers only what the
data allows."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import jax_vaecf
from jax_vaecf.training import engine as loop

import _synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(**changes):
  return {**dict(number_of_epochs=2, hidden_dims=(16,), latent_dim=4, batch_size_train=64,
                 batch_size_validation=64, total_anneal_steps=50, test_ks=(5, 10),
                 prefetch=1), **changes}


@pytest.fixture(scope="module")
def matrix():
  x = _synthetic.low_rank_interactions(n_users=300, n_items=150, seed=5)
  return sp.csr_matrix(x)


@pytest.fixture(scope="module")
def fitted(matrix):
  records = []
  users = np.array([f"u{r}" for r in range(matrix.shape[0])])
  items = np.array([f"i{c}" for c in range(matrix.shape[1])])
  model = jax_vaecf.fit(matrix, "ml-latest-small", user_ids=users, item_ids=items,
                        on_epoch=records.append, **_small())
  return model, records, users, items


def test_the_python_page_runs_as_written_and_its_folder_serves_the_cli(tmp_path):
  text = open(os.path.join(REPO, "docs", "python.md")).read()
  code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
  r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                     text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 0, r.stderr[-3000:]
  fan = re.search(r"^a Star Wars fan -> \[(.*?)\]", r.stdout, re.M)
  assert fan and len(fan.group(1).split(",")) == 5, r.stdout[-2000:]
  again = re.search(r"^\[(.*?)\]$", r.stdout, re.M)  # the loaded model's answer
  assert again and again.group(1) == fan.group(1)
  import _tools
  workdir = str(tmp_path / "runs" / "demo_python")
  cli = _tools.run("experiments.recommend", f"--workdir={workdir}",
                   "--items=1,260,1196", "--k=5")
  assert cli.returncode == 0, cli.stderr[-2000:]
  ranked = re.findall(r"^\s*\d+\.\s+(\S+)", cli.stdout, re.M)
  assert ranked == [v.strip() for v in fan.group(1).split(",")]
  out = str(tmp_path / "artefact")
  exp = _tools.run("experiments.export", f"--workdir={workdir}", f"--out={out}",
                   "--k=5")
  assert exp.returncode == 0, exp.stderr[-2000:]
  assert os.path.exists(os.path.join(out, "manifest.json"))


# Trains the demo preset to its end (the longest fit of the suite); the fast tier fits
# tiny models through the same api.fit.
SLOW_TESTS = ["test_the_in_process_demo_fit_prints_the_command_lines_test_line"]


def test_the_in_process_demo_fit_prints_the_command_lines_test_line(tmp_path):
  # The command line's run of the demo on this machine (other CPU classes may round the
  # last digits differently), then the same preset from Python.
  import _tools
  cli = _tools.run("experiments.train", "--config=demo",
                   f"--workdir={tmp_path / 'cli'}")
  assert cli.returncode == 0, cli.stderr[-2000:]
  (want,) = re.findall(r"^test \(.*$", cli.stdout, re.M)
  import test_docs
  test_docs.check_demo_output(cli.stdout)   # the README's "it ends with" lines
  model = jax_vaecf.fit(None, "demo", workdir=str(tmp_path / "python"))
  assert loop.format_test(model.results["test"], model.config.test_ks) == want


def test_columns_in_memory_split_as_the_data_sets_file_does():
  from jax_vaecf.training import configs
  cfg = configs.get_config("demo")
  table = np.loadtxt(os.path.join(configs.DEMO_DATA, "ratings.csv.gz"), delimiter=",",
                     skiprows=1, usecols=(0, 1, 2))
  inter = jax_vaecf.api.interactions_of((table[:, 0].astype(int),
                                         table[:, 1].astype(int), table[:, 2]))
  got = loop.split_interactions(cfg, inter)
  want = loop.load_data(cfg.replace(cache_dir=""))
  np.testing.assert_array_equal(got.item_ids, want.item_ids)
  np.testing.assert_array_equal(got.train_user_ids, want.train_user_ids)
  assert (got.train != want.train).nnz == 0
  for a, b in ((got.validation, want.validation), (got.test, want.test)):
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    assert (a.fold_in != b.fold_in).nnz == 0 and (a.heldout != b.heldout).nnz == 0


def test_every_epoch_reaches_the_callback_and_the_history(fitted):
  model, records, _, _ = fitted
  assert [r["epoch"] for r in records] == [1, 2]
  assert model.history == records
  assert all("val_ndcg@100" in r and "loss" in r for r in records)


def test_recommendations_by_raw_ids_never_hold_an_item_the_user_has(fitted, matrix):
  model, _, users, items = fitted
  split = model.split
  some = [str(u) for u in split.train_user_ids[:5]] + [str(split.test.user_ids[0])]
  got = model.recommend(users=some, k=10)
  for uid, recs in zip(some, got.items):
    had = {str(items[c]) for c in matrix[int(uid[1:])].indices}
    assert len(recs) == 10 and not had & {str(i) for i in recs}
  new = model.recommend(items=[["i3", "i4", "nope"]], k=3)
  assert new.unknown == [["nope"]] and not {"i3", "i4"} & set(map(str, new.items[0]))
  assert model.score(items=[["i3"]]).shape == (1, len(model.item_ids))
  with pytest.raises(ValueError, match=r"users \['nobody'\] are not in the data"):
    model.recommend(users=["nobody"])
  with pytest.raises(ValueError, match="give users .* or items .*, not both"):
    model.recommend(users=some, items=[["i3"]])


def test_evaluate_gives_the_runs_test_metrics(fitted):
  model, _, _, _ = fitted
  got = model.evaluate("test", ks=(5, 10))
  for k in ("ndcg@10", "recall@5", "map@10", "n_users"):
    assert got[k] == model.results["test"][k]
  with pytest.raises(ValueError, match="expected 'test', 'validation' or an EvalSplit"):
    model.evaluate("train")


def test_save_then_load_and_a_cli_folder_loads_too(fitted, tmp_path, trained_run):
  model, _, _, _ = fitted
  history = [["i1", "i2"], ["i7"]]
  before = model.recommend(items=history, k=5)
  path = model.save(str(tmp_path / "saved"))
  loaded = jax_vaecf.load(path)
  after = loaded.recommend(items=history, k=5)
  assert [list(a) for a in after.items] == [list(b) for b in before.items]
  assert loaded.history == model.history
  # The folder keeps the data given in Python (split.npz): known users are answered as
  # the fitted model answers them; without that file the data must be given again.
  assert (loaded.recommend(users=["u0"], k=5).items[0].tolist()
          == model.recommend(users=["u0"], k=5).items[0].tolist())
  os.remove(os.path.join(path, "split.npz"))
  with pytest.raises(ValueError, match="run's data was given in Python"):
    jax_vaecf.load(path).recommend(users=["u0"])
  cli_model = jax_vaecf.load(trained_run)
  split = cli_model.split  # read again from the run's data set
  uid = str(split.train_user_ids[0])
  recs = cli_model.recommend(users=[uid], k=5).items[0]
  had = {str(split.item_ids[c]) for c in split.train[0].indices}
  assert len(recs) == 5 and not had & set(map(str, recs))


def test_a_second_fit_in_the_same_folder_resumes(matrix, tmp_path):
  workdir = str(tmp_path / "run")
  first = jax_vaecf.fit(matrix, "ml-latest-small", workdir=workdir, **_small()).history
  again = jax_vaecf.fit(matrix, "ml-latest-small", workdir=workdir,
                        **_small(number_of_epochs=3))
  assert [r["epoch"] for r in again.history] == [1, 2, 3]
  assert again.history[:2] == first  # epochs 1 and 2 not trained again
  other = sp.csr_matrix(matrix[:, ::-1])  # the same users, the items in another order
  with pytest.raises(ValueError):
    jax_vaecf.fit(other, "ml-latest-small", workdir=workdir, **_small())


def test_bad_data_and_settings_are_refused_before_training(matrix, tmp_path):
  with pytest.raises(TypeError, match="data: expected None"):
    jax_vaecf.fit([1, 2, 3], "demo")
  with pytest.raises(ValueError, match="unknown settings \\['bogus'\\]"):
    jax_vaecf.fit(matrix, "demo", bogus=1)
  with pytest.raises(ValueError, match="user_ids: 2 ids for the matrix's 300 rows"):
    jax_vaecf.fit(matrix, "demo", user_ids=["a", "b"])
  with pytest.raises(ValueError, match="3 users but 2 items"):
    jax_vaecf.fit(([1, 2, 3], [1, 2]), "demo")
  with pytest.raises(ValueError, match="bad setting: lr must be > 0"):
    jax_vaecf.fit(matrix, "demo", lr=-1.0)


def test_refit_trains_on_every_training_item_for_the_chosen_epochs(matrix, tmp_path):
  workdir = str(tmp_path / "run")
  model = jax_vaecf.fit(matrix, "ml-latest-small", workdir=workdir, protocol="per_user",
                        refit=True, **_small(number_of_epochs=4))
  validated = jax_vaecf.load(workdir)
  best = max(validated.history, key=lambda r: r["val_ndcg@100"])["epoch"]
  assert model.workdir == os.path.join(workdir, "refit")
  assert model.config.number_of_epochs == best and model.config.validation_fraction == 0
  assert [r["epoch"] for r in model.history] == list(range(1, best + 1))
  assert all("val_ndcg@100" not in r for r in model.history)  # nothing held out
  # The refit's training rows are the validated run's training rows and targets.
  full = model.split
  cut = loop.with_validation(validated.config, full)
  assert full.train.nnz == cut.train.nnz + cut.validation.heldout.nnz
  assert (full.test.heldout != cut.test.heldout).nnz == 0  # the same test targets
  assert 0.0 < model.results["test"]["ndcg@10"] <= 1.0
  with pytest.raises(ValueError, match="refit retrains on the validation targets"):
    jax_vaecf.fit(matrix, "ml-latest-small", refit=True, **_small())


def _events(folder):
  """The scalar values of the TFRecord event files in ``folder``: ``{tag: [(step,
  value)]}`` (each record: length u64, its crc u32, the Event proto, its crc u32)."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_the_tensorboard_callback_writes_every_number_of_a_record(tmp_path):
  pytest.importorskip("tensorboardX")
  write = jax_vaecf.api.TensorBoard(str(tmp_path / "tb"))
  write({"split": "train", "epoch": 1, "loss": 3.5, "val_ndcg@100": 0.25,
         "checkpointed": True})
  write({"split": "train", "epoch": 2, "loss": 2.5, "val_ndcg@100": 0.5,
         "checkpointed": True})
  write.close()
  events = _events(str(tmp_path / "tb"))
  assert sorted(events) == ["loss", "val_ndcg_at_100"]
  assert events["loss"] == [(1, 3.5), (2, 2.5)]
  assert events["val_ndcg_at_100"] == [(1, 0.25), (2, 0.5)]
