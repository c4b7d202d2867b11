"""What only the PostgreSQL store has: its schema derived from the declared tables, numbered
migrations, monthly partitions and the index that serves one symbol-day, connection errors that are
typed and bounded, surviving a server restart, concurrent writers, and answers identical to DuckDB's."""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest

from marketpipe.core.config import url_without_password
from marketpipe.core.errors import StoreError
from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.tables import FINDINGS_SCHEMA, QUALITY_SCORES, RECONCILE_SCHEMA, SCHEMA_VERSION, TABLES
from marketpipe.store.base import Store
from marketpipe.store.duckdb import DuckDBStore
from marketpipe.store.pg_schema import MIGRATIONS, REVISION
from marketpipe.store.postgres import PostgresStore, connect_url
from tests.pg_server import PgServer
from tests.store.test_duckdb import T0, bars, page

_PG_NAMES = {
    "text": "text",
    "double precision": "float8",
    "bigint": "int8",
    "integer": "int4",
    "boolean": "bool",
    "date": "date",
    "timestamp with time zone": "timestamptz",
}


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    """A plain driver (psycopg) for looking at the database from outside the store."""
    with psycopg.connect(url, autocommit=True) as con:
        cur = con.execute(sql)
        return list(cur.fetchall()) if cur.description else []


def test_a_fresh_store_holds_exactly_the_declared_tables(pg_url: str) -> None:
    from marketpipe.store.pg_schema import pg_type

    PostgresStore(pg_url).close()
    rows = query(
        pg_url,
        """SELECT c.table_name, c.column_name, c.data_type, c.is_nullable, c.is_identity
           FROM information_schema.columns c JOIN pg_class k ON k.relname = c.table_name
           WHERE c.table_schema = 'public' AND NOT k.relispartition ORDER BY c.table_name, c.ordinal_position""",
    )
    held: dict[str, list[tuple[str, str, bool, bool]]] = {}
    for table, column, dtype, nullable, identity in rows:
        held.setdefault(str(table), []).append(
            (str(column), _PG_NAMES[str(dtype)], nullable == "YES", identity == "YES")
        )
    assert sorted(held) == sorted([t.name for t in TABLES] + ["schema_migrations"])
    for t in TABLES:
        want = [
            (c, pg_type(d).split()[0], t.nullable(c) and c != t.serial, c == t.serial) for c, d in t.columns.items()
        ]
        if t.versioned:
            want.append((REVISION, "int4", False, False))
        assert held[t.name] == want, t.name


