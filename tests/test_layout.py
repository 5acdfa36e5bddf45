"""The codebase's shape: jobs are leaves, and no module imports another test module."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Checkout folder -> the package it installs as (setup.py).
PACKAGES = {"parti": "parti", "tokenizer": "parti.tokenizer", "tasks": "parti.tasks"}


def _modules() -> dict[str, pathlib.Path]:
  """Installed module name -> source file, for every module of the three folders."""
  found = {}
  for folder, package in PACKAGES.items():
    for path in sorted((ROOT / folder).rglob("*.py")):
      parts = path.relative_to(ROOT / folder).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join((package, *parts))] = path
  return found


def _is_job(path: pathlib.Path) -> bool:
  """A job is a module a user runs: it has a `__main__` block."""
  return any(
    isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    for node in ast.parse(path.read_text()).body
  )


def _imported(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The project modules `path` imports, at the top or inside functions."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {name for name in names if name in modules}


def test_no_module_imports_a_job():
  modules = _modules()
  jobs = {name for name, path in modules.items() if _is_job(path)}
  assert {
    "parti.train",
    "parti.infer",
    "parti.tokenizer.train",
    "parti.tasks.prepare_shapes",
  } <= jobs
  offenders = {
    name: sorted(_imported(path, modules) & (jobs - {name})) for name, path in modules.items()
  }
  assert not {name: jobs for name, jobs in offenders.items() if jobs}


def test_jobs_are_the_top_level_modules_of_parti():
  """What a user runs sits at the top of `parti/` (or of the tokenizer and tasks);
  the library lives in subpackages."""
  top_level = {p.stem for p in (ROOT / "parti").glob("*.py")} - {"__init__"}
  library = {name for name in top_level if not _is_job(ROOT / "parti" / f"{name}.py")}
  # The one library module kept at the top: the developers' guide names it as the only
  # module that knows the mesh axes.
  assert library == {"partitioning"}


def test_tests_import_helpers_not_other_tests():
  for path in sorted((ROOT / "tests").glob("test_*.py")):
    tree = ast.parse(path.read_text())
    imported = {
      node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
      alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert not {name for name in imported if name.startswith("test_")}, path.name
