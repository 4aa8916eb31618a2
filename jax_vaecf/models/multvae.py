"""Mult-VAE and Mult-DAE (Liang et al., "Variational Autoencoders for Collaborative
Filtering", WWW 2018) as Flax Linen modules, and their registry entries.

Both models take a batch of users' interaction rows, either dense ``(B, n_items)`` or a
padded :class:`jax_vaecf.core.sparse.SparseBatch`, and return float32 logits over all items.
The sparse path computes the first layer as a gather-and-sum over each user's items, so
the input side of a batch is never dense; it is the same function as the dense path
(see ``tests/test_model.py``).

Architecture, exactly as the paper's code (github dawenl/vae_cf):

* input rows L2-normalised per user (``x / sqrt(max(sum x^2, 1e-12))``), then dropout
  (rate 0.5, training only, kept entries scaled by ``1 / (1 - rate)``);
* Mult-VAE encoder ``[n_items, 600, 2 * 200]`` with tanh between layers; the last layer's
  output is split into the posterior mean and log-variance;
* ``z = mu + eps * exp(logvar / 2)`` when training, ``z = mu`` when evaluating;
* decoder ``[200, 600, n_items]`` with tanh hidden layers and linear logits;
* Mult-DAE: ``[n_items, 200, n_items]`` with tanh, no posterior;
* weights Glorot-uniform, biases truncated normal with stddev 0.001.

Precision: parameters are stored in ``param_dtype`` (float32); each matmul runs in
``dtype`` (float32, bfloat16 or float16) and accumulates into float32; hidden activations
are cast back to ``dtype``; logits, ``mu`` and ``logvar`` are always float32.

RNG streams: ``'dropout'`` (input dropout) and ``'noise'`` (reparameterisation), used
only when ``train=True``. Masks and noise are functions of each user's global row
(``row_offset + local row``) and item (:mod:`jax_vaecf.core.random`), so the dense and sparse
paths, and one device or many, draw the same ones from the same keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from jax_vaecf.core import item_shards as item_shards_lib
from jax_vaecf.core import losses
from jax_vaecf.models.base import (Array, CFModel, Dense, Input, InputDense, ModelEntry,
                                   ModelOutput, check_input, model_setting,
                                   sample_posterior)

class MultVAE(CFModel):
  """Mult-VAE: encoder ``[n_items, *hidden_dims, 2 * latent_dim]``, decoder mirrored.

  Attributes:
    n_items: number of items (input and output width).
    hidden_dims: encoder hidden widths (paper: ``(600,)``); the decoder uses them reversed.
    latent_dim: width of the Gaussian latent (paper: 200).
    dropout_rate: input dropout rate while training (paper: 0.5).
    dtype: matmul dtype (float32, bfloat16 or float16).
    param_dtype: parameter dtype (float32).
    item_shards: ``None``, or the item split of a model-parallel step (then ``n_items``
      is one shard's width; see :class:`CFModel`).
  """

  n_items: int
  hidden_dims: Sequence[int] = (600,)
  latent_dim: int = 200
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: item_shards_lib.ItemShards | None = None

  def setup(self):
    dims = list(self.hidden_dims) + [2 * self.latent_dim]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder_in = InputDense(self.n_items, dims[0], self.dropout_rate, **kw,
                                 item_shards=self.item_shards)
    self.encoder = [Dense(d, **kw) for d in dims[1:]]
    self.decoder = [Dense(d, **kw) for d in list(self.hidden_dims)[::-1] + [self.n_items]]

  def encode(self, x: Input, *, train: bool = False,
             row_offset=0) -> tuple[Array, Array]:
    """Returns the posterior ``(mu, logvar)``, each float32 ``(B, latent_dim)``.

    ``train`` applies input dropout.
    """
    check_input(x, self.n_items)
    h = self.encoder_in(x, train=train, row_offset=row_offset)
    for layer in self.encoder:
      h = layer(jnp.tanh(h).astype(self.dtype))
    return h[:, :self.latent_dim], h[:, self.latent_dim:]

  def decode_features(self, z: Array) -> Array:
    """Maps latents ``(B, latent_dim)`` to the output layer's input ``(B, width)``.

    Returned in ``dtype``.
    """
    h = z
    for layer in self.decoder[:-1]:
      h = layer(h.astype(self.dtype))
      h = jnp.tanh(h)
    return h.astype(self.dtype)

  def decode(self, z: Array) -> Array:
    """Maps latents ``(B, latent_dim)`` to float32 logits ``(B, n_items)``."""
    return self.decoder[-1](self.decode_features(z))

  @property
  def output_layer(self) -> str:
    """Name of the output layer's parameters (``params[name]['kernel' | 'bias']``)."""
    return f"decoder_{len(self.hidden_dims)}"

  def features(self, x: Input, *, train: bool = False, row_offset=0, dropout: bool = True,
               frozen: Any = None, kl: bool = True) -> ModelOutput:
    """As :meth:`__call__`, but ``logits`` holds the output layer's input ``(B, width)``.

    ``logits = features @ params[output_layer]['kernel'] + ...['bias']``; the training
    step fuses that layer with the loss (:func:`jax_vaecf.core.losses.output_layer_nll`).
    When training, ``kl`` is ``KL(q(z|x) || N(0, I))`` per user
    (:func:`jax_vaecf.core.losses.gaussian_kl`).
    """
    del frozen
    mu, logvar = self.encode(x, train=train and dropout, row_offset=row_offset)
    z = mu
    kl_u = None
    if train:
      z = sample_posterior(self, mu, logvar, row_offset)
      if kl:
        kl_u = losses.gaussian_kl(mu, logvar)
    return ModelOutput(self.decode_features(z), mu, logvar, kl_u)

  def __call__(self, x: Input, *, train: bool = False, row_offset=0, **kwargs
               ) -> ModelOutput:
    """Logits and posterior of a batch.

    Args:
      x: dense ``(B, n_items)`` rows or a :class:`SparseBatch`.
      train: draw dropout and posterior noise (needs rngs ``'dropout'`` and ``'noise'``).
      row_offset: global position of this batch's first row (data-parallel shards).
      **kwargs: ``dropout``, ``frozen``, ``kl`` as :meth:`features`.
    """
    out = self.features(x, train=train, row_offset=row_offset, **kwargs)
    return out._replace(logits=self.decoder[-1](out.logits))


class MultDAE(CFModel):
  """Mult-DAE: ``[n_items, *hidden_dims, n_items]`` with tanh hidden layers.

  Attributes:
    n_items: number of items.
    hidden_dims: hidden widths (paper: ``(200,)``).
    dropout_rate: input dropout rate while training (paper: 0.5).
    dtype, param_dtype, item_shards: as for :class:`MultVAE`.
  """

  n_items: int
  hidden_dims: Sequence[int] = (200,)
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: item_shards_lib.ItemShards | None = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dims = list(self.hidden_dims)
    self.encoder_in = InputDense(self.n_items, dims[0], self.dropout_rate, **kw,
                                 item_shards=self.item_shards)
    self.layers = [Dense(d, **kw) for d in dims[1:] + [self.n_items]]

  @property
  def output_layer(self) -> str:
    """Name of the output layer's parameters (as :attr:`MultVAE.output_layer`)."""
    return f"layers_{len(self.hidden_dims) - 1}"

  @property
  def has_kl(self) -> bool:
    return False

  def features(self, x: Input, *, train: bool = False, row_offset=0, dropout: bool = True,
               frozen: Any = None, kl: bool = True) -> ModelOutput:
    """The output layer's input ``(B, width)`` in ``dtype`` (as :meth:`MultVAE.features`);
    no KL term."""
    del frozen, kl
    check_input(x, self.n_items)
    h = self.encoder_in(x, train=train and dropout, row_offset=row_offset)
    for layer in self.layers[:-1]:
      h = layer(jnp.tanh(h).astype(self.dtype))
    return ModelOutput(jnp.tanh(h).astype(self.dtype))

  def __call__(self, x: Input, *, train: bool = False, row_offset=0, **kwargs
               ) -> ModelOutput:
    """Logits of a batch (arguments as :meth:`MultVAE.__call__`)."""
    h = self.features(x, train=train, row_offset=row_offset, **kwargs).logits
    return ModelOutput(self.layers[-1](h))

def _positive_widths(widths) -> None:
  if any(int(w) < 1 for w in widths):
    raise ValueError(f"hidden_dims must be positive, got {tuple(widths)}")


@dataclasses.dataclass(frozen=True)
class MultVAESettings:
  """Mult-VAE's own settings."""

  hidden_dims: tuple = model_setting(
      (600,), "Encoder hidden widths, comma separated (the decoder mirrors them; '' = "
      "the model's paper).", shapes=True, empty_means_default=True)
  latent_dim: int = model_setting(200, "Latent width.", shapes=True)

  def __post_init__(self):
    _positive_widths(self.hidden_dims)
    if self.latent_dim < 1:
      raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")


@dataclasses.dataclass(frozen=True)
class MultDAESettings:
  """Mult-DAE's own settings."""

  hidden_dims: tuple = model_setting(
      (200,), "Hidden widths, comma separated ('' = the model's paper).", shapes=True,
      empty_means_default=True)

  def __post_init__(self):
    _positive_widths(self.hidden_dims)
    if not self.hidden_dims:
      raise ValueError("Mult-DAE needs at least one hidden layer")


def _build_multvae(n_items, settings, dropout_rate, dtype):
  return MultVAE(n_items, tuple(settings.hidden_dims), settings.latent_dim, dropout_rate,
                 dtype)


def _build_multdae(n_items, settings, dropout_rate, dtype):
  return MultDAE(n_items, tuple(settings.hidden_dims), dropout_rate, dtype)


def _widths_space():
  from jax_vaecf.models import space  # pylint: disable=g-import-not-at-top
  return (space.hidden_dims_param("One width for every hidden layer."),)


MULTVAE = ModelEntry(_build_multvae, "Mult-VAE", MultVAESettings, space=_widths_space())
MULTDAE = ModelEntry(_build_multdae, "Mult-DAE", MultDAESettings, space=_widths_space())
