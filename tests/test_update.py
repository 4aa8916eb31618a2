"""A trained model taking new interactions (``FittedModel.update``, ``experiments.update``):
EASE equals a refit on the new data (exact update or refit), a VAE trained on from its
checkpoint ranks its users' new items higher, new items are refused where the model
cannot take them, the old run folder is left byte for byte, and the new one exports and
is served after a reload."""

import hashlib
import os
import re
import time

import numpy as np
import pytest
import scipy.sparse as sp

import jax_vaecf
from jax_vaecf.models import ease as ease_lib
from jax_vaecf.training import configs
from jax_vaecf.training import update as update_lib

import _synthetic

L2 = 50.0

# Each trains a VAE, fits EDLAE twice, or exports twice and serves: over 10 s on two
# cores. The fast tier keeps the EASE algebra, the refusals and the recovered diagonal.
SLOW_TESTS = ["test_a_vae_trained_on_ranks_its_users_new_items_higher",
              "test_edlae_is_refitted_with_its_chosen_settings",
              "test_the_update_tool_deploys_a_new_version_through_export_and_reload"]


def _matrix():
  x = _synthetic.low_rank_interactions(n_users=300, n_items=150, seed=5)
  users = np.array([f"u{r}" for r in range(x.shape[0])])
  items = np.array([f"i{c}" for c in range(x.shape[1])])
  return sp.csr_matrix(x), users, items


@pytest.fixture(scope="module")
def ease_model(tmp_path_factory):
  x, users, items = _matrix()
  workdir = str(tmp_path_factory.mktemp("update") / "ease")
  return jax_vaecf.fit(x, "ml-latest-small", workdir=workdir, user_ids=users,
                       item_ids=items, model="ease", l2=(L2,), test_ks=(5, 10))


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
  x, users, items = _matrix()
  workdir = str(tmp_path_factory.mktemp("update") / "vae")
  return jax_vaecf.fit(x, "ml-latest-small", workdir=workdir, user_ids=users,
                       item_ids=items, number_of_epochs=3, hidden_dims=(16,),
                       latent_dim=4, batch_size_train=64, batch_size_validation=64,
                       total_anneal_steps=50, test_ks=(5, 10), prefetch=1)


