"""The conftest hook that puts a test in the slow tier (setup.cfg runs "not slow")."""

import importlib.util
import sys
import types

import conftest

_MODULE = '''
import subprocess

SLOW_TESTS = ["test_listed", "test_cased[2]"]

def _launch():
  return subprocess.run(["true"])

def _helper():
  return _launch()

def _fit_twice(loop):
  loop.run(1)
  loop.run(2)

def test_through_a_helper():
  _helper()

def test_trains_twice(loop):
  _fit_twice(loop)

def test_pure():
  return sum(range(3))

def test_listed():
  pass

def test_cased(n):
  pass

def fixture_that_trains(tmp_path_factory):
  return trained_workdir(tmp_path_factory, "x")
'''


def _item(module, name, case=None, fixtures=()):
  defs = {f.__name__: [types.SimpleNamespace(func=f)] for f in fixtures}
  return types.SimpleNamespace(
      module=module, originalname=name, name=name + (f"[{case}]" if case else ""),
      function=getattr(module, name),
      _fixtureinfo=types.SimpleNamespace(name2fixturedefs=defs))


def test_slow_is_found_through_helpers_fixtures_and_the_modules_list(tmp_path,
                                                                      monkeypatch):
  path = tmp_path / "test_fake_tier.py"
  path.write_text(_MODULE)
  spec = importlib.util.spec_from_file_location("test_fake_tier", path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, "test_fake_tier", module)
  spec.loader.exec_module(module)
  why = lambda *a, **k: conftest._why_slow(_item(module, *a, **k))  # pylint: disable=protected-access
  assert why("test_through_a_helper") == "starts a process (_launch)"
  assert why("test_trains_twice") == "trains 2 times"
  assert why("test_pure") is None
  assert why("test_listed") == "listed in test_fake_tier.SLOW_TESTS"
  assert why("test_cased", case="2") == "listed in test_fake_tier.SLOW_TESTS"
  assert why("test_cased", case="1") is None
  assert why("test_pure", fixtures=[module.fixture_that_trains]) == (
      "trains a run folder (fixture_that_trains)")
