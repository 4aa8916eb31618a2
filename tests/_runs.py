"""Small end-to-end runs shared by the experiment tests: one config, one trained
workdir, one log reader."""

import json
import os

from jax_vaecf.training import configs

import _synthetic


def movielens_dir(tmp_path_factory, name: str, titles: bool = False) -> str:
  """A folder with a low-rank MovieLens-format ratings.csv (300 users, 150 items)."""
  d = tmp_path_factory.mktemp(name)
  _synthetic.write_movielens_csv(str(d), titles=titles)
  return str(d)


def movielens_dir_plain(tmp_path, name: str = "data") -> str:
  """:func:`movielens_dir` in a test's own ``tmp_path``."""
  d = tmp_path / name
  d.mkdir()
  _synthetic.write_movielens_csv(str(d))
  return str(d)


def trained_workdir(tmp_path_factory, name: str, titles: bool = False, **changes) -> str:
  """The workdir of a 2-epoch run of :func:`small_config` (not tested) on fresh data."""
  from jax_vaecf.training import engine as loop
  d = movielens_dir(tmp_path_factory, name, titles=titles)
  cfg = small_config(d, **{"cache_dir": os.path.join(d, "cache"), "number_of_epochs": 2,
                           "test": False, **changes})
  workdir = os.path.join(d, "run")
  loop.run(cfg, workdir)
  return workdir


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
