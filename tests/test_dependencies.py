"""Every package the code imports is declared in pyproject.toml, so a fresh virtual environment has it.

Runtime code (`sd/`) may import only `[project] dependencies` and the optional extras (such as `openvino`,
imported lazily and refused with one line when absent); the tests may also import the `[test]` extra. A
package that happens to be on the machine, or arrives only as another package's dependency, does not count.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str], set[str]]:
    """(runtime, test, other optional) distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    test = {requirement_name(r) for r in extras["test"]}
    optional = {requirement_name(r) for name, reqs in extras.items() if name != "test" for r in reqs}
    return runtime, test, optional


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level module name -> the files that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(folder.parent)))
    return found


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide `module`; for one not installed, its own name (how an
    optional extra that is absent, e.g. openvino, is named)."""
    return {normalise(d) for d in metadata.packages_distributions().get(module, [module])}


def undeclared(folder: Path, allowed: set[str], local: set[str]) -> list[str]:
    problems = []
    for module, files in imported_modules(folder).items():
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        if not distributions_of(module) & allowed:
            problems.append(f"{module} (imported by {', '.join(sorted(files))})")
    return problems


def test_runtime_code_imports_only_declared_packages() -> None:
    runtime, _, optional = declared()
    assert undeclared(ROOT / "sd", runtime | optional, {"sd"}) == []


def test_tests_import_only_declared_packages() -> None:
    runtime, test, optional = declared()
    local = {"sd", "conftest", "reference", *(p.stem for p in (ROOT / "tests").glob("*.py"))}
    assert undeclared(ROOT / "tests", runtime | test | optional, local) == []


def test_the_check_sees_a_missing_package(tmp_path: Path) -> None:
    (tmp_path / "uses_yaml.py").write_text("import yaml.loader\nfrom numpy import zeros\nfrom . import x\n")
    assert undeclared(tmp_path, {"numpy"}, set()) == [f"yaml (imported by {tmp_path.name}/uses_yaml.py)"]
