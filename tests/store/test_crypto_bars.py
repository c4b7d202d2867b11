"""Crypto pairs' bars in the store, on both engines: fractional volumes come back exactly (never
rounded), writes are idempotent, a vendor revision is a new version, bad rows are quarantined with
their fractions, and a store of schema v5 upgrades to v6 keeping its stock bars identical."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl

from marketpipe.core.schema import BAR_SCHEMA, CRYPTO_BAR_SCHEMA
from marketpipe.core.tables import CRYPTO_TABLES, SCHEMA_VERSION
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.validate import check_bars
from marketpipe.store.base import Coverage, IngestRecord, PageWrite, Store
from tests.store.test_duckdb import bars as stock_bars
from tests.store.test_duckdb import page as stock_page

SAT = datetime(2024, 3, 2, tzinfo=UTC)
PAIR = "BTC/USD"
# Volumes as a crypto vendor sends them: fractions of a coin with many digits.
VOLUMES = [0.00012345678901, 1.5, 123.456789012345, 7e-09, 0.1 + 0.2]


def crypto_bars(volumes: list[float] = VOLUMES, t0: datetime = SAT, fetched_at: datetime = SAT) -> pl.DataFrame:
    n = len(volumes)
    return pl.DataFrame(
        {
            "symbol": [PAIR] * n,
            "timeframe": ["1Min"] * n,
            "ts": [t0 + timedelta(minutes=i) for i in range(n)],
            "open": [62_000.0] * n,
            "high": [62_010.5] * n,
            "low": [61_990.125] * n,
            "close": [62_000.25] * n,
            "volume": volumes,
            "trade_count": [3] * n,
            "vwap": [62_001.123456] * n,
            "source": ["sim:alpaca"] * n,
            "feed": ["us"] * n,
            "fetched_at": [fetched_at] * n,
        },
        schema=CRYPTO_BAR_SCHEMA,
    )


def crypto_page(df: pl.DataFrame, *, refresh: bool = False) -> PageWrite:
    res = check_bars(df, timeframe=Timeframe.parse("1Min"), request_id="req", day_tz="UTC")
    end = SAT + timedelta(minutes=df.height)
    return PageWrite(
        bars=res.good,
        quarantine=res.quarantine,
        coverage=[Coverage(PAIR, "1Min", "alpaca", "sim:alpaca", "us", SAT, end, df.height, "req", SAT)],
        ingest=IngestRecord(
            "alpaca", "sim:alpaca", "us", "bars", "1Min", [PAIR], SAT, end, "req", 1, SAT, df.height, 0, res.rejected
        ),
        refresh=refresh,
    )


def test_fractional_volumes_round_trip_exactly_and_writes_are_idempotent(store: Store) -> None:
    df = crypto_bars()
    assert store.write_pages([crypto_page(df)]) == [5]
    back = store.read_bars([PAIR], "1Min", SAT, SAT + timedelta(hours=1))
    assert back.schema == pl.Schema(CRYPTO_BAR_SCHEMA)
    assert back["volume"].to_list() == VOLUMES  # bit for bit: float for float
    assert back.equals(df)
    assert store.write_pages([crypto_page(df)]) == [0]  # the same bars again: stored once
    assert store.read_bars([PAIR], "1Min", SAT, SAT + timedelta(hours=1)).height == 5
    assert store.counts()["crypto_bars"] == 5 and store.counts()["bars"] == 0
    cov = store.coverage([PAIR], "1Min", SAT, SAT + timedelta(hours=1))
    assert cov["feed"].to_list() == ["us", "us"] and set(cov["provider"]) == {"alpaca"}  # the shared ledger
    # stocks beside them are untouched and keep their integer volumes
    assert store.write_pages([stock_page(stock_bars(3))]) == [3]
    stocks = store.read_bars(["AAPL"], "1Min", datetime(2024, 3, 5, tzinfo=UTC), datetime(2024, 3, 6, tzinfo=UTC))
    assert stocks.schema == pl.Schema(BAR_SCHEMA) and stocks["volume"].to_list() == [0, 1, 2]
    summary = store.summary()
    assert sorted(summary["symbol"].to_list()) == ["AAPL", PAIR]


def test_a_vendor_revision_of_a_pair_is_a_new_version_with_its_fractions(store: Store) -> None:
    store.write_pages([crypto_page(crypto_bars())])
    # a later fetch: one volume changed in its 15th digit
    revised = crypto_bars([*VOLUMES[:2], 123.456789012346, *VOLUMES[3:]], fetched_at=SAT + timedelta(days=1))
    p = crypto_page(revised, refresh=True)
    assert store.write_pages([p]) == [1] and p.revised == 1
    back = store.read_bars([PAIR], "1Min", SAT, SAT + timedelta(hours=1))
    assert back.height == 5 and back["volume"][2] == 123.456789012346  # the newest version
    rev = store.revisions(PAIR)
    assert rev.height == 1
    assert (rev["old_volume"][0], rev["new_volume"][0]) == (123.456789012345, 123.456789012346)
    assert store.revisions().height == 0  # the stock revisions are another table


def test_bad_pair_rows_are_quarantined_with_their_fractions(store: Store) -> None:
    df = crypto_bars().with_columns(
        high=pl.when(pl.col("ts") == SAT + timedelta(minutes=1)).then(1.0).otherwise(pl.col("high"))
    )
    assert store.write_pages([crypto_page(df)]) == [4]
    q = store.quarantine(PAIR)
    assert q.height == 1 and q["volume"][0] == 1.5 and q["reason"][0].startswith("ohlc_inconsistent")
    assert q.schema["volume"] == pl.Float64()
    assert store.quarantined_at([PAIR], "1Min", SAT, SAT + timedelta(hours=1)).height == 1
    assert store.quarantine().height == 0  # the stock quarantine holds none of it


def test_a_v5_store_upgrades_and_keeps_its_stock_bars_identical(
    engine: str, make_store: Callable[..., Store], store_target: str
) -> None:
    first = make_store()
    t0 = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    first.write_pages([stock_page(stock_bars(30), cover=(t0, t0 + timedelta(minutes=30)))])
    before = first.read_bars(["AAPL"], "1Min", t0, t0 + timedelta(hours=1))
    first.close()
    _make_v5(engine, store_target)

    upgraded = make_store()
    after = upgraded.read_bars(["AAPL"], "1Min", t0, t0 + timedelta(hours=1))
    assert after.equals(before) and after.schema["volume"] == pl.Int64()
    assert upgraded.coverage(["AAPL"], "1Min", t0, t0 + timedelta(hours=1)).height == 1
    assert upgraded.write_pages([crypto_page(crypto_bars())]) == [5]  # the new tables are there
    assert upgraded.read_bars([PAIR], "1Min", SAT, SAT + timedelta(hours=1))["volume"].to_list() == VOLUMES
    upgraded.close()
    assert _version(engine, store_target) == str(SCHEMA_VERSION)


def _make_v5(engine: str, target: str) -> None:
    """Turn the store back into what marketpipe with schema 5 left: no crypto tables, version 5."""
    names = ", ".join(t.name for t in (CRYPTO_TABLES.bars, CRYPTO_TABLES.quarantine, CRYPTO_TABLES.revisions))
    if engine == "duckdb":
        con = duckdb.connect(target)
        for name in names.split(", "):
            con.execute(f"DROP TABLE {name}")
        con.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
        con.close()
        return
    import psycopg

    with psycopg.connect(target, autocommit=True) as con:
        con.execute(f"DROP TABLE {names}")
        con.execute("DELETE FROM schema_migrations WHERE version >= 6")
        con.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")


def _version(engine: str, target: str) -> str:
    if engine == "duckdb":
        con = duckdb.connect(target, read_only=True)
        try:
            return str(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0])
        finally:
            con.close()
    import psycopg

    with psycopg.connect(target) as con:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return str(row[0]) if row else ""
