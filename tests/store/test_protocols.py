"""Both stores (DuckDB, PostgreSQL) implement every role protocol, with the protocols' exact
signatures (a backend is written against the protocols alone)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from marketpipe.core.config import Config
from marketpipe.core.errors import StoreError
from marketpipe.store import open_store
from marketpipe.store.base import COUNTED, ActionStore, BarStore, OpsStore, OptionStore, QualityStore, Store
from marketpipe.store.duckdb import DuckDBStore
from marketpipe.store.postgres import PostgresStore

ROLES: list[type] = [BarStore, QualityStore, OpsStore, ActionStore, OptionStore, Store]
BACKENDS: list[type] = [DuckDBStore, PostgresStore]


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
def test_the_store_is_every_role(store: Store, role: type) -> None:
    assert isinstance(store, role)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.__name__)
def test_signatures_are_the_protocols(role: type, backend: type) -> None:
    for name in members(role):
        if name in ("path", "__enter__", "__exit__"):
            continue
        want, have = inspect.signature(getattr(role, name)), inspect.signature(getattr(backend, name))
        assert have == want, f"{role.__name__}.{name}: {backend.__name__}{have} != protocol{want}"
        assert getattr(role, name).__doc__, f"{role.__name__}.{name} says no contract"


def test_roles_split_the_whole_store_without_overlap() -> None:
    bar, quality, ops = set(members(BarStore)), set(members(QualityStore)), set(members(OpsStore))
    actions, options = set(members(ActionStore)), set(members(OptionStore))
    assert bar < quality  # scoring reads the bars it scores
    assert not quality & ops and not actions & (quality | ops) and not options & (quality | ops | actions)
    assert set(members(Store)) == quality | ops | actions | options | {"close", "__enter__", "__exit__"}


def test_something_that_is_not_a_store_is_not_one() -> None:
    assert not isinstance(object(), BarStore)
    assert not isinstance(object(), OpsStore)


def test_open_store_opens_the_configured_file(tmp_path: Path) -> None:
    cfg = Config()
    cfg.store.path = str(tmp_path / "sub" / "cfg.duckdb")
    with open_store(cfg) as st:
        assert isinstance(st, Store)
        assert st.path == cfg.store.path
        assert st.counts() == dict.fromkeys(COUNTED, 0)
    with open_store(cfg, read_only=True) as ro:
        assert ro.counts()["bars"] == 0


def test_open_store_opens_a_postgresql_url(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config()
    cfg.store.url = pg_url
    with pytest.raises(StoreError, match="no store at"):  # a command that only reads creates nothing
        open_store(cfg, create=False)
    with open_store(cfg) as st:
        assert isinstance(st, PostgresStore) and isinstance(st, Store)
        assert st.path == pg_url
        assert st.counts() == dict.fromkeys(COUNTED, 0)
    with open_store(cfg, read_only=True) as ro:
        assert isinstance(ro, PostgresStore) and ro.counts()["bars"] == 0
    # the environment, and a duckdb:// URL or a path keep the embedded store
    monkeypatch.setenv("MARKETPIPE_STORE_URL", pg_url)
    assert Config().store_target() == pg_url and Config().store_is_server()
    monkeypatch.setenv("MARKETPIPE_STORE_URL", "duckdb:///tmp/x.duckdb")
    assert Config().store_path() == Path("/tmp/x.duckdb") and not Config().store_is_server()


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


def test_where_the_store_is_first_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[store] url``, then ``[store] path`` (what ``--store`` sets, a path or a URL), then
    ``MARKETPIPE_STORE_URL``, then ``MARKETPIPE_STORE``, then the default file."""
    from marketpipe.cli.common import load_config

    pg = "postgresql://u@h:5432/db"
    monkeypatch.delenv("MARKETPIPE_STORE_URL", raising=False)
    monkeypatch.delenv("MARKETPIPE_STORE", raising=False)
    monkeypatch.setenv("MARKETPIPE_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text(f'[store]\nurl = "{pg}"\npath = "{tmp_path / "f.duckdb"}"\n')
    assert load_config(None).store_target() == pg
    assert load_config(None, str(tmp_path / "cli.duckdb")).store_target() == str(tmp_path / "cli.duckdb")
    assert load_config(None, "postgresql://other@h/db").store_target() == "postgresql://other@h/db"
    cfg = Config()
    monkeypatch.setenv("MARKETPIPE_STORE", str(tmp_path / "env.duckdb"))
    assert cfg.store_target() == str(tmp_path / "env.duckdb") and not cfg.store_is_server()
    monkeypatch.setenv("MARKETPIPE_STORE_URL", pg)
    assert cfg.store_target() == pg and cfg.store_is_server()
    cfg.store.path = "duckdb://" + str(tmp_path / "p.duckdb")
    assert cfg.store_target() == str(tmp_path / "p.duckdb") and cfg.store_path() == tmp_path / "p.duckdb"
