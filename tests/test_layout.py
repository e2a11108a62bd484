"""The layout's rules, checked on the source: who may import what, which faces stay torch-free, and
how large a module or a function may grow.

Imports are read with :mod:`ast` (every ``import`` statement, at module level or inside a function),
not by running the code, so a rule breaks here before it breaks at run time.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EDGE_SDK = ROOT / "edge_sdk"
COORDINATOR = ROOT / "coordinator"

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

# path (from the repository root) -> why it may be longer than MAX_MODULE_LINES
LONG_MODULES: dict[str, str] = {}

# "path::qualified.name" -> why the function may be longer than MAX_FUNCTION_LINES
LONG_FUNCTIONS: dict[str, str] = {
    "edge_sdk/scaling/_search.py::_search": "the greedy width search: its closures share one state (next clean-up)",
}


def _modules(package: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every module of ``package``."""
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: Path) -> Iterator[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement of one module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# The coordinator reaches the SDK only through its faces (and the torch-free ground modules every
# room shares). It does run a device's code: the simulator trains with the device's own trainer and
# the validator evaluates with its data pipeline, both through the public ``edge_sdk`` face.
COORDINATOR_MAY_IMPORT = {
    "edge_sdk",
    "edge_sdk.protocol",
    "edge_sdk.scaling",
    "edge_sdk._errors",
    "edge_sdk._units",
}


def test_the_coordinator_imports_only_the_sdk_faces() -> None:
    """``coordinator/**`` imports from ``edge_sdk`` only the faces ``edge_sdk``, ``edge_sdk.protocol``
    and ``edge_sdk.scaling``, plus the ground modules ``edge_sdk._errors`` and ``edge_sdk._units``;
    never a private module of a room, not even as a name of a face.

    The coordinator runs device code on purpose: the simulator trains each simulated device with the
    device's own trainer (``TaskRunner``), and the validator scores the merged model with the device's
    data pipeline (``read_tsv``, ``encode``, ``evaluate``), one implementation so that simulated and
    real runs agree. It takes them from the public ``edge_sdk`` face, as a user would.
    """
    broken = []
    for module, path in _modules(COORDINATOR):
        for imported, name in _imports(module, path):
            if imported != "edge_sdk" and not imported.startswith("edge_sdk."):
                continue
            if imported not in COORDINATOR_MAY_IMPORT:
                broken.append(f"{_rel(path)}: {imported}")
            elif name is not None and name.startswith("_") and name != "__version__":
                broken.append(f"{_rel(path)}: {imported}.{name}")
    assert not broken, "the coordinator imports private SDK modules:\n" + "\n".join(broken)


def test_the_sdk_never_imports_the_coordinator() -> None:
    broken = [
        f"{_rel(path)}: {imported}"
        for module, path in _modules(EDGE_SDK)
        for imported, _ in _imports(module, path)
        if imported == "coordinator" or imported.startswith("coordinator.")
    ]
    assert not broken, "edge_sdk imports the coordinator:\n" + "\n".join(broken)


@pytest.mark.parametrize("face", ["edge_sdk", "edge_sdk.protocol", "edge_sdk.serving"])
def test_torch_free_faces_do_not_import_torch(face: str) -> None:
    """An inference-only install (no torch) can import these faces; a fresh interpreter proves it."""
    code = f"import sys, {face}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"importing {face} imported {out.stdout.strip()}"


def _faces() -> list[str]:
    """Every package (a face: ``__init__.py``) under ``edge_sdk`` and ``coordinator``."""
    return [module for package in (EDGE_SDK, COORDINATOR) for module, path in _modules(package)
            if path.name == "__init__.py"]  # fmt: skip


@pytest.mark.parametrize("face", _faces())
def test_every_name_a_face_exports_resolves(face: str) -> None:
    """Each name in ``__all__`` resolves; a lazy face's table lists only exported names."""
    module = importlib.import_module(face)
    exported = getattr(module, "__all__", [])
    assert len(set(exported)) == len(exported), f"{face}.__all__ repeats a name"
    missing = [name for name in exported if getattr(module, name, None) is None]
    assert not missing, f"{face}.__all__ names that do not resolve: {missing}"
    lazy = getattr(module, "_NAMES", getattr(module, "_LAZY", {}))
    assert set(lazy) <= set(exported), f"{face} loads names it does not export: {set(lazy) - set(exported)}"


def _sources() -> Iterator[Path]:
    for package in (EDGE_SDK, COORDINATOR):
        yield from sorted(package.rglob("*.py"))


def test_no_module_is_longer_than_the_limit() -> None:
    long = {_rel(p): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    unexplained = {path: n for path, n in long.items() if path not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_MODULE_LINES} lines: {unexplained}"
    stale = set(LONG_MODULES) - set(long)
    assert not stale, f"allowed long modules that are short now (remove them from LONG_MODULES): {stale}"


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function, nested ones and methods included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, name + ".")
        else:
            yield from _functions(node, prefix)


def test_no_function_is_longer_than_the_limit() -> None:
    long = {}
    for path in _sources():
        for name, node in _functions(ast.parse(path.read_text(), str(path))):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long[f"{_rel(path)}::{name}"] = lines
    unexplained = {key: n for key, n in long.items() if key not in LONG_FUNCTIONS}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}"
    stale = set(LONG_FUNCTIONS) - set(long)
    assert not stale, f"allowed long functions that are short now (remove them from LONG_FUNCTIONS): {stale}"


MAX_METHODS = 19  # FederationEngine and CoordinatorServer: defs in the class body, properties included


def _methods(path: str, cls: str) -> list[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return [b.name for b in node.body if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_engine_and_the_server_have_fewer_than_20_methods() -> None:
    engine = _methods("coordinator/federation/_engine.py", "FederationEngine")
    server = _methods("coordinator/serve/_server.py", "CoordinatorServer")
    assert len(engine) <= MAX_METHODS, engine
    assert len(server) <= MAX_METHODS, server
