"""The library stands alone: no module of ``jax_vaecf`` imports the command-line layer."""

import ast
import os
import pkgutil
import subprocess
import sys

import jax_vaecf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(jax_vaecf.__file__))


def _modules():
  return ["jax_vaecf"] + [m.name for m in pkgutil.walk_packages([PACKAGE], "jax_vaecf.")]


def test_no_module_of_the_library_names_experiments():
  offenders = []
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      tree = ast.parse(open(path, encoding="utf-8").read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          targets = [node.module or ""]
        else:
          continue
        offenders += [f"{os.path.relpath(path, REPO)}:{node.lineno} imports {t}"
                      for t in targets if t == "experiments" or t.startswith("experiments.")]
  assert not offenders, offenders


def test_importing_every_module_of_the_library_loads_no_tool():
  code = ("import importlib, sys\n"
          f"for name in {_modules()!r}:\n"
          "  importlib.import_module(name)\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'experiments'))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                     text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]"
