"""The driver layer has no import cycles: `sme/` imports form a DAG, function-level imports included."""

import ast
import os

from sme import sweep
from sme.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    """{module: sme modules it imports anywhere in its body}, parsed with ast (nothing is executed)."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, "sme")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                modules[_module_name(path)] = path
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # "from sme import io" imports the module sme.io; "from sme.x import f" imports sme.x
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_function_level_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_sme_has_no_import_cycles():
    graph = import_graph()
    assert "sme.runs" in graph["sme.train.loop"] and "sme.io" in graph["sme.runs"]  # the parser sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_drivers_are_peers():
    graph = import_graph()
    assert "sme.sweep" not in graph["sme.train.loop"]
    assert "sme.train.loop" not in graph["sme.sweep"]
    assert {"sme.sweep", "sme.train.loop"} <= graph["sme.driver"]
    assert not hasattr(loop, "_shard") and not hasattr(sweep, "_shard")  # one sharding rule: sme.runs
