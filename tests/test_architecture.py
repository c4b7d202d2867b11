"""The map in docs/architecture.md, checked: which package may import which (every import counts, lazy
ones inside functions too), and no import circle between modules anywhere in ``src/marketpipe``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "marketpipe"

# A package may import itself and these (docs/architecture.md, "Layers"). "root" is marketpipe/__init__.py.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "wire": {"core"},
    "providers": {"core", "wire"},
    "store": {"core"},
    "cache": {"core"},
    "quality": {"core"},
    "alerts": {"core"},
    "bus": {"core"},
    "sim": {"core", "wire"},
    "service": {"core", "wire", "providers", "store", "cache", "quality", "bus"},
    "api": {"root", "core", "wire", "cache", "service", "alerts"},
    "cli": {"root", "core", "wire", "providers", "store", "cache", "quality", "service", "api", "sim", "alerts", "bus"},
    "root": {"core", "providers", "quality", "service"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    name = ".".join(("marketpipe", *parts))
    return name.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Module -> the marketpipe modules it imports (``from a.b import c`` counts as ``a.b.c`` when that
    is a module, else ``a.b``)."""
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        me = _module_name(path)
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("marketpipe")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = me.split(".") if is_pkg else me.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                if not base.startswith("marketpipe"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add(sub if sub in modules else base)
        out[me] = {m for m in found if m in modules and m != me}
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def test_every_import_points_down_the_layers() -> None:
    wrong = sorted(
        f"{m} imports {dep}"
        for m, deps in _imports().items()
        for dep in deps
        if _package(dep) != _package(m) and _package(dep) not in ALLOWED[_package(m)]
    )
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_circle() -> None:
    graph = _imports()
    # Tarjan's strongly connected components; a component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checks_see_what_they_check() -> None:
    graph = _imports()
    # a known lazy import (inside a function) and a known top-level one are both seen
    assert "marketpipe.sim.server" in graph["marketpipe.cli.main"]
    assert "marketpipe.wire.alpaca_rest" in graph["marketpipe.providers.alpaca"]
    assert set(ALLOWED) >= {_package(m) for m in graph}


@pytest.mark.parametrize("package", ["sim", "api"])
def test_neither_the_simulator_nor_the_api_touches_an_adapter(package: str) -> None:
    bad = sorted(
        f"{m} imports {d}"
        for m, deps in _imports().items()
        if _package(m) == package
        for d in deps
        if _package(d) == "providers"
    )
    assert not bad, bad
