"""Adding a model is one class, one settings type and one registry entry: a model
registered at run time, with a setting of its own, trains, saves, reloads (its shape
rebuilt from the run folder's identity), resumes, recommends, exports and is tuned with
no other file touched; its setting is a flag, a settings-file field and a tuned
parameter. And the settings users type today keep their meaning."""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

import jax_vaecf
from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import configs
from jax_vaecf import model as model_lib
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.models import recvae as recvae_lib
from jax_vaecf.models import space
from jax_vaecf.tuning import search as tune

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


@dataclasses.dataclass(frozen=True)
class TinySettings:
  """A model's settings type: one setting that shapes the parameters, one that does not."""

  width: int = model_lib.model_setting(8, "The code's width.", shapes=True)
  squash: str = model_lib.model_setting("tanh", "Unused here: a setting with choices.",
                                        choices=("tanh", "none"))

  def __post_init__(self):
    if self.width < 1:
      raise ValueError(f"width must be >= 1, got {self.width}")


def _build(n_items, settings, dropout_rate, dtype):
  return TinyAE(n_items, settings.width, dropout_rate, dtype)


TINY = model_lib.ModelEntry(
    _build, "Tiny AE", TinySettings,
    space=(space.Param("width", "categorical", "The code's width.", choices=(4, 6),
                       applies="model"),))


@pytest.fixture
def tiny():
  entry = model_lib.register("tiny", TINY)
  yield entry
  model_lib.unregister("tiny")


def test_a_model_registered_at_run_time_trains_saves_reloads_and_serves(tiny, tmp_path):
  x = sp.csr_matrix(_synthetic.low_rank_interactions(n_users=300, n_items=120, seed=2))
  settings = dict(model="tiny", width=7, dropout_rate=0.2,
                  number_of_epochs=2, batch_size_train=64, batch_size_validation=64,
                  test_ks=(5, 10), prefetch=1)
  workdir = str(tmp_path / "run")
  model = jax_vaecf.fit(x, "ml-latest-small", workdir=workdir, **settings)
  assert 0.0 < model.results["test"]["ndcg@10"] <= 1.0
  # The folder alone rebuilds it: width 7 (not the default 8) from the identity.
  ident = checkpoint_lib.read_best_meta(workdir)["identity"]
  assert ident["model"] == "tiny" and ident["width"] == 7 and "squash" not in ident
  rec = recommend.Recommender.from_workdir(workdir)
  assert isinstance(rec.model, TinyAE) and rec.model.latent_dim == 7
  assert rec.params["decoder"]["kernel"].shape == (7, 120)
  loaded = jax_vaecf.load(model.save(str(tmp_path / "saved")))
  histories = [[3, 4, 5], [10]]
  got = loaded.recommend(items=histories, k=5)
  assert [list(a) for a in got.items] == [
      list(b) for b in model.recommend(items=histories, k=5).items]
  assert not {3, 4, 5} & set(np.asarray(got.items[0]).tolist())
  # Resume: two more epochs from the saved folder; another width is refused.
  more = jax_vaecf.fit(x, "ml-latest-small", workdir=str(tmp_path / "saved"),
                       **{**settings, "number_of_epochs": 4})
  assert [r["epoch"] for r in more.history] == [1, 2, 3, 4]
  with pytest.raises(ValueError, match="width"):
    jax_vaecf.fit(x, "ml-latest-small", workdir=str(tmp_path / "saved"),
                  **{**settings, "number_of_epochs": 5, "width": 5})
  manifest = more.export(str(tmp_path / "artefact"), k=5)
  assert manifest["model"]["model"] == "tiny" and manifest["model"]["width"] == 7
  assert manifest["param_shapes"]["decoder/kernel"][0] == [7, 120]


