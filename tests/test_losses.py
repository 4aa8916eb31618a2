"""Loss values and gradients against an independent float64 numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf.core import losses
from jax_vaecf import model as model_lib
from jax_vaecf.core import sparse as sparse_lib
from jax_vaecf.training import steps as train_lib

import _numpy_ref as ref

jax.config.update("jax_enable_x64", False)


def _problem(seed=0, b=6, n=25):
  rng = np.random.default_rng(seed)
  x = (rng.random((b, n)) < 0.3).astype(np.float32)
  x[0, :3] = 1
  logits = rng.normal(size=(b, n)).astype(np.float32) * 3
  return x, logits


def test_multinomial_nll_matches_numpy_dense_and_sparse():
  x, logits = _problem()
  want = ref.nll(logits.astype(np.float64), x)
  got = losses.multinomial_nll(jnp.asarray(logits), jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got_sparse = losses.multinomial_nll_sparse(jnp.asarray(logits),
                                             sparse_lib.from_dense(x, nnz=200))
  np.testing.assert_allclose(got_sparse, want, rtol=1e-5)


def test_nll_is_float32_for_half_precision_logits():
  x, logits = _problem()
  got = losses.multinomial_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(x))
  assert got.dtype == jnp.float32


def _output_problem(seed=0, b=10, width=7, n=30):
  rng = np.random.default_rng(seed)
  x = (rng.random((b, n)) < 0.25).astype(np.float32) * rng.integers(1, 3, (b, n))
  x[:, seed % n] = 1
  mask = np.ones(b, np.float32)
  mask[-2] = 0.0  # a padding row: contributes nothing
  h = rng.normal(size=(b, width)).astype(np.float32)
  kernel = (rng.normal(size=(width, n)) * 0.5).astype(np.float32)
  bias = (rng.normal(size=n) * 0.1).astype(np.float32)
  batch = sparse_lib.from_dense(x, nnz=b * n // 2 + 7, row_mask=mask)
  return x, mask, h, kernel, bias, batch


def _output_reference(x, mask, h, kernel, bias):
  """Value and gradients of sum_u mask_u nll_u(h @ kernel + bias) in float64 numpy."""
  h, kernel, bias, x = (a.astype(np.float64) for a in (h, kernel, bias, x))
  logits = h @ kernel + bias
  value = float(np.sum(mask * ref.nll(logits, x)))
  p = np.exp(ref.log_softmax(logits))
  d_logits = mask[:, None] * (x.sum(1, keepdims=True) * p - x)
  return value, d_logits @ kernel.T, h.T @ d_logits, d_logits.sum(0)


@pytest.mark.parametrize("chunk_size", [10, 4, 3, 1, 64])
def test_output_layer_nll_value_and_gradients_match_numpy(chunk_size):
  # 10 rows in chunks of 10, 4 and 3 (the last chunk padded), 1, and one oversize chunk.
  x, mask, h, kernel, bias, batch = _output_problem()
  want = _output_reference(x, mask, h, kernel, bias)

  def f(h, kernel, bias):
    return losses.output_layer_nll(h, kernel, bias, batch, chunk_size)

  value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(
      jnp.asarray(h), jnp.asarray(kernel), jnp.asarray(bias))
  assert float(value) == pytest.approx(want[0], rel=1e-5)
  for got, expected in zip(grads, want[1:]):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(grads[0])[-2] == 0)  # the padding row gets no gradient


def test_output_layer_nll_scales_with_the_cotangent_and_jits():
  x, mask, h, kernel, bias, batch = _output_problem(seed=1)
  want = _output_reference(x, mask, h, kernel, bias)

  @jax.jit
  def g(kernel):
    return jax.grad(lambda k: 3.0 * losses.output_layer_nll(
        jnp.asarray(h), k, jnp.asarray(bias), batch, 4))(kernel)

  np.testing.assert_allclose(g(jnp.asarray(kernel)), 3.0 * want[2], rtol=1e-4, atol=1e-5)


def test_output_layer_nll_half_precision_stays_close_and_float32():
  x, mask, h, kernel, bias, batch = _output_problem(seed=2)
  want = _output_reference(x, mask, h, kernel, bias)
  value, d_kernel = jax.value_and_grad(losses.output_layer_nll, argnums=1)(
      jnp.asarray(h), jnp.asarray(kernel), jnp.asarray(bias), batch, 4, jnp.bfloat16)
  assert value.dtype == jnp.float32 and d_kernel.dtype == jnp.float32
  assert float(value) == pytest.approx(want[0], rel=2e-2)
  np.testing.assert_allclose(d_kernel, want[2], rtol=0.1, atol=0.05)


def test_row_major_transpose_is_the_exact_transpose():
  h = np.random.default_rng(3).standard_normal((7, 5)).astype(np.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    hd = jnp.asarray(h, dtype)
    got = jax.jit(losses.row_major_transpose)(hd)
    assert got.dtype == hd.dtype and got.shape == (5, 7)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(hd, np.float32).T)


def test_output_layer_nll_rejects_bad_shapes():
  x, mask, h, kernel, bias, batch = _output_problem()
  with pytest.raises(ValueError, match="output_layer_nll"):
    losses.output_layer_nll(jnp.asarray(h[:5]), kernel, bias, batch, 4)
  with pytest.raises(ValueError, match="output_layer_nll"):
    losses.output_layer_nll(jnp.asarray(h), kernel[:, :5], bias, batch, 4)
  with pytest.raises(ValueError, match="chunk_size"):
    losses.output_layer_nll(jnp.asarray(h), kernel, bias, batch, 0)


def test_gaussian_kl_matches_numpy():
  rng = np.random.default_rng(3)
  mu, logvar = rng.normal(size=(2, 5, 4))
  np.testing.assert_allclose(losses.gaussian_kl(jnp.asarray(mu), jnp.asarray(logvar)),
                             ref.kl(mu, logvar), rtol=1e-5)
  assert np.allclose(losses.gaussian_kl(jnp.zeros((3, 4)), jnp.zeros((3, 4))), 0)


def test_masked_mean_ignores_padding():
  v = jnp.array([1.0, 2.0, 100.0])
  assert float(losses.masked_mean(v, jnp.array([1.0, 1.0, 0.0]))) == pytest.approx(1.5)
  assert float(losses.masked_mean(v, jnp.zeros(3))) == 0.0
  with pytest.raises(ValueError):
    losses.masked_mean(v, jnp.ones(2))


def test_l2_penalty_counts_kernels_only():
  params = {"a": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 100.0)},
            "b": {"kernel": jnp.ones((4,)), "bias": jnp.ones((4,))}}
  assert float(losses.l2_penalty(params, 0.5)) == pytest.approx(0.5 * (6 * 4 + 4))


def _objective(m, params, x, beta, lam, eps):
  """The training objective in eval mode with given noise, through the library."""
  mu, logvar = m.apply({"params": params}, jnp.asarray(x), method=m.encode)
  z = mu + eps * jnp.exp(0.5 * logvar)
  logits = m.apply({"params": params}, z, method=m.decode)
  return (jnp.mean(losses.multinomial_nll(logits, jnp.asarray(x)))
          + beta * jnp.mean(losses.gaussian_kl(mu, logvar))
          + losses.l2_penalty(params, lam))


def test_vae_objective_value_and_gradient_match_numpy_finite_differences():
  rng = np.random.default_rng(4)
  m = model_lib.build_model("multvae", 12, hidden_dims=(5,), latent_dim=3)
  params = train_lib.init_params(m, jax.random.PRNGKey(0))
  x = (rng.random((4, 12)) < 0.4).astype(np.float32)
  x[:, 0] = 1
  eps = rng.normal(size=(4, 3)).astype(np.float32)
  beta, lam = 0.3, 0.05

  def np_objective(pn):
    logits, mu, logvar = ref.vae_forward(pn, x.astype(np.float64), eps)
    return (ref.nll(logits, x).mean() + beta * ref.kl(mu, logvar).mean()
            + ref.l2(pn, lam))

  pn = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  value = _objective(m, params, x, beta, lam, eps)
  assert float(value) == pytest.approx(np_objective(pn), rel=1e-5)
  grads = jax.grad(lambda p: _objective(m, p, x, beta, lam, eps))(params)
  h = 1e-6
  for layer, name in [("encoder_in", "kernel"), ("encoder_0", "bias"),
                      ("decoder_1", "kernel"), ("decoder_0", "kernel")]:
    arr = pn[layer][name]
    for flat in rng.choice(arr.size, 3, replace=False):
      idx = np.unravel_index(flat, arr.shape)
      plus = jax.tree_util.tree_map(np.copy, pn)
      minus = jax.tree_util.tree_map(np.copy, pn)
      plus[layer][name][idx] += h
      minus[layer][name][idx] -= h
      fd = (np_objective(plus) - np_objective(minus)) / (2 * h)
      got = float(np.asarray(grads[layer][name])[idx])
      assert got == pytest.approx(fd, rel=2e-3, abs=2e-5), (layer, name, idx)


def test_lam_changes_the_gradient():
  # The reference's L2 term was silently inert; here lam must move every kernel gradient.
  rng = np.random.default_rng(5)
  m = model_lib.build_model("multvae", 12, hidden_dims=(5,), latent_dim=3)
  params = train_lib.init_params(m, jax.random.PRNGKey(0))
  x = (rng.random((4, 12)) < 0.4).astype(np.float32)
  eps = np.zeros((4, 3), np.float32)
  g0 = jax.grad(lambda p: _objective(m, p, x, 0.2, 0.0, eps))(params)
  g1 = jax.grad(lambda p: _objective(m, p, x, 0.2, 0.1, eps))(params)
  for layer in params:
    diff = np.asarray(g1[layer]["kernel"]) - np.asarray(g0[layer]["kernel"])
    np.testing.assert_allclose(diff, 2 * 0.1 * np.asarray(params[layer]["kernel"]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g1[layer]["bias"], g0[layer]["bias"], atol=1e-7)


# Two compiled gradients of a full model (6 s); the L2 penalty's value is checked fast beside it.
SLOW_TESTS = ['test_lam_changes_the_gradient']
