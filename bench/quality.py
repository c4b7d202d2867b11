"""Data-quality benchmark: completeness + anomalies + score, marketpipe vs a home-grown pandas script.

    ./dev bench quality [--years 10] [--symbols 500] [--repeat 5]

Two workloads, both built from the simulator's deterministic market (no network):

(1) one symbol, ``--years`` of 1-minute bars (~98k bars a year): the shape of an intraday research set;
(2) ``--symbols`` symbols x 1 year of daily bars: the shape of a universe screen.

For each, the same three checks are timed on bars already in memory:

* marketpipe: ``expected_stamps`` + ``assess`` (calendar completeness with the ledger), ``detect``
  (every anomaly rule), ``score_days`` + ``summarize``;
* the peer: what a user without marketpipe writes with pandas and exchange-calendars — expected
  minutes per session from the schedule, ``isin`` for presence, rolling/EWM return z-scores, jumps,
  split ratios, frozen runs, volume outliers, zero-volume moves, a per-day score.

Then the end-to-end service path (read from DuckDB + the checks + storing findings and scores) is
timed on the same data. Rows/s is bars checked per second; the best of ``--repeat`` runs is shown.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


# --- marketpipe --------------------------------------------------------------------------------------


def marketpipe_checks(frame: pl.DataFrame, tf_text: str, start: datetime, end: datetime) -> dict[str, Any]:
    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.config import QualityConfig
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.quality.anomaly import SEVERITY_WEIGHT, detect
    from marketpipe.quality.completeness import assess_frames
    from marketpipe.quality.score import score_days, summarize_many
    from marketpipe.service.quality import period_expr

    cal, tf, cfg = get_calendar(), Timeframe.parse(tf_text), QualityConfig()
    symbols = frame.get_column("symbol").unique(maintain_order=True).to_list()
    none = pl.DataFrame(
        schema={"symbol": pl.String(), "start": pl.Datetime("us", "UTC"), "end": pl.Datetime("us", "UTC")}
    )
    comps = assess_frames(symbols, tf, cal, start, end, frame, none)
    findings = detect(frame, tf, cfg.anomaly)
    day = period_expr(tf, cal.tz).alias("day")
    anomalous = findings.group_by("symbol", day).agg(
        anomalies=pl.len().cast(pl.Int64),
        weighted=(pl.col("bars") * pl.col("severity").replace_strict(SEVERITY_WEIGHT, default=0.0)).sum(),
    )
    empty = pl.DataFrame(schema={"symbol": pl.String(), "day": pl.Date(), "x": pl.Float64()})
    scored = score_days(
        comps.days,
        quarantined=empty.rename({"x": "quarantined"}),
        anomalous=anomalous,
        timeliness=empty.rename({"x": "timeliness"}),
        consistency=empty.rename({"x": "consistency"}),
        weights=cfg.weights,
    )
    scores = [s["score"] for s in summarize_many(scored).values()]
    return {"findings": findings.height, "score": float(np.mean(scores))}


# --- the peer: a careful home-grown pandas version of the same checks ---------------------------------


def pandas_checks(frame: pd.DataFrame, tf_text: str, start: datetime, end: datetime) -> dict[str, Any]:
    import exchange_calendars as xc

    cal = xc.get_calendar("XNYS", start="2000-01-01")
    sched = cal.schedule.loc[start.date().isoformat() : (end - timedelta(days=1)).date().isoformat()]
    daily = tf_text == "1Day"
    if daily:
        expected = pd.DatetimeIndex(sched.index).tz_localize("America/New_York").tz_convert("UTC")
    else:
        expected = pd.DatetimeIndex(
            np.concatenate(
                [
                    pd.date_range(o, c, freq="1min", inclusive="left").values
                    for o, c in zip(sched["open"], sched["close"], strict=True)
                ]
            )
        ).tz_localize("UTC")
    findings = 0
    scores = []
    for _sym, g in frame.groupby("symbol", sort=False):
        g = g.sort_values("ts")
        present = expected.isin(g["ts"])
        completeness = present.mean()
        close = g["close"]
        days = g["ts"].dt.tz_convert("America/New_York").dt.date
        # Same rule as marketpipe: intraday, a session's first bar is measured from its own open.
        base = close.shift().where(days == days.shift(), g["open"]) if not daily else close.shift()
        r = np.log(close / base)
        sigma = r.shift().ewm(span=100, adjust=False, min_periods=30).std()
        z = (r / sigma).abs()
        jump = r.abs() >= np.log1p(0.20)
        r_next = r.shift(-1)
        spike = ((z >= 10) | jump) & ((r + r_next).abs() < 0.5 * r.abs())
        ratio = close.shift() / g["open"]
        split = pd.Series(False, index=g.index)
        for k in (2.0, 3.0, 4.0, 5.0, 10.0, 1.5):
            split |= ((ratio / k - 1).abs() <= 0.02) | ((ratio * k - 1).abs() <= 0.02)
        split &= np.log(ratio).abs() >= np.log1p(0.3)
        flat = (g["high"] == g["low"]) & (g["open"] == close)
        run = (flat & ~(flat.shift(fill_value=False) & (close == close.shift()))).cumsum()
        run_len = flat.groupby(run).transform("sum")
        run_start = flat & ~(flat.shift(fill_value=False) & (close == close.shift()))
        frozen = run_start & (run_len >= (15 if not daily else 3))
        vol_base = g["volume"].astype(float).shift().ewm(span=100, adjust=False, min_periods=5).mean()
        vol_out = (g["volume"] >= 100) & (g["volume"] >= 25 * vol_base)
        zero_move = (g["volume"] == 0) & ~(flat & (close == close.shift()))
        bad = (z >= 10) | jump | split | frozen | vol_out | zero_move | spike
        findings += int(bad.sum())
        per_day = pd.DataFrame({"day": days, "bad": bad}).groupby("day")["bad"].sum()
        validity = (1 - per_day / g.groupby(days).size()).mean()
        scores.append((0.4 * validity + 0.3 * completeness) / 0.7)
    return {"findings": findings, "score": float(np.mean(scores))}


# --- end to end through the service -----------------------------------------------------------------


def service_path(frame: pl.DataFrame, tf_text: str, start: datetime, end: datetime, path: Path) -> Callable[[], Any]:
    from marketpipe.core.calendar import get_calendar
    from marketpipe.service.quality import analyze
    from marketpipe.store.base import Coverage, IngestRecord, PageWrite
    from marketpipe.store.duckdb import DuckDBStore

    store = DuckDBStore(path)
    now = datetime.now(UTC)
    syms = frame["symbol"].unique(maintain_order=True).to_list()
    store.write_pages(
        [
            PageWrite(
                bars=frame,
                quarantine=pl.DataFrame(),
                coverage=[
                    Coverage(s, tf_text, "alpaca", "sim:alpaca", "sip", start, end, 0, "bench", now) for s in syms
                ],
                ingest=IngestRecord(
                    "alpaca", "sim:alpaca", "sip", "bars", tf_text, syms, start, end, "bench", 1, now, frame.height
                ),
            )
        ]
    )
    cal = get_calendar()
    return lambda: analyze(store, cal, syms, tf_text, start, end, now=now, raise_events=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--years", type=int, default=10)
    ap.add_argument("--symbols", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from marketpipe.core.timeutil import parse_range
    from marketpipe.sim.data import SimMarket

    market = SimMarket(cache_mb=64)
    last = 2025
    workloads = []
    t = time.perf_counter()
    s1, e1 = parse_range(f"{last - args.years + 1}-01-01", f"{last}-12-31")
    intraday = pl.concat(
        [
            market.canonical_bars("AAPL", "1Min", f"{y}-01-01", f"{y}-12-31")
            for y in range(last - args.years + 1, last + 1)
        ]
    )
    workloads.append((f"1 symbol x {args.years}y 1Min", intraday, "1Min", s1, e1))
    s2, e2 = parse_range(f"{last}-01-01", f"{last}-12-31")
    names = [f"S{chr(65 + i // 676 % 26)}{chr(65 + i // 26 % 26)}{chr(65 + i % 26)}" for i in range(args.symbols)]
    universe = pl.concat([market.canonical_bars(s, "1Day", s2.date(), e2.date()) for s in names])
    workloads.append((f"{args.symbols} symbols x 1y 1Day", universe, "1Day", s2, e2))
    print(f"data built in {time.perf_counter() - t:.1f}s (simulator, in memory)\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, frame, tf, s, e) in enumerate(workloads):
            pdf = frame.select("symbol", "ts", "open", "high", "low", "close", "volume").to_pandas()
            marketpipe_checks(frame, tf, s, e)  # warm-up: calendar arrays, polars kernels
            t_mp, r_mp = best(functools.partial(marketpipe_checks, frame, tf, s, e), args.repeat)
            t_pd, r_pd = best(functools.partial(pandas_checks, pdf, tf, s, e), max(1, args.repeat // 2))
            svc = service_path(frame, tf, s, e, Path(tmp) / f"q{i}.duckdb")
            svc()
            t_svc, _ = best(svc, args.repeat)
            n = frame.height
            rows.append((name, n, t_mp, t_pd, t_svc, r_mp, r_pd))

    print(
        f"{'workload':<28}{'bars':>11}{'marketpipe':>12}{'rows/s':>13}{'pandas':>10}{'rows/s':>13}{'ratio':>8}"
        f"{'service e2e':>13}{'rows/s':>13}"
    )
    for name, n, t_mp, t_pd, t_svc, _r_mp, _r_pd in rows:
        print(
            f"{name:<28}{n:>11,}{t_mp:>11.3f}s{n / t_mp:>13,.0f}{t_pd:>9.3f}s{n / t_pd:>13,.0f}{t_pd / t_mp:>7.1f}x"
            f"{t_svc:>12.3f}s{n / t_svc:>13,.0f}"
        )
    print(
        "\nfindings (marketpipe / pandas, same rules): "
        + "; ".join(f"{name}: {r_mp['findings']} / {r_pd['findings']}" for name, _n, _a, _b, _c, r_mp, r_pd in rows)
    )
    print("target: >= 5,000,000 rows/s for the checks (marketpipe column)")


if __name__ == "__main__":
    main()
