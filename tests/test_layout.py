"""The package's shape: imports flow one way (no cycle), and the installed code never imports torch.

The import graph is read from the source with `ast`, every `import` and
`from ... import` counted, at module level or inside a function. An edge is an
explicit import of another project module; the implicit import of a parent
package that Python performs first is not an edge (a package `__init__` that
re-exports its submodules would otherwise be a cycle with each of them).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dpjax", "checkpoints_convert")


def _modules() -> dict[str, str]:
  """Module name -> file path, for every module of the installed packages."""
  out = {}
  for package in PACKAGES:
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if not name.endswith(".py"):
          continue
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _runtime_nodes(tree: ast.AST):
  """Every node of `tree` except those under `if TYPE_CHECKING:` (never executed: an
  annotation's import, which cannot make a cycle at run time)."""
  todo = [tree]
  while todo:
    node = todo.pop()
    yield node
    for child in ast.iter_child_nodes(node):
      if (isinstance(child, ast.If) and isinstance(child.test, ast.Name)
          and child.test.id == "TYPE_CHECKING"):
        todo.extend(child.orelse)
        continue
      todo.append(child)


def _imports(path: str, module: str, is_package: bool, known=()) -> set[str]:
  """Modules `path` imports. `from a import b` imports `a.b` when that is a module of
  `known`, and `a` otherwise."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in _runtime_nodes(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module
      for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        names.add(sub if sub in known else prefix)
  return names


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    is_package = path.endswith("__init__.py")
    graph[module] = {name for name in _imports(path, module, is_package, modules)
                     if name in modules and name != module}
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 20 and "dpjax.model.transformer" in graph["dpjax.model.load"]
  cycle = _find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_type_checking_imports_are_not_edges():
  tree = ast.parse("from typing import TYPE_CHECKING\nimport a\nif TYPE_CHECKING:\n  import b\n"
                   "else:\n  import c\ndef f():\n  import d\n")
  names = {alias.name for node in _runtime_nodes(tree) if isinstance(node, ast.Import)
           for alias in node.names}
  assert names == {"a", "c", "d"}


def test_the_package_reads_as_the_pipeline():
  """At most 8 modules at the package's top level; every stage a subpackage."""
  top = sorted(name for name in os.listdir(os.path.join(ROOT, "dpjax")) if name.endswith(".py"))
  assert len(top) <= 8, top
  for stage in ("model", "checkpoints", "tasks", "lens", "engine", "study", "report", "serve",
                "cli"):
    assert os.path.isfile(os.path.join(ROOT, "dpjax", stage, "__init__.py")), stage


def test_no_tracked_file_holds_an_absolute_home_or_work_path():
  import re
  import subprocess
  files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.split("\n")
  pattern = re.compile(r"(?<![\w.])/(home|root|work|Users|tmp/pytest)/[\w.-]+")
  offenders = []
  for name in filter(None, files):
    path = os.path.join(ROOT, name)
    if not os.path.isfile(path) or os.path.getsize(path) > 5_000_000:
      continue
    with open(path, "rb") as f:
      data = f.read()
    if b"\0" in data[:8192]:
      continue
    for match in pattern.finditer(data.decode("utf-8", "replace")):
      offenders.append(f"{name}: {match.group(0)}")
  assert offenders == []


def test_the_cycle_finder_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("lower,upper", [
    ("dpjax.checkpoints.convert", "dpjax.model.transformer"),  # checkpoint I/O below the model
    ("dpjax.model.transformer", "dpjax.checkpoints.convert"),
    ("dpjax.tasks.schema", "dpjax.tasks.readers"),  # readers apart from the schema
    ("dpjax.bundled", "dpjax.cli.study"),           # the bundled model's path registers no flag
    ("dpjax.study.settings", "dpjax.cli.flags"),    # settings declare fields, not flags
    ("dpjax.study.methods", "dpjax.study.settings"),  # choice lists are imported downward
    ("dpjax.engine.sweep", "dpjax.study.run"),      # the engine knows nothing of the study
    ("dpjax.lens.readout", "dpjax.engine.sweep"),
])
def test_modules_do_not_reach_up(lower, upper):
  graph = import_graph()
  seen, todo = set(), [lower]
  while todo:
    node = todo.pop()
    if node in seen:
      continue
    seen.add(node)
    todo.extend(graph[node])
  assert upper not in seen


def _module_level_imports(path: str) -> set[str]:
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


def test_the_installed_package_never_imports_torch():
  """No module imports torch when imported (torch is not a dependency of the package; only
  dpjax-throughput's HF comparison asks for it, inside the function that needs it)."""
  offenders = [module for module, path in _modules().items()
               if any(n == "torch" or n.startswith("torch.") for n in _module_level_imports(path))]
  assert offenders == []
  modules = sorted(_modules())
  code = ("import importlib, sys\n"
          f"for name in {modules!r}:\n"
          "  importlib.import_module(name)\n"
          "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
  import subprocess
  import sys
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_kept_block_plan_has_one_definition():
  """The bucket rule and the padded step arrays are written in `dpjax.model.plan` only."""
  for module, path in _modules().items():
    if module == "dpjax.model.plan":
      continue
    with open(path) as f:
      source = f.read()
    assert "NUM_KEEP_BUCKETS" not in source and "def keep_buckets" not in source, module
    assert "np.cumsum(keep" not in source and "flatnonzero(keep)" not in source, module
