"""The library's input boundary (jax_vaecf.data.inputs): what ``fit``, ``recommend``,
``score``, ``evaluate``, ``save``, ``export`` and a hand-made ``Split`` accept, and the
one clear line each gives for what it cannot answer right."""

import dataclasses
import os
import shutil

from hypothesis import HealthCheck, event, given, settings, strategies as st
import numpy as np
import pytest
import scipy.sparse as sp

import jax_vaecf
from jax_vaecf.training import configs
from jax_vaecf.data import inputs
from jax_vaecf.data import split as split_lib

import _synthetic

ITEM_IDS = list(range(100, 220))  # the fitted model's item ids, one per matrix column
SMALL = dict(number_of_epochs=1, hidden_dims=(8,), latent_dim=4, batch_size_train=64,
             batch_size_validation=64, total_anneal_steps=10, test_ks=(5,), prefetch=1)


@pytest.fixture(scope="module")
def matrix():
  return sp.csr_matrix(_synthetic.low_rank_interactions(n_users=150, n_items=120, seed=3))


@pytest.fixture(scope="module")
def model(matrix):
  """One tiny model in its temporary run folder (no workdir), fitted once."""
  users = np.array([f"u{r}" for r in range(matrix.shape[0])])
  return jax_vaecf.fit(matrix, "ml-latest-small", user_ids=users,
                       item_ids=np.array(ITEM_IDS), **SMALL)


# ------------------------------------------------------------------ defect 1: strings


def test_a_string_in_place_of_a_list_is_refused_naming_the_argument(model):
  user = str(model.split.train_user_ids[0])
  assert len(model.recommend(users=[user], k=3).items) == 1
  with pytest.raises(TypeError, match=r"^users: expected a list of raw ids, got a text"):
    model.recommend(users=user, k=3)
  with pytest.raises(TypeError, match=r"^items: expected a list of users' item lists, got "
                                      r"a flat list of ids"):
    model.recommend(items=["101", "102"], k=3)
  with pytest.raises(TypeError, match=r"^items: expected a list of users' item lists"):
    model.score(items=["101", "102"])
  with pytest.raises(TypeError, match=r"^items: expected a list of users' item lists"):
    model.recommend(items="101", k=3)
  with pytest.raises(TypeError, match=r"^items\[0\]\[1\]: a raw id is an int or a str, "
                                      r"got bytes"):
    model.recommend(items=[["101", b"102"]], k=3)


def test_a_lone_id_none_or_a_float_is_not_an_id(model):
  with pytest.raises(TypeError, match=r"^users: expected a list of raw ids, got int"):
    model.recommend(users=1)
  with pytest.raises(TypeError, match=r"^users\[0\]: a raw id is an int or a str, got "
                                      r"NoneType"):
    model.recommend(users=[None])
  with pytest.raises(TypeError, match=r"^items: expected a list of users' item lists, got "
                                      r"a flat list"):
    model.recommend(items=[101, 102])
  with pytest.raises(TypeError, match=r"^items\[0\]\[0\]: a raw id is an int or a str, "
                                      r"got float"):
    model.recommend(items=[[101.0]])


# ------------------------------------------------------------------ k and ks


@pytest.mark.parametrize("k", [2.5, "5", True, None, np.float32(3)])
def test_k_of_the_wrong_kind_names_k(model, k):
  with pytest.raises(TypeError, match=r"^k: expected an int"):
    model.recommend(items=[[101]], k=k)


@pytest.mark.parametrize("k", [0, -1, 121])
def test_k_out_of_range_names_k(model, k):
  with pytest.raises(ValueError, match=rf"^k must be in \[1, 120\] \(the model's items\), "
                                       rf"got {k}"):
    model.recommend(items=[[101]], k=k)


def test_numpy_integers_are_ids_and_ks(model):
  a = model.recommend(items=[[np.int64(101), 102]], k=np.int32(4))
  b = model.recommend(items=[[101, 102]], k=4)
  assert a.items[0].tolist() == b.items[0].tolist() and len(a.items[0]) == 4


def test_evaluate_refuses_a_fractional_k_rather_than_rounding_it(model):
  with pytest.raises(TypeError, match=r"^ks\[0\]: expected an int, got float 2.5"):
    model.evaluate("test", ks=(2.5,))
  with pytest.raises(TypeError, match=r"^ks: expected a list of ints, got int"):
    model.evaluate("test", ks=5)
  with pytest.raises(ValueError, match=r"^ks: give at least one k"):
    model.evaluate("test", ks=())


