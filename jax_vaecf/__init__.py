"""jax_vaecf: Mult-VAE, Mult-DAE, RecVAE and EASE for collaborative filtering in JAX/Flax.

``jax_vaecf.fit(data, "ml1m")`` trains from Python and ``jax_vaecf.load(DIR)`` opens a
run folder (:mod:`jax_vaecf.api`); both are imported on first use, so ``import
jax_vaecf.data`` stays light.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
  if name in ("api", "fit", "load", "FittedModel"):
    api = importlib.import_module("jax_vaecf.api")
    return api if name == "api" else getattr(api, name)
  raise AttributeError(f"module 'jax_vaecf' has no attribute {name!r}")
