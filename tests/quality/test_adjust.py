"""Adjust-on-read on real simulator bars: the factor table from actions, its application in any row
order, stock dividends, impossible actions, and the adjustment parameter's strict parsing."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest

from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import actions_frame
from marketpipe.core.tables import QUARANTINE_SCHEMA
from marketpipe.quality.adjust import apply, factors, impossible, parse_adjustment, scale_steps
from marketpipe.sim.data import SimMarket
from marketpipe.store.base import Coverage, IngestRecord, PageWrite
from marketpipe.store.duckdb import DuckDBStore

MARKET = SimMarket()
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def acts(*rows: dict[str, object]) -> pl.DataFrame:
    base = {"provider": "alpaca", "source": "sim:alpaca", "symbol": "AAPL", "fetched_at": T0}
    return actions_frame([{**base, "vendor_id": str(i), "action_id": f"alpaca:{i}", **r} for i, r in enumerate(rows)])


def closes(start: str, end: str) -> pl.DataFrame:
    d = MARKET.canonical_bars("AAPL", "1Day", start, end)
    return d.select(pl.col("ts").dt.convert_time_zone("America/New_York").dt.date().alias("day"), "close")


def test_parse_adjustment() -> None:
    assert parse_adjustment("raw") == frozenset() and parse_adjustment(None) == frozenset()
    every = frozenset({"split", "dividend", "spin-off"})
    assert parse_adjustment("all") == parse_adjustment("split,dividend,spin-off") == every
    assert parse_adjustment("split,dividend") == frozenset({"split", "dividend"})
    assert parse_adjustment("spin-off") == frozenset({"spin-off"})
    assert parse_adjustment("raw,split") == frozenset({"split"})  # raw adds nothing, as at the vendor
    for bad in ("both", "", "split,", "split,split", "SPLIT", "spinoff", "spin_off", "spin-off,spin-off"):
        with pytest.raises(InvalidArgument) as err:
            parse_adjustment(bad)
        assert err.value.details["parameter"] == "adjustment"


def test_factor_table_split_stock_dividend_and_cash_dividend() -> None:
    a = acts(
        {"type": "forward_split", "ex_date": "2020-08-31", "old_rate": 1.0, "new_rate": 4.0},
        {"type": "stock_dividend", "ex_date": "2020-10-01", "rate": 0.05},
        {"type": "cash_dividend", "ex_date": "2020-11-06", "cash_amount": 0.205},
        {"type": "name_change", "process_date": "2020-12-01", "new_symbol": "AAPL2"},  # listed, not applied
    )
    c = closes("2020-08-01", "2020-11-30T23:00:00Z")
    f = factors(a, c, frozenset({"split", "dividend"}))
    prev = c.filter(pl.col("day") == date(2020, 11, 5))["close"][0]
    assert f.applied["type"].to_list() == ["forward_split", "stock_dividend", "cash_dividend"]
    rows = f.table.rows()
    assert [r[0] for r in rows] == [date(2020, 8, 31), date(2020, 10, 1), date(2020, 11, 6)]
    d = (prev - 0.205) / prev
    assert rows[2][1:] == pytest.approx((d, 1.0))
    assert rows[1][1:] == pytest.approx((d / 1.05, 1.05))
    assert rows[0][1:] == pytest.approx((d / 1.05 / 4, 1.05 * 4))
    only_splits = factors(a, c, frozenset({"split"}))
    assert only_splits.applied["type"].to_list() == ["forward_split", "stock_dividend"]


def ge_closes(symbol: str, start: str, end: str) -> pl.DataFrame:
    d = MARKET.canonical_bars(symbol, "1Day", start, end)
    day = pl.col("ts").dt.convert_time_zone("America/New_York").dt.date().alias("day")
    return d.select(pl.lit(symbol).alias("symbol"), day, "close")


def test_spin_off_factor_uses_the_new_lines_close_on_the_ex_date() -> None:
    """GE's spin-off of GE HealthCare (1 GEHC per 3 GE, ex 2023-01-04): f = 1 - (1/3 x P_GEHC(ex)) / C_prev,
    both raw closes; without the new line's close it is skipped with the reason, not priced."""
    spin = {"type": "spin_off", "symbol": "GE", "ex_date": "2023-01-04", "old_rate": 3.0, "new_rate": 1.0,
            "new_symbol": "GEHC"}  # fmt: skip
    a = acts(spin).with_columns(pl.lit("GE").alias("symbol"))
    own = ge_closes("GE", "2022-12-20", "2023-01-03T23:00:00Z").drop("symbol")
    new = ge_closes("GEHC", "2023-01-04", "2023-01-04T23:00:00Z")
    assert new.height == 1 and MARKET.canonical_bars("GEHC", "1Day", "2022-12-01", "2023-01-03").height == 0
    f = factors(a, own, frozenset({"spin-off"}), new)
    c_prev, p_new = own["close"][-1], new["close"][0]
    assert f.table.rows() == [(date(2023, 1, 4), pytest.approx(1 - (p_new / 3) / c_prev), 1.0)]
    assert f.applied["type"].to_list() == ["spin_off"] and f.skipped.height == 0
    assert factors(a, own, frozenset({"split", "dividend"}), new).table.height == 0  # not asked for: not applied
    none = factors(a, own, frozenset({"spin-off"}), new.clear())
    assert none.table.height == 0 and none.applied.height == 0
    assert none.skipped.select("type", "ex_date", "reason").rows() == [
        ("spin_off", date(2023, 1, 4), "no raw close of the new line GEHC on the ex-date")
    ]
    no_ratio = factors(acts({**spin, "old_rate": None}).with_columns(pl.lit("GE").alias("symbol")), own,
                       frozenset({"spin-off"}), new)  # fmt: skip
    assert no_ratio.skipped["reason"].to_list() == ["spin-off without a ratio or a new symbol"]
    worth_more = factors(a, own, frozenset({"spin-off"}), new.with_columns(pl.col("close") * 1000))
    assert worth_more.skipped["reason"].to_list() == ["spin-off value >= previous close"]
    assert impossible(acts({**spin, "old_rate": 0.0}))["reason"].to_list() == ["spin-off ratio <= 0"]


