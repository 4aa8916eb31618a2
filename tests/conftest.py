"""Test set-up: four virtual CPU devices for the data-parallel tests, and one compilation
cache for the whole session.

XLA reads the flag once, when jax is first imported, so it is set here, before any test
module imports jax. Single-device code paths use the first device as usual.

Many tests build the same small models and steps again (new closures, so jit's
in-memory cache misses); JAX's persistent compilation cache, in a temporary folder shared
by the tests and the subprocesses they start, compiles each program once. It changes
nothing but compile time: entries are keyed by the program and the compiler options.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jax_vaecf_test_jit_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
