"""The import graph: one namespace, layers that point one way, no cycles.

Layers, lowest first (a module may import its own layer and those below):

0. base: ``fedlora.*`` building blocks (config, errors, data, model, adapter, export,
   keys, addresses, protocol, runtime, ...);
1. privacy: ``fedlora.privacy`` (no torch, no Flower), ``fedlora.ddp`` (device-level DP's
   encoding, numpy only) and ``fedlora.reporting``;
2. ``fedlora.client`` and ``fedlora.server``, which never import each other (what they
   share lives below them);
3. commands: ``fedlora.cli`` (one module per command group), ``fedlora.simulate`` (and
   its calibration prefetch, ``fedlora.simprefetch``) and ``fedlora.testing``, which put
   the layers together.

Every import statement counts, module-level or inside a function (a function-level
import is a dependency all the same), read from the source with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source folder → the package it installs as (pyproject.toml's package-dir).
FOLDERS = {
    "fedlora": "fedlora",
    "server": "fedlora.server",
    "client": "fedlora.client",
    "privacy": "fedlora.privacy",
}
RANKS = {
    "fedlora.privacy": 1,
    "fedlora.ddp": 1,
    "fedlora.reporting": 1,
    "fedlora.client": 2,
    "fedlora.server": 2,
    "fedlora.audit": 3,
    "fedlora.cli": 3,
    "fedlora.simulate": 3,
    "fedlora.simprefetch": 3,
    "fedlora.testing": 3,
}
SIBLINGS = ("fedlora.client", "fedlora.server")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "fedlora" and parts and parts[0] == "v1":
                continue  # generated protobuf code
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from X import Y``: X.Y when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


GRAPH = {name: {d for d in _imports(path) if d in MODULES} for name, path in MODULES.items()}


def _layer(module: str) -> tuple[str, int]:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len, default="")
    return (best or "fedlora", RANKS.get(best, 0))


def test_the_tree_maps_onto_the_one_namespace():
    assert "fedlora.server.app" in MODULES and "fedlora.client.app" in MODULES
    assert "fedlora.privacy.ledger" in MODULES and "fedlora.cli" in MODULES


def test_nothing_imports_the_folders_as_top_level_packages():
    """`import server` would work from a checkout and fail once installed."""
    offenders = []
    for tree in ("fedlora", "server", "client", "privacy", "tests", "bench", "scripts"):
        for path in (ROOT / tree).rglob("*.py"):
            for dep in _imports(path):
                if dep.split(".")[0] in ("server", "client", "privacy"):
                    offenders.append(f"{path.relative_to(ROOT)}: {dep}")
    assert not offenders, offenders


def test_layers_point_one_way():
    upward = []
    for module, deps in GRAPH.items():
        layer, rank = _layer(module)
        for dep in deps:
            dep_layer, dep_rank = _layer(dep)
            if dep_rank > rank or (
                dep_rank == rank
                and layer in SIBLINGS
                and dep_layer in SIBLINGS
                and dep_layer != layer
            ):
                upward.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("forbidden", ["torch", "flwr", "opacus", "transformers", "peft"])
def test_privacy_imports_no_ml_framework(forbidden):
    for module, path in MODULES.items():
        if module.startswith("fedlora.privacy"):
            assert not {d for d in _imports(path) if d.split(".")[0] == forbidden}, module
