"""The package's rooms import downwards only.

The floor (`core`) imports nothing of the project; data, models and evaluation stand on
it and not on each other; training on those; serving on training; tuning on all of them;
the public modules at the top (`api`, `model`) on anything. A module imported from a
room above its own would tie the floor to what stands on it.
"""

import ast
import pathlib

import jax_vaecf

LAYERS = {
    "core": 0,
    "data": 1, "models": 1, "evaluation": 1,
    "training": 2,
    "serving": 3,
    "tuning": 4,
    "": 5,  # jax_vaecf/__init__.py and api.py: fit and load
}
ROOT = pathlib.Path(jax_vaecf.__file__).parent


def _room(module: str) -> str:
  """The room of a dotted module name: `jax_vaecf.core.files` -> `core`; '' for the top.
  `jax_vaecf.model`, the models' public face (the registry, Mult-VAE and Mult-DAE, the
  layers every model builds on), belongs to the models' room."""
  if module == "jax_vaecf.model":
    return "models"
  parts = module.split(".")
  return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else ""


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "jax_vaecf":
        for alias in node.names:
          yield f"jax_vaecf.{alias.name}", node.lineno
      elif node.module.startswith("jax_vaecf."):
        yield node.module, node.lineno
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("jax_vaecf."):
          yield alias.name, node.lineno


def _module_of(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  return ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" \
      else ".".join(rel.parts)


def test_every_module_lives_in_a_room():
  loose = [p.name for p in ROOT.glob("*.py")
           if p.stem not in ("__init__", "api", "model")]
  assert not loose, f"modules outside the rooms {sorted(LAYERS)}: {loose}"


def test_no_import_runs_upward_or_sideways():
  upward = []
  for path in sorted(ROOT.rglob("*.py")):
    if "demo_data" in path.parts:
      continue
    here = _room(_module_of(path))
    for target, line in _imports(path):
      there = _room(target)
      if there == here:
        continue
      if LAYERS[there] >= LAYERS[here]:
        upward.append(f"{path.relative_to(ROOT.parent)}:{line} ({here or 'top'}) imports "
                      f"{target} ({there or 'top'})")
  assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
  # The rule itself: a core module naming a training module is reported.
  fake = tmp_path / "jax_vaecf" / "core" / "x.py"
  fake.parent.mkdir(parents=True)
  fake.write_text("from jax_vaecf.training import engine\n")
  (target, _), = list(_imports(fake))
  assert _room(target) == "training" and LAYERS["training"] > LAYERS["core"]
