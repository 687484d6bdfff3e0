"""The layers, by folder, read from the source (the AST of every module, so an import inside a function counts):

- ``store/`` and ``migrations/`` import neither ``addon`` nor ``bench`` nor ``tests``.
- Plain Python imports nothing of mitmproxy, directly or through another module of the repository: all of
  ``store/`` and ``migrations/``, and every subpackage of ``addon/`` (``addon/<package>/``); the modules
  directly in ``addon/`` are the addons and their mitmproxy glue.
- A hook module — one defining a class with a method named after a hook mitmproxy's proxy raises (a flow's,
  a connection's or a message's), found in mitmproxy's own registry (``mitmproxy.hooks.all_hooks``), not a
  hand-kept list — imports no other hook module: ``addon/codex.py`` builds the addons and hands each its
  collaborators.
- The test harness is ``tests/support``: a test module imports no other test module (nor ``conftest``), only
  ``tests/test_bench.py`` imports ``bench``, ``bench`` imports nothing of ``tests`` but ``tests.support``, and
  ``tests.support`` imports neither ``bench`` nor a test module.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

from mitmproxy import hooks
from mitmproxy.proxy import layers, server_hooks  # noqa: F401 - defining the proxy's hooks registers them

ROOT = Path(__file__).resolve().parent.parent

# The events of connections, flows and messages: every hook defined under mitmproxy.proxy. The lifecycle hooks
# (load, configure, running, done, update) do not make a hook module: the services every addon is handed
# (the runtime, client limits, the refusal sink) take their options through them.
PROXY_HOOKS = frozenset(name for name, hook in hooks.all_hooks.items()
                        if hook.__module__.startswith("mitmproxy.proxy."))

# Relay composes wsrelay's Sockets and failover's Failover as nested addons (its ``addons`` attribute, mitmproxy's
# way of building one addon from parts), and Sockets calls back into its Relay: one addon in three modules.
NESTED_ADDONS = {("addon.relay", "addon.wsrelay"), ("addon.wsrelay", "addon.relay"), ("addon.relay", "addon.failover")}


def module_name(root: Path, path: Path) -> str:
    """The dotted name ``path`` is imported as (a package by its folder's name)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # each module is parsed once, however many checks read it
def imported_modules(root: Path, path: Path) -> frozenset[str]:
    """The dotted name of everything ``path`` imports, relative imports resolved; ``from a import b`` gives
    both ``a`` and ``a.b`` (``b`` may be a module)."""
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def python_files(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(root: Path, files: list[Path], forbidden: tuple[str, ...],
               allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """For each of ``files`` that imports anything under ``forbidden`` (and not under ``allowed``): what."""
    def ok(name: str) -> bool:  # allowed, or a package on the way to it (``from tests import support``)
        return under(name, allowed) or any(a.startswith(name + ".") for a in allowed)

    found = {str(p.relative_to(root)): sorted(n for n in imported_modules(root, p) if under(n, forbidden) and not ok(n))
             for p in files}
    return {k: v for k, v in found.items() if v}


def plain_modules(root: Path) -> list[Path]:
    addon = root / "addon"
    return [*python_files(root, "store"), *python_files(root, "migrations"),
            *(p for p in python_files(root, "addon") if p.parent != addon)]


def mitmproxy_reach(root: Path) -> dict[str, str]:
    """Each plain module that reaches mitmproxy, with the shortest import chain that does."""
    imports = {module_name(root, p): imported_modules(root, p) for folder in ("addon", "store", "migrations")
               for p in python_files(root, folder)}
    # An import runs every package on the way too: addon.metering.sse runs addon and addon.metering.
    runs = {name: {m for imported in names for i in range(1, imported.count(".") + 2)
                   if (m := ".".join(imported.split(".")[:i])) in imports and m != name}
            for name, names in imports.items()}
    chains = {}
    for path in plain_modules(root):
        start = module_name(root, path)
        seen, todo = {start}, deque([[start]])
        while todo:
            chain = todo.popleft()
            if direct := sorted(n for n in imports[chain[-1]] if under(n, ("mitmproxy",))):
                chains[start] = " -> ".join([*chain, direct[0]])
                break
            for nxt in sorted(runs[chain[-1]] - seen):
                seen.add(nxt)
                todo.append([*chain, nxt])
    return chains


def hook_modules(root: Path) -> dict[str, Path]:
    """The modules of ``addon/`` that define a class with a method named after a proxy hook, by name."""
    found = {}
    for path in python_files(root, "addon"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                                                      and f.name in PROXY_HOOKS for f in node.body):
                found[module_name(root, path)] = path
    return found


def addon_to_addon(root: Path) -> set[tuple[str, str]]:
    """(importer, imported) for every hook module that imports another hook module."""
    hook = hook_modules(root)
    return {(name, other) for name, path in hook.items() for n in imported_modules(root, path)
            for other in hook if other != name and under(n, (other,))}


def misplaced_test_imports(root: Path) -> dict[str, list[str]]:
    """Imports across the tests' layers: between test modules (or of conftest), of bench from a test module
    other than test_bench, of tests other than the harness from bench, of bench or test modules from the
    harness."""
    top = root / "tests"
    test_modules = [p for p in python_files(root, "tests") if p.parent == top and p.name.startswith("test_")]
    not_harness = tuple(f"tests.{p.stem}" for p in python_files(root, "tests")
                        if p.parent == top and p.name != "__init__.py")
    found: dict[str, list[str]] = {}
    for checked in (imports_of(root, test_modules, not_harness),
                    imports_of(root, [p for p in test_modules if p.name != "test_bench.py"], ("bench",)),
                    imports_of(root, python_files(root, "bench"), ("tests",), allowed=("tests.support",)),
                    imports_of(root, python_files(root, "tests/support"), ("bench", *not_harness))):
        for name, modules in checked.items():
            found[name] = sorted(found.get(name, []) + modules)
    return found


def test_imported_modules_sees_every_form(tmp_path):
    (tmp_path / "addon" / "meter").mkdir(parents=True)
    p = tmp_path / "addon" / "meter" / "m.py"
    p.write_text("import addon.relay\nfrom tests import x\ndef f():\n    from bench.http import y\n"
                 "from . import sse\nfrom ..errors import E\n")
    assert imported_modules(tmp_path, p) == {"addon.relay", "tests", "tests.x", "bench.http", "bench.http.y",
                                             "addon.meter", "addon.meter.sse", "addon.errors", "addon.errors.E"}


def test_proxy_hooks_come_from_mitmproxy():
    assert {"requestheaders", "request", "responseheaders", "response", "error", "http_connect",
            "client_disconnected", "websocket_message", "websocket_end"} <= PROXY_HOOKS
    assert PROXY_HOOKS.isdisjoint({"load", "configure", "running", "done", "update"})


def test_store_and_migrations_stay_below_the_addon():
    files = python_files(ROOT, "store") + python_files(ROOT, "migrations")
    assert files
    assert imports_of(ROOT, files, ("addon", "bench", "tests")) == {}


def test_plain_python_imports_nothing_of_mitmproxy():
    assert any(p.parent.name == "store" for p in plain_modules(ROOT))
    assert mitmproxy_reach(ROOT) == {}


def test_hook_modules_do_not_import_each_other():
    # the discovery finds the addons codex.py loads for their flow hooks
    assert {"addon.admin", "addon.auth", "addon.drain", "addon.gate", "addon.hygiene", "addon.relay"} \
        <= set(hook_modules(ROOT))
    found = addon_to_addon(ROOT)
    assert found - NESTED_ADDONS == set()
    assert NESTED_ADDONS - found == set(), "an allowed import is gone: take it off its list"


def test_tests_import_the_harness_not_each_other():
    assert misplaced_test_imports(ROOT) == {}


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checks_catch_an_addon_importing_an_addon_and_plain_code_importing_mitmproxy(tmp_path):
    write_tree(tmp_path, {
        "addon/__init__.py": "",
        "addon/a.py": "class A:\n    def request(self, flow): ...\n",
        "addon/b.py": "from addon.a import A\nfrom addon import svc\nclass B:\n    def response(self, flow): ...\n",
        "addon/c.py": "class C:\n    async def websocket_message(self, flow):\n        from . import a\n",
        # options only: a service, not a hook module
        "addon/svc.py": "class S:\n    def load(self, loader): ...\n    def configure(self, updated): ...\n",
        "addon/glue.py": "from mitmproxy import ctx\n",  # glue lives directly in addon/
        "addon/metering/__init__.py": "",
        "addon/metering/direct.py": "def f():\n    import mitmproxy.http\n",
        "addon/metering/through.py": "from addon.metering.clean import g\n",
        "addon/metering/clean.py": "from addon import glue\ndef g(): ...\n",
        "store/__init__.py": "",
        "store/s.py": "from mitmproxy.net import encoding\n",
        "store/t.py": "import sqlalchemy\n",
        "migrations/env.py": "import alembic\n",
    })
    assert set(hook_modules(tmp_path)) == {"addon.a", "addon.b", "addon.c"}
    assert addon_to_addon(tmp_path) == {("addon.b", "addon.a"), ("addon.c", "addon.a")}
    assert mitmproxy_reach(tmp_path) == {
        "addon.metering.direct": "addon.metering.direct -> mitmproxy.http",
        "addon.metering.clean": "addon.metering.clean -> addon.glue -> mitmproxy",
        "addon.metering.through": "addon.metering.through -> addon.metering.clean -> addon.glue -> mitmproxy",
        "store.s": "store.s -> mitmproxy.net"}


def test_the_check_catches_tests_importing_across_their_layers(tmp_path):
    write_tree(tmp_path, {
        "tests/__init__.py": "", "tests/conftest.py": "from tests.support.w import wait\n",
        "tests/support/__init__.py": "", "tests/support/w.py": "from bench.http import QUIET\n",
        "tests/support/ok.py": "from addon.relay import Relay\nfrom tests.support.w import wait\n",
        "tests/test_a.py": "from tests.support.w import wait\n",
        "tests/test_b.py": "from tests.test_a import helper\nfrom tests import conftest\n",
        "tests/test_c.py": "import bench.data\n",
        "tests/test_bench.py": "from bench.http import QUIET\n",
        "bench/__init__.py": "", "bench/ok.py": "from tests.support.w import wait\nfrom tests import support\n",
        "bench/bad.py": "from tests import test_a\n",
    })
    assert misplaced_test_imports(tmp_path) == {
        "tests/support/w.py": ["bench.http", "bench.http.QUIET"],
        "tests/test_b.py": ["tests.conftest", "tests.test_a", "tests.test_a.helper"],
        "tests/test_c.py": ["bench.data"],
        "bench/bad.py": ["tests.test_a"]}
