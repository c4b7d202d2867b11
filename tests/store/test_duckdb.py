from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from marketpipe.core.errors import StoreError
from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.validate import check_bars
from marketpipe.store.base import COUNTED, Coverage, IngestRecord, PageWrite, Store
from marketpipe.store.duckdb import DuckDBStore

T0 = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)


def bars(
    n: int, symbol: str = "AAPL", t0: datetime = T0, source: str = "sim", feed: str = "sip", close: float = 10.5
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": [symbol] * n,
            "timeframe": ["1Min"] * n,
            "ts": [t0 + timedelta(minutes=i) for i in range(n)],
            "open": [10.0] * n,
            "high": [11.0] * n,
            "low": [9.0] * n,
            "close": [close] * n,
            "volume": list(range(n)),
            "trade_count": [5] * n,
            "vwap": [10.2] * n,
            "source": [source] * n,
            "feed": [feed] * n,
            "fetched_at": [T0] * n,
        },
        schema=BAR_SCHEMA,
    )


def page(
    df: pl.DataFrame,
    *,
    cover: tuple[datetime, datetime] | None = None,
    quarantine: pl.DataFrame | None = None,
    symbol: str = "AAPL",
    source: str = "sim",
    feed: str = "sip",
) -> PageWrite:
    res = check_bars(df, timeframe=Timeframe.parse("1Min"), request_id="req")
    cov = []
    if cover:
        cov = [Coverage(symbol, "1Min", "alpaca", source, feed, cover[0], cover[1], df.height, "req", T0)]
    return PageWrite(
        bars=res.good,
        quarantine=quarantine if quarantine is not None else res.quarantine,
        coverage=cov,
        ingest=IngestRecord(
            "alpaca",
            source,
            feed,
            "bars",
            "1Min",
            [symbol],
            T0,
            T0 + timedelta(days=1),
            "req",
            1,
            T0,
            df.height,
            0,
            res.rejected,
        ),
    )


def test_round_trip_keeps_values_and_utc(store: Store) -> None:
    df = bars(10)
    assert store.write_pages([page(df)]) == [10]
    back = store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(hours=1))
    assert back.schema == pl.Schema(BAR_SCHEMA)
    assert back.equals(df)


def test_writes_are_idempotent(store: Store) -> None:
    df = bars(10)
    store.write_pages([page(df)])
    assert store.write_pages([page(df), page(bars(15))]) == [0, 5]
    assert store.counts()["bars"] == 15
    # raw data is never edited in place: a second delivery with other values does not overwrite
    store.write_pages([page(bars(10, close=99.0))])
    assert store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(hours=1))["close"].unique().to_list() == [10.5]


def test_pages_of_one_batch_that_share_bars_store_each_once(store: Store) -> None:
    # two pages written together overlap on minutes 5-9, none of them held before: each bar is stored
    # once and only the first page that carries it counts it (the fast bulk path must not double them)
    assert store.write_pages([page(bars(10)), page(bars(10, t0=T0 + timedelta(minutes=5)))]) == [10, 5]
    assert store.counts()["bars"] == 15
    back = store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(hours=1))
    assert back.height == 15 and back["ts"].is_unique().all()


def test_failed_transaction_leaves_nothing(store: Store) -> None:
    good = page(bars(5), cover=(T0, T0 + timedelta(minutes=5)))
    broken = page(bars(5, t0=T0 + timedelta(hours=1)))
    broken.quarantine = pl.DataFrame({"nonsense": [1]})  # wrong shape: the write must fail
    with pytest.raises(Exception):  # noqa: B017 - polars or store error, both fine; state is what matters
        store.write_pages([good, broken])
    assert store.counts() == dict.fromkeys(COUNTED, 0)


def test_coverage_and_ingest_log(store: Store) -> None:
    store.write_pages([page(bars(5), cover=(T0, T0 + timedelta(minutes=5)))])
    cov = store.coverage(["AAPL", "MSFT"], "1Min", T0 - timedelta(days=1), T0 + timedelta(days=1))
    assert cov.height == 1 and cov["start"][0] == T0 and cov["rows"][0] == 5
    log = store.ingest_log()
    assert log.height == 1 and log["rows_stored"][0] == 5


def test_quarantine_kept_with_reason(store: Store) -> None:
    df = bars(3).with_columns(volume=pl.Series([1, -5, 2]))
    store.write_pages([page(df)])
    q = store.quarantine("AAPL")
    assert q.height == 1 and q["reason"][0] == "negative_volume" and q["volume"][0] == -5


def test_read_prefers_sip_and_real_sources_when_variants_overlap(store: Store) -> None:
    store.write_pages([page(bars(3, feed="iex", close=9.5), cover=(T0, T0 + timedelta(minutes=3)), feed="iex")])
    store.write_pages([page(bars(3, close=10.5), cover=(T0, T0 + timedelta(minutes=3)))])
    both = store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(hours=1))
    assert both.height == 3 and both["feed"].unique().to_list() == ["sip"]
    iex = store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(hours=1), feed="iex")
    assert iex["close"].unique().to_list() == [9.5]


