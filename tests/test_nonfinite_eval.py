"""A diverged model (NaN / inf scores) is refused by evaluation, never given metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf.evaluation import metrics
from jax_vaecf import model as model_lib
from jax_vaecf.training import parallel
from jax_vaecf.core import schedules
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

N_ITEMS = 30


def _model():
  return model_lib.build_model("multvae", N_ITEMS, hidden_dims=(8,), latent_dim=3)


def _nan_params(params):
  return jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), params)


def _eval_batch(n_users=10, n_real=9, seed=0):
  """Users with fold-in and held-out items; rows ``n_real ...`` are padding."""
  rng = np.random.default_rng(seed)
  fold = (rng.random((n_users, N_ITEMS)) < 0.3).astype(np.float32)
  held = ((rng.random((n_users, N_ITEMS)) < 0.2) & (fold == 0)).astype(np.float32)
  mask = (np.arange(n_users) < n_real).astype(np.float32)
  return sparse_lib.EvalBatch(sparse_lib.from_dense(fold, nnz=256, row_mask=mask),
                              sparse_lib.from_dense(held, nnz=128, row_mask=mask))


def test_ranking_metrics_flags_real_users_with_nonfinite_scores():
  scores = np.zeros((4, 6), np.float32)
  scores[1, 2] = np.nan
  scores[2, 5] = np.inf
  scores[3, 0] = np.nan  # a padding row: not a user
  fold_in = np.zeros((4, 6), np.float32)
  fold_in[0, :3] = 1  # masked to -inf inside: not a divergence
  heldout = np.zeros((4, 6), np.float32)
  heldout[:, 4] = 1
  m = metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(heldout),
                              jnp.asarray(fold_in), (2,),
                              row_mask=jnp.asarray([1.0, 1.0, 1.0, 0.0]))
  assert np.asarray(m["nonfinite"]).tolist() == [False, True, True, False]
  # Scores the caller masked itself: its own flags, taken before masking, are used.
  masked = np.where(fold_in > 0, -np.inf, 0.0).astype(np.float32)
  m = metrics.ranking_metrics(jnp.asarray(masked), jnp.asarray(heldout), None, (2,),
                              nonfinite=jnp.zeros(4, bool))
  assert not np.asarray(m["nonfinite"]).any()


def test_accumulator_refuses_a_batch_with_nonfinite_users():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 12)).astype(np.float32)
  heldout = (rng.random((5, 12)) < 0.3).astype(np.float32)
  heldout[:, 0] = 1
  acc = metrics.MetricAccumulator()
  acc.add(metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(heldout), None, (5,)))
  before = acc.result()
  bad = scores.copy()
  bad[1, 3] = np.nan
  bad[4, :] = -np.inf
  m = metrics.ranking_metrics(jnp.asarray(bad), jnp.asarray(heldout), None, (5,))
  assert np.isfinite(np.asarray(m["ndcg@5"])).all()  # alone they would pass for metrics
  with pytest.raises(metrics.NonFiniteModelError,
                     match="non-finite scores for 2 users in evaluation: the model "
                           "diverged"):
    acc.add(m)
  assert acc.result() == before  # nothing of the refused batch was kept
  # Padding rows do not count, whatever their scores.
  acc.add(m, row_mask=np.array([1, 0, 1, 1, 0]))
  assert acc.result()["n_users"] == 2 * 5 - 2


@pytest.mark.parametrize("fmt, chunk", [("sparse", 1024), ("sparse", 4), ("dense", 1024)])
def test_eval_step_flags_nan_params_but_not_fold_in_masking(fmt, chunk):
  m = _model()
  params = train_lib.init_params(m, jax.random.PRNGKey(0))
  batch = _eval_batch()
  step = jax.jit(train_lib.make_eval_step(m, (5, 10), input_format=fmt,
                                          output_chunk_size=chunk))
  good = step(params, batch)
  assert good["nonfinite"].shape == (10,) and good["nonfinite"].dtype == jnp.bool_
  assert not np.asarray(good["nonfinite"]).any()  # fold-in items at -inf do not count
  acc = metrics.MetricAccumulator()
  acc.add(good)
  assert acc.result()["n_users"] > 0
  bad = step(_nan_params(params), batch)
  assert np.asarray(bad["nonfinite"]).tolist() == [True] * 9 + [False]  # row 9: padding
  with pytest.raises(metrics.NonFiniteModelError, match="non-finite scores for 9 users"):
    metrics.MetricAccumulator().add(bad)


@pytest.mark.parametrize("mode", parallel.MODES)
def test_parallel_eval_of_nan_params_is_refused(mode):
  m = _model()
  opt = train_lib.make_optimizer()
  options = train_lib.StepOptions(beta_schedule=schedules.constant_schedule(0.1))
  ps = parallel.make_parallel_steps(m, options, mode=mode,
                                    devices=parallel.resolve_devices(4), ks=(10,))
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0), options)
  batch = _eval_batch(n_users=10, n_real=10)
  eb = sparse_lib.EvalBatch(parallel.pad_and_shard(batch.fold_in, 4),
                            parallel.pad_and_shard(batch.heldout, 4))
  put = ps.put_batch(eb)
  ok = ps.metrics_to_host(ps.eval_step(ps.init_state(state), put))
  assert ok["nonfinite"].shape == (12,) and not ok["nonfinite"].any()
  st = ps.init_state(state.replace(params=_nan_params(state.params)))
  out = ps.metrics_to_host(ps.eval_step(st, put))
  assert out["nonfinite"].tolist() == [True] * 10 + [False] * 2  # 2 padding rows
  with pytest.raises(metrics.NonFiniteModelError, match="for 10 users"):
    metrics.MetricAccumulator().add(out)
