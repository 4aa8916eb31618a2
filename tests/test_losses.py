"""Loss values and gradients against an independent float64 numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf import losses
from jax_vaecf import model as model_lib
from jax_vaecf import sparse as sparse_lib
from jax_vaecf import train as train_lib

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
