"""Model shapes, parameter counts, the paper's forward pass and dense == sparse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf import model as model_lib
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

import _numpy_ref as ref


def _params(m, seed=0):
  return train_lib.init_params(m, jax.random.PRNGKey(seed))


def test_paper_parameter_counts():
  # ML-20M: 20,108 items. VAE [20108, 600, 200, 600, 20108]; DAE [20108, 200, 20108].
  vae = model_lib.build_model("multvae", 20108)
  shapes = jax.eval_shape(lambda: _params(vae))
  assert model_lib.count_params(shapes) == 24_511_308
  dae = model_lib.build_model("multdae", 20108)
  shapes = jax.eval_shape(lambda: _params(dae))
  assert model_lib.count_params(shapes) == 2 * 20108 * 200 + 200 + 20108


# These compile many model variants each; the other tests of the module keep the model
# in the fast tier.
SLOW_TESTS = ["test_hidden_sizes_are_configurable", "test_row_offset_shifts_the_randomness"]


def test_hidden_sizes_are_configurable():
  m = model_lib.build_model("multvae", 40, hidden_dims=(16, 8), latent_dim=4)
  p = _params(m)
  assert p["encoder_in"]["kernel"].shape == (40, 16)
  assert p["encoder_1"]["kernel"].shape == (8, 8)  # 2 * latent
  assert p["decoder_0"]["kernel"].shape == (4, 8)
  assert p["decoder_2"]["kernel"].shape == (16, 40)
  assert m.output_layer == "decoder_2"
  linear = model_lib.build_model("multvae", 40, hidden_dims=(), latent_dim=4)
  p = _params(linear)
  assert p["encoder_in"]["kernel"].shape == (40, 8)  # straight to (mu, logvar)
  assert p["decoder_0"]["kernel"].shape == (4, 40) and linear.output_layer == "decoder_0"
  assert set(p) == {"encoder_in", "decoder_0"}
  dae = model_lib.build_model("multdae", 40, hidden_dims=(7, 5))
  assert dae.output_layer == "layers_1" and _params(dae)["layers_1"]["kernel"].shape == (5, 40)
  with pytest.raises(ValueError, match="at least one hidden layer"):
    model_lib.build_model("multdae", 40, hidden_dims=())


def test_initialisation_glorot_and_small_biases():
  m = model_lib.build_model("multvae", 2000)
  p = _params(m)
  w = np.asarray(p["encoder_in"]["kernel"])
  limit = np.sqrt(6.0 / (2000 + 600))
  assert np.abs(w).max() <= limit
  assert np.abs(w).max() > 0.95 * limit  # uniform over the whole Glorot range
  b = np.asarray(p["decoder_1"]["bias"])
  assert 0 < np.std(b) < 0.002 and np.abs(b).max() <= 0.002 + 1e-9


@pytest.mark.parametrize("name", ["multvae", "multdae"])
def test_eval_forward_matches_numpy(name):
  rng = np.random.default_rng(1)
  m = model_lib.build_model(name, 30, hidden_dims=(12,), latent_dim=5)
  p = _params(m)
  x = (rng.random((7, 30)) < 0.3).astype(np.float32) * rng.integers(1, 4, (7, 30))
  out = m.apply({"params": p}, jnp.asarray(x), train=False)
  pn = jax.tree_util.tree_map(np.asarray, p)
  if name == "multvae":
    logits, mu, logvar = ref.vae_forward(pn, x.astype(np.float64))
    np.testing.assert_allclose(out.mu, mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.logvar, logvar, rtol=1e-4, atol=1e-5)
  else:
    logits = ref.dae_forward(pn, x.astype(np.float64))
    assert out.mu is None
  assert out.logits.dtype == jnp.float32 and out.logits.shape == (7, 30)
  np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["multvae", "multdae"])
def test_sparse_input_equals_dense_in_train_and_eval(name):
  rng = np.random.default_rng(2)
  m = model_lib.build_model(name, 64, hidden_dims=(16,), latent_dim=4)
  p = _params(m)
  x = (rng.random((9, 64)) < 0.2).astype(np.float32)
  x[3] = 0  # an empty row must not produce NaN
  sb = sparse_lib.from_dense(x, nnz=200)
  rngs = {"dropout": jax.random.PRNGKey(5), "noise": jax.random.PRNGKey(6)}
  for train in (False, True):
    a = m.apply({"params": p}, jnp.asarray(x), train=train, rngs=rngs)
    b = m.apply({"params": p}, sb, train=train, rngs=rngs)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(a.logits))
  # Training-mode output differs from eval mode: dropout and noise are really applied.
  t = m.apply({"params": p}, sb, train=True, rngs=rngs).logits
  e = m.apply({"params": p}, sb, train=False).logits
  assert np.abs(np.asarray(t) - np.asarray(e)).max() > 1e-3


def test_dropout_rate_and_scaling():
  x = np.ones((50, 2000), np.float32)
  inner = model_lib.InputDense(2000, 4, 0.5)
  # Use an identity-like probe: the first layer's pre-activation of a kernel of ones
  # counts the kept, rescaled entries.
  kp = {"kernel": jnp.ones((2000, 4)), "bias": jnp.zeros((4,))}
  y = inner.apply({"params": kp}, jnp.asarray(x), train=True,
                  rngs={"dropout": jax.random.PRNGKey(0)})
  norm = 1 / np.sqrt(2000)
  kept = np.asarray(y[:, 0]) / (2 * norm)
  frac = kept / 2000
  assert abs(frac.mean() - 0.5) < 0.01
  assert np.all(np.abs(frac - 0.5) < 0.06)


def test_row_offset_shifts_the_randomness():
  m = model_lib.build_model("multvae", 32, hidden_dims=(8,), latent_dim=3)
  p = _params(m)
  x = np.ones((4, 32), np.float32)
  rngs = {"dropout": jax.random.PRNGKey(1), "noise": jax.random.PRNGKey(2)}
  full = m.apply({"params": p}, jnp.asarray(x), train=True, rngs=rngs).logits
  tail = m.apply({"params": p}, jnp.asarray(x[2:]), train=True, rngs=rngs,
                 row_offset=2).logits
  np.testing.assert_allclose(full[2:], tail, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_value_error():
  m = model_lib.build_model("multvae", 16, hidden_dims=(4,), latent_dim=2)
  p = _params(m)
  with pytest.raises(ValueError, match="n_items=16"):
    m.apply({"params": p}, jnp.ones((2, 15)))
  with pytest.raises(ValueError, match="n_items=16"):
    m.apply({"params": p}, jnp.ones((16,)))
  bad = sparse_lib.SparseBatch(np.zeros(3, np.int32), np.array([0, 5, 16], np.int32),
                               np.ones(3, np.float32), np.ones(2, np.float32))
  with pytest.raises(ValueError, match=r"cols.*\[0, 16\)"):
    m.apply({"params": p}, bad)
  with pytest.raises(ValueError, match="unknown model"):
    model_lib.build_model("vae", 10)
  with pytest.raises(ValueError, match="dropout_rate"):
    model_lib.build_model("multvae", 10, dropout_rate=1.0)


def test_half_precision_keeps_float32_outputs_and_params():
  m = model_lib.build_model("multvae", 32, hidden_dims=(8,), latent_dim=3,
                            dtype=jnp.bfloat16)
  p = _params(m)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(p))
  out = m.apply({"params": p}, jnp.ones((2, 32)), train=False)
  assert out.logits.dtype == jnp.float32 and out.mu.dtype == jnp.float32
  m32 = model_lib.build_model("multvae", 32, hidden_dims=(8,), latent_dim=3)
  ref32 = m32.apply({"params": p}, jnp.ones((2, 32)), train=False).logits
  np.testing.assert_allclose(out.logits, ref32, atol=0.05)


def test_add_bias_has_the_plain_gradient():
  # add_bias only changes how the bias gradient is computed; value and both gradients
  # must equal those of `y + b`, also under vmap (the train step maps over shards).
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.standard_normal((3, 7, 5)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(5), jnp.float32)
  w = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)

  def f(add):
    return lambda y, b: jnp.sum(jax.vmap(lambda yy: jnp.tanh(add(yy, b)) * w)(y))

  np.testing.assert_allclose(model_lib.add_bias(y[0], b), y[0] + b)
  got = jax.grad(f(model_lib.add_bias), argnums=(0, 1))(y, b)
  want = jax.grad(f(lambda yy, bb: yy + bb), argnums=(0, 1))(y, b)
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(got[1]))) > 0  # the bias gradient is not trivially zero


def _coo_case():
  # 30 entries (some duplicated, plus padding) over a 6 x 11 matrix.
  rng = np.random.default_rng(5)
  rows = np.r_[rng.integers(0, 6, 26), 2, 2, 0, 0].astype(np.int32)
  cols = np.r_[rng.integers(0, 11, 26), 4, 4, 0, 0].astype(np.int32)
  vals = np.r_[rng.normal(size=26), 1.5, 0.5, 0.0, 0.0].astype(np.float32)
  x = np.zeros((6, 11), np.float32)
  np.add.at(x, (rows, cols), vals)
  matrix = rng.normal(size=(11, 3)).astype(np.float32)
  cot = rng.normal(size=(6, 3)).astype(np.float32)
  return rows, cols, vals, x, matrix, cot


# Both forms of the product: the entry loop (what CPU runs) and the gather form (what
# other platforms run) in one chunk, in chunks of 7 (padded) and one entry at a time.
_FORMS = {
    "loop": lambda r, c, v, m, n: sparse_lib._loop_matmul(r, c, v, m, n),
    "gather": lambda r, c, v, m, n: sparse_lib._gather_matmul(r, c, v, m, n, 1000),
    "gather_7": lambda r, c, v, m, n: sparse_lib._gather_matmul(r, c, v, m, n, 7),
    "gather_1": lambda r, c, v, m, n: sparse_lib._gather_matmul(r, c, v, m, n, 1),
    "matmul": lambda r, c, v, m, n: sparse_lib.matmul(r, c, v, m, n),
}


@pytest.mark.parametrize("form", sorted(_FORMS))
def test_sparse_matmul_equals_dense_in_value_and_gradient(form):
  rows, cols, vals, x, matrix, cot = _coo_case()
  product = _FORMS[form]

  def f(v, m):
    return jnp.sum(product(rows, cols, v, m, 6) * cot)

  got, (d_vals, d_matrix) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(vals),
                                                                   jnp.asarray(matrix))
  np.testing.assert_allclose(product(rows, cols, vals, matrix, 6), x @ matrix, rtol=1e-5,
                             atol=1e-5)
  assert float(got) == pytest.approx(float(np.sum((x @ matrix) * cot)), rel=1e-5)
  np.testing.assert_allclose(d_matrix, x.T @ cot, rtol=1e-5, atol=1e-5)
  # d/d vals_i of sum((X @ M) * cot) = <M[cols_i], cot[rows_i]>.
  np.testing.assert_allclose(d_vals, np.sum(matrix[cols] * cot[rows], axis=1), rtol=1e-5,
                             atol=1e-5)


def test_sparse_matmul_loop_and_gather_forms_agree_jitted_vmapped_and_in_bf16():
  rows, cols, vals, _, matrix, cot = _coo_case()
  for dtype in (jnp.float32, jnp.bfloat16):
    m = jnp.asarray(matrix, dtype)
    grads = [jax.jit(jax.grad(lambda m, p=p: jnp.sum(p(rows, cols, vals, m, 6) * cot)))(m)
             for p in (_FORMS["loop"], _FORMS["gather"])]
    assert grads[0].dtype == grads[1].dtype == dtype
    np.testing.assert_allclose(np.float32(grads[0]), np.float32(grads[1]), rtol=1e-2,
                               atol=1e-2)
  both = np.stack([vals, 2 * vals])  # vmapped over the values, as a sharded step does
  got = [jax.vmap(lambda v, p=p: p(rows, cols, v, matrix, 6))(both)
         for p in (_FORMS["loop"], _FORMS["gather"])]
  np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-5)


def test_sparse_matmul_entries_outside_the_matrix_add_nothing():
  rows, cols, vals, x, matrix, _ = _coo_case()
  bad_rows = np.r_[rows, 6, -1, 0].astype(np.int32)  # row 6 and -1 are outside 6 rows
  bad_cols = np.r_[cols, 0, 3, 11].astype(np.int32)  # item 11 is outside 11 items
  bad_vals = np.r_[vals, 5.0, 5.0, 5.0].astype(np.float32)
  np.testing.assert_allclose(sparse_lib.matmul(bad_rows, bad_cols, bad_vals, matrix, 6),
                             x @ matrix, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda m: jnp.sum(sparse_lib.matmul(bad_rows, bad_cols, bad_vals, m, 6)))(
      jnp.asarray(matrix))
  np.testing.assert_allclose(grad, x.T @ np.ones((6, 3), np.float32), rtol=1e-5, atol=1e-5)


def test_sparse_matmul_refuses_a_nonsense_chunk_size():
  rows, cols, vals, _, matrix, _ = _coo_case()
  with pytest.raises(ValueError, match="chunk_size"):
    sparse_lib.matmul(rows, cols, vals, matrix, 6, chunk_size=0)


def test_input_layer_gathers_in_chunks_with_the_same_result():
  rng = np.random.default_rng(6)
  x = (rng.random((5, 30)) < 0.4).astype(np.float32)
  batch = sparse_lib.from_dense(x, nnz=90)
  whole = model_lib.InputDense(30, 4, 0.5)
  chunked = model_lib.InputDense(30, 4, 0.5, gather_chunk_size=8)
  p = whole.init({"params": jax.random.PRNGKey(0)}, jnp.asarray(x), train=False)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  for train in (False, True):
    want = whole.apply(p, jnp.asarray(x), train=train, rngs=rngs)  # the dense path
    got = chunked.apply(p, batch, train=train, rngs=rngs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, most", [(10, 4), (10, 10), (10, 64), (10_000, 1024), (7, 1)])
def test_equal_chunks_cover_with_less_than_one_padding_per_chunk(n, most):
  count, size = sparse_lib.equal_chunks(n, most)
  assert size <= most and count * size >= n and count * size - n < count
  assert count == -(-n // most)
  rows = jnp.arange(n)
  seen = np.concatenate([np.asarray(sparse_lib.rows_of_chunk(rows, c, size)) for c in
                         range(count)])
  # Every row is in range in exactly one chunk; elsewhere it is marked `size`.
  assert np.sum(seen < size) == n and np.all(seen <= size)
