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


# Two tiers. Plain ``pytest`` runs the fast tier (setup.cfg: -m "not slow"); ``pytest -m
# slow`` runs the rest, and .ci/run runs both. A test is slow when it, a fixture it uses,
# or a helper of its own module that either calls (followed through the module's own
# functions) does one of _SLOW_WORK's things; a module may also name tests in
# ``SLOW_TESTS`` (function names, or one case of one: ``name[params]``) with a comment
# saying why.
import inspect  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import types  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """The workdir of one 2-epoch run of ``_runs.small_config`` (not tested), trained once
  per session (per xdist worker) for every test that only reads a run folder. A test
  that writes into a run folder trains its own (``_runs.trained_workdir``)."""
  import _runs  # pylint: disable=g-import-not-at-top
  return _runs.trained_workdir(tmp_path_factory, "shared_run")


_SLOW_WORK = {
    # A new interpreter re-imports jax and compiles again; the multi-device workers
    # (_distributed_worker, _mesh8_worker, _partition_worker) run this way too.
    "starts a process": re.compile(r"\bsubprocess\.|\bPopen\(|\brun_processes\("),
    "trains a run folder": re.compile(r"\btrained_workdir\(|\bdef trained_run\("),
    "serves over HTTP": re.compile(r"\buvicorn\."),
    "runs the tuner": re.compile(r"\btune_lib\.search\(|\b_search\("),
}


# A test that compares runs (a resumed run with an uninterrupted one, four devices with
# one) trains at least twice; a test that trains once, in-process, stays fast.
_TRAINS = re.compile(r"\bloop\.run\(|\bfit\(|\btrain_and_validate\(")


def _called_functions(func, module, seen):
  """``func`` and the functions of ``module`` it names, followed transitively."""
  if not isinstance(func, types.FunctionType) or func in seen:
    return
  seen.add(func)
  for name in func.__code__.co_names:
    value = getattr(module, name, None)
    if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
      _called_functions(value, module, seen)


def _source(func) -> str:
  try:
    return inspect.getsource(func)
  except (OSError, TypeError):
    return ""


def _why_slow(item) -> str | None:
  module = item.module
  listed = getattr(module, "SLOW_TESTS", ())
  if item.originalname in listed or item.name in listed:
    return f"listed in {module.__name__}.SLOW_TESTS"
  funcs = set()
  _called_functions(item.function, module, funcs)
  trainings = sum(len(_TRAINS.findall(_source(func))) for func in funcs)
  if trainings >= 2:
    return f"trains {trainings} times"
  for defs in item._fixtureinfo.name2fixturedefs.values():  # pylint: disable=protected-access
    for fixturedef in defs:
      fixture_module = inspect.getmodule(fixturedef.func)
      if fixture_module is not None and fixture_module.__name__.startswith(
          ("test_", "conftest")):
        _called_functions(fixturedef.func, fixture_module, funcs)
  for func in funcs:
    text = _source(func)
    for why, pattern in _SLOW_WORK.items():
      if pattern.search(text):
        return f"{why} ({func.__name__})"
  return None


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  for item in items:
    why = _why_slow(item) if isinstance(item, pytest.Function) else None
    if why:
      item.add_marker(pytest.mark.slow(reason=why))
