"""The train and eval steps: exact updates, path equivalence, padding, and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_vaecf.core import losses
from jax_vaecf.evaluation import metrics
from jax_vaecf import model as model_lib
from jax_vaecf.core import precision
from jax_vaecf.core import schedules
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

import _numpy_ref as ref
import _synthetic


def _batch(seed=0, b=8, n=40, nnz=256):
  rng = np.random.default_rng(seed)
  x = (rng.random((b, n)) < 0.2).astype(np.float32)
  x[:, seed % n] = 1
  return x, sparse_lib.from_dense(x, nnz=nnz)


def test_dae_step_is_exact_sgd_on_the_papers_objective():
  x, batch = _batch()
  m = model_lib.build_model("multdae", 40, hidden_dims=(6,), dropout_rate=0.0)
  lr, lam = 0.1, 0.01
  opt = optax.sgd(lr)
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0))
  step = jax.jit(train_lib.make_train_step(m, train_lib.StepOptions(
      beta_schedule=schedules.constant_schedule(0.5), lam=lam)))
  new_state, met = step(state, batch)
  pn = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), state.params)
  want = ref.nll(ref.dae_forward(pn, x.astype(np.float64)), x).mean() + ref.l2(pn, lam)
  assert float(met["loss"]) == pytest.approx(want, rel=1e-5)
  assert float(met["beta"]) == 0.0  # Mult-DAE has no KL term

  def objective(p):
    logits = m.apply({"params": p}, jnp.asarray(x)).logits
    return jnp.mean(losses.multinomial_nll(logits, jnp.asarray(x))) + losses.l2_penalty(p, lam)

  grads = jax.grad(objective)(state.params)
  expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, state.params, grads)
  for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(new_state.step) == 1


def _run(m, fmt, batches, steps_fn=None, sched=None):
  opt = train_lib.make_optimizer(1e-2)
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(3))
  step = jax.jit(train_lib.make_train_step(m, train_lib.StepOptions(
      beta_schedule=sched or schedules.linear_schedule(0.2, 10), input_format=fmt)))
  out = []
  for b in batches:
    state, met = step(state, b)
    out.append(float(met["loss"]))
  return state, out


def test_sparse_and_dense_paths_train_identically():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  batches = [_batch(s)[1] for s in range(4)]
  s_sparse, l_sparse = _run(m, "sparse", batches)
  s_dense, l_dense = _run(m, "dense", batches)
  np.testing.assert_allclose(l_sparse, l_dense, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s_sparse.params),
                  jax.tree_util.tree_leaves(s_dense.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["multvae", "multdae"])
def test_output_chunk_size_does_not_change_training(name):
  m = model_lib.build_model(name, 40, hidden_dims=(12,), latent_dim=4)
  batches = [_batch(s)[1] for s in range(3)]
  results = []
  for chunk in (1024, 3):
    opt = train_lib.make_optimizer(1e-2)
    state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(3))
    step = jax.jit(train_lib.make_train_step(m, train_lib.StepOptions(
        beta_schedule=schedules.linear_schedule(0.2, 10), output_chunk_size=chunk)))
    losses_seen = []
    for b in batches:
      state, met = step(state, b)
      losses_seen.append(float(met["loss"]))
    results.append((state, losses_seen))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(results[0][0].params),
                  jax.tree_util.tree_leaves(results[1][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="output_chunk_size"):
    train_lib.make_train_step(m, train_lib.StepOptions(
        beta_schedule=schedules.constant_schedule(0.0), output_chunk_size=0))


def _shard(batch: sparse_lib.SparseBatch, n_shards: int, nnz_per_shard: int):
  """Splits a batch's rows into shards with local row ids (as the batcher does)."""
  x = np.zeros((batch.batch_size, 40), np.float32)
  np.add.at(x, (batch.rows, batch.cols), batch.vals)
  parts = np.split(x, n_shards)
  masks = np.split(np.asarray(batch.row_mask), n_shards)
  shards = [sparse_lib.from_dense(p, nnz=nnz_per_shard, row_mask=mk)
            for p, mk in zip(parts, masks)]
  return jax.tree_util.tree_map(lambda *a: np.stack(a), *shards)


def test_sharded_batch_equals_one_batch():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  batches = [_batch(s)[1] for s in range(3)]
  s1, l1 = _run(m, "sparse", batches)
  s4, l4 = _run(m, "sparse", [_shard(b, 4, 96) for b in batches])
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_padding_rows_do_not_change_the_step():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  x, batch = _batch(b=6)
  padded_x = np.concatenate([x, np.ones((2, 40), np.float32)])  # junk in padded rows
  padded = sparse_lib.from_dense(padded_x, nnz=400,
                                 row_mask=np.array([1] * 6 + [0, 0], np.float32))
  s_a, l_a = _run(m, "sparse", [batch])
  s_b, l_b = _run(m, "sparse", [padded])
  assert l_a[0] == pytest.approx(l_b[0], rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(s_a.params), jax.tree_util.tree_leaves(s_b.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_beta_follows_the_schedule_and_steps_count():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  opt = train_lib.make_optimizer()
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0))
  step = jax.jit(train_lib.make_train_step(m, train_lib.StepOptions(
      beta_schedule=schedules.linear_schedule(0.2, 20))), donate_argnums=0)
  betas = []
  for s in range(6):
    state, met = step(state, _batch(s)[1])
    betas.append(float(met["beta"]))
  np.testing.assert_allclose(betas, [0, 0.05, 0.1, 0.15, 0.2, 0.2], atol=1e-7)
  assert int(state.step) == 6


