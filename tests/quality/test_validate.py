from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.validate import check_bars

T0 = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)


def frame(n: int = 5, tf: str = "1Min", step: timedelta = timedelta(minutes=1), t0: datetime = T0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": ["AAPL"] * n,
            "timeframe": [tf] * n,
            "ts": [t0 + i * step for i in range(n)],
            "open": [10.0] * n,
            "high": [11.0] * n,
            "low": [9.0] * n,
            "close": [10.5] * n,
            "volume": [100] * n,
            "trade_count": [5] * n,
            "vwap": [10.2] * n,
            "source": ["sim"] * n,
            "feed": ["sip"] * n,
            "fetched_at": [T0] * n,
        },
        schema=BAR_SCHEMA,
    )


def run(df: pl.DataFrame, tf: str = "1Min", **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("start", T0 - timedelta(days=1))
    kw.setdefault("end", T0 + timedelta(days=30))
    return check_bars(df, timeframe=Timeframe.parse(tf), now=datetime(2030, 1, 1, tzinfo=UTC), request_id="r1", **kw)


def test_clean_frame_passes_untouched() -> None:
    df = frame()
    res = run(df)
    assert res.good.equals(df)
    assert res.quarantine.height == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"high": 8.0}, "ohlc_inconsistent"),
        ({"low": 10.8}, "ohlc_inconsistent"),
        ({"volume": -1}, "negative_volume"),
        ({"open": 0.0}, "nonpositive_price"),
        ({"close": -3.0}, "nonpositive_price"),
        ({"vwap": 12.0}, "vwap_out_of_range"),
        ({"trade_count": -2}, "negative_trade_count"),
        ({"close": None}, "missing_field"),
        ({"symbol": "aa pl"}, "bad_symbol"),
    ],
)
def test_each_rule_quarantines_with_reason(change: dict, reason: str) -> None:
    df = frame()
    bad = df.with_columns(
        **{k: pl.when(pl.int_range(pl.len()) == 2).then(pl.lit(v)).otherwise(pl.col(k)) for k, v in change.items()}
    )
    res = run(bad)
    assert res.good.height == 4
    assert res.quarantine.height == 1
    row = res.quarantine.row(0, named=True)
    assert reason in row["reason"].split(",")
    assert row["request_id"] == "r1"
    assert row["ts"] == T0 + timedelta(minutes=2)
    assert res.counts[reason] == 1


def test_misaligned_out_of_range_and_future() -> None:
    df = frame(3).with_columns(
        ts=pl.Series([T0 + timedelta(seconds=17), T0 - timedelta(days=2), T0 + timedelta(days=3)])
    )
    res = check_bars(
        df,
        timeframe=Timeframe.parse("1Min"),
        start=T0 - timedelta(days=1),
        end=T0 + timedelta(days=30),
        now=T0 + timedelta(days=1),
    )
    reasons = res.quarantine.get_column("reason").to_list()
    assert reasons == ["misaligned_ts", "out_of_range", "in_future"]


def test_duplicates_exact_keep_first_conflicting_quarantine_all() -> None:
    df = frame(3)
    exact = df.slice(1, 1)
    conflict = df.slice(2, 1).with_columns(close=pl.lit(10.9))
    res = run(pl.concat([df, exact, conflict]))
    assert res.good.get_column("ts").to_list() == [T0, T0 + timedelta(minutes=1)]
    reasons = sorted(res.quarantine.get_column("reason").to_list())
    assert reasons == ["duplicate", "duplicate_conflict", "duplicate_conflict"]


@pytest.mark.parametrize(
    ("tf", "ts", "ok"),
    [
        ("5Min", T0 + timedelta(minutes=5), True),
        ("5Min", T0 + timedelta(minutes=3), False),
        ("1Hour", datetime(2024, 3, 5, 15, tzinfo=UTC), True),
        ("1Hour", datetime(2024, 3, 5, 15, 30, tzinfo=UTC), False),
        ("1Day", datetime(2024, 3, 5, 5, tzinfo=UTC), True),  # winter: NY midnight = 05:00Z
        ("1Day", datetime(2024, 7, 5, 4, tzinfo=UTC), True),  # summer: 04:00Z
        ("1Day", datetime(2024, 7, 5, 5, tzinfo=UTC), False),
        ("1Week", datetime(2024, 3, 4, 5, tzinfo=UTC), True),  # a Monday
        ("1Week", datetime(2024, 3, 5, 5, tzinfo=UTC), False),
        ("1Month", datetime(2024, 3, 1, 5, tzinfo=UTC), True),
        ("1Month", datetime(2024, 3, 2, 5, tzinfo=UTC), False),
    ],
)
def test_alignment_by_timeframe(tf: str, ts: datetime, ok: bool) -> None:
    df = frame(1, tf).with_columns(ts=pl.Series([ts], dtype=pl.Datetime("us", "UTC")))
    res = check_bars(df, timeframe=Timeframe.parse(tf))
    assert (res.quarantine.height == 0) is ok


def test_unparsable_timestamp_is_kept_in_quarantine_with_raw_text() -> None:
    df = frame(2).with_columns(
        ts=pl.Series([T0, None], dtype=pl.Datetime("us", "UTC")), raw_ts=pl.Series(["a", "garbage"])
    )
    res = run(df)
    assert res.quarantine.height == 1
    assert res.quarantine.row(0, named=True)["raw_ts"] == "garbage"
    assert "bad_timestamp" in res.quarantine.row(0, named=True)["reason"]


def test_empty_frame() -> None:
    res = run(pl.DataFrame(schema=BAR_SCHEMA))
    assert res.good.height == 0 and res.quarantine.height == 0
