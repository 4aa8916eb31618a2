"""An independent float64 numpy forward pass and loss of Mult-VAE / Mult-DAE (eval mode,
optionally with given latent noise), used as the oracle for the JAX code."""

import numpy as np


def l2_normalize(x):
  return x / np.sqrt(np.maximum((x * x).sum(1, keepdims=True), 1e-12))


def dense(h, layer):
  return h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)


def vae_forward(params, x, eps=None):
  """Returns logits, mu, logvar; z = mu + eps * std when eps is given."""
  h = dense(l2_normalize(x), params["encoder_in"])
  i = 0
  while f"encoder_{i}" in params:
    h = dense(np.tanh(h), params[f"encoder_{i}"])
    i += 1
  latent = h.shape[1] // 2
  mu, logvar = h[:, :latent], h[:, latent:]
  z = mu if eps is None else mu + eps * np.exp(0.5 * logvar)
  h = z
  i = 0
  while f"decoder_{i}" in params:
    if i:
      h = np.tanh(h)
    h = dense(h, params[f"decoder_{i}"])
    i += 1
  return h, mu, logvar


def dae_forward(params, x):
  h = dense(l2_normalize(x), params["encoder_in"])
  i = 0
  while f"layers_{i}" in params:
    h = dense(np.tanh(h), params[f"layers_{i}"])
    i += 1
  return h


def log_softmax(logits):
  m = logits.max(1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))


def nll(logits, x):
  return -(log_softmax(logits) * x).sum(1)


def kl(mu, logvar):
  return (0.5 * (-logvar + np.exp(logvar) + mu ** 2 - 1)).sum(1)


def l2(params, lam):
  total = 0.0
  for layer in params.values():
    total += (np.asarray(layer["kernel"], np.float64) ** 2).sum()
  return lam * total
