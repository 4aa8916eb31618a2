"""Test set-up: four virtual CPU devices for the data-parallel tests.

XLA reads the flag once, when jax is first imported, so it is set here, before any test
module imports jax. Single-device code paths use the first device as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
