"""The declared tables (core/tables.py) are what a DuckDB store holds, and files made by earlier
versions of marketpipe still open and gain the tables added since."""

from __future__ import annotations

import dataclasses
from datetime import date
from pathlib import Path

import duckdb
import polars as pl
import pytest

from marketpipe.core.errors import StoreError
from marketpipe.core.tables import COVERAGE, INGEST_LOG, SCHEMA_VERSION, TABLES, Table
from marketpipe.store.base import Coverage, IngestRecord
from marketpipe.store.duckdb import DuckDBStore, sql_type, table_ddl

# The DDL as written by hand before the tables were declared once (schema v3, as shipped). A file
# created by that code must still open, and a fresh store must have exactly its columns.
SHIPPED_DDL = [
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS bars (
        symbol VARCHAR NOT NULL, timeframe VARCHAR NOT NULL, ts TIMESTAMP NOT NULL,
        open DOUBLE, high DOUBLE, low DOUBLE, close DOUBLE, volume BIGINT, trade_count BIGINT,
        vwap DOUBLE, source VARCHAR NOT NULL, feed VARCHAR, fetched_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS quarantine (
        symbol VARCHAR, timeframe VARCHAR, ts TIMESTAMP, open DOUBLE, high DOUBLE, low DOUBLE,
        close DOUBLE, volume BIGINT, trade_count BIGINT, vwap DOUBLE, source VARCHAR, feed VARCHAR,
        fetched_at TIMESTAMP, raw_ts VARCHAR, reason VARCHAR, request_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS coverage (
        symbol VARCHAR NOT NULL, timeframe VARCHAR NOT NULL, provider VARCHAR NOT NULL,
        source VARCHAR NOT NULL, feed VARCHAR, start TIMESTAMP NOT NULL, "end" TIMESTAMP NOT NULL,
        rows BIGINT, request_id VARCHAR, fetched_at TIMESTAMP)""",
    """CREATE SEQUENCE IF NOT EXISTS ingest_seq""",
    """CREATE TABLE IF NOT EXISTS reconciliation (
        run_id VARCHAR, created_at TIMESTAMP, symbol VARCHAR, timeframe VARCHAR, ts TIMESTAMP,
        reference VARCHAR, other VARCHAR, status VARCHAR, price_delta_pct DOUBLE, worst_field VARCHAR,
        volume_ratio DOUBLE, volume_flag BOOLEAN, reference_close DOUBLE, other_close DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS ingest_log (
        id BIGINT DEFAULT nextval('ingest_seq'), provider VARCHAR, source VARCHAR, feed VARCHAR,
        kind VARCHAR, timeframe VARCHAR, symbols VARCHAR, start TIMESTAMP, "end" TIMESTAMP,
        request_id VARCHAR, page INTEGER, fetched_at TIMESTAMP, rows_received BIGINT,
        rows_stored BIGINT, rows_rejected BIGINT)""",
    # v2
    """CREATE TABLE IF NOT EXISTS anomalies (
        symbol VARCHAR NOT NULL, timeframe VARCHAR NOT NULL, ts TIMESTAMP NOT NULL, kind VARCHAR NOT NULL,
        severity VARCHAR, value DOUBLE, bars BIGINT, detail VARCHAR, detected_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS quality_scores (
        symbol VARCHAR NOT NULL, timeframe VARCHAR NOT NULL, day DATE NOT NULL, expected BIGINT, present BIGINT,
        confirmed_empty BIGINT, gap BIGINT, quarantined BIGINT, anomalies BIGINT, completeness DOUBLE,
        validity DOUBLE, timeliness DOUBLE, consistency DOUBLE, score DOUBLE, computed_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS revisions (
        symbol VARCHAR, timeframe VARCHAR, ts TIMESTAMP, source VARCHAR, feed VARCHAR,
        old_open DOUBLE, old_high DOUBLE, old_low DOUBLE, old_close DOUBLE, old_volume BIGINT,
        new_open DOUBLE, new_high DOUBLE, new_low DOUBLE, new_close DOUBLE, new_volume BIGINT,
        request_id VARCHAR, revised_at TIMESTAMP)""",
    """CREATE SEQUENCE IF NOT EXISTS run_seq""",
    """CREATE TABLE IF NOT EXISTS job_runs (
        id BIGINT DEFAULT nextval('run_seq'), job VARCHAR, run_id VARCHAR, symbol VARCHAR, strategy VARCHAR,
        started_at TIMESTAMP, finished_at TIMESTAMP, status VARCHAR, code VARCHAR, message VARCHAR,
        bars_stored BIGINT, bars_rejected BIGINT)""",
    # v3
    """CREATE TABLE IF NOT EXISTS prev_close (
        symbol VARCHAR PRIMARY KEY, session DATE NOT NULL, close DOUBLE NOT NULL, source VARCHAR,
        updated_at TIMESTAMP)""",
    # v4
    """CREATE TABLE IF NOT EXISTS corporate_actions (
        action_id VARCHAR NOT NULL, provider VARCHAR NOT NULL, source VARCHAR, vendor_id VARCHAR,
        type VARCHAR NOT NULL, symbol VARCHAR, ex_date DATE, record_date DATE, payable_date DATE,
        process_date DATE, effective_date DATE, declaration_date DATE, old_rate DOUBLE, new_rate DOUBLE,
        cash_amount DOUBLE, rate DOUBLE, currency VARCHAR, old_symbol VARCHAR, new_symbol VARCHAR,
        fetched_at TIMESTAMP, raw VARCHAR, version BIGINT NOT NULL, content_hash VARCHAR NOT NULL,
        stored_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS action_coverage (
        symbol VARCHAR NOT NULL, provider VARCHAR NOT NULL, source VARCHAR, start DATE NOT NULL,
        "end" DATE NOT NULL, rows BIGINT, request_id VARCHAR, fetched_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS action_quarantine (
        action_id VARCHAR, provider VARCHAR, source VARCHAR, vendor_id VARCHAR, type VARCHAR, symbol VARCHAR,
        ex_date DATE, record_date DATE, payable_date DATE, process_date DATE, effective_date DATE,
        declaration_date DATE, old_rate DOUBLE, new_rate DOUBLE, cash_amount DOUBLE, rate DOUBLE,
        currency VARCHAR, old_symbol VARCHAR, new_symbol VARCHAR, fetched_at TIMESTAMP, raw VARCHAR,
        reason VARCHAR, quarantined_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS action_reconciliation (
        run_id VARCHAR, created_at TIMESTAMP, symbol VARCHAR, family VARCHAR, reference VARCHAR, other VARCHAR,
        status VARCHAR, reference_date DATE, other_date DATE, reference_value DOUBLE, other_value DOUBLE,
        reference_id VARCHAR, other_id VARCHAR)""",
    # v5: the gateway's audit log of admin requests
    "CREATE SEQUENCE IF NOT EXISTS audit_log_seq",
    """CREATE TABLE IF NOT EXISTS audit_log (
        id BIGINT DEFAULT nextval('audit_log_seq'), occurred_at TIMESTAMP NOT NULL, actor VARCHAR NOT NULL,
        address VARCHAR, action VARCHAR NOT NULL, params VARCHAR, status BIGINT NOT NULL, code VARCHAR,
        request_id VARCHAR)""",
    # v6: crypto pairs' bars, quarantine and revisions (float volume)
    """CREATE TABLE IF NOT EXISTS crypto_bars (
        symbol VARCHAR NOT NULL, timeframe VARCHAR NOT NULL, ts TIMESTAMP NOT NULL,
        open DOUBLE, high DOUBLE, low DOUBLE, close DOUBLE, volume DOUBLE, trade_count BIGINT,
        vwap DOUBLE, source VARCHAR NOT NULL, feed VARCHAR, fetched_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS crypto_quarantine (
        symbol VARCHAR, timeframe VARCHAR, ts TIMESTAMP, open DOUBLE, high DOUBLE, low DOUBLE,
        close DOUBLE, volume DOUBLE, trade_count BIGINT, vwap DOUBLE, source VARCHAR, feed VARCHAR,
        fetched_at TIMESTAMP, raw_ts VARCHAR, reason VARCHAR, request_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS crypto_revisions (
        symbol VARCHAR, timeframe VARCHAR, ts TIMESTAMP, source VARCHAR, feed VARCHAR,
        old_open DOUBLE, old_high DOUBLE, old_low DOUBLE, old_close DOUBLE, old_volume DOUBLE,
        new_open DOUBLE, new_high DOUBLE, new_low DOUBLE, new_close DOUBLE, new_volume DOUBLE,
        request_id VARCHAR, revised_at TIMESTAMP)""",
    # v7: option chain history (snapshot rows as received, quote and trade times in nanoseconds) and quarantine
    """CREATE TABLE IF NOT EXISTS option_snapshots (
        contract VARCHAR NOT NULL, underlying VARCHAR, root VARCHAR, expiration DATE, type VARCHAR, strike DOUBLE,
        as_of TIMESTAMP NOT NULL, quote_ts TIMESTAMP_NS, bid_price DOUBLE, bid_size BIGINT, bid_exchange VARCHAR,
        ask_price DOUBLE, ask_size BIGINT, ask_exchange VARCHAR, quote_condition VARCHAR, trade_ts TIMESTAMP_NS,
        trade_price DOUBLE, trade_size BIGINT, trade_exchange VARCHAR, trade_condition VARCHAR, delta DOUBLE,
        gamma DOUBLE, theta DOUBLE, vega DOUBLE, rho DOUBLE, implied_volatility DOUBLE, greeks_missing VARCHAR,
        source VARCHAR NOT NULL, feed VARCHAR, fetched_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS option_quarantine (
        contract VARCHAR, underlying VARCHAR, root VARCHAR, expiration DATE, type VARCHAR, strike DOUBLE,
        as_of TIMESTAMP, quote_ts TIMESTAMP_NS, bid_price DOUBLE, bid_size BIGINT, bid_exchange VARCHAR,
        ask_price DOUBLE, ask_size BIGINT, ask_exchange VARCHAR, quote_condition VARCHAR, trade_ts TIMESTAMP_NS,
        trade_price DOUBLE, trade_size BIGINT, trade_exchange VARCHAR, trade_condition VARCHAR, delta DOUBLE,
        gamma DOUBLE, theta DOUBLE, vega DOUBLE, rho DOUBLE, implied_volatility DOUBLE, greeks_missing VARCHAR,
        source VARCHAR, feed VARCHAR, fetched_at TIMESTAMP, reasons VARCHAR, request_id VARCHAR)""",
]
V1_TABLES = ("meta", "bars", "quarantine", "coverage", "reconciliation", "ingest_log")

_COLUMNS = """SELECT table_name, column_name, data_type, is_nullable, column_default
              FROM information_schema.columns WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"""


def described(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str, bool, str | None]]]:
    out: dict[str, list[tuple[str, str, bool, str | None]]] = {}
    for table, column, dtype, nullable, default in con.execute(_COLUMNS).fetchall():
        out.setdefault(table, []).append((column, dtype, nullable == "YES", default))
    return out


def declared(table: Table) -> list[tuple[str, str, bool]]:
    return [(name, sql_type(dtype), table.nullable(name)) for name, dtype in table.columns.items()]


def test_a_fresh_store_holds_exactly_the_declared_tables(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "fresh.duckdb")
    try:
        held = described(store.con)
    finally:
        store.close()
    assert sorted(held) == sorted(t.name for t in TABLES)
    for table in TABLES:
        assert [c[:3] for c in held[table.name]] == declared(table), table.name
        serial = [c[0] for c in held[table.name] if c[3] and "nextval" in c[3]]
        assert serial == ([table.serial] if table.serial else []), table.name


def test_the_derived_ddl_is_the_shipped_one(tmp_path: Path) -> None:
    """Columns, types, nullability, defaults, sequences and keys: identical to the hand-written DDL,
    so files created before and after the change are the same."""

    def shape(ddl: list[str]) -> tuple[object, ...]:
        con = duckdb.connect()
        try:
            for stmt in ddl:
                con.execute(stmt)
            return (
                described(con),
                con.execute("SELECT sequence_name FROM duckdb_sequences() ORDER BY 1").fetchall(),
                con.execute(
                    "SELECT table_name, constraint_type, constraint_column_names FROM duckdb_constraints() ORDER BY ALL"
                ).fetchall(),
            )
        finally:
            con.close()

    assert shape([s for t in TABLES for s in table_ddl(t)]) == shape(SHIPPED_DDL)


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
def test_a_store_file_from_an_earlier_version_opens_and_gains_the_new_tables(tmp_path: Path, version: int) -> None:
    path = tmp_path / f"v{version}.duckdb"
    con = duckdb.connect(str(path))
    keep = {t.name for t in TABLES if t.since <= version}
    for stmt in SHIPPED_DDL:
        name = stmt.split("EXISTS", 1)[1].split()[0]
        if "SEQUENCE" in stmt or name in keep:
            con.execute(stmt)
    assert {t.name for t in TABLES if t.since == 1} == set(V1_TABLES)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
    con.execute(
        "INSERT INTO bars (symbol, timeframe, ts, source, close) VALUES ('AAPL', '1Min', '2024-03-05 14:30', 'sim', 1)"
    )
    con.close()

    store = DuckDBStore(path)
    try:
        assert store.counts()["bars"] == 1
        assert store.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [
            (str(SCHEMA_VERSION),)
        ]
        assert sorted(described(store.con)) == sorted(t.name for t in TABLES)
        store.save_prev_closes([("AAPL", date(2024, 3, 4), 1.25, "sim")])
        assert store.prev_closes(["AAPL"])["AAPL"][1] == 1.25
    finally:
        store.close()


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.duckdb"
    DuckDBStore(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(StoreError, match="newer than this marketpipe"):
        DuckDBStore(path)


def test_the_write_records_match_their_tables() -> None:
    """The page-write records carry the columns of the rows they become (no column named twice)."""
    assert [f.name for f in dataclasses.fields(Coverage)] == COVERAGE.names
    assert [f.name for f in dataclasses.fields(IngestRecord)] == INGEST_LOG.written


def test_a_table_cannot_name_a_column_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="not among its columns"):
        Table("t", {"a": pl.String()}, not_null=("b",))