def _tree_digest(folder):
  """sha256 over every file's relative path and bytes under ``folder``."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, folder).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def _missing(split, row, count, start=0):
  """``count`` raw item ids the training row ``row`` lacks, from column ``start`` on."""
  have = set(split.train[row].indices.tolist())
  cols = [c for c in range(start, split.n_items) if c not in have][:count]
  return [str(split.item_ids[c]) for c in cols]


def _changes(split):
  """New items for 5 training users, 3 new users, 2 new items (raw-id columns)."""
  users, items = [], []
  for r in (0, 3, 10, 50, 99):
    for item in _missing(split, r, 2, start=r % 40):
      users.append(str(split.train_user_ids[r]))
      items.append(item)
  for j, history in enumerate((["i1", "i2", "newA"], ["i2", "i7", "newA", "newB"],
                               ["i3", "i4", "i5", "i6"])):
    users += [f"new{j}"] * len(history)
    items += history
  users += [str(split.train_user_ids[7])]
  items += ["newB"]
  return users, items


def _reference_b(split):
  return ease_lib.numpy_ease(split.train, L2)


def _assert_scores_as_refit(model, users):
  """The model's ``B`` and its top 10 for ``users`` are those of a float64 refit on its
  own training rows."""
  split = model.split
  want = _reference_b(split)
  got = np.asarray(model.recommender.params["output"]["kernel"], np.float64)
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
  rows = [list(split.train_user_ids).index(u) for u in users]
  x = split.train[rows].toarray()
  scores = np.where(x > 0, -np.inf, x @ want)
  top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
  recs = model.recommend(users=users, k=10)
  for r, t in enumerate(top):
    assert list(recs.items[r]) == list(split.item_ids[t])


def test_ease_update_equals_a_refit_and_leaves_the_old_folder_as_it_was(ease_model):
  digest = _tree_digest(ease_model.workdir)
  old_split = ease_model.split
  histories = [["i1", "i2"], ["i3"]]
  before = jax_vaecf.load(ease_model.workdir).recommend(items=histories, k=10)
  users, items = _changes(old_split)
  new = ease_model.update((np.array(users), np.array(items)))
  assert new.results["train"]["how"] == "update"
  assert new.workdir == ease_model.workdir + "-update-1"
  assert list(new.item_ids[-2:]) == ["newA", "newB"]
  assert new.split.n_train_users == old_split.n_train_users + 3
  _assert_scores_as_refit(new, [str(old_split.train_user_ids[r]) for r in (0, 3, 7, 10)]
                          + ["new0", "new1", "new2"])
  assert _tree_digest(ease_model.workdir) == digest
  again = jax_vaecf.load(ease_model.workdir).recommend(items=histories, k=10)
  assert [list(a) for a in again.items] == [list(b) for b in before.items]
  # The new folder holds its data: loaded, it updates again, from the version number on.
  loaded = jax_vaecf.load(new.workdir)
  newer = loaded.update((np.array(["new2", "u0"]), np.array(["newA", "newC"])))
  assert newer.workdir == ease_model.workdir + "-update-2"
  assert newer.results["train"]["how"] == "update"
  _assert_scores_as_refit(newer, ["new2", "u0"])


def test_ease_refits_when_the_change_costs_more_than_a_refit(ease_model, tmp_path):
  split = ease_model.split
  users, items = [], []
  for r in range(150):  # 150 changed rows of 150 items: a Woodbury update costs more
    users.append(str(split.train_user_ids[r]))
    items.append(_missing(split, r, 1, start=r % 100)[0])
  new = ease_model.update((np.array(users), np.array(items)), out=tmp_path / "big")
  assert new.results["train"]["how"] == "refit"
  _assert_scores_as_refit(new, [str(split.train_user_ids[r]) for r in (0, 1, 149)])


def test_nothing_new_and_a_used_folder_are_refused_before_any_work(ease_model, tmp_path):
  split = ease_model.split
  row = split.train[0].indices[:2]
  user = str(split.train_user_ids[0])
  out = tmp_path / "none"
  with pytest.raises(ValueError, match="nothing to update"):
    ease_model.update(([user, user], [str(split.item_ids[c]) for c in row]), out=out)
  assert not out.exists()
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "file").write_text("x")
  with pytest.raises(ValueError, match="not an empty folder"):
    ease_model.update(([user], ["newA"]), out=tmp_path / "used")


def test_the_ease_diagonal_is_recovered_from_b():
  rng = np.random.default_rng(0)
  x = sp.csr_matrix((rng.random((60, 20)) < 0.3).astype(np.float32))
  g = (x.T @ x).toarray().astype(np.float64)
  p = np.linalg.inv(g + 7.0 * np.eye(20))
  b = (-p / np.diag(p)[None, :]).astype(np.float32)
  np.fill_diagonal(b, 0.0)
  np.testing.assert_allclose(update_lib.ease_diag_p(x, b, 7.0), np.diag(p), rtol=1e-5)
  with pytest.raises(ValueError, match="does not match its training rows"):
    update_lib.ease_diag_p(x, b * 50.0, 7.0)


def test_new_items_are_refused_for_a_model_with_an_output_unit_per_item():
  split = _matrix_split()
  change = update_lib.merge(split, ["u0", "u0", "u1"], ["i1", "brand_new", "other"])
  assert change.new_items == ["brand_new", "other"]
  cfg = configs.get_config("ml-latest-small")
  with pytest.raises(ValueError, match=r"^data: items brand_new, other are not in the "
                                       r"model's item table; multvae's output layer"):
    update_lib._new_items_refused(cfg, change)  # pylint: disable=protected-access
  update_lib._new_items_refused(cfg.replace(model="ease"), change)  # EASE takes them


def _matrix_split():
  from jax_vaecf import data as data_lib
  x = sp.csr_matrix(np.eye(4, 3, dtype=np.float32) + np.eye(4, 3, 1, dtype=np.float32))
  test = data_lib.EvalSplit(sp.csr_matrix(np.array([[1, 0, 0]], np.float32)),
                            sp.csr_matrix(np.array([[0, 1, 0]], np.float32)),
                            np.array(["h0"]))
  return data_lib.Split(train=x, validation=None, test=test,
                        item_ids=np.array(["i0", "i1", "i2"]),
                        train_user_ids=np.array(["u0", "u1", "u2", "u3"]))


def test_merge_puts_each_interaction_where_its_user_is():
  split = _matrix_split()
  change = update_lib.merge(split, ["u0", "h0", "h0", "n1", "u3"],
                            ["i2", "i2", "i1", "i0", "i0"])
  new = change.split
  assert new.train.shape == (5, 3) and list(new.train_user_ids) == [
      "u0", "u1", "u2", "u3", "n1"]
  assert new.train[0].indices.tolist() == [0, 1, 2] and new.train[4].indices.tolist() == [0]
  # A held-out user is never trained on: the item joins the fold-in row, and an item
  # the user holds out stays held out only.
  assert new.test.fold_in[0].indices.tolist() == [0, 2]
  assert new.test.heldout[0].indices.tolist() == [1]
  assert change.rows.tolist() == [0, 3, 4] and change.old_rows.shape == (3, 3)
  assert change.old_rows[0].indices.tolist() == [0, 1]
  assert change.old_rows[1].nnz == 0 and change.old_rows[2].nnz == 0
  assert (change.added_train, change.added_fold_in, change.new_users) == (3, 1, 1)


def _mean_rank(model, histories, targets):
  """The mean rank (0 = first) of each user's ``targets`` among the items outside the
  history, the history folded in."""
  ranks = []
  scores = model.score(items=histories)
  column = {str(v): j for j, v in enumerate(model.item_ids.tolist())}
  for s, history, wanted in zip(scores, histories, targets):
    s = s.copy()
    s[[column[h] for h in history]] = -np.inf
    order = np.argsort(-s, kind="stable")
    place = np.empty_like(order)
    place[order] = np.arange(order.size)
    ranks += [place[column[t]] for t in wanted]
  return float(np.mean(ranks))


def test_a_vae_trained_on_ranks_its_users_new_items_higher(vae_model, tmp_path):
  split = vae_model.split
  popularity = np.asarray(split.train.sum(axis=0)).ravel()
  targets = [str(split.item_ids[c]) for c in np.argsort(popularity, kind="stable")[:3]]
  users, items, histories, wanted = [], [], [], []
  for r in range(40):
    history = [str(split.item_ids[c]) for c in split.train[r].indices]
    new = [t for t in targets if t not in history]
    users += [str(split.train_user_ids[r])] * len(new)
    items += new
    histories.append(history)
    wanted.append(new)
  before = _mean_rank(vae_model, histories, wanted)
  out = tmp_path / "vae_new_items"
  with pytest.raises(ValueError, match=r"items brand_new are not in the model's item "
                                       r"table; multvae's output layer"):
    vae_model.update((["u0", "u0"], ["i1", "brand_new"]), out=out)
  assert not out.exists()
  epoch = vae_model.recommender.checkpoint_meta["epoch"]
  step = vae_model.history[epoch - 1]["step"]
  new = vae_model.update((np.array(users), np.array(items)), out=tmp_path / "vae2",
                         steps=30)
  record = new.results["train"]
  assert record["how"] == "continued" and record["update_steps"] == 30
  # Trained on from the checkpoint's state: its step count (the KL weight's schedule,
  # Adam's bias correction) goes on.
  assert record["epoch"] == epoch + 1 and record["step"] == step + 30
  after = _mean_rank(new, histories, wanted)
  assert after < 0.5 * before, (before, after)
  # Only a held-out user's fold-in row grows: nothing is trained, the weights stay.
  test = split.test
  have = set(test.fold_in[0].indices.tolist()) | set(test.heldout[0].indices.tolist())
  item = next(str(split.item_ids[c]) for c in range(split.n_items) if c not in have)
  same = vae_model.update(([str(test.user_ids[0])], [item]), out=tmp_path / "vae3")
  assert same.results["train"]["update_steps"] == 0
  assert same.split.test.fold_in[0, list(same.item_ids).index(item)] == 1
  np.testing.assert_array_equal(same.score(items=histories[:3]),
                                vae_model.score(items=histories[:3]))


def test_edlae_is_refitted_with_its_chosen_settings(tmp_path):
  from jax_vaecf.models import edlae
  x, users, items = _matrix()
  model = jax_vaecf.fit(x, "ml-latest-small", workdir=tmp_path / "edlae", user_ids=users,
                        item_ids=items, model="edlae", dropout_p=(0.25,), l2=(100.0,),
                        test_ks=(5, 10))
  new = model.update((np.array(["u0", "new0", "new0"]), np.array(["i5", "i1", "newA"])))
  assert new.results["train"]["how"] == "refit"
  want = edlae.numpy_edlae(new.split.train, 0.25, 100.0)
  got = np.asarray(new.recommender.params["output"]["kernel"], np.float64)
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_the_update_tool_deploys_a_new_version_through_export_and_reload(ease_model,
                                                                        tmp_path):
  pytest.importorskip("starlette")
  import _tools
  from _asgi import AsgiClient
  from jax_vaecf.serving import http as server
  v1, v2, link = tmp_path / "v1", tmp_path / "v2", tmp_path / "current"
  ease_model.export(v1, k=5)
  os.symlink(v1, link)
  app = server.create_app(str(link), log=open(os.devnull, "w"))
  history = {"items": ["newA", "i2"], "k": 5}
  with AsgiClient(app) as client:
    for _ in range(600):
      if client.request("GET", "/health")[0] == 200:
        break
      time.sleep(0.1)
    status, old_answer = client.json("POST", "/recommend", _json(history))
    assert status == 200 and old_answer["unknown"] == ["newA"]
    data = tmp_path / "new.csv"
    data.write_text("user,item\n" + "".join(f"n{j},newA\nn{j},i{j + 1}\n"
                                            for j in range(6)))
    out = tmp_path / "run2"
    r = _tools.run("experiments.update", f"--workdir={ease_model.workdir}",
                   f"--data={data}", f"--out={out}", "--header=yes")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ease update" in r.stdout and re.search(r"^test \(", r.stdout, re.M)
    new = jax_vaecf.load(out)
    r = _tools.run("experiments.export", f"--workdir={out}", f"--out={v2}", "--k=5")
    assert r.returncode == 0, r.stderr[-2000:]
    os.symlink(v2, tmp_path / "next")
    os.replace(tmp_path / "next", link)
    status, got = client.json("POST", "/admin/reload")
    assert status == 200 and got["generation"] == 2, got
    status, new_answer = client.json("POST", "/recommend", _json(history))
  assert status == 200 and new_answer["unknown"] == []
  want = new.recommend(items=[history["items"]], k=5)
  assert new_answer["items"] == [str(i) for i in want.items[0]]
  assert new_answer["items"] != old_answer["items"]


def _json(obj):
  import json
  return json.dumps(obj).encode()
