"""The layering of python/kvtier (docs/architecture.md, "Layers"), checked on the source with ast.

1. No module of the core imports p2p, sim, integrations, examples, cli or router: not at the top, not
   inside a function, not through a relative import. The core is built and tested without them;
   they are built on it, and p2p is handed to a cache as a ChunkSource (kvtier.sources).
2. No module reads the private attributes of KVCache or PagedKVPool (``obj._x`` where obj is not
   ``self`` / ``cls``) outside the module that defines the class. The names are those the classes
   define themselves (``self._x = ...``, ``def _x``), so the list follows the classes.

Run as a script to print the module dependency graph::

    python tests/test_import_rules.py             # edges between kvtier's top-level modules
    python tests/test_import_rules.py --modules   # every module, and the cycles among them
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "kvtier"
REPO = PKG.parents[1]

# Modules and packages of the core: a package (config) counts with every module in it.
CORE = (
    "cache",
    "pool",
    "sequence",
    "layout",
    "keys",
    "planner",
    "policies",
    "config",
    "factory",
    "metrics",
    "upload",
    "errors",
    "sources",
    "routing",
    "events",
    "codecs",
)
FORBIDDEN = ("p2p", "sim", "integrations", "examples", "cli", "router")

# (class's module, class): the private names of these classes stay inside their module.
GUARDED_CLASSES = (("cache", "KVCache"), ("pool", "PagedKVPool"))
# Private names always guarded, whatever else defines them: the tier and the peers of a cache.
ALWAYS_GUARDED = ("_tier", "_peers")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


EXTENSIONS = ("kvtier._core",)  # compiled modules: no source, and they import nothing of kvtier


def _is_module(dotted: str, known: dict[str, Path]) -> bool:
    return dotted in known or dotted in EXTENSIONS


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module imported) for every import in the file, at any depth (functions, classes,
    ``if TYPE_CHECKING``), relative ones resolved. ``from a import b`` counts ``a.b`` when that
    is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub, known) else mod))
    return out


def _top(dotted: str) -> str | None:
    """kvtier.cache -> cache, kvtier.p2p.service -> p2p, kvtier -> kvtier; None outside kvtier."""
    parts = dotted.split(".")
    if parts[0] != "kvtier":
        return None
    return parts[1] if len(parts) > 1 else "kvtier"


def graph(top_level: bool = True) -> dict[str, set[str]]:
    """Edges between kvtier's modules (``top_level``: subpackages as one node; the package's
    ``__init__`` is the node ``kvtier``). Extension modules (``_core``) are left out."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        src = _top(name) if top_level else name
        edges[src]
        for _line, target in imports_of(name, path, known):
            if _top(target) is None or _top(target) == "_core":
                continue
            dst = _top(target) if top_level else target
            if dst != src and (top_level or dst in known):
                edges[src].add(dst)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def core_modules(known: dict[str, Path]) -> list[str]:
    """Every module of the core: those CORE names, and each module of a package it names."""
    return sorted(name for name in known if _top(name) in CORE)


def test_the_core_imports_no_layer_above_it():
    known = modules()
    missing = [m for m in CORE if f"kvtier.{m}" not in known]
    assert not missing, f"core modules listed here but not in python/kvtier: {missing}"
    core = core_modules(known)
    assert {"kvtier.config", "kvtier.config.sizes", "kvtier.config.kvtier_config"} <= set(core)
    bad = []
    for name in core:
        for line, target in imports_of(name, known[name], known):
            top = _top(target)
            if top in FORBIDDEN:
                bad.append(f"{known[name].relative_to(REPO)}:{line}: {name} imports {target}")
    assert not bad, "the core must not import p2p, sim, integrations, examples, cli or router:\n" + "\n".join(bad)


def test_the_core_is_in_no_import_cycle_with_the_layers_above():
    edges = graph()
    for comp in cycles(edges):
        mixed = set(comp) & set(CORE)
        assert not (mixed and set(comp) & set(FORBIDDEN)), f"import cycle across layers: {comp}"


def test_the_core_modules_import_one_way():
    """No cycle among the core's modules (the config package builds no cache: kvtier.factory,
    above both, does)."""
    edges = graph()
    among = {name: edges[name] & set(CORE) for name in CORE}
    assert not cycles(among), f"import cycle inside the core: {cycles(among)}"


def test_no_import_cycle_inside_a_core_package():
    """The modules of a core package (config) import each other one way: the package's
    __init__ re-exports them, and none imports the package or a module that imports it."""
    edges = graph(top_level=False)
    for package in CORE:
        inside = {name for name in edges if name.startswith(f"kvtier.{package}.")}
        if not inside:
            continue  # a module, not a package
        inside.add(f"kvtier.{package}")
        among = {name: edges[name] & inside for name in inside}
        assert not cycles(among), f"import cycle inside kvtier.{package}: {cycles(among)}"


def _private_names(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def guarded_names() -> dict[str, str]:
    """Private name -> the module (``cache``/``pool``) whose class owns it. A name that another
    class of python/kvtier defines too (``_lock``) cannot be told apart by name and is left out,
    except ALWAYS_GUARDED."""
    owners: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for attr in _private_names(node):
                    owners[attr].add((name.removeprefix("kvtier."), node.name))
    out = {}
    for mod, cls in GUARDED_CLASSES:
        for attr, who in owners.items():
            if (mod, cls) in who and (len(who) == 1 or attr in ALWAYS_GUARDED):
                out[attr] = mod
    return out


def test_guarded_names_come_from_the_classes():
    names = guarded_names()
    assert names["_tier"] == "cache" and names["_peers"] == "cache"
    assert names["_allocate"] == "pool" and names["_bookkeeping"] == "cache"  # methods


def test_no_module_reads_the_private_state_of_a_cache_or_pool():
    names = guarded_names()
    files = sorted(PKG.rglob("*.py")) + sorted((REPO / "tests").rglob("*.py"))
    bad = []
    for path in files:
        own = module_name(path).removeprefix("kvtier.") if path.is_relative_to(PKG) else None
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute) or node.attr not in names:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if names[node.attr] == own:
                continue  # the class's own module (its helpers, as Sequence in pool.py)
            bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, (
        "private state of KVCache / PagedKVPool read from outside (use the public "
        "accessors: cache.tier, cache.peers, ...):\n" + "\n".join(bad)
    )


def _print_graph(top_level: bool) -> None:
    edges = graph(top_level)
    for src in sorted(edges):
        if edges[src]:
            print(f"{src} -> {', '.join(sorted(edges[src]))}")
    comps = cycles(edges)
    print(f"cycles: {len(comps)}" + "".join(f"\n  {len(c)} modules: {', '.join(c)}" for c in comps))


if __name__ == "__main__":
    _print_graph(top_level="--modules" not in sys.argv)
