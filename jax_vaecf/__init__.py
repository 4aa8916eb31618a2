"""jax_vaecf: Mult-VAE, Mult-DAE, RecVAE and EASE for collaborative filtering in JAX/Flax.

``jax_vaecf.fit(data, "ml1m")`` trains from Python and ``jax_vaecf.load(DIR)`` opens a
run folder (:mod:`jax_vaecf.api`); both are imported on first use, so ``import
jax_vaecf.data`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  if name in ("fit", "load", "FittedModel"):
    from jax_vaecf import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'jax_vaecf' has no attribute {name!r}")
