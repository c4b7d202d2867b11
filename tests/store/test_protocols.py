"""DuckDBStore implements every role protocol, with the protocols' exact signatures (a second
backend is written against the protocols alone)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from marketpipe.core.config import Config
from marketpipe.store import open_store
from marketpipe.store.base import ActionStore, BarStore, OpsStore, QualityStore, Store
from marketpipe.store.duckdb import DuckDBStore

ROLES: list[type] = [BarStore, QualityStore, OpsStore, ActionStore, Store]


@pytest.fixture
def duck(tmp_path: Path) -> Iterator[DuckDBStore]:
    s = DuckDBStore(tmp_path / "p.duckdb")
    yield s
    s.close()


def members(proto: type) -> list[str]:
    names = {
        name
        for klass in proto.__mro__
        if klass not in (object,) and getattr(klass, "_is_protocol", False)
        for name in (*vars(klass), *getattr(klass, "__annotations__", {}))
        if not name.startswith("_") or name in ("__enter__", "__exit__")
    }
    return sorted(names - {"_is_protocol", "_is_runtime_protocol"})


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.__name__)
def test_duckdb_store_is_every_role(duck: DuckDBStore, role: type) -> None:
    assert isinstance(duck, role)


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.__name__)
def test_duckdb_signatures_are_the_protocols(role: type) -> None:
    for name in members(role):
        if name in ("path", "__enter__", "__exit__"):
            continue
        want, have = inspect.signature(getattr(role, name)), inspect.signature(getattr(DuckDBStore, name))
        assert have == want, f"{role.__name__}.{name}: DuckDBStore{have} != protocol{want}"
        assert getattr(role, name).__doc__, f"{role.__name__}.{name} says no contract"


def test_roles_split_the_whole_store_without_overlap() -> None:
    bar, quality, ops = set(members(BarStore)), set(members(QualityStore)), set(members(OpsStore))
    actions = set(members(ActionStore))
    assert bar < quality  # scoring reads the bars it scores
    assert not quality & ops and not actions & (quality | ops)
    assert set(members(Store)) == quality | ops | actions | {"close", "__enter__", "__exit__"}


def test_something_that_is_not_a_store_is_not_one() -> None:
    assert not isinstance(object(), BarStore)
    assert not isinstance(object(), OpsStore)


def test_open_store_opens_the_configured_file(tmp_path: Path) -> None:
    cfg = Config()
    cfg.store.path = str(tmp_path / "sub" / "cfg.duckdb")
    with open_store(cfg) as st:
        assert isinstance(st, Store)
        assert st.path == cfg.store.path
        assert st.counts() == {"bars": 0, "quarantine": 0, "coverage": 0, "ingest_log": 0}
    with open_store(cfg, read_only=True) as ro:
        assert ro.counts()["bars"] == 0


def test_the_store_imports_nothing_above_it() -> None:
    """store/ is an adapter: it may import core/ (and itself), never quality/, service/, api/, cli/,
    providers/ (the DuckDB store used to take its quarantine schema from quality.validate)."""
    import ast

    import marketpipe.store

    allowed = ("marketpipe.core", "marketpipe.store")
    for path in Path(marketpipe.store.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.startswith("marketpipe"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
