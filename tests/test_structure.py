"""The package's import structure: every import points down the pipeline, and no two modules import each other
(directly or round a longer circle), counting imports inside functions too, which hide circles from Python.

The layers, bottom to top (a module may import from its own layer or any layer below):

    errors, config -> data -> tasks -> models, generation -> losses
        -> train (and the modules trainers use: scoring, reward_functions, evaluate)
        -> lab, bench, studio -> cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "alignlab"

LAYERS = [
    ("alignlab", "alignlab.errors", "alignlab.config"),
    ("alignlab.data",),
    ("alignlab.tasks",),
    ("alignlab.models", "alignlab.generation"),
    ("alignlab.losses",),
    ("alignlab.train", "alignlab.scoring", "alignlab.reward_functions", "alignlab.evaluate"),
    ("alignlab.lab", "alignlab.bench", "alignlab.studio"),
    ("alignlab.cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: the longest matching prefix wins (``alignlab`` itself is the package root)."""
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "alignlab" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The alignlab modules ``path`` imports anywhere (module level or inside functions); ``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("alignlab"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("alignlab"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, known) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (as a list of modules, first = last), or None. A package importing its own
    submodules (``__init__`` re-exports) is not a circle unless a submodule imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_import_points_down_the_pipeline():
    graph = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "imports pointing back up the pipeline:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    # the package root re-exports nothing but errors; a package __init__ that imports its own submodules is a
    # re-export, so drop the edge from a package to its children before looking for circles
    pruned = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycle = find_cycle(pruned)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert find_cycle(graph) == expected


def test_the_layer_check_sees_a_back_arrow():
    assert layer_of("alignlab.data.io") < layer_of("alignlab.train.loop") < layer_of("alignlab.cli")
    assert layer_of("alignlab.models") == layer_of("alignlab.generation")
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("alignlab.somewhere_new")
