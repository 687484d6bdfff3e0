"""Imports run downward: ``store`` never imports ``addon``; ``bench`` never imports ``tests``.

Read from the source (the AST of every module), so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every absolute import in ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_packages_sees_every_form(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import addon.relay\nfrom tests import x\ndef f():\n    from bench.http import y\n")
    assert imported_packages(p) == {"addon", "tests", "bench"}


@pytest.mark.parametrize("package, forbidden", [("store", {"addon", "bench", "tests"}),
                                                ("migrations", {"addon", "bench", "tests"}),
                                                ("bench", {"tests"})])
def test_imports_run_downward(package, forbidden):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    upward = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & forbidden) for p in modules}
    assert {k: v for k, v in upward.items() if v} == {}
