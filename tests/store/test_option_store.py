"""Option chain history in the store, on both engines: snapshot rows as received (the vendor's greeks
and IV, or null with the reason; quote and trade times to the nanosecond), quarantined rows, idempotent
and all-or-nothing writes, filtered reads, and a store of schema v6 upgrading to hold them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import duckdb
import msgspec
import polars as pl
import pytest

from marketpipe.core.errors import StoreError
from marketpipe.core.options import GREEKS, GREEKS_NOT_SENT, OPTION_SNAPSHOT_SCHEMA
from marketpipe.core.tables import OPTION_QUARANTINE, OPTION_QUARANTINE_SCHEMA, OPTION_SNAPSHOTS, SCHEMA_VERSION
from marketpipe.quality.option_checks import split_checked
from marketpipe.store.base import OptionFilter, Store
from marketpipe.wire.alpaca_options import SnapshotsPage, snapshots_to_frame
from tests.store.test_crypto_bars import _version as stored_version

AS_OF = datetime(2026, 12, 7, 15, 0, 0, 250_000, tzinfo=UTC)
CALL, PUT, BARE = "SPY261218C00600000", "SPY261218P00600000", "SPY270115C00650000"
QUOTE_T = "2026-12-07T14:59:58.123456789Z"  # the vendor's nanoseconds, kept as sent

# One vendor page in Alpaca's wire format: a call with greeks and IV, a put whose quote is crossed
# (bid above ask: quarantined), a contract sent without greeks (null, with the reason).
PAGE = {
    "snapshots": {
        CALL: {
            "latestQuote": {"t": QUOTE_T, "bx": "C", "bp": 4.1, "bs": 12, "ax": "X", "ap": 4.3, "as": 9, "c": "A"},
            "latestTrade": {"t": "2026-12-07T14:58:01.000000001Z", "x": "C", "p": 4.2, "s": 1, "c": "I"},
            "greeks": {"delta": 0.51, "gamma": 0.021, "theta": -0.12, "vega": 0.33, "rho": 0.05},
            "impliedVolatility": 0.187,
        },
        PUT: {"latestQuote": {"t": QUOTE_T, "bx": "C", "bp": 5.2, "bs": 3, "ax": "C", "ap": 5.0, "as": 4, "c": "A"}},
        BARE: {"latestQuote": {"t": QUOTE_T, "bx": "N", "bp": 1.05, "bs": 20, "ax": "N", "ap": 1.15, "as": 25}},
    },
    "next_page_token": None,
}


def snapshot(as_of: datetime = AS_OF) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(served rows, quarantined rows with reasons and request id) of the page, as the service splits them."""
    page = msgspec.json.decode(msgspec.json.encode(PAGE), type=SnapshotsPage)
    frame = snapshots_to_frame(page.snapshots or {}, "SPY", as_of, "sim:alpaca", "opra", as_of)
    ok, bad = split_checked(frame)
    return ok, bad.with_columns(request_id=pl.lit("req-1")).select(list(OPTION_QUARANTINE_SCHEMA))


def test_a_snapshot_round_trips_as_received_with_its_nulls(store: Store) -> None:
    rows, bad = snapshot()
    assert store.write_option_snapshot(rows, bad) == (2, 1)
    back = store.read_option_snapshots(OptionFilter(underlying="SPY"))
    assert back.schema == pl.Schema(OPTION_SNAPSHOT_SCHEMA)
    assert back["contract"].to_list() == [CALL, BARE]  # by (contract, as_of)
    assert back.equals(rows.sort("contract", "as_of"))
    bare = back.row(by_predicate=pl.col("contract") == BARE, named=True)
    assert all(bare[g] is None for g in (*GREEKS, "implied_volatility"))
    assert bare["greeks_missing"] == GREEKS_NOT_SENT
    call = back.row(by_predicate=pl.col("contract") == CALL, named=True)
    assert call["delta"] == 0.51 and call["implied_volatility"] == 0.187 and call["greeks_missing"] is None
    assert back["quote_ts"].dt.nanosecond().to_list() == [123_456_789, 123_456_789]
    assert call["source"] == "sim:alpaca" and call["feed"] == "opra"

    held = store.option_quarantine()
    assert held.schema == pl.Schema(OPTION_QUARANTINE_SCHEMA)
    assert held["contract"].to_list() == [PUT] and held["request_id"].to_list() == ["req-1"]
    assert held["reasons"].to_list() == ["crossed_quote"]
    assert (held["bid_price"][0], held["ask_price"][0]) == (5.2, 5.0)  # as received, not corrected


def test_the_same_snapshot_written_twice_is_stored_once(store: Store) -> None:
    rows, bad = snapshot()
    assert store.write_option_snapshot(rows, bad) == (2, 1)
    assert store.write_option_snapshot(rows, bad) == (0, 0)
    doubled = pl.concat([rows, rows])  # a key repeated inside one write, too
    assert store.write_option_snapshot(doubled, pl.concat([bad, bad])) == (0, 0)
    assert store.read_option_snapshots().height == 2 and store.option_quarantine().height == 1
    later_rows, later_bad = snapshot(AS_OF + timedelta(minutes=5))  # the next snapshot is new rows
    assert store.write_option_snapshot(pl.concat([later_rows, later_rows]), later_bad) == (2, 1)
    assert store.read_option_snapshots().height == 4


