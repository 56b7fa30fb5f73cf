"""pyproject.toml declares what weightgen imports, with no torch ceiling, and one version string."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import weightgen

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in the package (function-local imports included)."""
    found = set()
    for path in (ROOT / "weightgen").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "weightgen"}


def test_every_imported_package_is_declared():
    project = PYPROJECT["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project.get("optional-dependencies", {}).values() for r in extra}
    dists = packages_distributions()
    undeclared = {}
    for module in _third_party_imports():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_torch_has_a_floor_and_no_ceiling():
    torch_req = next(r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "torch")
    assert ">=" in torch_req and "<" not in torch_req, torch_req


def test_one_version_string():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "weightgen.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", weightgen.__version__)