def test_multi_symbol_read_is_ordered(store: Store) -> None:
    store.write_pages([page(bars(3, "MSFT")), page(bars(3, "AAPL"))])
    df = store.read_bars(["MSFT", "AAPL"], "1Min", T0, T0 + timedelta(hours=1))
    assert df["symbol"].to_list() == ["AAPL"] * 3 + ["MSFT"] * 3


def test_second_process_gets_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "locked.duckdb"
    s = DuckDBStore(path)
    try:
        code = (
            "from marketpipe.store.duckdb import DuckDBStore\n"
            "from marketpipe.core.errors import StoreError\n"
            f"try:\n    DuckDBStore({str(path)!r})\nexcept StoreError as e:\n    print(e.code)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == StoreError.code
    finally:
        s.close()


def test_a_refresh_stores_revisions_as_newer_versions(store: Store) -> None:
    store.write_pages([page(bars(5))])
    later = T0 + timedelta(hours=1)
    again = page(bars(5, close=10.8).with_columns(fetched_at=pl.lit(later, BAR_SCHEMA["fetched_at"])))
    again.refresh = True
    assert store.write_pages([again]) == [5] and again.revised == 5
    span = (T0, T0 + timedelta(hours=1))
    assert store.read_bars(["AAPL"], "1Min", *span)["close"].unique().to_list() == [10.8]
    # naming the source and feed still reads one row per minute, the newest version
    named = store.read_bars(["AAPL"], "1Min", *span, source="sim", feed="sip")
    assert named.height == 5 and named["close"].unique().to_list() == [10.8]
    assert store.read_bars(["AAPL", "MSFT"], "1Min", *span, source="sim", feed="sip").height == 5
    rev = store.revisions("AAPL")
    assert rev.height == 5 and rev["old_close"].unique().to_list() == [10.5] and rev["new_close"][0] == 10.8
    same = page(bars(5, close=10.8))
    same.refresh = True
    assert store.write_pages([same]) == [0] and same.revised == 0  # nothing new: idempotent
    plain = page(bars(5, close=99.0))
    assert store.write_pages([plain]) == [0]  # without refresh a held key is skipped
    assert store.counts()["bars"] == 10 and store.summary()["bars"].to_list() == [10]


def test_the_audit_log_is_appended_and_read_newest_first(store: Store) -> None:
    rows = [
        {"occurred_at": T0 + timedelta(seconds=i), "actor": "admin", "address": "10.0.0.1",
         "action": f"POST /admin/{a}", "params": '{"provider":"polygon"}' if a == "failover" else None,
         "status": 200, "code": None, "request_id": f"r{i}"}
        for i, a in enumerate(["failover", "reconnect", "cache/invalidate"])
    ]  # fmt: skip
    for row in rows:
        store.log_admin_action(row)
    got = store.admin_actions(limit=2)
    assert got["action"].to_list() == ["POST /admin/cache/invalidate", "POST /admin/reconnect"]
    assert got["id"].to_list() == sorted(got["id"].to_list(), reverse=True)
    first = store.admin_actions()[-1].to_dicts()[0]
    assert {k: first[k] for k in rows[0]} == rows[0]


def test_distinct_keys_is_shown_only_when_no_two_rows_share_a_key() -> None:
    from marketpipe.store.duckdb import _distinct_keys

    a, b = bars(30), bars(30, "MSFT")
    later = bars(30, t0=T0 + timedelta(minutes=30))
    assert _distinct_keys(pl.concat([a, b, later]))  # AAPL's two runs span disjoint minutes
    assert _distinct_keys(pl.concat([a, bars(30, source="polygon")]))  # another source: another series
    assert not _distinct_keys(pl.concat([a, b, bars(5, t0=T0 + timedelta(minutes=29))]))  # minute 29 twice
    assert not _distinct_keys(pl.concat([a, a.slice(3, 1)]))
    assert not _distinct_keys(a.reverse())  # not shown (falling times), though distinct


def test_a_batch_writes_every_pages_ledger_and_log_rows_in_order(store: Store) -> None:
    pages = [
        page(
            bars(10, t0=T0 + timedelta(minutes=10 * i)),
            cover=(T0 + timedelta(minutes=10 * i), T0 + timedelta(minutes=10 * i + 10)),
        )
        for i in range(5)
    ]
    for i, p in enumerate(pages):
        p.ingest.page = i + 1
    assert store.write_pages(pages) == [10] * 5
    log = store.ingest_log()
    assert log["page"].to_list() == [5, 4, 3, 2, 1]  # newest first: the ids follow the pages' order
    assert log["rows_stored"].to_list() == [10] * 5
    cov = store.coverage(["AAPL"], "1Min", T0, T0 + timedelta(hours=1))
    assert cov.height == 5 and cov["rows"].sum() == 50
