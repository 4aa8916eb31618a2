"""The documentation holds: every relative link resolves (file and #anchor), every
``python -m experiments.X --flag`` command of the README names a tool and flags that tool
defines, and every ```python block of README.md, ARCHITECTURE.md and docs/*.md runs in a
test as written or says, in an HTML comment just above it, why it is a fragment."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import glob
import inspect
import io
import os
import re
import sys

from absl import flags
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "ARCHITECTURE.md"]
               + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))])

FRAGMENT = re.compile(r"^<!--\s*fragment:\s*(.*?)\s*-->$")

# Pages whose python blocks run top to bottom as one program in another test.
RUN_AS_ONE_PROGRAM = {
    "docs/python.md": ("tests/test_api.py",
                       "test_the_python_page_runs_as_written_and_its_folder_serves_the_cli"),
}


@dataclasses.dataclass
class Block:
  page: str
  line: int          # 1-based line of the opening fence
  lang: str
  code: str
  note: str          # the HTML comment on the line above the fence ('' if none)


def _read(page: str) -> str:
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    return f.read()


def blocks(page: str) -> list[Block]:
  """The fenced code blocks of a markdown page, in order."""
  out, lines, i = [], _read(page).splitlines(), 0
  while i < len(lines):
    m = re.match(r"^(`{3,})(\S*)\s*$", lines[i])
    if not m:
      i += 1
      continue
    fence, start = m.group(1), i
    i += 1
    while i < len(lines) and not lines[i].startswith(fence):
      i += 1
    assert i < len(lines), f"{page}:{start + 1}: a code block that is never closed"
    above = next((l.strip() for l in reversed(lines[:start]) if l.strip()), "")
    out.append(Block(page, start + 1, m.group(2), "\n".join(lines[start + 1:i]) + "\n",
                     above if above.startswith("<!--") else ""))
    i += 1
  return out


def prose(page: str) -> str:
  """The page with its fenced code blocks blanked out (line numbers kept)."""
  lines = _read(page).splitlines()
  for b in blocks(page):
    for j in range(b.line - 1, b.line + b.code.count("\n") + 1):
      lines[j] = ""
  return "\n".join(lines)


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to
  hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
  return text.replace(" ", "-")


def anchors(page: str) -> set[str]:
  seen: dict[str, int] = {}
  out = set()
  for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose(page), re.M):
    base = slug(m.group(1))
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f"{base}-{n}")
  return out


def test_slug_follows_githubs_rule():
  assert slug("EASE, the baseline, on the same split") == "ease-the-baseline-on-the-same-split"
  assert slug("The paper's protocol (held-out users)") == "the-papers-protocol-held-out-users"
  assert slug("Over HTTP: `python -m experiments.serve`") == "over-http-python--m-experimentsserve"
  assert slug("ML-20M shape") == "ml-20m-shape"


def _links(page: str):
  text = prose(page)
  text = re.sub(r"`[^`\n]*`", "", text)   # inline code is not a link
  for m in re.finditer(r"\]\(([^)\s]+)\)", text):
    yield text.count("\n", 0, m.start()) + 1, m.group(1)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves_to_a_file_and_anchor(page):
  broken = []
  for line, target in _links(page):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else \
        os.path.join(REPO, page)
    if not os.path.exists(full):
      broken.append(f"{page}:{line}: {target}: no such file")
    elif anchor and full.endswith(".md") and anchor not in anchors(os.path.relpath(full, REPO)):
      broken.append(f"{page}:{line}: {target}: no heading has the anchor #{anchor}")
  assert not broken, "\n".join(broken)


# --- the README's commands ----------------------------------------------------------

_ABSL_HELP = {"help", "helpfull", "helpshort", "helpxml", "only_check_args"}


class _OntoFreshFlags(ast.NodeTransformer):
  """Rewrites a tool's source so that it defines its flags on ``__fv__``, a fresh
  ``FlagValues``, instead of absl's global set: every ``flags.DEFINE_*`` call without a
  ``flag_values`` gets one, each call of the ``__main__`` block goes through
  ``__call__`` (which hands ``__fv__`` to a function that takes ``flag_values``), and
  ``cli.run(main)`` is never reached."""

  def visit_Call(self, node):  # pylint: disable=invalid-name
    self.generic_visit(node)
    if (isinstance(node.func, ast.Attribute) and node.func.attr.startswith("DEFINE")
        and not any(k.arg == "flag_values" for k in node.keywords)):
      node.keywords.append(ast.keyword("flag_values", ast.Name("__fv__", ast.Load())))
    return node

  def visit_If(self, node):  # pylint: disable=invalid-name
    if not (isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"):
      return self.generic_visit(node)
    body = []
    for stmt in node.body:
      if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        call = stmt.value
        stmt = ast.Expr(ast.Call(ast.Name("__call__", ast.Load()),
                                 [call.func] + call.args, call.keywords))
      body.append(stmt)
    node.body = body
    return node


def tool_flags(tool: str) -> set[str]:
  """The flags ``python -m experiments.<tool>`` accepts, read in this process: the tool's
  source runs as ``__main__`` (as ``python -m`` runs it) with its flags defined on a fresh
  set and its ``cli.run`` left out; then the flags every absl program has and those of
  the modules it imports (absl's, ``experiments.cli``'s)."""
  from experiments import cli  # pylint: disable=import-outside-toplevel
  path = os.path.join(REPO, "experiments", f"{tool}.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.fix_missing_locations(_OntoFreshFlags().visit(ast.parse(f.read())))
  fresh = flags.FlagValues()

  def call(fn, *args, **kwargs):
    if fn is cli.run:
      return None
    if "flag_values" in inspect.signature(fn).parameters and "flag_values" not in kwargs:
      kwargs["flag_values"] = fresh
    return fn(*args, **kwargs)

  namespace = {"__name__": "__main__", "__file__": path, "__fv__": fresh, "__call__": call}
  exec(compile(tree, path, "exec"), namespace)  # pylint: disable=exec-used
  names = set(fresh) | _ABSL_HELP
  for module_name, defined in flags.FLAGS.flags_by_module_dict().items():
    if not module_name.startswith("experiments.") or module_name == cli.__name__:
      names |= {fl.name for fl in defined}
  return names


def readme_commands() -> list[tuple[int, str, list[str]]]:
  """(line, tool, flags) of each ``python -m experiments.X ...`` command of README.md,
  in code blocks and in inline code; a ``\\`` continues a command on the next line."""
  text = _read("README.md").replace("\\\n", " ")
  out = []
  for m in re.finditer(r"python -m experiments\.(\w+)([^`\n]*)", text):
    args = re.split(r"\s(?:#|&&|\||&|;)", m.group(2))[0]
    out.append((text.count("\n", 0, m.start()) + 1, m.group(1),
                re.findall(r"(?:^|\s)--([A-Za-z_]\w*)", args)))
  return out


def test_the_readme_names_commands_with_flags():
  tools = {t for _, t, _ in readme_commands()}
  assert {"train", "recommend", "export", "serve", "compare", "plot", "tune"} <= tools


@pytest.mark.parametrize("tool", sorted({t for _, t, _ in readme_commands()}))
def test_every_readme_command_names_a_tool_and_flags_it_defines(tool):
  assert os.path.exists(os.path.join(REPO, "experiments", f"{tool}.py")), \
      f"README.md: python -m experiments.{tool}: no such tool"
  known = tool_flags(tool)
  wrong = []
  for line, t, used in readme_commands():
    for name in used if t == tool else ():
      if name not in known and not (name.startswith("no") and name[2:] in known):
        wrong.append(f"README.md:{line}: python -m experiments.{tool} has no flag --{name}")
  assert not wrong, "\n".join(wrong)


def test_the_flag_reader_finds_flags_defined_each_way():
  assert {"config", "workdir", "lr", "model"} <= tool_flags("train")      # config flags
  assert {"artifact", "port", "max_batch_users"} <= tool_flags("serve")   # define_flags(fv)
  assert {"metrics", "bootstrap"} <= tool_flags("compare")                # global define
  assert {"items", "users_file"} <= tool_flags("recommend")               # on import
  assert "bogus_flag" not in tool_flags("train")


# --- python blocks ------------------------------------------------------------------

# The blocks run here, by page and their place among the page's python blocks.
RUN_HERE = {
    ("README.md", 0): "test_the_readme_python_block_runs_as_written",
    ("ARCHITECTURE.md", 0): "test_the_architecture_train_step_block_runs_as_written",
    ("docs/recommendations.md", 0): "test_the_recommender_and_artefact_blocks_run_as_written",
    ("docs/serving.md", 0): "test_the_recommender_and_artefact_blocks_run_as_written",
}


def python_blocks(page: str) -> list[Block]:
  return [b for b in blocks(page) if b.lang == "python"]


def test_every_python_block_runs_in_a_test_or_says_why_it_is_a_fragment():
  loose = []
  for page in PAGES:
    for i, b in enumerate(python_blocks(page)):
      fragment = FRAGMENT.match(b.note)
      if fragment:
        if not fragment.group(1):
          loose.append(f"{page}:{b.line}: a fragment needs a reason")
        elif (page, i) in RUN_HERE:
          loose.append(f"{page}:{b.line}: marked a fragment but run by {RUN_HERE[page, i]}")
      elif page not in RUN_AS_ONE_PROGRAM and (page, i) not in RUN_HERE:
        loose.append(f"{page}:{b.line}: a python block that no test runs; run it in "
                     "tests/test_docs.py or mark it <!-- fragment: reason -->")
  for (page, i), name in RUN_HERE.items():
    if i >= len(python_blocks(page)):
      loose.append(f"{page}: has no python block {i} for {name}")
    assert name in globals(), name
  for page, (test_file, name) in RUN_AS_ONE_PROGRAM.items():
    source = _read(test_file)
    if f"def {name}(" not in source or os.path.basename(page) not in source:
      loose.append(f"{page}: {test_file}::{name} no longer runs this page")
  assert not loose, "\n".join(loose)


def _run_block(page: str, index: int, cwd, monkeypatch) -> str:
  """Runs one python block as written, in ``cwd``, in this process; returns what it
  printed."""
  b = python_blocks(page)[index]
  monkeypatch.chdir(cwd)
  out = io.StringIO()
  code = compile(b.code, f"{page}:{b.line}", "exec")
  with contextlib.redirect_stdout(out):
    exec(code, {"__name__": "__docs__"})  # pylint: disable=exec-used
  return out.getvalue()


def _listed(printed: str, label: str) -> list[str]:
  """The entries of the line ``label: [a, b, ...]`` that a block printed, as text."""
  m = re.search(rf"^{re.escape(label)}:? \[(.*)\]$", printed, re.M)
  assert m, f"no line '{label} [...]' in:\n{printed}"
  return [v.strip().strip("'\"") for v in m.group(1).split(",")]


@pytest.mark.slow
def test_the_architecture_train_step_block_runs_as_written(tmp_path, monkeypatch):
  printed = _run_block("ARCHITECTURE.md", 0, tmp_path, monkeypatch)
  assert re.match(r"^\(500, 1000\) float32 \[.*'loss'.*\]$", printed), printed


@pytest.mark.slow
def test_the_readme_python_block_runs_as_written(tmp_path, monkeypatch):
  printed = _run_block("README.md", 0, tmp_path, monkeypatch)
  ndcg = re.search(r"^test ndcg@100: (0\.\d+)$", printed, re.M)
  assert ndcg and 0.0 < float(ndcg.group(1)) <= 1.0, printed
  assert re.search(r"^user \d+ -> \[(\d+, ){4}\d+\]$", printed, re.M), printed
  new = _listed(printed, "new user ->")
  assert len(new) == 5 and not {"1", "50", "260"} & set(new), printed
  assert os.path.exists(tmp_path / "runs" / "mine" / "config.json")


@pytest.mark.slow
def test_the_recommender_and_artefact_blocks_run_as_written(tmp_path, monkeypatch):
  import jax_vaecf  # pylint: disable=import-outside-toplevel
  model = jax_vaecf.fit(None, "demo", number_of_epochs=1,
                        workdir=str(tmp_path / "runs" / "demo"))
  model.export(str(tmp_path / "exported" / "demo"), k=10)
  printed = _run_block("docs/recommendations.md", 0, tmp_path, monkeypatch)
  items = _listed(printed, "items")
  assert len(items) == 10 and not {"1", "50", "260"} & set(items), printed
  monkeypatch.setattr(sys, "path", sys.path[:])   # the block puts the artefact first
  monkeypatch.delitem(sys.modules, "serve", raising=False)
  printed = _run_block("docs/serving.md", 0, tmp_path, monkeypatch)
  sys.modules.pop("serve", None)
  assert _listed(printed, "items") == items, printed


# --- the demo's output --------------------------------------------------------------

def readme_demo_lines() -> list[str]:
  """The lines the README says the demo ends with (the block after ``<!-- demo-output
  -->``)."""
  (b,) = [b for b in blocks("README.md") if b.note == "<!-- demo-output -->"]
  return b.code.splitlines()


def masked(line: str) -> str:
  return re.sub(r"\d+(?:\.\d+)?", "N", line)


def check_demo_output(stdout: str) -> None:
  """Asserts that the demo's output ends with the README's lines: their form always, and
  every digit on the CPU class the README names (other classes round differently)."""
  want, got = readme_demo_lines(), stdout.rstrip("\n").splitlines()[-2:]
  assert [masked(l) for l in got] == [masked(l) for l in want], (got, want)
  if _is_the_readmes_cpu_class():
    assert got == want


def _is_the_readmes_cpu_class() -> bool:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
  except OSError:
    return False
  return "AMD EPYC" in info and " avx512f" in info   # the README's "Zen 4, AVX-512"


def test_the_demo_check_refuses_other_last_lines(monkeypatch):
  want = readme_demo_lines()
  assert len(want) == 2 and want[0].startswith("test (") and want[1].startswith("catalogue:")
  check_demo_output("epoch 30 ...\n" + "\n".join(want) + "\n")
  with pytest.raises(AssertionError):
    check_demo_output("\n".join(want) + "\nanother line\n")
  with pytest.raises(AssertionError):
    check_demo_output("\n".join(reversed(want)) + "\n")
  other_digits = want[0].replace("ndcg@20 0.", "ndcg@20 1.", 1)   # same form, one digit off
  assert other_digits != want[0]
  monkeypatch.setattr(sys.modules[__name__], "_is_the_readmes_cpu_class", lambda: False)
  check_demo_output(other_digits + "\n" + want[1] + "\n")   # another CPU class: form only
  monkeypatch.setattr(sys.modules[__name__], "_is_the_readmes_cpu_class", lambda: True)
  with pytest.raises(AssertionError):
    check_demo_output(other_digits + "\n" + want[1] + "\n")


def test_the_readme_is_read_in_five_minutes():
  lines = _read("README.md").splitlines()
  assert len(lines) <= 150, f"README.md has {len(lines)} lines; reference material goes to docs/"
  first_screen = "\n".join(lines[:60])
  for needed in ("git clone", "python3 -m venv", "pip install -e .", 'pip install -e ".[test]"',
                 "python -m experiments.train --config=demo --workdir=runs/demo",
                 "<!-- demo-output -->", "python -m pytest -q -n 2\n",
                 "python -m pytest -q -n 2 -m slow"):
    assert needed in first_screen, f"the README's first screen lacks {needed!r}"


# ARCHITECTURE.md's map: one row per module, under its room's heading.
ROOM_HEADING = re.compile(r"^### `(jax_vaecf/(?:\w+/)?)`")
MODULE_ROW = re.compile(r"^\| `(\w+\.py)` \|")
PACKAGE_PATH = re.compile(r"\bjax_vaecf/(?:\w+/)*\w+\.py\b")


def map_rows(text: str) -> list[str]:
  """The module paths of the map's rows (`## The map` up to the next `## `): each table
  row naming `m.py` under the heading of room `jax_vaecf/room/` is `jax_vaecf/room/m.py`;
  a row under any other heading is returned as `?/m.py`, which names no module."""
  rows, room, inside = [], None, False
  for line in text.splitlines():
    if line.startswith("## "):
      inside = line.strip() == "## The map"
      continue
    if not inside:
      continue
    if line.startswith("### "):
      heading = ROOM_HEADING.match(line)
      room = heading.group(1) if heading else None
      continue
    row = MODULE_ROW.match(line)
    if row:
      rows.append((room or "?/") + row.group(1))
  return rows


def package_modules() -> list[str]:
  """Every module of the package (not `__init__.py`, not the demo data), as a path."""
  found = glob.glob(os.path.join(REPO, "jax_vaecf", "**", "*.py"), recursive=True)
  paths = (os.path.relpath(p, REPO).replace(os.sep, "/") for p in found)
  return sorted(p for p in paths
                if not p.endswith("/__init__.py") and "/demo_data/" not in p)


def test_the_map_reader_sees_rooms_rows_and_stray_rows():
  text = ("## The map\n### `jax_vaecf/`\n| `api.py` | x |\n### `jax_vaecf/core/` (0)\n"
          "| module | concern |\n| `files.py` | y |\n### Elsewhere\n| `lost.py` | z |\n"
          "## Next\n| `after.py` | w |\n")
  assert map_rows(text) == ["jax_vaecf/api.py", "jax_vaecf/core/files.py", "?/lost.py"]


def test_the_architecture_map_names_every_module_once():
  rows = map_rows(_read("ARCHITECTURE.md"))
  modules = package_modules()
  assert len(modules) > 40, modules  # the glob found the package
  twice = sorted({r for r in rows if rows.count(r) > 1})
  missing = sorted(set(modules) - set(rows))
  stray = sorted(set(rows) - set(modules))
  assert not (twice or missing or stray), (
      f"ARCHITECTURE.md's map: modules without a row {missing}, rows naming no module "
      f"{stray}, rows given twice {twice}")


def test_every_package_path_in_the_architecture_exists():
  named = sorted(set(PACKAGE_PATH.findall(_read("ARCHITECTURE.md"))))
  assert named, "ARCHITECTURE.md names no jax_vaecf/...py path"
  gone = [p for p in named if not os.path.isfile(os.path.join(REPO, p))]
  assert not gone, f"ARCHITECTURE.md names files that do not exist: {gone}"