def test_a_failing_snapshot_write_leaves_nothing(store: Store) -> None:
    rows, bad = snapshot()
    unlabelled = rows[:1].with_columns(source=pl.lit(None, pl.String), as_of=pl.lit(AS_OF + timedelta(seconds=1)))
    with pytest.raises(StoreError, match="nothing written"):  # a row without its source: refused by the table
        store.write_option_snapshot(pl.concat([rows, unlabelled]), bad)
    assert store.read_option_snapshots().height == 0
    assert store.option_quarantine().height == 0  # the quarantine rows of that write went too
    assert store.write_option_snapshot(rows, bad) == (2, 1)  # and the store still takes writes


def test_reads_filter_by_underlying_contract_time_type_and_expiration(store: Store) -> None:
    t1 = AS_OF + timedelta(minutes=5)
    for at in (AS_OF, t1):
        rows, bad = snapshot(at)
        store.write_option_snapshot(rows, bad)
    read = store.read_option_snapshots
    assert read(OptionFilter(underlying="QQQ")).height == 0
    assert read(OptionFilter(contracts=(BARE,)))["as_of"].to_list() == [AS_OF, t1]
    assert read(OptionFilter(start=t1)).height == 2 and read(OptionFilter(end=t1)).height == 2
    assert read(OptionFilter(start=AS_OF, end=t1))["as_of"].unique().to_list() == [AS_OF]
    assert set(read(OptionFilter(type="call"))["contract"]) == {CALL, BARE}
    assert set(read(OptionFilter(expiration=date(2027, 1, 15)))["contract"]) == {BARE}
    assert read(OptionFilter(type="put")).height == 0  # the put was quarantined, never stored as served
    held = store.option_quarantine(OptionFilter(underlying="SPY"), limit=1)
    assert held["as_of"].to_list() == [t1]  # newest first
    empty = read(OptionFilter(contracts=("SPY261218C00999000",)))
    assert empty.height == 0 and empty.schema == pl.Schema(OPTION_SNAPSHOT_SCHEMA)


def test_a_v6_store_upgrades_and_gains_the_option_tables(
    engine: str, make_store: Callable[..., Store], store_target: str
) -> None:
    make_store().close()
    _make_v6(engine, store_target)
    upgraded = make_store()
    rows, bad = snapshot()
    assert upgraded.write_option_snapshot(rows, bad) == (2, 1)
    assert upgraded.read_option_snapshots().height == 2
    upgraded.close()
    assert stored_version(engine, store_target) == str(SCHEMA_VERSION) == "7"


def _make_v6(engine: str, target: str) -> None:
    """Turn the store back into what marketpipe with schema 6 left: no option tables, version 6."""
    names = [OPTION_SNAPSHOTS.name, OPTION_QUARANTINE.name]
    if engine == "duckdb":
        con = duckdb.connect(target)
        for name in names:
            con.execute(f"DROP TABLE {name}")
        con.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
        con.close()
        return
    import psycopg

    with psycopg.connect(target, autocommit=True) as con:
        con.execute(f"DROP TABLE {', '.join(names)}")
        con.execute("DELETE FROM schema_migrations WHERE version >= 7")
        con.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")


def _drop_table(engine: str, target: str, store: Store, table: str) -> None:
    """Break a store under a running gateway, as an operator's mistake would (DuckDB: through the gateway's
    own connection, the one process that may hold the file)."""
    if engine == "duckdb":
        store.con.execute(f"DROP TABLE {table}")  # type: ignore[attr-defined]
    else:
        import psycopg

        with psycopg.connect(target, autocommit=True) as con:
            con.execute(f"DROP TABLE {table}")


def test_store_info_and_readiness_count_the_option_tables(
    make_store: Callable[..., Store], store_target: str, engine: str, sim: object
) -> None:
    """``counts()`` — what ``marketpipe store info`` prints and what ``/health/ready`` probes — covers the
    option tables: each snapshot row once however often it is written; an option table that cannot be read
    makes the store not ready."""
    import asyncio

    from marketpipe.api.app import create_app
    from tests.api.conftest import gateway_config
    from tests.api.test_hardening import SECRET_ENV, asgi, close
    from tests.cli.test_cli import run

    store = make_store()
    rows, bad = snapshot()
    assert store.write_option_snapshot(rows, bad) == (2, 1)
    assert store.write_option_snapshot(rows, bad) == (0, 0)
    counts = store.counts()
    assert (counts["option_snapshots"], counts["option_quarantine"]) == (2, 1)
    store.close()  # DuckDB: one process holds the file at a time
    info = run("store", "info", "--store", store_target)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "'option_snapshots': 2" in info.stdout and "'option_quarantine': 1" in info.stdout, info.stdout

    async def readiness() -> None:
        app = create_app(gateway_config(sim.url, store_target), env=SECRET_ENV)  # type: ignore[attr-defined, arg-type]
        try:
            async with asgi(app) as c:
                r = await c.get("/health/ready")
                assert r.status_code == 200 and r.json()["checks"]["store"] == "ok"
                _drop_table(engine, store_target, app.state.mp.data.store, "option_quarantine")
                r = await c.get("/health/ready")
                store_check = str(r.json()["checks"]["store"])
                assert r.status_code == 503 and store_check.startswith("STORE_ERROR")
                assert "option_quarantine" in store_check
        finally:
            await close(app)

    asyncio.run(readiness())
