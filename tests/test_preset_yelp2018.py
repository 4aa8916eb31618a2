"""The yelp2018 preset does what its docstring says at Yelp2018's size."""

import numpy as np

from jax_vaecf.core import schedules
from jax_vaecf.training import configs
from jax_vaecf.training import engine


def test_the_kl_cap_is_reached_at_epoch_20_of_yelp2018s_batches_and_never_under_ml20m():
  n_train_users = 31_668  # Yelp2018 as NGCF / LightGCN split it
  preset, paper = configs.get_config("yelp2018"), configs.get_config("ml20m")
  per_epoch = engine.steps_per_epoch(preset, n_train_users)
  assert per_epoch == 64
  total, _ = engine.anneal_steps(preset, per_epoch)
  beta = schedules.linear_schedule(preset.anneal_cap, total)
  assert float(beta(np.int32(20 * per_epoch - 1))) < preset.anneal_cap
  assert float(beta(np.int32(20 * per_epoch))) == np.float32(preset.anneal_cap)
  # The paper's 200,000 steps: the weight is still below 0.01 at the preset's epoch 20.
  paper_total, _ = engine.anneal_steps(paper, per_epoch)
  assert float(schedules.linear_schedule(paper.anneal_cap, paper_total)(
      np.int32(24 * per_epoch))) < 0.01


def test_the_preset_reads_an_ngcf_pair_per_user_chooses_on_validation_and_refits():
  cfg = configs.get_config("yelp2018")
  assert (cfg.dataset, cfg.protocol, cfg.refit) == ("ngcf", "per_user", True)
  assert cfg.validation_fraction > 0 and cfg.early_stopping > 0
  assert 20 in cfg.test_ks
  configs.validate(cfg)
