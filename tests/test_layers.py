"""Imports run downward: ``store`` never imports ``addon``; ``bench`` never imports ``tests``; an addon
depends on the runtime, never on another addon's module.

Read from the source (the AST of every module), so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """The dotted name of every absolute import in ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every absolute import in ``path``."""
    return {name.split(".")[0] for name in imported_modules(path)}


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


# The modules whose addons run flow hooks; codex.py builds them and hands each its collaborators.
HOOK_ADDONS = {"admin", "auth", "drain", "gate", "hygiene", "relay", "sseview", "startup"}


def test_addons_do_not_import_each_other():
    imports = {name: {m.removeprefix("addon.") for m in imported_modules(ROOT / "addon" / f"{name}.py")}
               for name in sorted(HOOK_ADDONS)}
    # StartupCheck is handed the gate it opens.
    assert {k: sorted(v & HOOK_ADDONS) for k, v in imports.items() if v & HOOK_ADDONS} == {"startup": ["gate"]}
