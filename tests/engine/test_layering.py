"""Imports flow downward only (docs/architecture.md): a static import graph of `qlip`, every
import counted, the ones inside functions too."""

import ast
from pathlib import Path

import qlip

SOURCE = Path(qlip.__file__).parent
# layer of each top-level part of qlip (the package itself is the public facade, above all); a module may import its own layer's other parts only
# along the DAG checked below, and lower layers freely
LAYERS = {"qlip": 6, "version": 0, "files": 0, "quant": 1, "nn": 2, "methods": 3, "policies": 3, "pipeline": 4,
          "metrics": 5, "world": 5, "evaluation": 5, "qlip_training": 5, "cli_args": 5, "demo": 5, "cli": 5,
          "testing": 5}


def _module(path: Path) -> str:
    parts = ["qlip", *path.relative_to(SOURCE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name == "qlip" or name.startswith("qlip.")}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "qlip"


def _graph() -> dict[str, set[str]]:
    """Edges between top-level parts (``cli`` -> ``evaluation``), from every module's imports."""
    edges: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        source = _part(_module(path))
        edges.setdefault(source, set()).update(
            _part(m) for m in _imports(path) if _part(m) != source)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_parts_of_qlip_import_each_other_without_a_cycle():
    edges = _graph()
    assert {"cli_args", "pipeline"} <= edges["evaluation"] and "demo" in edges["cli"]
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_no_part_imports_a_higher_layer():
    upward = sorted((source, target) for source, targets in _graph().items() for target in targets
                    if LAYERS[target] > LAYERS[source])
    assert upward == [], f"imports that go up a layer: {upward}"


def test_the_cycle_finder_finds_cli_evaluation_demo():
    # the circle this test file exists for: cli -> evaluation -> cli, demo -> cli -> demo
    assert _cycle({"cli": {"evaluation", "demo"}, "evaluation": {"cli"}, "demo": {"cli"}})
    assert _cycle({"cli": {"evaluation"}, "evaluation": {"cli_args"}}) is None
