"""jax_vaecf: Mult-VAE, Mult-DAE and RecVAE for collaborative filtering in JAX/Flax."""

__version__ = "0.1.0"
