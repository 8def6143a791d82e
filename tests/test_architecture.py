"""The house rules: layers import only downward, the package graph has no circle,
and no import of leancnn's own modules hides inside a function."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_cycle_finder_finds_a_circle_and_passes_a_chain():
    assert import_graph.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert import_graph.find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_graph_has_no_circle():
    edges = import_graph.package_graph()
    assert {"cli", "methods", "measure", "kernels"} <= set(edges)
    assert "methods" in edges["experiment"]   # the graph sees real imports
    assert import_graph.find_cycle(edges) is None


def test_every_layer_of_the_contract_names_a_real_module():
    modules = {path.stem if path.is_file() else path.name for path in (ROOT / "leancnn").iterdir()
               if (path.suffix == ".py" and path.stem != "__init__")
               or (path / "__init__.py").is_file()}
    listed = [name for layer in import_graph.layers() for name in layer]
    assert sorted(listed) == sorted(modules)


@pytest.mark.skipif(shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed")
def test_layers_import_only_downward():
    tool = pathlib.Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(tool)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def _function_level_internal_imports(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            internal = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("leancnn"))) \
                or (isinstance(node, ast.Import) and any(a.name.startswith("leancnn") for a in node.names))
            if internal:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_function_level_import_of_leancnn_modules():
    # Imports inside functions existed to dodge circles; with one-way layers none is needed.
    # (Optional third-party packages, e.g. matplotlib or uvicorn, may still load lazily.)
    found = [hit for path in sorted((ROOT / "leancnn").rglob("*.py")) for hit in _function_level_internal_imports(path)]
    assert found == []


def test_the_import_scanner_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("import os\nfrom .top import level\n\ndef f():\n    import json\n"
                      "    from .x import y\n    import leancnn.io\n    return y\n")
    assert _function_level_internal_imports(source, tmp_path) == ["sample.py:6", "sample.py:7"]
