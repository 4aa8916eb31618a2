"""RecVAE (Shenbin et al., "RecVAE: a New Variational Autoencoder for Top-N
Recommendations with Implicit Feedback", WSDM 2020) on the library's model interface.

* Encoder: the input row L2-normalised, input dropout (encoder phase only), then
  densely connected layers of one width: ``h1 = LN(swish(W1 x))`` and
  ``h_k = LN(swish(W_k h_{k-1} + h_1 + ... + h_{k-1}))`` (LayerNorm epsilon 0.1), and
  linear heads to ``mu`` and ``logvar``. The first layer is the sparse gather of
  :class:`jax_vaecf.model.InputDense`.
* Decoder: one linear layer ``latent -> n_items`` with the multinomial likelihood: the
  fused :func:`jax_vaecf.core.losses.output_layer_nll` of every model.
* Composite prior: ``p(z) = 3/20 N(0, I) + 3/4 N(mu_old(x), var_old(x)) + 1/10 N(0,
  e^10 I)`` per latent dimension, where ``mu_old, var_old`` come from a frozen copy of
  the encoder (the state's ``frozen['prior']``) applied to the same input without
  dropout. The KL term is the single-sample estimate ``sum_d [log q(z|x) - log p(z)]``;
  the train step weighs it by ``beta`` or per user by ``gamma * |x_u|``.
* Training alternates two phases (:attr:`RecVAE.phases`): encoder-only updates for
  ``encoder_epochs`` passes with input dropout, then the frozen copy is refreshed from
  the encoder and the decoder alone is trained for ``decoder_epochs`` passes without
  input dropout, each phase with its own Adam state. ``z`` is sampled in both phases;
  evaluation uses ``z = mu``. The first round's prior encoder is initialised on its own,
  as in the authors' code.

Parameters: ``{'encoder': {...}, 'decoder': {'kernel', 'bias'}}``; the frozen
variables: ``{'prior': <encoder parameters>}``.
"""

from __future__ import annotations

import dataclasses

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_vaecf.models import base as model_lib

Array = jax.Array

LAYER_NORM_EPS = 0.1
LOG_2PI = math.log(2.0 * math.pi)
# (log weight, log-variance) of the prior's fixed components: N(0, I) and N(0, e^10 I).
# The remaining 3/4 goes to the frozen encoder's posterior.
STANDARD = (math.log(3 / 20), 0.0)
WIDE = (math.log(1 / 10), 10.0)
POSTERIOR_LOG_WEIGHT = math.log(3 / 4)


def log_normal(x: Array, mu: Array | float, logvar: Array | float) -> Array:
  """Elementwise ``log N(x; mu, exp(logvar))`` in float32."""
  return -0.5 * (logvar + LOG_2PI + jnp.square(x - mu) * jnp.exp(-logvar))


def composite_kl(z: Array, mu: Array, logvar: Array, prior_mu: Array,
                 prior_logvar: Array) -> Array:
  """Per-user ``sum_d [log q(z_d|x) - log p(z_d)]`` for RecVAE's composite prior.

  Args:
    z: float32 ``(B, latent)``, a sample of the posterior ``q = N(mu, exp(logvar))``.
    mu, logvar: float32 ``(B, latent)``, the posterior.
    prior_mu, prior_logvar: float32 ``(B, latent)``, the frozen encoder's posterior of the
      same rows (treated as constants).

  Returns:
    float32 ``(B,)``.
  """
  z, mu, logvar = (a.astype(jnp.float32) for a in (z, mu, logvar))
  prior_mu = jax.lax.stop_gradient(prior_mu.astype(jnp.float32))
  prior_logvar = jax.lax.stop_gradient(prior_logvar.astype(jnp.float32))
  components = jnp.stack([
      log_normal(z, 0.0, STANDARD[1]) + STANDARD[0],
      log_normal(z, prior_mu, prior_logvar) + POSTERIOR_LOG_WEIGHT,
      log_normal(z, 0.0, WIDE[1]) + WIDE[0],
  ], axis=-1)
  log_p = jax.nn.logsumexp(components, axis=-1)
  return jnp.sum(log_normal(z, mu, logvar) - log_p, axis=-1)


