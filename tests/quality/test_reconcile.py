from datetime import UTC, datetime, timedelta

import polars as pl

from marketpipe.quality.reconcile import Thresholds, reconcile

TS = [datetime(2024, 3, 5, 14, 30, tzinfo=UTC) + timedelta(minutes=i) for i in range(6)]


def bars(close: list[float], volume: list[int] | None = None, ts: list[datetime] = TS) -> pl.DataFrame:
    n = len(close)
    return pl.DataFrame(
        {
            "symbol": ["A"] * n,
            "ts": ts[:n],
            "open": close,
            "high": [c * 1.01 for c in close],
            "low": [c * 0.99 for c in close],
            "close": close,
            "volume": volume or [1000] * n,
        },
    )


def test_levels_and_one_sided_bars() -> None:
    ref = bars([100.0] * 5)
    other = bars([100.0, 100.05, 100.5, 102.0, 106.0]).slice(1, 4)
    other = pl.concat([other, bars([100.0], ts=[TS[5]])])
    r = reconcile(ref, other, reference_name="a", other_name="b", timeframe="1Min")
    assert r.rows["status"].to_list() == ["only_reference", "match", "minor", "warn", "mismatch", "only_other"]
    assert r.counts["mismatch"] == 1 and r.counts["only_reference"] == 1 and r.counts["only_other"] == 1
    assert r.mismatches["worst_field"].to_list()[0] in ("open", "high", "low", "close")  # all moved by 6 %


def test_identical_sources_have_no_findings() -> None:
    r = reconcile(bars([100.0, 101.0]), bars([100.0, 101.0]), reference_name="a", other_name="b", timeframe="1Min")
    assert set(r.rows["status"]) == {"match"} and r.counts["volume_flagged"] == 0


def test_partial_volume_is_flagged_not_a_price_mismatch() -> None:
    r = reconcile(
        bars([100.0] * 3), bars([100.0] * 3, [25, 25, 25]), reference_name="a", other_name="b", timeframe="1Min"
    )
    assert set(r.rows["status"]) == {"match"}
    assert r.counts["volume_flagged"] == 3 and r.rows["volume_ratio"][0] == 0.025


def test_custom_hard_threshold() -> None:
    r = reconcile(
        bars([100.0]),
        bars([102.0]),
        reference_name="a",
        other_name="b",
        timeframe="1Min",
        thresholds=Thresholds(hard_pct=1.5),
    )
    assert r.rows["status"].to_list() == ["mismatch"]