def test_migrations_are_numbered_recorded_and_applied_once(pg_url: str) -> None:
    with PostgresStore(pg_url) as s:
        applied = s.migrations()
    assert [v for v, _ in applied] == list(range(1, len(MIGRATIONS) + 1))
    assert "bars" in applied[0][1] and "prev_close" in applied[2][1] and "corporate_actions" in applied[3][1]
    first = query(pg_url, "SELECT version, applied_at FROM schema_migrations ORDER BY 1")
    PostgresStore(pg_url).close()  # opening again applies nothing
    assert query(pg_url, "SELECT version, applied_at FROM schema_migrations ORDER BY 1") == first
    assert query(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_a_database_of_an_older_marketpipe_gains_only_the_newer_tables(pg_url: str) -> None:
    """A store made before corporate actions (schema 3) keeps its bars and gains the action tables."""
    with PostgresStore(pg_url) as s:
        s.write_pages([page(bars(3))])
    query(pg_url, "DROP TABLE corporate_actions, action_coverage, action_quarantine, action_reconciliation, audit_log")
    query(pg_url, "DELETE FROM schema_migrations WHERE version >= 4")
    query(pg_url, "UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with PostgresStore(pg_url) as s:
        assert [v for v, _ in s.migrations()] == list(range(1, SCHEMA_VERSION + 1))
        assert s.counts()["bars"] == 3
        assert s.read_actions(["AAPL"], date(2020, 1, 1), date(2020, 12, 31)).height == 0
    assert query(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_several_processes_opening_one_fresh_database_migrate_it_once(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            PostgresStore(pg_url).close()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert query(pg_url, "SELECT count(*) FROM schema_migrations") == [(len(MIGRATIONS),)]


def test_a_store_from_a_newer_version_is_refused(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    query(pg_url, f"INSERT INTO schema_migrations (version, description) VALUES ({len(MIGRATIONS) + 1}, 'future')")
    with pytest.raises(StoreError, match="newer than this marketpipe"):
        PostgresStore(pg_url)
    with pytest.raises(StoreError, match="newer than this marketpipe"):
        PostgresStore(pg_url, read_only=True)


def test_monthly_partitions_are_made_as_needed_and_one_symbol_day_uses_the_key(pg_url: str) -> None:
    with PostgresStore(pg_url) as s:
        jan = datetime(2024, 1, 31, 23, 58, tzinfo=UTC)  # crosses into February
        assert s.write_pages([page(bars(5, t0=jan)), page(bars(3, t0=T0))]) == [5, 3]
        parts = {
            r[0]
            for r in query(pg_url, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid")
            if str(r[0]).startswith("bars_")
        }
        assert {"bars_2024_01", "bars_2024_02", "bars_2024_03"} <= parts
        today = datetime.now(UTC)
        assert f"bars_{today.year:04d}_{today.month:02d}" in parts  # created ahead on open
        default = query(pg_url, "SELECT count(*) FROM pg_partitioned_table WHERE partdefid <> 0")
        assert default == [(0,)]
        plan = "\n".join(
            str(r[0])
            for r in query(
                pg_url,
                "EXPLAIN SELECT * FROM bars WHERE symbol = 'AAPL' AND timeframe = '1Min' "
                "AND ts >= '2024-03-05' AND ts < '2024-03-06'",
            )
        )
        assert "bars_2024_03" in plan and "bars_2024_01" not in plan  # pruned to one month
        assert "bars_2024_03_symbol_timeframe_ts" in plan or "Index" in plan
        got = s.read_bars(["AAPL"], "1Min", jan, jan + timedelta(minutes=5))
        assert got.height == 5 and got["ts"].to_list() == [jan + timedelta(minutes=i) for i in range(5)]


def test_an_unreachable_server_is_a_store_error_with_a_hint_not_a_hang(pg: PgServer) -> None:
    closed = pg.url("postgres").replace(f":{pg.port}", ":1")
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL store") as info:
        PostgresStore(closed)
    assert "is the server running" in str(info.value) and info.value.details["path"] == closed
    # a host that never answers: bounded by the connect timeout
    with pytest.raises(StoreError):
        PostgresStore("postgresql://postgres@10.255.255.1:5432/x", connect_timeout=1)
    assert time.monotonic() - t0 < 10


def test_the_password_never_shows() -> None:
    url = "postgresql://alice:s3cret@db.example:6543/market"
    assert url_without_password(url) == "postgresql://alice:***@db.example:6543/market"
    assert "connect_timeout=5" in connect_url(url, 5)
    assert "connect_timeout=9" in connect_url(url + "?connect_timeout=9", 5)


def test_concurrent_writers_of_one_range_store_each_bar_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[list[int]] = []

    def write(s: PostgresStore, offset: int) -> None:
        barrier.wait()
        for k in range(5):  # overlapping pages, in different orders per writer
            results.append(s.write_pages([page(bars(200, t0=T0 + timedelta(minutes=((k + offset) % 5) * 100)))]))

    threads = [threading.Thread(target=write, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert stores[0].counts()["bars"] == 600
        assert sum(n for r in results for n in r) == 600  # every bar counted stored exactly once
        dup = query(pg_url, "SELECT count(*) FROM (SELECT symbol, ts FROM bars GROUP BY 1, 2 HAVING count(*) > 1) d")
        assert dup == [(0,)]
    finally:
        for s in stores:
            s.close()


def test_a_server_restart_is_survived(pg: PgServer, pg_url: str) -> None:
    with PostgresStore(pg_url, retry_seconds=30) as s:
        assert s.write_pages([page(bars(5))]) == [5]
        pg.restart(down_seconds=1.0)
        assert s.write_pages([page(bars(10))]) == [5]  # reconnected; the write went through once
        assert s.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(hours=1)).height == 10


def test_a_server_that_stays_down_fails_the_write_with_store_error(pg: PgServer, pg_url: str) -> None:
    with PostgresStore(pg_url, retry_seconds=1.0) as s:
        s.write_pages([page(bars(3))])
        pg.stop()
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError) as info:
                s.write_pages([page(bars(6))])
            assert time.monotonic() - t0 < 15
            assert info.value.code == "STORE_ERROR"
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="cannot connect"):  # a read (the health probe) fails fast
                s.counts()
            assert time.monotonic() - t0 < 3
        finally:
            pg.start()
        assert s.counts()["bars"] == 3  # nothing of the failed write, and the store works again


def _exercise(s: Store) -> dict[str, pl.DataFrame | object]:
    """Every read of the protocols after the same writes."""
    cover = (T0, T0 + timedelta(minutes=5))
    quar = bars(3, t0=T0 + timedelta(hours=2)).with_columns(volume=pl.Series([1, -5, 2]))
    p1 = page(bars(5), cover=cover)
    p1.anomalies = pl.DataFrame(
        {
            "symbol": ["AAPL"],
            "timeframe": ["1Min"],
            "ts": [T0],
            "kind": ["spike"],
            "severity": ["warn"],
            "value": [3.5],
            "bars": [1],
            "detail": ["x"],
        },
        schema=FINDINGS_SCHEMA,
    )
    s.write_pages([p1, page(quar), page(bars(4, "MSFT", feed="iex"), symbol="MSFT", feed="iex")])
    s.write_pages([page(bars(2, feed="iex", close=1.0), feed="iex")])
    ref = page(bars(5, close=10.8))
    ref.refresh = True
    s.write_pages([ref])
    rows = pl.DataFrame(
        {
            "symbol": ["AAPL"],
            "timeframe": ["1Min"],
            "ts": [T0],
            "reference": ["alpaca"],
            "other": ["polygon"],
            "status": ["ok"],
            "price_delta_pct": [0.1],
            "worst_field": ["close"],
            "volume_ratio": [1.0],
            "volume_flag": [False],
            "reference_close": [10.5],
            "other_close": [10.51],
        },
        schema=RECONCILE_SCHEMA,
    )
    s.write_reconciliation("run1", T0, rows)
    s.replace_findings(["AAPL"], "1Min", T0, T0 + timedelta(days=1), p1.anomalies, T0)
    scores = pl.DataFrame(
        [("AAPL", "1Min", date(2024, 3, 5), 390, 5, 0, 385, 1, 1, 0.1, 0.9, 1.0, 1.0, 0.5, T0)],
        schema=dict(QUALITY_SCORES.columns),
        orient="row",
    )
    s.replace_scores("1Min", scores)
    s.replace_scores("1Min", scores)
    s.log_job_runs(
        [
            {
                "job": "j",
                "run_id": "r",
                "symbol": "AAPL",
                "strategy": "smart",
                "started_at": T0,
                "finished_at": T0,
                "status": "ok",
                "code": None,
                "message": None,
                "bars_stored": 5,
                "bars_rejected": 0,
            }
        ]
    )
    s.save_prev_closes([("AAPL", date(2024, 3, 4), 10.0, "sim")])
    s.save_prev_closes([("AAPL", date(2024, 3, 5), 11.0, "sim")])
    span = (T0 - timedelta(days=1), T0 + timedelta(days=1))
    return {
        "bars": s.read_bars(["AAPL", "MSFT"], "1Min", *span),
        "one": s.read_bars(["AAPL"], "1Min", *span),
        "exact": s.read_bars(["MSFT"], "1Min", *span, source="sim", feed="iex"),
        "paged": s.read_bars(["AAPL", "MSFT"], "1Min", *span, limit=3, after=("AAPL", T0 + timedelta(minutes=1))),
        "desc": s.read_bars(["AAPL"], "1Min", *span, desc=True, sources=["sim"]),
        "coverage": s.coverage(["AAPL"], "1Min", *span),
        "until": s.covered_until(["AAPL", "MSFT"], "1Min"),
        "quarantined_at": s.quarantined_at(["AAPL"], "1Min", *span),
        "findings": s.findings(["AAPL"], "1Min", *span),
        "scores": s.scores("AAPL", "1Min"),
        "reconciliation": s.reconciliation("AAPL"),
        "reconciliation_many": s.reconciliation_many(["AAPL"], "1Min", *span),
        "job_runs": s.job_runs().drop("id"),
        "prev": s.prev_closes(["AAPL", "MSFT"]),
        "counts": s.counts(),
        "summary": s.summary(),
        "quarantine": s.quarantine(),
        "ingest_log": s.ingest_log().drop("id"),
        "revisions": s.revisions().drop("revised_at"),
    }


UNORDERED = {"quarantined_at", "reconciliation_many"}  # "in no set order" (store/base.py)


def test_both_engines_answer_alike(tmp_path: Path, pg_url: str) -> None:
    """The same writes, then every read: equal frames with identical dtypes from both engines."""
    with DuckDBStore(tmp_path / "d.duckdb") as duck, PostgresStore(pg_url) as pgs:
        want, got = _exercise(duck), _exercise(pgs)
    assert want["revisions"].height == 5  # type: ignore[union-attr]
    assert want["bars"].schema == pl.Schema(BAR_SCHEMA)  # type: ignore[union-attr]
    for name, expected in want.items():
        have = got[name]
        if isinstance(expected, pl.DataFrame):
            assert isinstance(have, pl.DataFrame)
            if name in UNORDERED:
                expected, have = expected.sort(pl.all()), have.sort(pl.all())
            assert have.schema == expected.schema, name
            assert have.equals(expected), f"{name}:\n{have}\n!=\n{expected}"
        else:
            assert have == expected, name


def test_the_cli_takes_a_postgresql_url_and_never_shows_its_password(sim: object, pg_url: str, tmp_path: Path) -> None:
    """``--store postgresql://...`` word for word (a URL, not a path), a backfill into it, ``store info``,
    and ``config show`` with a password in ``[store] url``."""
    from tests.cli.test_cli import run
    from tests.conftest import SIM_ENV

    cfg = tmp_path / "mp.toml"
    cfg.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\n')  # type: ignore[attr-defined]
    env = {**SIM_ENV, "MARKETPIPE_CONFIG": str(cfg)}
    done = run("backfill", "AAPL", "--start", "2024-03-05", "--end", "2024-03-05", "--store", pg_url, "--no-progress",
               env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    info = run("store", "info", "--store", pg_url, env=env)
    assert info.returncode == 0 and pg_url in info.stdout and "'bars': 390" in info.stdout, info.stdout + info.stderr
    secret = tmp_path / "secret.toml"
    secret.write_text('[store]\nurl = "postgresql://alice:hunter2@db.example:6543/market"\n')
    shown = run("config", "show", "--config", str(secret))
    assert shown.returncode == 0 and "hunter2" not in shown.stdout + shown.stderr
    assert "postgresql://alice:***@db.example:6543/market" in shown.stdout
    down = run("store", "info", "--store", "postgresql://postgres@127.0.0.1:1/nothing", env=env)
    lines = [line for line in down.stderr.splitlines() if line.startswith("error[")]
    assert down.returncode == 1 and len(lines) == 1 and lines[0].startswith("error[STORE_ERROR]: cannot connect")


def test_a_copy_that_meets_held_rows_goes_the_staged_way(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the direct COPY can lose: another writer commits the same bars between the probe and
    the COPY (here: the probe is made to miss them), or two pages of one batch share bars. The key
    refuses the COPY; the batch is written again through the stage, each bar once, nothing doubled."""
    with PostgresStore(pg_url) as s:
        assert s.write_pages([page(bars(5), cover=(T0, T0 + timedelta(minutes=5)))]) == [5]
        monkeypatch.setattr(s, "_overlaps", lambda cur, bars, batch: False)
        assert s.write_pages([page(bars(8), cover=(T0, T0 + timedelta(minutes=8)))]) == [3]
        monkeypatch.undo()
        later = T0 + timedelta(hours=2)
        assert s.write_pages([page(bars(4, t0=later)), page(bars(6, t0=later))]) == [4, 2]
        assert s.counts() == {
            "bars": 14,
            "quarantine": 0,
            "coverage": 2,
            "ingest_log": 4,
            "crypto_bars": 0,
            "crypto_quarantine": 0,
            "option_snapshots": 0,
            "option_quarantine": 0,
        }
        assert s.ingest_log()["rows_stored"].to_list() == [2, 4, 3, 5]
