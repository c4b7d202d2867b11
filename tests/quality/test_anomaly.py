"""Anomaly rules on real simulator series: silent on clean data, exact on each planted defect."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from marketpipe.core.config import AnomalyConfig
from marketpipe.core.timeframe import DAY1
from marketpipe.core.timeutil import NY
from marketpipe.quality.anomaly import detect
from marketpipe.quality.validate import check_bars
from marketpipe.sim.data import SimMarket

MARKET = SimMarket()


def frame(symbol: str, tf: str, start: str, end: str) -> pl.DataFrame:
    return MARKET.canonical_bars(symbol, tf, start, end)


def plant(f: pl.DataFrame, i: int, **cols: float) -> pl.DataFrame:
    out = {c: f[c].to_numpy().copy() for c in ("open", "high", "low", "close", "volume")}
    for c, v in cols.items():
        out[c][i] = v
    out["high"][i] = max(out["high"][i], out["open"][i], out["close"][i])
    out["low"][i] = min(out["low"][i], out["open"][i], out["close"][i])
    return f.with_columns(**{c: pl.Series(v) for c, v in out.items()})


@pytest.mark.parametrize(
    ("tf", "start", "end"),
    [
        ("1Min", "2024-01-01", "2024-04-30"),
        ("1Day", "2020-01-01", "2024-12-31"),
        ("5Min", "2024-01-01", "2024-06-30"),
        ("1Hour", "2023-01-01", "2024-12-31"),
    ],
)
def test_clean_series_raise_nothing(tf: str, start: str, end: str) -> None:
    """Nothing but the real splits: raw bars jump at AAPL's 4:1 (2020-08-31) and TSLA's 3:1 (2022-08-25),
    which the rule reports (the quality service explains them with the stored actions)."""
    f = pl.concat([frame(s, tf, start, end) for s in ("AAPL", "MSFT", "SPY", "TSLA", "KO")])
    found = detect(f, tf)
    real = {("AAPL", "2020-08-31"), ("TSLA", "2022-08-25")} if tf == "1Day" else set()
    got = {(r["symbol"], str(r["ts"].astimezone(NY).date())) for r in found.iter_rows(named=True)}
    assert got == real and set(found["kind"]) <= {"split_like"}, found.head(10)


def test_each_rule_on_daily_bars() -> None:
    f = frame("AAPL", "1Day", "2020-01-01", "2024-12-31")
    c = f["close"].to_numpy()
    v = f["volume"].to_numpy()
    g = plant(f, 300, close=c[300] * 1.6)  # bad tick, reverts next day
    level = np.where(np.arange(g.height) >= 600, 0.7, 1.0)  # a 30 % drop that stays: a jump, not a spike
    g = g.with_columns(*(pl.col(k) * level for k in ("open", "high", "low", "close", "vwap")))
    g = plant(g, 800, volume=float(v[800] * 60))
    g = plant(g, 900, volume=0.0)
    prices = {k: g[k].to_numpy().copy() for k in ("open", "high", "low", "close")}
    for k in prices:  # an unadjusted 3:1 split before bar 1000
        prices[k][:1000] *= 3
    p = prices["close"][1099]
    for k in prices:
        prices[k][1100:1105] = p  # five single-price days at one level
    g = g.with_columns(**{k: pl.Series(x) for k, x in prices.items()}).with_columns(vwap=pl.col("close"))
    assert check_bars(g, timeframe=DAY1).rejected == 0
    found = detect(g, "1Day").with_row_index()
    ts = g["ts"]
    got = {(r["kind"], ts.to_list().index(r["ts"])) for r in found.iter_rows(named=True)}
    assert got == {
        ("spike", 300),
        ("jump", 600),
        ("volume_outlier", 800),
        ("zero_volume_move", 900),
        ("split_like", 1000),
        ("frozen", 1100),
        ("split_like", 167),  # AAPL's real 4:1 split of 2020-08-31 in the raw bars
    }
    frozen = found.filter(pl.col("kind") == "frozen").row(0, named=True)
    assert frozen["bars"] >= 5 and frozen["severity"] == "medium"


def test_thresholds_come_from_the_config() -> None:
    f = frame("MSFT", "1Min", "2024-03-04", "2024-03-08")
    c = f["close"].to_numpy()
    g = plant(f, 1000, close=c[1000] * 1.05)  # 5 %: an outlier for a minute series, under the jump threshold
    assert detect(g, "1Min").select("kind", "severity").rows() == [("spike", "medium")]
    assert detect(g, "1Min", AnomalyConfig(z_threshold=1e6, z_high=1e6, jump_pct=50)).height == 0
    assert detect(g, "1Min", AnomalyConfig(jump_pct=4)).select("kind", "severity").rows() == [("spike", "high")]


def test_overnight_moves_are_not_minute_outliers_but_splits_across_the_night_are_found() -> None:
    f = frame("SPY", "1Min", "2024-03-04", "2024-03-08")
    day = f["ts"].dt.convert_time_zone("America/New_York").dt.date()
    first_wed = int(np.flatnonzero((day == day.unique().sort()[2]).to_numpy())[0])
    factor = np.where(np.arange(f.height) < first_wed, 2.0, 1.0)
    g = f.with_columns(*(pl.col(k) * factor for k in ("open", "high", "low", "close", "vwap")))
    found = detect(g, "1Min")
    assert found.select("kind").to_series().to_list() == ["split_like"]
    assert found["ts"].item() == f["ts"][first_wed]


def test_tiny_and_empty_frames() -> None:
    f = frame("AAPL", "1Min", "2024-03-04", "2024-03-04")
    assert detect(f.head(0), "1Min").height == 0
    assert detect(f.head(1), "1Min").height == 0


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="on_high"):
        AnomalyConfig(on_high="delete")
    with pytest.raises(ValueError, match="z_threshold"):
        AnomalyConfig(z_threshold=5, z_high=3)
