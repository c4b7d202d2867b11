"""Adjust-on-read benchmark: reading ``--years`` of 1-minute bars of one symbol from the store,
raw vs ``adjustment=all`` (splits and cash dividends applied on read).

    ./dev bench adjust [--years 10] [--repeat 3] [--quick]

The store is built from the simulator's deterministic market (no network): AAPL's 1-minute and daily
bars and its real corporate actions (the 4:1 split of 2020-08-31 and 28 quarterly dividends, as the
simulator's Alpaca face lists them), written with their ledgers. Both reads go through
``MarketData.bars(..., fetch=False)``: the raw read is the store read; the adjusted one adds the actions
read, the raw daily closes before each dividend, the factor table, and the store's read with the factors
applied in the query. The factor table is kept in-process behind the store's fingerprint of what it came
from (``Actions.plan``), so a repeated adjusted read costs that one fingerprint query more than the raw
one; the "first" line is an adjusted read with nothing kept (``Actions.forget`` before each run: the
actions, the closes and the factors computed again). The target (issue 14): adjusted (repeated) at most
1.2x raw. Times are min / median / max over ``--repeat`` runs, raw and adjusted interleaved.
``--quick``: 2 years, well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl

from marketpipe.core.config import Config
from marketpipe.core.schema import actions_frame
from marketpipe.core.tables import QUARANTINE_SCHEMA
from marketpipe.service.data import MarketData
from marketpipe.sim.alpaca_actions import record
from marketpipe.sim.data import SimMarket
from marketpipe.store.base import ActionCoverage, Coverage, IngestRecord, PageWrite
from marketpipe.store.duckdb import DuckDBStore
from marketpipe.wire.alpaca_actions import to_action

SYMBOL = "AAPL"
END = datetime(2025, 12, 31, 5, tzinfo=UTC)


def build(path: Path, years: int) -> tuple[datetime, datetime]:
    market = SimMarket()
    start = END - timedelta(days=365 * years)
    now = datetime.now(UTC)
    store = DuckDBStore(path)
    try:
        for tf in ("1Day", "1Min"):
            # a year a page: bounded memory whatever --years is
            lo = start - timedelta(days=30 if tf == "1Day" else 0)
            while lo < END:
                hi = min(lo + timedelta(days=365), END)
                bars = market.canonical_bars(SYMBOL, tf, lo, hi - timedelta(microseconds=1), fetched_at=now)
                cov = Coverage(SYMBOL, tf, "alpaca", "sim:alpaca", "sip", lo, hi, bars.height, "bench", now)
                ing = IngestRecord("alpaca", "sim:alpaca", "sip", "bars", tf, [SYMBOL], lo, hi, "bench", 1, now,
                                   bars.height)  # fmt: skip
                store.write_pages([PageWrite(bars, pl.DataFrame(schema=QUARANTINE_SCHEMA), [cov], ing)])
                lo = hi
        rows = [to_action(*record(a), source="sim:alpaca", fetched_at=now) for a in market.actions.of(SYMBOL)]
        first = start.date()
        store.write_actions(
            actions_frame(rows),
            [ActionCoverage(SYMBOL, "alpaca", "sim:alpaca", first, date.today(), len(rows), "bench", now)],
        )
    finally:
        store.close()
    return start, END


def timed(md: MarketData, start: datetime, end: datetime, adjustment: str) -> tuple[float, int]:
    t = time.perf_counter()
    frame = asyncio.run(md.bars(SYMBOL, start, end, timeframe="1Min", fetch=False, adjustment=adjustment))
    return time.perf_counter() - t, frame.height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--years", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 years (unless --years is given): a short run")
    args = ap.parse_args()
    if args.quick and args.years == 10:
        args.years = 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adjust.duckdb"
        t0 = time.perf_counter()
        start, end = build(path, args.years)
        print(f"store built in {time.perf_counter() - t0:.1f} s ({args.years}y of {SYMBOL} 1Min + 1Day + actions)")
        cfg = Config()
        cfg.store.path = str(path)
        cfg.store.read_cache_mb = 0  # the store's read L1 off: both reads go to DuckDB every time
        md = MarketData(cfg)
        try:
            timed(md, start, end, "all")  # warm: the file's pages, the import of everything
            runs: dict[str, list[float]] = {"raw": [], "all": [], "first": []}
            rows = 0
            for _ in range(args.repeat):
                for adj in ("raw", "all"):
                    secs, rows = timed(md, start, end, adj)
                    runs[adj].append(secs)
                md.actions.forget()
                runs["first"].append(timed(md, start, end, "all")[0])
        finally:
            asyncio.run(md.aclose())
    print(f"{SYMBOL} {args.years}y 1Min: {rows:,} bars, {args.repeat} runs each")
    print(f"{'read':<17}{'min s':>10}{'median s':>10}{'max s':>10}")
    for adj, label in (("raw", "raw"), ("all", "adjustment=all"), ("first", "all, first read")):
        xs = runs[adj]
        print(f"{label:<17}{min(xs):>10.3f}{statistics.median(xs):>10.3f}{max(xs):>10.3f}")
    ratio = statistics.median(runs["all"]) / statistics.median(runs["raw"])
    first = statistics.median(runs["first"]) / statistics.median(runs["raw"])
    print(f"ratio adjusted/raw (median): {ratio:.2f}x (target <= 1.2x); first read {first:.2f}x")


if __name__ == "__main__":
    main()