# ------------------------------------------------------------------ fit's keywords


@pytest.mark.parametrize("setting, value, expected", [
    ("number_of_epochs", "2", "int"), ("lr", "fast", "float"), ("hidden_dims", "600",
                                                                 "a list of int")])
def test_a_keyword_setting_of_the_wrong_type_is_named(matrix, tmp_path, setting, value,
                                                      expected):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=rf"^fit\({setting}=\.\.\.\): {setting} = "
                                       rf"{value!r}, expected {expected}$"):
    jax_vaecf.fit(matrix, "ml-latest-small", workdir=str(workdir), **{setting: value})
  assert not workdir.exists()


def test_numpy_scalars_are_settings_of_their_python_type():
  cfg = jax_vaecf.api._config("demo", {"number_of_epochs": np.int64(3),
                                       "lr": np.float32(0.5), "test_ks": [np.int64(7)]})
  assert (cfg.number_of_epochs, cfg.lr, cfg.test_ks) == (3, 0.5, (7,))
  assert type(cfg.number_of_epochs) is int


def test_a_callback_that_is_not_callable_fails_before_any_training(matrix, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(TypeError, match=r"^on_epoch: expected a function of one record"):
    jax_vaecf.fit(matrix, "ml-latest-small", workdir=str(workdir), on_epoch=5, **SMALL)
  assert not workdir.exists()


# ------------------------------------------------------------------ defect 2: the matrix


def test_stored_zeros_are_no_interactions():
  m = sp.csr_matrix(_synthetic.low_rank_interactions(n_users=30, n_items=12, seed=1))
  zeroed = m.copy()
  zeroed.data[::2] = 0  # stored, but zero
  got = jax_vaecf.api.interactions_of(zeroed)
  want = jax_vaecf.api.interactions_of(sp.csr_matrix(zeroed.toarray()))
  assert got.users.size == want.users.size == zeroed.count_nonzero() < m.nnz
  assert sorted(zip(got.users, got.items)) == sorted(zip(want.users, want.items))
  assert zeroed.nnz == m.nnz  # the caller's matrix is left as it was


@pytest.mark.parametrize("value, what", [(-1.0, "negative"), (np.nan, "NaN or inf"),
                                         (np.inf, "NaN or inf")])
def test_a_negative_or_non_finite_entry_is_refused_with_its_place(value, what):
  m = sp.csr_matrix(np.eye(4, dtype=np.float32))
  m.data[2] = value
  with pytest.raises(ValueError, match=rf"^data: a {what} entry \({value!r} at row 2, "
                                       r"column 2\)"):
    jax_vaecf.api.interactions_of(m)


def test_ratings_in_a_matrix_are_refused_not_ignored():
  m = sp.csr_matrix(np.array([[1, 0, 4.5], [0, 1, 1]], np.float32))
  with pytest.raises(ValueError, match=r"^data: entries must be 0 or 1 \(non-zero = an "
                                       r"interaction\), got 4.5 at row 0, column 2; "
                                       r"binarise it .* csv_threshold"):
    jax_vaecf.api.interactions_of(m)


def test_duplicate_row_or_column_ids_are_refused():
  m = sp.csr_matrix(np.eye(3, dtype=np.float32))
  with pytest.raises(ValueError, match=r"^user_ids: user id 'a' names both row 0 and "
                                       r"row 2"):
    jax_vaecf.api.interactions_of(m, user_ids=["a", "b", "a"])
  with pytest.raises(ValueError, match=r"^item_ids: item id 7 names both column 1 and "
                                       r"column 2"):
    jax_vaecf.api.interactions_of(m, item_ids=[5, 7, 7])
  with pytest.raises(TypeError, match=r"^item_ids\[1\]: a raw id is an int or a str, got "
                                      r"NoneType"):
    jax_vaecf.api.interactions_of(m, item_ids=[5, None, 7])


# ------------------------------------------------------------------ defect 4: a Split


def _tiny_split(n_items=6):
  rng = np.random.default_rng(0)
  def m(rows):
    return sp.csr_matrix((rng.random((rows, n_items)) < 0.5).astype(np.float32))
  test = split_lib.EvalSplit(fold_in=m(4), heldout=m(4), user_ids=np.arange(10, 14))
  return split_lib.Split(train=m(8), validation=None, test=test,
                         item_ids=np.arange(n_items), train_user_ids=np.arange(8))


def _with_test(split, **changes):
  return dataclasses.replace(split, test=dataclasses.replace(split.test, **changes))


def test_a_checked_split_is_the_same_split_in_the_librarys_form():
  s = _tiny_split()
  got = inputs.split(s)
  for a, b in ((got.train, s.train), (got.test.fold_in, s.test.fold_in),
               (got.test.heldout, s.test.heldout)):
    assert a.dtype == np.float32 and a.indices.dtype == np.int32
    assert (a != b).nnz == 0


def test_a_split_with_held_out_columns_beyond_its_items_is_refused():
  s = _tiny_split()
  wide = sp.hstack([s.test.heldout, sp.csr_matrix(np.ones((4, 3), np.float32))]).tocsr()
  with pytest.raises(ValueError, match=r"^data.test.heldout: shape \(4, 9\), expected "
                                       r"\(4, 6\)"):
    inputs.split(_with_test(s, heldout=wide))
  with pytest.raises(ValueError, match=r"^data.test.heldout: shape \(4, 5\)"):
    inputs.split(_with_test(s, heldout=s.test.heldout[:, :5]))


def test_a_split_whose_item_ids_do_not_match_its_columns_is_refused():
  s = _tiny_split()
  with pytest.raises(ValueError, match=r"^data.train: shape \(8, 6\), expected \(8, 5\)"):
    inputs.split(dataclasses.replace(s, item_ids=np.arange(5)))


@pytest.mark.parametrize("value", [-1.0, np.nan, 0.0, 2.0])
def test_a_split_with_an_entry_other_than_one_is_refused(value):
  s = _tiny_split()
  train = s.train.copy()
  train.data[0] = value
  with pytest.raises(ValueError, match=r"^data.train: a split's entries are 1"):
    inputs.split(dataclasses.replace(s, train=train))


def test_fit_checks_a_split_before_it_makes_the_run_folder(tmp_path):
  s = _tiny_split()
  train = s.train.copy()
  train.data[:] = np.nan
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"^data.train: a split's entries are 1 \(an interaction\), got nan at row 0"):
    jax_vaecf.fit(dataclasses.replace(s, train=train), "ml-latest-small",
                  workdir=str(workdir), **SMALL)
  assert not workdir.exists()