def test_its_setting_is_a_flag_a_json_field_and_a_tuned_parameter(tiny):
  from absl import flags
  from experiments import cli
  fv = flags.FlagValues()
  cli.define_config_flags(fv)
  fv(["prog", "--config=demo", "--model=tiny", "--width=5"])
  cfg = cli.config_from_flags(fv)
  assert cfg.model_settings == TinySettings(width=5) and cfg.width == 5
  assert "The code's width." in fv["width"].help
  saved = configs.to_json(cfg)
  assert saved["model_settings"] == {"width": 5, "squash": "tanh"}
  assert configs.from_json(saved, "config.json") == cfg
  with pytest.raises(ValueError, match="width must be >= 1"):
    cfg.replace(width=0)
  with pytest.raises(ValueError, match="squash must be one of"):
    cfg.replace(squash="relu")
  with pytest.raises(ValueError, match="width is a setting of --model=tiny, not of "
                                       "multvae"):
    configs.get_config("demo").replace(width=5)
  space = tune.make_space(cfg, ("lr", "width"), n_train_users=lambda: 100)
  assert space.distributions["width"].choices == (4, 5, 6)
  assert space.trial_config(cfg, {"lr": cfg.lr, "width": 4}).model_settings.width == 4


def test_the_registry_refuses_what_it_cannot_rebuild(tiny):
  with pytest.raises(ValueError, match="registered already"):
    model_lib.register("tiny", tiny)
  with pytest.raises(ValueError, match="space names \\['rank'\\], which are not"):
    model_lib.ModelEntry(_build, "bad", TinySettings,
                         space=(space.Param("rank", "int", "", 1, 4, applies="model"),))
  assert "tiny" in model_lib.names()
  configs.validate(configs.get_config("demo").replace(model="tiny"))
  with pytest.raises(ValueError, match="is a built-in model"):
    model_lib.unregister("multvae")
  with pytest.raises(ValueError, match="does not give the model's name, n_items and "
                                       "shape settings"):
    model_lib.model_from_identity({"model": "tiny", "n_items": 5})


def test_shape_settings_are_the_ones_each_entry_declares():
  assert model_lib.shape_settings("multvae", configs.Config().model_settings) == {
      "hidden_dims": [600], "latent_dim": 200}
  recvae = configs.get_config("ml1m_recvae")
  assert model_lib.shape_settings("recvae", recvae.model_settings) == {
      "hidden_dims": [600] * 5, "latent_dim": 200}
  assert model_lib.shape_settings("ease", configs.get_config("ml1m_ease").model_settings
                                  ) == {}


def test_flags_and_presets_users_type_today_keep_their_meaning():
  from absl import flags
  from experiments import cli
  fv = flags.FlagValues()
  cli.define_config_flags(fv)
  fv(["prog", "--config=ml20m", "--model=recvae", "--hidden_dims=300,300",
      "--encoder_epochs=2"])
  cfg = cli.config_from_flags(fv)
  assert cfg.model_settings == recvae_lib.RecVAESettings(hidden_dims=(300, 300),
                                                         encoder_epochs=2)
  fv2 = flags.FlagValues()
  cli.define_config_flags(fv2)
  fv2(["prog", "--config=ml1m_dae", "--hidden_dims="])
  assert cli.config_from_flags(fv2).hidden_dims == (200,)  # '' = the paper's
  assert configs.get_config("ml20m").model_settings == model_lib.MultVAESettings()
  assert configs.get_config("ml20m_ease").l2 == (500.0,)
  # RecVAE's check is its settings type's: the same line from a flag, a preset's
  # replace and build_model.
  for make in (lambda: configs.get_config("ml1m_recvae").replace(hidden_dims=(600, 300)),
               lambda: model_lib.build_model("recvae", 5, hidden_dims=(600, 300))):
    with pytest.raises(ValueError, match="need one width, got hidden_dims=\\(600, 300\\)"):
      make()
  # A settings file of the flat layout (every model's settings by name) still reads.
  flat = {"model": "ease", "hidden_dims": [], "latent_dim": 200, "encoder_epochs": 3,
          "decoder_epochs": 1, "l2": [300]}
  assert configs.from_json(flat, "best.json").model_settings.l2 == (300.0,)
  with pytest.raises(ValueError, match="unknown settings \\['latent_dim'\\] \\(latent_dim "
                                       "is a setting of --model=multvae or recvae"):
    configs.from_json({**flat, "latent_dim": 64}, "best.json")


def test_a_config_with_model_settings_copies_pickles_and_hashes_whole():
  import copy
  import pickle
  cfg = configs.get_config("ml1m_recvae").replace(encoder_epochs=2)
  for twin in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
    assert twin == cfg and hash(twin) == hash(cfg) and twin.encoder_epochs == 2
  assert cfg != cfg.replace(encoder_epochs=3)
  with pytest.raises(AttributeError, match="no setting 'nonsense'"):
    getattr(cfg, "nonsense")
