"""jax_vaecf: Mult-VAE and Mult-DAE for collaborative filtering in JAX/Flax."""

__version__ = "0.1.0"