def test_evaluate_checks_an_eval_split_over_other_items(model):
  part = model.split.test
  wide = sp.hstack([part.heldout, sp.csr_matrix((part.n_users, 2), dtype=np.float32)])
  with pytest.raises(ValueError, match=r"^on.heldout: shape \(\d+, 122\), expected "
                                       r"\(\d+, 120\)"):
    model.evaluate(dataclasses.replace(part, heldout=wide.tocsr()), ks=(5,))
  assert model.evaluate(part, ks=(5,))["ndcg@5"] == model.evaluate("test", ks=(5,))[
      "ndcg@5"]


# ------------------------------------------------------------------ EASE's l2


@pytest.mark.parametrize("l2", [1e30, 1e39, 1e-30, 0.5, 2e6])
def test_l2_outside_the_range_a_float32_solve_answers_is_refused_up_front(l2):
  cfg = configs.get_config("ml1m_ease")
  with pytest.raises(ValueError, match=r"^bad setting: EASE: l2 must be in \[1, "
                                       r"1e\+06\], got \[.*\]: below, float32 rounding"):
    configs.validate(cfg.replace(l2=(100.0, l2)))  # one bad value of a sweep
  configs.validate(cfg.replace(l2=(1.0, 100.0, 1e6)))


def test_a_single_l2_is_one_value_and_a_bad_one_fails_before_the_data(tmp_path):
  assert jax_vaecf.api._config("ml1m_ease", {"l2": 100.0}).l2 == (100.0,)
  assert jax_vaecf.api._config("ml1m_ease", {"l2": [50, 100.0]}).l2 == (50.0, 100.0)
  with pytest.raises(ValueError, match=r"^fit\(l2=\.\.\.\): EASE: l2 must be in"):
    jax_vaecf.fit(None, "ml1m_ease", l2=1e30, workdir=str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"^fit\(l2=\.\.\.\): l2 = '100', expected a list "
                                       r"of float$"):
    jax_vaecf.api._config("ml1m_ease", {"l2": "100"})


