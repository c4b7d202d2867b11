"""Parquet cold-tier benchmark: export rows/s and one symbol-day read back, marketpipe vs pandas, same run.

    ./dev bench export [--symbols 5] [--days 126] [--repeat 3] [--reads 50]

The simulator serves ``--symbols`` x ``--days`` sessions of 1-minute bars into a fresh DuckDB store (not
timed). Then, each ``--repeat`` times:

(a) marketpipe export: the store's bars to a fresh Hive-partitioned dataset (``service/export.export_bars``:
    store read, per-month digest, one file per symbol-month committed by rename)
(b) marketpipe export again over the same dataset: nothing changed, so footers are read and nothing written
(c) the peer: the same store read into pandas, then ``DataFrame.to_parquet(partition_cols=[symbol, year,
    month])`` — what a user without marketpipe writes (no digest, no atomic commit, no resume)

and one symbol-day of minute bars read back, ``--reads`` times each, p50:

(d) marketpipe from Parquet: ``mp.bars(..., source="parquet://…")``'s path (partition pruning by listing the
    symbol's prefix, the day's month only, the time filter pushed down)
(e) marketpipe from the DuckDB store: ``read_bars``
(f) the peer: ``pandas.read_parquet(dataset, filters=[symbol, ts range])`` over the same dataset

Each figure is printed as min / median / max over the repeats, with ratios against the peer.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def p50(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=5)
    ap.add_argument("--days", type=int, default=126, help="sessions of 1-minute bars per symbol")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reads", type=int, default=50, help="symbol-day reads per repeat (p50 taken)")
    args = ap.parse_args()

    import pandas as pd
    import polars as pl

    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.config import config_from_dict
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.core.timeutil import parse_time
    from marketpipe.service.data import SyncMarketData
    from marketpipe.service.export import export_bars
    from marketpipe.sim.server import SimServer
    from marketpipe.store.duckdb import DuckDBStore
    from marketpipe.store.parquet import open_dataset

    cal = get_calendar()
    last = parse_time("2024-06-28", name="end", end=True)
    sessions = [s for s in cal.sessions(last - timedelta(days=args.days * 2), last) if s.close < last][-args.days :]
    start, end = sessions[0].open - timedelta(hours=6), sessions[-1].close + timedelta(hours=1)
    symbols = [f"X{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(args.symbols)]
    tf = Timeframe.parse("1Min")
    work = Path(tempfile.mkdtemp(prefix="mp-bench-export-"))
    store_path = work / "store.duckdb"
    try:
        with SimServer() as sim:
            cfg = config_from_dict(
                {
                    "providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited", "rate_limit_per_min": 10**6}},
                    "store": {"path": str(store_path)},
                }
            )
            env = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}
            t0 = time.perf_counter()
            with SyncMarketData(config=cfg, env=env) as client:
                client.backfill(symbols, start, end, timeframe=tf)
            fill_s = time.perf_counter() - t0

        store = DuckDBStore(store_path, read_only=True)
        rows = store.read_bars(symbols, str(tf), start, end).height
        print(
            f"store: {args.symbols} symbols x {len(sessions)} sessions of 1Min = {rows:,} bars "
            f"(backfilled from the simulator in {fill_s:.1f}s, not timed)"
        )
        day = sessions[len(sessions) // 2]
        d0, d1 = day.open - timedelta(hours=6), day.close + timedelta(hours=1)
        sym = symbols[0]

        export_s: list[float] = []
        rerun_s: list[float] = []
        peer_s: list[float] = []
        pq_read: list[float] = []
        db_read: list[float] = []
        pd_read: list[float] = []
        for i in range(args.repeat):
            lake, peer = work / f"lake{i}", work / f"peer{i}"
            dataset = open_dataset(str(lake), cfg.export, env={})
            secs, stats = timed(lambda d=dataset: export_bars(store, d, symbols, tf))
            assert stats.rows_written == rows, (stats.rows_written, rows)
            export_s.append(secs)
            secs, again = timed(lambda d=dataset: export_bars(store, d, symbols, tf))
            assert again.files_written == 0
            rerun_s.append(secs)

            def pandas_export(out: Path = peer) -> None:
                frame = store.read_bars(symbols, str(tf), start, end).with_columns(
                    year=pl.col("ts").dt.year(), month=pl.col("ts").dt.month()
                )
                frame.to_pandas().to_parquet(out, partition_cols=["symbol", "year", "month"], index=False)

            peer_s.append(timed(pandas_export)[0])

            got = dataset.read_bars([sym], str(tf), d0, d1)
            want = store.read_bars([sym], str(tf), d0, d1)
            assert got.equals(want) and got.height > 0
            filters = [
                ("symbol", "==", sym),
                ("timestamp", ">=", pd.Timestamp(d0)),
                ("timestamp", "<", pd.Timestamp(d1)),
            ]
            assert len(pd.read_parquet(lake, filters=filters)) == got.height
            pq_read.append(p50(lambda d=dataset: d.read_bars([sym], str(tf), d0, d1), args.reads))
            db_read.append(p50(lambda: store.read_bars([sym], str(tf), d0, d1), args.reads))
            pd_read.append(p50(lambda lk=lake, f=filters: pd.read_parquet(lk, filters=f), args.reads))
            shutil.rmtree(lake)
            shutil.rmtree(peer)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.repeat} runs; min / median / max")
    print(f"{'export (store -> Parquet)':58} {'seconds':>26} {'rows/s (median)':>16}")
    for name, vals in (
        ("(a) marketpipe export, fresh dataset", export_s),
        ("(b) marketpipe export rerun, nothing changed", rerun_s),
        ("(c) peer: pandas to_parquet(partition_cols=...)", peer_s),
    ):
        lo, med, hi = spread(vals)
        print(f"{name:58} {lo:8.3f} / {med:7.3f} / {hi:7.3f} {rows / med:16,.0f}")
    print(f"\n{'read one symbol-day of 1Min bars (p50 of ' + str(args.reads) + ' reads)':58} {'ms':>26}")
    for name, vals in (
        ("(d) marketpipe from Parquet", pq_read),
        ("(e) marketpipe from the DuckDB store", db_read),
        ("(f) peer: pandas.read_parquet(filters=...)", pd_read),
    ):
        lo, med, hi = (v * 1000 for v in spread(vals))
        print(f"{name:58} {lo:8.2f} / {med:7.2f} / {hi:7.2f}")
    m = statistics.median
    print(
        f"\nratio export (a) vs peer (c): {m(peer_s) / m(export_s):5.2f}x   "
        f"ratio read (d) vs peer (f): {m(pd_read) / m(pq_read):5.2f}x   "
        f"read Parquet (d) / DuckDB store (e) time: {m(pq_read) / m(db_read):5.2f}"
    )


if __name__ == "__main__":
    main()