def test_fp16_loss_scaling_recovers_from_overflow():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4,
                            dtype=jnp.float16)
  opt = train_lib.make_optimizer()
  options = train_lib.StepOptions(beta_schedule=schedules.constant_schedule(0.2),
                                  loss_scaling=True, loss_scale_period=2)
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0), options)
  # A scale so large that the float16 backward pass overflows: the step is skipped.
  state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(2.0**24)))
  step = jax.jit(train_lib.make_train_step(m, options))
  before = state.params
  state, met = step(state, _batch(0)[1])
  assert int(met["skipped_steps"]) == 1
  assert float(state.loss_scale.scale) == 2.0**23
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for s in range(1, 40):
    state, met = step(state, _batch(s)[1])
  assert np.isfinite(float(met["loss"]))
  assert int(state.loss_scale.skipped_steps) < 39  # it found a usable scale
  assert not np.array_equal(np.asarray(before["decoder_0"]["kernel"]),
                            np.asarray(state.params["decoder_0"]["kernel"]))


def test_loss_scale_update_rule():
  ls = precision.init_loss_scale(True, 8.0)
  ls = precision.update_loss_scale(ls, jnp.asarray(True), period=2)
  assert float(ls.scale) == 8.0 and int(ls.good_steps) == 1
  ls = precision.update_loss_scale(ls, jnp.asarray(True), period=2)
  assert float(ls.scale) == 16.0 and int(ls.good_steps) == 0
  ls = precision.update_loss_scale(ls, jnp.asarray(False), period=2)
  assert float(ls.scale) == 8.0 and int(ls.skipped_steps) == 1


def _evaluate(m, params, fold, held, ks=(100,)):
  ev = jax.jit(train_lib.make_eval_step(m, ks))
  acc = metrics.MetricAccumulator()
  for i in range(0, fold.shape[0], 100):
    b = sparse_lib.EvalBatch(sparse_lib.from_dense(fold[i:i + 100], nnz=4096),
                             sparse_lib.from_dense(held[i:i + 100], nnz=4096))
    acc.add(ev(params, b))
  return acc.result()


def test_training_learns_the_low_rank_structure():
  n_items = 200
  x = _synthetic.low_rank_interactions(n_users=1000, n_items=n_items, seed=0)
  train_x, eval_x = x[:800], x[800:]
  fold, held = _synthetic.fold_in_split(eval_x)
  m = model_lib.build_model("multvae", n_items, hidden_dims=(64,), latent_dim=16)
  opt = train_lib.make_optimizer(3e-3)
  state = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0))
  step = jax.jit(train_lib.make_train_step(m, train_lib.StepOptions(
      beta_schedule=schedules.linear_schedule(0.2, 500))), donate_argnums=0)
  rng = np.random.default_rng(0)
  for epoch in range(30):
    order = rng.permutation(800)
    for i in range(0, 800, 100):
      state, _ = step(state, sparse_lib.from_dense(train_x[order[i:i + 100]], nnz=2048))
  got = _evaluate(m, state.params, fold, held)["ndcg@100"]
  # Baselines on the same users: a random ranking and item popularity in training.
  rand = metrics.ranking_metrics(jnp.asarray(rng.random(fold.shape)), jnp.asarray(held),
                                 jnp.asarray(fold), (100,))["ndcg@100"].mean()
  pop_scores = np.broadcast_to(train_x.sum(0), fold.shape)
  pop = metrics.ranking_metrics(jnp.asarray(pop_scores), jnp.asarray(held),
                                jnp.asarray(fold), (100,))["ndcg@100"].mean()
  assert got > 2.0 * float(rand)
  assert got > float(pop) + 0.1, (got, float(pop), float(rand))


def test_bad_step_arguments():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  sched = schedules.constant_schedule(0.1)
  with pytest.raises(ValueError, match="input format"):
    train_lib.make_train_step(m, train_lib.StepOptions(beta_schedule=sched,
                                                       input_format="coo"))
  with pytest.raises(ValueError, match="lam"):
    train_lib.make_train_step(m, train_lib.StepOptions(beta_schedule=sched, lam=-1.0))
  with pytest.raises(ValueError, match="n_items"):
    train_lib.make_eval_step(m, (41,))
  with pytest.raises(ValueError, match="learning rate"):
    train_lib.make_optimizer(0.0)


@pytest.mark.parametrize("fmt, chunk", [("sparse", 1024), ("sparse", 4), ("sparse", 1),
                                        ("dense", 1024)])