# ------------------------------------------------------------------ defect 3: save; export


def test_save_inside_the_models_own_temporary_folder_is_refused(matrix, tmp_path):
  m = jax_vaecf.fit(matrix, "ml-latest-small", **SMALL)
  before = m.recommend(items=[[0, 1]], k=3).items[0].tolist()
  for inside in (os.path.join(m.workdir, "keep"), m.workdir):
    with pytest.raises(ValueError, match=r"^path: .* is inside the model's run folder"):
      m.save(inside)
  assert not os.path.exists(os.path.join(m.workdir, "keep"))
  kept = m.save(str(tmp_path / "kept"))
  assert m.recommend(items=[[0, 1]], k=3).items[0].tolist() == before
  assert jax_vaecf.load(kept).recommend(items=[[0, 1]], k=3).items[0].tolist() == before


def test_a_pickled_item_table_is_named_by_its_file(model, tmp_path):
  from jax_vaecf.serving import recommender as recommend
  folder = str(tmp_path / "copy")
  shutil.copytree(model.workdir, folder)
  path = os.path.join(folder, "item_ids.npy")
  np.save(path, np.array([object()] * 120, dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match=rf"^{path}: not a numpy array of item ids"):
    recommend.Recommender.from_workdir(folder)


def test_export_for_an_unknown_platform_is_refused_before_writing(model, tmp_path):
  out = tmp_path / "artefact"
  with pytest.raises(ValueError, match=r"^platforms: \['tpu9'\]; expected some of "
                                       r"\('cpu', 'cuda', 'rocm', 'tpu'\)"):
    model.export(str(out), k=5, platforms=("tpu9",))
  with pytest.raises(TypeError, match=r"^platforms: expected a list of platform names"):
    model.export(str(out), k=5, platforms="cpu")
  assert not out.exists()


# ------------------------------------------------------------------ the contract, generated

_any_id = st.one_of(
    st.sampled_from(ITEM_IDS), st.sampled_from([str(i) for i in ITEM_IDS]),
    st.integers(-3, 300), st.text(max_size=3), st.none(), st.floats(), st.booleans(),
    st.binary(max_size=2), st.sampled_from([np.int64(101), np.str_("102"), np.float64(3)]))
_good_id = st.one_of(st.sampled_from(ITEM_IDS), st.sampled_from([str(i) for i in ITEM_IDS]),
                    st.integers(-3, 300), st.text(max_size=3))
# Half of the draws are well-formed, so both sides of the contract are tried.
_good_history = st.one_of(st.lists(_good_id, max_size=5),
                          st.lists(st.sampled_from(ITEM_IDS), max_size=5).map(np.array))
_history = st.one_of(_good_history, st.lists(_any_id, max_size=5), st.text(max_size=3),
                     _any_id)
_items = st.one_of(st.lists(_good_history, max_size=3), st.lists(_good_history, max_size=3),
                   st.lists(_history, max_size=3), st.text(max_size=4),
                   st.lists(_any_id, min_size=1, max_size=3), _any_id)
_k = st.one_of(st.sampled_from([1, 2, 5, 119, 120, np.int64(5)]),
               st.sampled_from([1, 2, 5, 119, 120, np.int64(5)]),
               st.sampled_from([-1, 0, 121, 2.5, True, "5", None, np.float32(5)]),
               st.floats())
_users = st.one_of(
    st.lists(st.sampled_from([f"u{r}" for r in range(0, 150, 3)]), max_size=3),
    st.lists(st.one_of(st.sampled_from([f"u{r}" for r in range(0, 150, 7)]), _any_id),
             max_size=3), st.text(max_size=3), _any_id)
_BOUNDED = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _is_id(v):
  return isinstance(v, (int, np.integer, str)) and not isinstance(v, (bool, np.bool_))


def _is_history(h):
  if isinstance(h, np.ndarray):
    h = h.tolist()
  return isinstance(h, list) and all(_is_id(v) for v in h)


def _valid_k(k):
  return _is_id(k) and not isinstance(k, str) and 1 <= int(k) <= len(ITEM_IDS)


def _as_list(history):
  return history.tolist() if isinstance(history, np.ndarray) else list(history)


def _reference(model, histories, k):
  """Per user: the dense score path's row (``model.score``, float64, columns in
  ``model.item_ids`` order) with the user's known items at -inf and the top-k scores of
  that row; the ids not known; the column of each id."""
  known = {str(i): i for i in ITEM_IDS}
  column = {int(i): j for j, i in enumerate(model.item_ids.tolist())}  # score's order
  seen = [[known[str(v)] for v in _as_list(h) if str(v) in known] for h in histories]
  unknown = [[v for v in _as_list(h) if str(v) not in known] for h in histories]
  rows = model.score(items=seen).astype(np.float64) if seen else np.zeros((0, 0))
  out = []
  for row, mine in zip(rows, seen):
    row = row.copy()
    row[[column[i] for i in mine]] = -np.inf
    n = min(k, len(ITEM_IDS) - len(set(mine)))
    out.append((row, -np.sort(-row)[:n]))
  return out, unknown, column


def _assert_one_clear_error(error, bad_arguments):
  """A TypeError / ValueError of one line whose first word is a bad argument."""
  assert isinstance(error, (TypeError, ValueError)), repr(error)
  message = str(error)
  named = {n.split("[")[0].split(" ")[0] for n in message.split(":")[0].split(" / ")}
  assert "\n" not in message and named & set(bad_arguments), (message, bad_arguments)


def _assert_matches_reference(model, got, histories, k):
  reference, unknown, column = _reference(model, histories, k)
  assert [list(u) for u in got.unknown] == unknown
  assert len(got.items) == len(reference)
  for ids, scores, (row, top) in zip(got.items, got.scores, reference):
    np.testing.assert_allclose(scores, top, rtol=1e-4, atol=1e-5)
    # Each returned id is the item of its score (ties may come in either order).
    np.testing.assert_allclose(row[[column[int(i)] for i in ids]], scores,
                               rtol=1e-4, atol=1e-5)
    assert len(set(ids.tolist())) == len(ids)


@given(items=_items, k=_k)
@_BOUNDED
def test_recommend_for_new_users_answers_right_or_names_the_bad_argument(model, items, k):
  valid_items = isinstance(items, list) and all(_is_history(h) for h in items)
  bad = {name for name, ok in (("items", valid_items), ("k", _valid_k(k))) if not ok}
  try:
    got = model.recommend(items=items, k=k)
  except Exception as e:  # pylint: disable=broad-except
    assert bad, f"a valid call raised {e!r}"
    _assert_one_clear_error(e, bad)
    event("refused")
    return
  event("answered")
  assert not bad, f"accepted bad {bad}: items={items!r} k={k!r}"
  _assert_matches_reference(model, got, items, int(k))


@given(users=_users, k=_k)
@_BOUNDED
def test_recommend_for_known_users_answers_right_or_names_the_bad_argument(model, matrix,
                                                                           users, k):
  in_data = {str(u) for part in (model.split.train_user_ids, model.split.validation.user_ids,
                                 model.split.test.user_ids) for u in part}
  valid_users = isinstance(users, list) and all(_is_id(u) for u in users)
  bad = {name for name, ok in (("users", valid_users and all(
      str(u) in in_data for u in users)), ("k", _valid_k(k))) if not ok}
  try:
    got = model.recommend(users=users, k=k)
  except Exception as e:  # pylint: disable=broad-except
    assert bad, f"a valid call raised {e!r}"
    _assert_one_clear_error(e, bad)
    event("refused")
    return
  event("answered")
  assert not bad, f"accepted bad {bad}: users={users!r} k={k!r}"
  # A user of the data is the new user holding all their items (the matrix's row).
  histories = [[ITEM_IDS[c] for c in matrix[int(str(u)[1:])].indices] for u in users]
  _assert_matches_reference(model, got, histories, int(k))


@given(items=_items)
@_BOUNDED
def test_score_answers_every_item_or_names_the_bad_argument(model, items):
  valid = isinstance(items, list) and all(_is_history(h) for h in items)
  try:
    got = model.score(items=items)
  except Exception as e:  # pylint: disable=broad-except
    assert not valid, f"a valid call raised {e!r}"
    _assert_one_clear_error(e, {"items"})
    event("refused")
    return
  event("answered")
  assert valid, f"accepted bad items={items!r}"
  assert got.shape == (len(items), len(ITEM_IDS)) and got.dtype == np.float32
  for r, history in enumerate(items):  # each row is that user's row scored alone
    np.testing.assert_allclose(got[r], model.score(items=[history])[0], rtol=1e-5,
                               atol=1e-6)