class RecVAEEncoder(nn.Module):
  """The densely connected encoder; returns float32 ``(mu, logvar)``, each
  ``(B, latent_dim)``.

  Attributes:
    n_items: input width.
    hidden_dims: the layers' widths (all equal: each layer adds the previous outputs).
    latent_dim: width of the latent.
    dropout_rate: input dropout rate when called with ``train=True``.
    dtype, param_dtype: matmul and parameter dtypes; LayerNorm runs in float32.
    item_shards: as :class:`jax_vaecf.model.MultVAE`.
  """

  n_items: int
  hidden_dims: Sequence[int] = (600,) * 5
  latent_dim: int = 200
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_dims[0]
    self.input = model_lib.InputDense(self.n_items, width, self.dropout_rate, **kw,
                                      item_shards=self.item_shards)
    self.hidden = [model_lib.Dense(width, **kw) for _ in self.hidden_dims[1:]]
    self.norms = [nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False,
                               dtype=jnp.float32, param_dtype=self.param_dtype)
                  for _ in self.hidden_dims]
    self.mu = model_lib.Dense(self.latent_dim, **kw)
    self.logvar = model_lib.Dense(self.latent_dim, **kw)

  def __call__(self, x: model_lib.Input, *, train: bool = False, row_offset=0
               ) -> tuple[Array, Array]:
    h = self.norms[0](jax.nn.swish(self.input(x, train=train, row_offset=row_offset)))
    previous = h  # h_1 + ... + h_{k-1}
    for k, layer in enumerate(self.hidden, start=1):
      h = self.norms[k](jax.nn.swish(layer(h.astype(self.dtype)) + previous))
      previous = previous + h
    h = h.astype(self.dtype)
    return self.mu(h), self.logvar(h)


class RecVAE(model_lib.CFModel):
  """RecVAE (see the module docstring).

  Attributes:
    n_items: number of items.
    hidden_dims: the encoder's layer widths, all equal (paper: five of 600).
    latent_dim: latent width (paper: 200).
    dropout_rate: input dropout of the encoder phase (paper: 0.5).
    dtype, param_dtype: as :class:`jax_vaecf.model.MultVAE`.
    encoder_epochs: passes of the encoder phase per round (paper: 3).
    decoder_epochs: passes of the decoder phase per round (paper: 1).
    item_shards: as :class:`jax_vaecf.model.MultVAE`.
  """

  n_items: int
  hidden_dims: Sequence[int] = (600,) * 5
  latent_dim: int = 200
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  encoder_epochs: int = 3
  decoder_epochs: int = 1
  item_shards: Any = None

  def _encoder(self, **kw) -> RecVAEEncoder:
    return RecVAEEncoder(self.n_items, tuple(self.hidden_dims), self.latent_dim,
                         self.dropout_rate, self.dtype, self.param_dtype,
                         item_shards=self.item_shards, **kw)

  def setup(self):
    self.encoder = self._encoder()
    self.decoder = model_lib.Dense(self.n_items, dtype=self.dtype,
                                   param_dtype=self.param_dtype)

  @property
  def output_layer(self) -> str:
    return "decoder"

  @property
  def phases(self) -> tuple[model_lib.Phase, ...]:
    return (
        model_lib.Phase("encoder", self.encoder_epochs, ("encoder",), dropout=True, kl=True),
        # The KL term does not depend on the decoder, so the decoder phase skips it.
        model_lib.Phase("decoder", self.decoder_epochs, ("decoder",), dropout=False,
                        kl=False, refresh_frozen=True),
    )

  def init_frozen(self, params: Any, key: Array) -> dict:
    """A prior encoder initialised on its own from ``key``, as the authors' code does."""
    del params
    x = jnp.zeros((1, self.n_items), jnp.float32)
    return {"prior": self._encoder(parent=None).init({"params": key}, x)["params"]}

  def frozen_from(self, params: Any) -> dict:
    """The prior encoder after an encoder phase: a copy of the encoder's parameters."""
    return {"prior": jax.tree_util.tree_map(jnp.copy, params["encoder"])}

  def features(self, x: model_lib.Input, *, train: bool = False, row_offset=0,
               dropout: bool = True, frozen: Any = None, kl: bool = True
               ) -> model_lib.ModelOutput:
    """``logits`` holds ``z`` ``(B, latent_dim)`` in ``dtype``: the decoder's input.

    When training, ``z`` is sampled and ``kl`` (with ``kl=True``) is
    :func:`composite_kl` against the prior encoder ``frozen['prior']``.
    """
    model_lib.check_input(x, self.n_items)
    mu, logvar = self.encoder(x, train=train and dropout, row_offset=row_offset)
    if not train:
      return model_lib.ModelOutput(mu.astype(self.dtype), mu, logvar)
    z = model_lib.sample_posterior(self, mu, logvar, row_offset)
    kl_u = None
    if kl:
      if frozen is None or "prior" not in frozen:
        raise ValueError("RecVAE's KL term needs the prior encoder: pass the state's "
                         "frozen variables (train.create_train_state makes them)")
      prior_mu, prior_logvar = self._encoder(parent=None).apply(
          {"params": frozen["prior"]}, x, train=False)
      kl_u = composite_kl(z, mu, logvar, prior_mu, prior_logvar)
    return model_lib.ModelOutput(z.astype(self.dtype), mu, logvar, kl_u)

  def __call__(self, x: model_lib.Input, *, train: bool = False, row_offset=0, **kwargs
               ) -> model_lib.ModelOutput:
    """Logits ``(B, n_items)`` and posterior; arguments as :meth:`features`."""
    out = self.features(x, train=train, row_offset=row_offset, **kwargs)
    return out._replace(logits=self.decoder(out.logits))


