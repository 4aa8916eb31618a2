"""Adding a model is one class and one registry entry: a model registered at run time
trains, saves, reloads (its shape rebuilt from the run folder's identity), resumes,
recommends and exports with no other file touched."""

import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

import jax_vaecf
from jax_vaecf import checkpoint as checkpoint_lib
from jax_vaecf import configs
from jax_vaecf import model as model_lib
from jax_vaecf import recommend

import _synthetic


class TinyAE(model_lib.CFModel):
  """``[n_items, latent_dim, n_items]`` with tanh: the smallest model of the interface."""

  n_items: int
  latent_dim: int = 8
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  item_shards: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder_in = model_lib.InputDense(self.n_items, self.latent_dim,
                                           self.dropout_rate, **kw,
                                           item_shards=self.item_shards)
    self.decoder = model_lib.Dense(self.n_items, **kw)

  @property
  def output_layer(self) -> str:
    return "decoder"

  @property
  def has_kl(self) -> bool:
    return False

  def features(self, x, *, train=False, row_offset=0, dropout=True, frozen=None, kl=True):
    del frozen, kl
    h = self.encoder_in(x, train=train and dropout, row_offset=row_offset)
    return model_lib.ModelOutput(nn.tanh(h).astype(self.dtype))

  def __call__(self, x, *, train=False, row_offset=0, **kwargs):
    h = self.features(x, train=train, row_offset=row_offset, **kwargs).logits
    return model_lib.ModelOutput(self.decoder(h))


def _build(n_items, hidden_dims, latent_dim, dropout_rate, dtype):
  del hidden_dims
  return TinyAE(n_items, latent_dim, dropout_rate, dtype)


@pytest.fixture
def tiny():
  entry = model_lib.register("tiny", model_lib.ModelEntry(_build, (), "Tiny AE",
                                                          shape=("latent_dim",)))
  yield entry
  model_lib.unregister("tiny")


def test_a_model_registered_at_run_time_trains_saves_reloads_and_serves(tiny, tmp_path):
  x = sp.csr_matrix(_synthetic.low_rank_interactions(n_users=300, n_items=120, seed=2))
  settings = dict(model="tiny", hidden_dims=(), latent_dim=7, dropout_rate=0.2,
                  number_of_epochs=2, batch_size_train=64, batch_size_validation=64,
                  test_ks=(5, 10), prefetch=1)
  workdir = str(tmp_path / "run")
  model = jax_vaecf.fit(x, "ml-latest-small", workdir=workdir, **settings)
  assert 0.0 < model.results["test"]["ndcg@10"] <= 1.0
  # The folder alone rebuilds it: latent_dim 7 (not the default 8) from the identity.
  ident = checkpoint_lib.read_best_meta(workdir)["identity"]
  assert ident["model"] == "tiny" and ident["latent_dim"] == 7
  rec = recommend.Recommender.from_workdir(workdir)
  assert isinstance(rec.model, TinyAE) and rec.model.latent_dim == 7
  assert rec.params["decoder"]["kernel"].shape == (7, 120)
  loaded = jax_vaecf.load(model.save(str(tmp_path / "saved")))
  histories = [[3, 4, 5], [10]]
  got = loaded.recommend(items=histories, k=5)
  assert [list(a) for a in got.items] == [
      list(b) for b in model.recommend(items=histories, k=5).items]
  assert not {3, 4, 5} & set(np.asarray(got.items[0]).tolist())
  # Resume: two more epochs from the saved folder.
  more = jax_vaecf.fit(x, "ml-latest-small", workdir=str(tmp_path / "saved"),
                       **{**settings, "number_of_epochs": 4})
  assert [r["epoch"] for r in more.history] == [1, 2, 3, 4]
  manifest = more.export(str(tmp_path / "artefact"), k=5)
  assert manifest["model"]["model"] == "tiny"
  assert manifest["param_shapes"]["decoder/kernel"][0] == [7, 120]


def test_the_registry_refuses_what_it_cannot_rebuild(tiny):
  with pytest.raises(ValueError, match="registered already"):
    model_lib.register("tiny", tiny)
  with pytest.raises(ValueError, match="shape names \\['rank'\\], which are neither"):
    model_lib.ModelEntry(_build, (), "bad", shape=("rank",))
  assert "tiny" in model_lib.names()
  configs.validate(configs.get_config("demo").replace(model="tiny", hidden_dims=()))
  with pytest.raises(ValueError, match="is a built-in model"):
    model_lib.unregister("multvae")


def _build_by_own_setting(n_items, hidden_dims, latent_dim, dropout_rate, dtype, *,
                          encoder_epochs=3):
  # A model whose width comes from its own setting (here a field RecVAE has too).
  del hidden_dims, latent_dim
  return TinyAE(n_items, 3 * encoder_epochs, dropout_rate, dtype)


# The module's longest test (a model of its own shape setting trained and rebuilt);
# test_the_registry_refuses_what_it_cannot_rebuild keeps the registry in the fast tier.
SLOW_TESTS = ["test_a_models_own_shape_setting_is_recorded_and_rebuilt"]


def test_a_models_own_shape_setting_is_recorded_and_rebuilt(tmp_path):
  model_lib.register("own", model_lib.ModelEntry(
      _build_by_own_setting, (), "own width", extra=("encoder_epochs",),
      shape=("encoder_epochs",)))
  try:
    x = sp.csr_matrix(_synthetic.low_rank_interactions(n_users=300, n_items=120, seed=3))
    workdir = str(tmp_path / "run")
    jax_vaecf.fit(x, "ml-latest-small", workdir=workdir, model="own", hidden_dims=(),
                  encoder_epochs=5, number_of_epochs=1, batch_size_train=64,
                  batch_size_validation=64, test=False, prefetch=1)
    ident = checkpoint_lib.read_best_meta(workdir)["identity"]
    assert ident["encoder_epochs"] == 5
    rec = recommend.Recommender.from_workdir(workdir)
    assert rec.params["decoder"]["kernel"].shape == (15, 120)
  finally:
    model_lib.unregister("own")
  assert model_lib.shape_settings("multvae", configs.Config()) == {}
  assert "encoder_epochs" not in model_lib.shape_settings("recvae", configs.Config())
