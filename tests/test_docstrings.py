"""The API a user imports documents itself: ``help(jax_vaecf.fit)`` is enough to call it.

Every public function, class and method of the modules below has a docstring; one that
takes arguments has an ``Args:`` section naming each of them (a class: in its own
docstring or its ``__init__``'s; a dataclass: ``Attributes:``), and one that returns
something has ``Returns:`` (``Yields:`` for a generator). A module's public names are its
``__all__``, else the functions and classes it defines whose names do not start with
``_``. Add a module here when its API is documented.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap

import pytest

DOCUMENTED_MODULES = (
    "jax_vaecf.api",
    "jax_vaecf.serving.recommender",
    "jax_vaecf.serving.export",
    "jax_vaecf.serving.http",
    "jax_vaecf.data.load",
    "jax_vaecf.data.split",
    "jax_vaecf.evaluation.metrics",
    "jax_vaecf.evaluation.significance",
    "jax_vaecf.data.inputs",
)

_SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]*):\s*$", re.M)


def _public_names(module) -> list[str]:
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return sorted(name for name, value in vars(module).items()
                if not name.startswith("_")
                and (inspect.isfunction(value) or inspect.isclass(value))
                and value.__module__ == module.__name__)


def _sections(doc: str) -> dict[str, str]:
  """``{"Args": text, "Returns": text, ...}`` of a Google-style docstring."""
  doc = inspect.cleandoc(doc)
  found = list(_SECTION.finditer(doc))
  return {m.group(1): doc[m.end():found[i + 1].start() if i + 1 < len(found) else None]
          for i, m in enumerate(found)}


def _function_node(fn) -> ast.AST | None:
  try:
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
  except (OSError, TypeError):
    return None
  node = ast.parse(source).body[0]
  return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _own_statements(node):
  """The statements of a function's body, not of the functions defined inside it."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                          ast.ClassDef)):
      continue
    yield child
    yield from _own_statements(child)


def _gives(fn) -> str | None:
  """``"Returns"`` when ``fn`` returns a value, ``"Yields"`` when it yields one: by its
  return annotation when it has one, else by its source."""
  node = _function_node(fn)
  annotation = inspect.signature(fn).return_annotation
  if annotation is not inspect.Signature.empty and annotation not in (None, "None"):
    yields = node is not None and any(
        isinstance(n, ast.Yield) and n.value is not None for n in _own_statements(node))
    return "Yields" if yields and not isinstance(node, ast.AsyncFunctionDef) else "Returns"
  if node is None or annotation in (None, "None"):
    return None
  for n in _own_statements(node):
    if isinstance(n, ast.Yield) and n.value is not None:
      return "Yields"
    if isinstance(n, ast.Return) and n.value is not None:
      return "Returns"
  return None


def _arguments(fn, bound: bool) -> list[str]:
  names = list(inspect.signature(fn).parameters)
  return names[1:] if bound else names


def _problems(qualname: str, fn, doc: str | None, bound: bool) -> list[str]:
  if not doc or not doc.strip():
    return [f"{qualname}: no docstring"]
  sections = _sections(doc)
  out = []
  arguments = _arguments(fn, bound)
  if arguments:
    args = sections.get("Args") or sections.get("Attributes")
    if args is None:
      out.append(f"{qualname}: takes {arguments} but has no Args: section")
    else:
      missing = [a for a in arguments if not re.search(rf"\b{re.escape(a)}\b", args)]
      if missing:
        out.append(f"{qualname}: Args: does not name {missing}")
  gives = _gives(fn)
  if gives is not None and gives not in sections:
    out.append(f"{qualname}: returns a value but has no {gives}: section")
  return out


def _class_problems(module_name: str, cls) -> list[str]:
  name = f"{module_name}.{cls.__name__}"
  out = []
  if not cls.__doc__ or not cls.__doc__.strip():
    out.append(f"{name}: no docstring")
  own_init = "__init__" in vars(cls)
  if own_init or dataclasses.is_dataclass(cls):
    init = cls.__init__
    arguments = _arguments(init, bound=True)
    docs = [d for d in (cls.__doc__, init.__doc__ if own_init else None) if d]
    if arguments and not any(_sections(d).get("Args") or _sections(d).get("Attributes")
                             for d in docs):
      out.append(f"{name}: takes {arguments} but neither it nor __init__ has Args:")
    elif arguments:
      text = " ".join((_sections(d).get("Args") or "") + (_sections(d).get("Attributes")
                                                          or "") for d in docs)
      missing = [a for a in arguments if not re.search(rf"\b{re.escape(a)}\b", text)]
      if missing:
        out.append(f"{name}: Args: does not name {missing}")
  for attr, raw in vars(cls).items():
    if attr.startswith("_"):
      continue
    qualname = f"{name}.{attr}"
    if isinstance(raw, property):
      if not raw.__doc__ or not raw.__doc__.strip():
        out.append(f"{qualname}: no docstring")
    elif isinstance(raw, (classmethod, staticmethod)):
      fn = getattr(cls, attr)
      out += _problems(qualname, fn, fn.__doc__, bound=False)
    elif inspect.isfunction(raw):
      out += _problems(qualname, raw, raw.__doc__, bound=True)
  return out


def _module_problems(module_name: str) -> list[str]:
  module = importlib.import_module(module_name)
  out = []
  for name in _public_names(module):
    value = getattr(module, name)
    if inspect.isclass(value):
      out += _class_problems(module_name, value)
    elif callable(value):
      out += _problems(f"{module_name}.{name}", value, value.__doc__, bound=False)
  return out


@pytest.mark.parametrize("module_name", DOCUMENTED_MODULES)
def test_the_public_api_has_args_and_returns_sections(module_name):
  assert _module_problems(module_name) == []


def test_the_walk_finds_what_is_missing():
  """The checks above can fail: an undocumented function, an argument left out of Args,
  a value returned without Returns, a class whose arguments are not described."""

  def bare(x):
    return x

  def args_only(x, y) -> int:
    """Adds.

    Args:
      x: a number.
    """
    return x + y

  def complete(x) -> None:
    """Prints.

    Args:
      x: what to print.
    """
    print(x)

  class Holder:
    """Holds."""

    def __init__(self, value):
      self.value = value

    def get(self):
      """The value."""
      return self.value

  assert _problems("bare", bare, bare.__doc__, bound=False) == ["bare: no docstring"]
  assert _problems("args_only", args_only, args_only.__doc__, bound=False) == [
      "args_only: Args: does not name ['y']",
      "args_only: returns a value but has no Returns: section"]
  assert _problems("complete", complete, complete.__doc__, bound=False) == []
  assert _class_problems("m", Holder) == [
      "m.Holder: takes ['value'] but neither it nor __init__ has Args:",
      "m.Holder.get: returns a value but has no Returns: section"]
