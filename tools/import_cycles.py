"""Module-level import cycles among the package's modules (`rewriter.*`, `rewriter.passes.*`).

A cycle makes import order matter and hides layering mistakes; imports inside functions (lazy,
for heavy or optional dependencies) are not counted. Usage: python tools/import_cycles.py
(prints each cycle, exit 1 if there is one).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (("rewriter", "rewriter"), ("passes", "rewriter.passes"))


def module_imports() -> dict[str, set[str]]:
    """Each module's module-level imports of other package modules."""
    found: dict[str, set[str]] = {}
    for folder, package in PACKAGES:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            deps: set[str] = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(alias.name for alias in node.names)
            found[name] = deps
    return {name: {d for d in deps if d in found and d != name} for name, deps in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def main() -> int:
    found = cycles(module_imports())
    for component in found:
        print("import cycle: " + " <-> ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
