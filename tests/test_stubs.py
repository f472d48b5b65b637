"""python/kvtier/_core.pyi (the compiled core's type stubs, from scripts/gen_stubs.sh) names
exactly what kvtier._core exports: every function, class, method and property, no more."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

_core = pytest.importorskip("kvtier._core")

STUB = Path(__file__).resolve().parents[1] / "python" / "kvtier" / "_core.pyi"


def stub_names() -> set[str]:
    tree = ast.parse(STUB.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    names.add(f"{node.name}.{item.name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def module_names() -> set[str]:
    names: set[str] = set()
    for name, obj in vars(_core).items():
        if name.startswith("_"):
            continue
        names.add(name)
        if inspect.isclass(obj):
            names.update(f"{name}.{m}" for m in vars(obj) if not m.startswith("_"))
    return names


def test_the_stubs_name_what_the_core_exports():
    stubs, module = stub_names(), module_names()
    assert module - stubs == set(), "exported but not in _core.pyi: run scripts/gen_stubs.sh"
    assert stubs - module == set(), "in _core.pyi but not exported: run scripts/gen_stubs.sh"


def test_the_package_says_it_is_typed():
    assert (STUB.parent / "py.typed").is_file()
