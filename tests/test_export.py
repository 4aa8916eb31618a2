"""Exported scorer artefacts: the same top-k as the Recommender, loaded without the
project, weights only, refusing altered files."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_vaecf.serving import export as export_lib
from jax_vaecf.core import files
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.serving import artefact as serve

import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter where importing the project fails: the artefact must not
# need it. Prints the recommendations as JSON.
# The project's own source roots leave sys.path; everything else stays, a virtual
# environment inside the clone (``.venv/lib/.../site-packages``) included.
_WITHOUT_PROJECT = """
import os
def without_project(path, repo):
  roots = {os.path.realpath(repo), os.path.realpath(os.path.join(repo, "tests"))}
  return [p for p in path if p not in ("", ".") and os.path.realpath(p) not in roots]
"""
_ISOLATED = _WITHOUT_PROJECT + """
import json, sys
sys.modules["jax_vaecf"] = None
sys.modules["experiments"] = None
sys.path = without_project(sys.path, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import serve
scorer = serve.load(sys.argv[2])
out = scorer.recommend(json.load(open(sys.argv[3])), k=int(sys.argv[4]))
json.dump([{"items": [str(i) for i in o["items"].tolist()],
            "scores": [float(s) for s in o["scores"].tolist()],
            "unknown": [str(u) for u in o["unknown"]]} for o in out], sys.stdout)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = _runs.trained_workdir(tmp_path_factory, "exp", ema_decay=0.9, test=True)
  out = os.path.join(os.path.dirname(workdir), "artefact")
  r = subprocess.run([sys.executable, "-m", "experiments.export", "--workdir",
                      workdir, "--out", out, "--k", "20"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return workdir, out


def test_the_artefact_without_the_project_matches_the_recommender(run, tmp_path):
  workdir, artefact = run
  rec = recommend.Recommender.from_workdir(workdir)
  rng = np.random.default_rng(0)
  ids = [str(i) for i in rec.item_ids.tolist()]
  # 1,000 users of every history length, a few with unknown ids and one with everything.
  histories = [[ids[j] for j in rng.choice(len(ids), rng.integers(0, 40), replace=False)]
               for _ in range(997)]
  histories += [["nope", ids[3]], ids[:-5], []]
  (tmp_path / "h.json").write_text(json.dumps(histories))
  r = subprocess.run([sys.executable, "-c", _ISOLATED, REPO, artefact,
                      str(tmp_path / "h.json"), "20"], cwd=str(tmp_path),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout)
  want = rec.recommend(histories, k=20)
  assert len(got) == 1000
  for g, items, scores, unknown in zip(got, want.items, want.scores, want.unknown):
    assert g["items"] == [str(i) for i in items.tolist()]
    assert g["scores"] == [float(s) for s in scores.tolist()]  # bit for bit
    assert g["unknown"] == [str(u) for u in unknown]
  assert len(got[-2]["items"]) == 5  # only 5 items are left outside that history
  assert got[-3]["unknown"] == ["nope"]


def test_manifest_holds_weights_only_and_the_checkpoint_facts(run):
  workdir, artefact = run
  manifest = json.load(open(os.path.join(artefact, "manifest.json")))
  assert manifest["format"] == serve.FORMAT and manifest["k"] == 20
  assert manifest["n_items"] == 150 and manifest["platforms"] == ["cpu"]
  assert manifest["model"]["weights"] == "weight average"
  assert manifest["metrics"]["epoch"] == manifest["metrics"]["test"]["epoch"]
  assert 0 < manifest["metrics"]["validation"]["ndcg@100"] <= 1
  assert sorted(os.listdir(artefact)) == sorted(list(manifest["files"]) + ["manifest.json"])
  rec = recommend.Recommender.from_workdir(workdir)
  with np.load(os.path.join(artefact, "params.npz")) as z:
    stored = {name: z[name] for name in z.files}
  served = export_lib._flat_params(rec.params)  # the average, not the raw weights
  assert sorted(stored) == sorted(served)  # no optimiser moments, no second copy
  for name in served:
    np.testing.assert_array_equal(stored[name], served[name])
  scorer = serve.load(artefact)
  out = scorer.recommend([[str(rec.item_ids[0])]], k=5)
  full = scorer.recommend([[str(rec.item_ids[0])]])
  np.testing.assert_array_equal(out[0]["items"], full[0]["items"][:5])
  with pytest.raises(ValueError, match="exported with k=20"):
    scorer.recommend([[]], k=21)


@pytest.mark.parametrize("victim", ["params.npz", "scorer.jax", "item_ids.npy", "serve.py"])
def test_an_altered_file_is_refused_by_name(run, tmp_path, victim):
  _, artefact = run
  copy = tmp_path / "copy"
  import shutil
  shutil.copytree(artefact, copy)
  raw = bytearray((copy / victim).read_bytes())
  raw[len(raw) // 2] ^= 0x01
  (copy / victim).write_bytes(bytes(raw))
  with pytest.raises(serve.ArtifactError, match=f"{victim}: checksum mismatch"):
    serve.load(str(copy))
  os.remove(copy / victim)
  with pytest.raises(serve.ArtifactError, match=f"{victim}: missing"):
    serve.load(str(copy))


def _edited_copy(artefact, tmp_path, name, edit, replace=None):
  """A copy of the artefact whose manifest ``edit`` changed in place; ``replace``
  writes new bytes over files of the copy (name -> bytes)."""
  import shutil
  copy = tmp_path / name
  shutil.copytree(artefact, copy)
  manifest = json.loads((copy / serve.MANIFEST).read_text())
  edit(manifest)
  (copy / serve.MANIFEST).write_text(json.dumps(manifest))
  for f, data in (replace or {}).items():
    (copy / f).write_bytes(data)
  return str(copy)


def test_every_file_read_must_be_listed_with_its_digest_inside_the_folder(run, tmp_path):
  _, artefact = run
  # Another model's weights under the same name: refused once its entry is gone from
  # the list (it was loaded before).
  other = np.load(os.path.join(artefact, "params.npz"))
  import io
  buf = io.BytesIO()
  np.savez(buf, **{k: np.zeros_like(other[k]) for k in other.files})
  for name, edit, first in (("unlisted", lambda m: m["files"].pop("params.npz"),
                              "params 'params.npz'"),
                             ("empty", lambda m: m.update(files={}),
                              "program 'scorer.jax'")):
    copy = _edited_copy(artefact, tmp_path, name, edit, {"params.npz": buf.getvalue()})
    with pytest.raises(serve.ArtifactError, match=f"{first} is not in the manifest's "
                       "list of files with their digests"):
      serve.load(copy)
  # A file outside the folder, listed or not.
  outside = tmp_path / "x"
  outside.mkdir()
  np.save(outside / "item_ids.npy", np.arange(1000))
  copy = _edited_copy(artefact, tmp_path, "escape",
                      lambda m: m.update(item_ids="../x/item_ids.npy"))
  with pytest.raises(serve.ArtifactError, match=r"item_ids '../x/item_ids.npy' is not "
                     "in the manifest's list"):
    serve.load(copy)

  def listed_outside(m):
    m["item_ids"] = "../x/item_ids.npy"
    m["files"]["../x/item_ids.npy"] = {
        "sha256": serve.sha256_of(str(outside / "item_ids.npy")),
        "bytes": os.path.getsize(outside / "item_ids.npy")}
  copy = _edited_copy(artefact, tmp_path, "escape2", listed_outside)
  with pytest.raises(serve.ArtifactError, match=r"'../x/item_ids.npy' is not a file "
                     "name inside the artefact's folder"):
    serve.load(copy)
  # A listed name that is a link out of the folder.
  copy = _edited_copy(artefact, tmp_path, "link", lambda m: None)
  os.remove(os.path.join(copy, "item_ids.npy"))
  os.symlink(outside / "item_ids.npy", os.path.join(copy, "item_ids.npy"))
  with pytest.raises(serve.ArtifactError, match="'item_ids.npy' leads out of the "
                     "artefact's folder"):
    serve.load(copy)
  # An entry without its digest.
  copy = _edited_copy(artefact, tmp_path, "nodigest",
                      lambda m: m["files"]["scorer.jax"].pop("sha256"))
  with pytest.raises(serve.ArtifactError, match="the entry of 'scorer.jax' in 'files' "
                     "has no bytes and sha256"):
    serve.load(copy)
  serve.load(artefact)  # the original still loads


def test_the_isolated_interpreter_keeps_a_virtual_environment_inside_the_clone(tmp_path):
  # A clone with its venv inside (as .gitignore suggests): the venv's packages stay
  # importable; the clone's own source root does not.
  clone = tmp_path / "clone"
  site = clone / ".venv" / "lib" / "site-packages"
  site.mkdir(parents=True)
  (site / "dep.py").write_text("VALUE = 7\n")
  (clone / "leak.py").write_text("raise AssertionError('the clone root is on sys.path')\n")
  artefact = tmp_path / "artefact"
  artefact.mkdir()
  # A stand-in artefact loader: reports what it could import, in the script's format.
  (artefact / "serve.py").write_text(
      "import importlib.util\n"
      "class _A(list):\n"
      "  def tolist(self): return list(self)\n"
      "class _S:\n"
      "  def recommend(self, histories, k):\n"
      "    import dep\n"
      "    leak = importlib.util.find_spec('leak') is not None\n"
      "    return [{'items': _A([dep.VALUE]), 'scores': _A([float(leak)]),\n"
      "             'unknown': []}]\n"
      "def load(path): return _S()\n")
  (tmp_path / "h.json").write_text("[[]]")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(clone)]))
  r = subprocess.run([sys.executable, "-c", _ISOLATED, str(clone), str(artefact),
                      str(tmp_path / "h.json"), "1"], cwd=str(clone), env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout) == [{"items": ["7"], "scores": [0.0], "unknown": []}]


def test_the_loaders_digest_is_the_projects(tmp_path):
  # serve.py, copied into the artefact, cannot import jax_vaecf.core.files and keeps its own
  # sha256_of: the digests a manifest records must be the ones both compute.
  rng = np.random.default_rng(0)
  # Empty, one partial block, and past one 16 MiB block.
  for size in (0, 1000, (1 << 24) + 17):
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / f"f{size}"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert files.sha256_of(path) == serve.sha256_of(str(path)) == want


def test_export_refuses_an_occupied_folder_and_a_diverged_model(run, tmp_path):
  workdir, _ = run
  occupied = tmp_path / "out"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("mine")
  r = subprocess.run([sys.executable, "-m", "experiments.export", "--workdir", workdir,
                      "--out", str(occupied)], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      f"error: {occupied}: exists and is not an empty folder; choose a new --out"]
  assert os.listdir(occupied) == ["keep.txt"]
  rec = recommend.Recommender.from_workdir(workdir)
  import jax
  nan = jax.tree_util.tree_map(lambda a: a * np.nan, rec.params)
  with pytest.raises(ValueError, match="not finite"):
    export_lib.write_artifact(tmp_path / "nan", rec.model, nan, rec.item_ids, 5,
                              model_info={})
  assert not os.path.exists(tmp_path / "nan")
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no staging left


def test_mult_dae_exports_too(tmp_path):
  import jax
  from jax_vaecf import model as model_lib
  from jax_vaecf.training import steps as train_lib
  m = model_lib.build_model("multdae", 60, hidden_dims=(8,))
  params = train_lib.init_params(m, jax.random.PRNGKey(3))
  ids = np.array([f"sku-{j}" for j in range(60)])
  rec = recommend.Recommender(m, params, ids)
  export_lib.write_artifact(tmp_path / "dae", m, params, ids, 7, model_info={"model": "multdae"})
  histories = [["sku-1", "sku-5"], [], [f"sku-{j}" for j in range(57)]]
  got = serve.load(str(tmp_path / "dae")).recommend(histories)
  want = rec.recommend(histories, k=7)
  for g, items, scores in zip(got, want.items, want.scores):
    np.testing.assert_array_equal(g["items"], items)
    np.testing.assert_array_equal(g["scores"], scores)
  assert len(got[2]["items"]) == 3


def test_out_of_range_columns_are_refused(run):
  workdir, artefact = run
  rec = recommend.Recommender.from_workdir(workdir)
  with pytest.raises(ValueError, match=r"user 1: item columns must be in \[0, 150\)"):
    rec.recommend_columns([np.array([3]), np.array([5, 150])], k=3)
  scorer = serve.load(artefact)
  with pytest.raises(ValueError, match=r"cols must be in \[0, 150\)"):
    scorer.top_k(*serve.pack([np.array([-1, 4])]))