@dataclasses.dataclass(frozen=True)
class RecVAESettings:
  """RecVAE's own settings; their checks, written once."""

  hidden_dims: tuple = model_lib.model_setting(
      (600,) * 5, "Encoder layer widths, comma separated, all equal ('' = the paper's "
      "five of 600).", shapes=True, empty_means_default=True)
  latent_dim: int = model_lib.model_setting(200, "Latent width.", shapes=True)
  encoder_epochs: int = model_lib.model_setting(
      3, "Passes of the encoder phase in each epoch (one epoch = one round of both "
      "phases).")
  decoder_epochs: int = model_lib.model_setting(
      1, "Passes of the decoder phase in each epoch.")

  def __post_init__(self):
    if not self.hidden_dims or len(set(self.hidden_dims)) != 1:
      raise ValueError(f"RecVAE's encoder layers add up each other's outputs, so they "
                       f"need one width, got hidden_dims={tuple(self.hidden_dims)}")
    if self.hidden_dims[0] < 1 or self.latent_dim < 1:
      raise ValueError("RecVAE's hidden_dims and latent_dim must be >= 1")
    if self.encoder_epochs < 1 or self.decoder_epochs < 1:
      raise ValueError(f"RecVAE needs encoder_epochs and decoder_epochs >= 1, got "
                       f"{self.encoder_epochs} and {self.decoder_epochs}")


def _build(n_items, settings: RecVAESettings, dropout_rate, dtype) -> RecVAE:
  return RecVAE(n_items, tuple(settings.hidden_dims), settings.latent_dim, dropout_rate,
                dtype, encoder_epochs=settings.encoder_epochs,
                decoder_epochs=settings.decoder_epochs)


def _space():
  from jax_vaecf.models import space  # pylint: disable=g-import-not-at-top
  return (space.hidden_dims_param("One width for every encoder layer (its five)."),)


ENTRY = model_lib.ModelEntry(_build, "RecVAE", RecVAESettings, space=_space())