def test_apply_is_the_same_in_any_row_order() -> None:
    bars = MARKET.canonical_bars("AAPL", "1Day", "2020-08-03", "2020-09-30T23:00:00Z")
    f = factors(acts({"type": "forward_split", "ex_date": "2020-08-31", "old_rate": 1.0, "new_rate": 4.0}),
                closes("2020-08-01", "2020-09-30"), frozenset({"split"}))  # fmt: skip
    fwd = apply(bars, f.table)
    back = apply(bars.reverse(), f.table).reverse()
    assert fwd.equals(back)
    day = bars["ts"].dt.convert_time_zone("America/New_York").dt.date()
    before = (day < date(2020, 8, 31)).to_numpy()
    np.testing.assert_allclose(fwd["close"].to_numpy()[before], bars["close"].to_numpy()[before] / 4, rtol=1e-15)
    assert (fwd["close"].to_numpy()[~before] == bars["close"].to_numpy()[~before]).all()
    assert fwd["volume"].to_list()[:3] == [v * 4 for v in bars["volume"].to_list()[:3]]
    assert fwd.columns == bars.columns and fwd.schema == bars.schema


def test_impossible_actions_are_named() -> None:
    a = acts(
        {"type": "forward_split", "ex_date": "2020-08-31", "old_rate": 1.0, "new_rate": 0.0},
        {"type": "cash_dividend", "ex_date": "2020-11-06", "cash_amount": -1.0},
        {"type": "cash_dividend", "ex_date": "2020-11-07"},
        {"type": "forward_split", "old_rate": 1.0, "new_rate": 2.0},
    )
    assert impossible(a).select("action_id", "reason").rows() == [
        ("alpaca:0", "split ratio <= 0"),
        ("alpaca:1", "negative cash amount"),
        ("alpaca:2", "cash dividend without an amount"),
        ("alpaca:3", "no ex, effective or process date"),
    ]
    f = factors(a, closes("2020-08-01", "2020-11-30"), frozenset({"split", "dividend"}))
    assert f.table.height == 0 and f.skipped.height == 4


def test_the_store_scales_while_it_reads_exactly_as_apply_does(tmp_path: Path) -> None:
    """DuckDB's ``read_bars_scaled`` (factors in the query) gives the very frame ``apply`` gives from the
    raw read: the same doubles, the same whole-share volumes (a 1:3 reverse split between two forward
    ones makes fractional ones to round), nulls kept."""
    bars = MARKET.canonical_bars("AAPL", "1Min", "2020-08-27", "2020-09-02T23:00:00Z").with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 0).then(None).otherwise(pl.col("vwap")).alias("vwap"),
        pl.when(pl.int_range(pl.len()) % 89 == 0).then(None).otherwise(pl.col("volume")).alias("volume"),
    )
    s, e = bars["ts"].min(), bars["ts"].max() + timedelta(minutes=1)
    store = DuckDBStore(tmp_path / "s.duckdb")
    try:
        cov = Coverage("AAPL", "1Min", "alpaca", "sim:alpaca", "sip", s, e, bars.height, "t", T0)
        ing = IngestRecord("alpaca", "sim:alpaca", "sip", "bars", "1Min", ["AAPL"], s, e, "t", 1, T0, bars.height)
        store.write_pages([PageWrite(bars, pl.DataFrame(schema=QUARANTINE_SCHEMA), [cov], ing)])
        a = acts(
            {"type": "forward_split", "ex_date": "2020-08-31", "old_rate": 1.0, "new_rate": 4.0},
            {"type": "reverse_split", "ex_date": "2020-09-01", "old_rate": 3.0, "new_rate": 1.0},
            {"type": "forward_split", "ex_date": "2020-09-02", "old_rate": 1.0, "new_rate": 2.0},
        )
        table = factors(a, closes("2020-08-01", "2020-09-30"), frozenset({"split"})).table
        raw = store.read_bars(["AAPL"], "1Min", s, e)
        want = apply(raw, table)
        got = store.read_bars_scaled("AAPL", "1Min", s, e, scale_steps(table))
        assert got.equals(want) and got.schema == raw.schema
        assert got["volume"].null_count() == raw["volume"].null_count() > 0
        assert not got.equals(raw)
        # a read of part of the range meets only the steps inside it and the first after it: the same
        # frame apply gives, whether it ends before an edge, straddles one, begins at one or lies past all
        ny = "America/New_York"
        edge = datetime(2020, 9, 1, tzinfo=ZoneInfo(ny)).astimezone(UTC)
        for lo, hi in (
            (s, edge - timedelta(hours=8)),
            (edge - timedelta(hours=8), edge + timedelta(hours=20)),
            (edge, edge + timedelta(hours=20)),
            (datetime(2020, 9, 2, 13, tzinfo=UTC), e),
        ):
            part = store.read_bars_scaled("AAPL", "1Min", lo, hi, scale_steps(table))
            assert part.height and part.equals(apply(store.read_bars(["AAPL"], "1Min", lo, hi), table)), (lo, hi)
    finally:
        store.close()
