"""The imports between leancnn's top-level modules and packages, as a graph.

    python tools/import_graph.py            # writes docs/architecture.md's drawing
    python tools/import_graph.py --check    # exit 1 if the graph has a circle

Each package is squashed to one node (imports inside a package are its own business);
the layers come from pyproject.toml's import contract, so the drawing shows each
node in its layer and an arrow running up would stand out (lint-imports forbids it).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import grimp

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- import-graph -->", "<!-- /import-graph -->"


def layers() -> list[list[str]]:
    """The contract's layers, top first, each a list of module names (without `leancnn.`)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = config["tool"]["importlinter"]["contracts"][0]
    return [[name.strip() for name in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def package_graph() -> dict[str, set[str]]:
    """Top-level module -> the top-level modules it imports (itself left out)."""
    graph = grimp.build_graph("leancnn")
    tops = sorted(graph.find_children("leancnn"))
    edges: dict[str, set[str]] = {}
    for top in tops:
        inside = {top} | graph.find_descendants(top)
        imported = set()
        for module in inside:
            imported |= graph.find_modules_directly_imported_by(module)
        edges[top.split(".")[1]] = {
            other.split(".")[1] for other in tops
            if other != top and any(m == other or m.startswith(other + ".") for m in imported)}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as a list of names (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def mermaid(edges: dict[str, set[str]]) -> str:
    names = ["cli", "apps", "engine", "methods", "nn", "measure", "core"]
    lines = ["```mermaid", "flowchart TD"]
    for index, layer in enumerate(layers()):
        title = names[index] if index < len(names) else f"layer {index}"
        lines.append(f"  subgraph layer{index} [{title}]")
        lines.extend(f"    {module}" for module in layer)
        lines.append("  end")
    for source in sorted(edges):
        lines.extend(f"  {source} --> {target}" for target in sorted(edges[source]))
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check for a circle; write nothing")
    args = parser.parse_args()
    edges = package_graph()
    cycle = find_cycle(edges)
    if cycle:
        print("import circle: " + " -> ".join(cycle), file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(edges)} top-level modules, {sum(map(len, edges.values()))} imports between them, no circle")
        return 0
    text = DOC.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + mermaid(edges) + "\n" + text[stop:])
    print(f"wrote the drawing into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