def test_eval_step_equals_dense_ranking_metrics(fmt, chunk):
  # Sparse: 10 users in one chunk, in chunks of 4 (the last padded) and one at a time.
  rng = np.random.default_rng(7)
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  params = train_lib.init_params(m, jax.random.PRNGKey(1))
  fold = (rng.random((10, 40)) < 0.3).astype(np.float32)
  held = ((rng.random((10, 40)) < 0.2) & (fold == 0)).astype(np.float32)
  held[4] = 0
  batch = sparse_lib.EvalBatch(
      sparse_lib.from_dense(fold, nnz=256, row_mask=np.r_[np.ones(9), 0]),
      sparse_lib.from_dense(held, nnz=128, row_mask=np.r_[np.ones(9), 0]))
  got = jax.jit(train_lib.make_eval_step(m, (5, 10), input_format=fmt,
                                         output_chunk_size=chunk))(params, batch)
  assert got["ndcg@10"].shape == (10,)
  logits = m.apply({"params": params}, jnp.asarray(fold)).logits
  want = metrics.ranking_metrics(logits, jnp.asarray(held), jnp.asarray(fold), (5, 10),
                                 row_mask=jnp.asarray(np.r_[np.ones(9), 0]))
  for k in ("ndcg@5", "ndcg@10", "recall@10", "valid", "n_heldout", "is_user"):
    np.testing.assert_allclose(np.asarray(got[k], np.float64),
                               np.asarray(want[k], np.float64), rtol=1e-5, atol=1e-6)
  assert not bool(got["valid"][4]) and not bool(got["valid"][9])


def test_weight_average_is_the_debiased_exponential_average_of_the_trajectory():
  m = model_lib.build_model("multvae", 40, hidden_dims=(12,), latent_dim=4)
  opt = train_lib.make_optimizer(1e-2)
  batches = [_batch(s)[1] for s in range(5)]
  sched = schedules.linear_schedule(0.2, 10)
  decay = 0.7
  plain_options = train_lib.StepOptions(beta_schedule=sched)
  avg_options = train_lib.StepOptions(beta_schedule=sched, ema_decay=decay)
  plain = train_lib.create_train_state(m, opt, jax.random.PRNGKey(3), plain_options)
  averaged = train_lib.create_train_state(m, opt, jax.random.PRNGKey(3), avg_options)
  step = jax.jit(train_lib.make_train_step(m, plain_options))
  step_avg = jax.jit(train_lib.make_train_step(m, avg_options))
  trajectory = []
  for b in batches:
    plain, _ = step(plain, b)
    averaged, _ = step_avg(averaged, b)
    trajectory.append(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), plain.params))
  # Averaging does not change the weights themselves.
  for a, b in zip(jax.tree_util.tree_leaves(plain.params),
                  jax.tree_util.tree_leaves(averaged.params)):
    np.testing.assert_array_equal(a, b)
  # ema_t = sum_s decay^(t-s) params_s / sum_s decay^(t-s), s = 1..t: no weight on the init.
  t = len(trajectory)
  w = np.array([decay ** (t - s) for s in range(1, t + 1)])
  want = jax.tree_util.tree_map(lambda *ps: sum(wi * p for wi, p in zip(w, ps)) / w.sum(),
                                *trajectory)
  for a, b in zip(jax.tree_util.tree_leaves(averaged.ema_params),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert averaged.eval_params is averaged.ema_params and plain.eval_params is plain.params
  # After one step the average is that step's weights.
  one, _ = step_avg(train_lib.create_train_state(m, opt, jax.random.PRNGKey(3),
                                                 avg_options), batches[0])
  for a, b in zip(jax.tree_util.tree_leaves(one.ema_params),
                  jax.tree_util.tree_leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_weight_average_needs_a_matching_state():
  m = model_lib.build_model("multdae", 40, hidden_dims=(6,))
  opt = train_lib.make_optimizer()
  sched = schedules.constant_schedule(0.0)
  _, batch = _batch()
  with pytest.raises(ValueError, match="ema_decay must be in"):
    train_lib.make_train_step(m, train_lib.StepOptions(beta_schedule=sched, ema_decay=1.0))
  plain_options = train_lib.StepOptions(beta_schedule=sched)
  avg_options = train_lib.StepOptions(beta_schedule=sched, ema_decay=0.9)
  # The state and the step made with different options: the step refuses the state.
  plain = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0), plain_options)
  with pytest.raises(ValueError, match="needs a state with ema_params"):
    train_lib.make_train_step(m, avg_options)(plain, batch)
  averaged = train_lib.create_train_state(m, opt, jax.random.PRNGKey(0), avg_options)
  with pytest.raises(ValueError, match="needs a state without ema_params"):
    train_lib.make_train_step(m, plain_options)(averaged, batch)


# Many steps each (11 s, 7 s); the exact-SGD, padding and sharding checks keep the step in the fast tier, and
# tests/test_parallel.py's loss-scaling recovery the fp16 path.
SLOW_TESTS = ['test_training_learns_the_low_rank_structure', 'test_fp16_loss_scaling_recovers_from_overflow']
