"""The package layering: augment and segment never import each other or pipelines, and the module-level
import graph of the project has no cycle (lazy imports inside functions are not edges)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("augment", "segment", "pipelines")
FORBIDDEN = {"augment": ("segment", "pipelines"), "segment": ("augment", "pipelines")}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, *, top_level: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_augment_and_segment_import_neither_each_other_nor_pipelines():
    bad = [(name, imported) for name, path in _modules().items() if name.split(".")[0] in FORBIDDEN
           for imported in _imports(path, top_level=False)
           if imported.split(".")[0] in FORBIDDEN[name.split(".")[0]]]
    assert not bad, bad


def test_the_module_level_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: {i for i in _imports(path, top_level=True) if i in modules and i != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
