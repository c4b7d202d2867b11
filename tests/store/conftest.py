"""The store suite runs against both engines: ``store`` (and ``make_store``) are parametrized over
DuckDB (a file in the test's temp dir) and PostgreSQL (a fresh database on the session's server)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from marketpipe.store.base import Store
from marketpipe.store.duckdb import DuckDBStore
from marketpipe.store.postgres import PostgresStore

ENGINES = ["duckdb", "postgresql"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_target(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where the test's store lives: a DuckDB file path or a fresh PostgreSQL database URL."""
    if engine == "duckdb":
        return str(tmp_path / "s.duckdb")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def make_store(engine: str, store_target: str) -> Iterator[Callable[..., Store]]:
    """Opens (another) store on the test's target; every one opened is closed afterwards."""
    opened: list[Store] = []

    def make(**kw: bool) -> Store:
        s: Store = DuckDBStore(store_target, **kw) if engine == "duckdb" else PostgresStore(store_target, **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store()
