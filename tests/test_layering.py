"""Dependencies point one way: ir <- ops <- passes <- codegen (<- cli, pipeline, ...). Every import counts, those
inside functions too (only ``if TYPE_CHECKING:`` blocks are skipped)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import sparsefx

ROOT = Path(sparsefx.__file__).parent
LAYERS = ("ir", "ops", "passes", "codegen")


def _imports(path: Path, module: str) -> set[str]:
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sparsefx"):
                out |= {f"{target}.{a.name}" for a in node.names} | {target}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sparsefx")}
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[module] = _imports(path, module)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_lower_layers_never_import_higher_ones():
    bad = []
    for module, targets in _graph().items():
        if _layer(module) not in LAYERS:
            continue
        rank = LAYERS.index(_layer(module))
        bad += [(module, t) for t in targets if _layer(t) in LAYERS[rank + 1:]]
    assert not bad, bad


def test_no_import_cycle_between_modules_of_the_layers():
    graph = _graph()
    g = nx.DiGraph()
    for module, targets in graph.items():
        for t in targets:
            # a package importing its own submodules (ops/routed/__init__ -> ops/routed/op) is how it registers them
            if t in graph and t != module and _layer(module) in LAYERS and not t.startswith(module + ".") \
                    and not module.startswith(t + "."):
                g.add_edge(module, t)
    assert list(nx.simple_cycles(g)) == []
