"""Small end-to-end runs shared by the experiment tests: one config, one log reader."""

import json
import os

from experiments import configs


def small_config(data_dir, **changes):
  """The ml-latest-small preset shrunk to seconds: a 16-wide model, batches of 64;
  ``changes`` (``cache_dir`` among them) override any field."""
  base = configs.get_config("ml-latest-small").replace(
      data_dir=data_dir, number_of_epochs=4,
      batch_size_train=64, batch_size_validation=64, hidden_dims=(16,), latent_dim=4,
      total_anneal_steps=50, validation_step=1, test_ks=(5, 10), prefetch=1)
  return base.replace(**changes)


def records(workdir):
  """The JSON lines of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
