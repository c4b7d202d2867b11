"""Backfill benchmark: marketpipe vs alpaca-py on the same simulator data, in the same run.

    ./dev bench backfill [--symbols 11] [--days 252] [--quick]

The simulator runs in its own process on loopback (so its CPU does not share our GIL) and serves
the same synthetic 1-minute bars to both clients. A warm-up pass fills the simulator's caches first
so neither measured run pays for data generation.

(a) alpaca-py: StockHistoricalDataClient(url_override=...).get_stock_bars(...) then .df
(b) marketpipe backfill into a fresh DuckDB file (plan, fetch, check, store, ledger)
(c) marketpipe's CPU path alone: decode + check + store from page bytes already in memory
(d) read one symbol x one day of minute bars back from DuckDB (the store's L1 off), the same day and other
    days, and (e) from the store's L1: p50 / p99
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from _sim import free_port, wait_up


def run_sim(port: int) -> None:
    from marketpipe.sim.server import serve_forever

    serve_forever("127.0.0.1", port)


def collect_pages(
    url: str, tmp: Path, symbols: list[str], start: datetime, end: datetime
) -> list[tuple[bytes, list[str]]]:
    """The raw page bytes of marketpipe's own request plan for 1Min SIP bars (the benchmark's data:
    also what warms the simulator's caches)."""
    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.service.backfill import plan
    from marketpipe.store.duckdb import DuckDBStore

    scratch = DuckDBStore(tmp / "plan.duckdb")
    units, _ = plan(
        scratch, get_calendar(), symbols, Timeframe.parse("1Min"), start, end, provider="alpaca", feed="sip"
    )
    scratch.close()
    pages: list[tuple[bytes, list[str]]] = []
    with httpx.Client(
        base_url=url, headers={"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}, timeout=120
    ) as client:
        for u in units:
            token = None
            while True:
                params = {
                    "symbols": ",".join(u.symbols),
                    "timeframe": "1Min",
                    "start": u.start.isoformat(),
                    "end": (u.end - timedelta(microseconds=1)).isoformat(),
                    "limit": 10000,
                    "feed": "sip",
                }
                if token:
                    params["page_token"] = token
                r = client.get("/v2/stocks/bars", params=params)
                r.raise_for_status()
                pages.append((r.content, list(u.symbols)))
                token = r.json().get("next_page_token")
                if not token:
                    break
    return pages


def page_checker(provider: Any, tf: Any, start: datetime, end: datetime, now: datetime) -> Callable[..., Any]:
    """Page bytes -> the ``PageWrite`` the backfill would commit (decode + check, no store)."""
    from marketpipe.providers.alpaca import _page_decoder
    from marketpipe.providers.base import BarPage
    from marketpipe.service.backfill import check_page

    decode = _page_decoder("bars", False, "", "1Min", "sip", provider)

    def cpu(item: tuple[bytes, list[str]]) -> Any:
        body, syms = item
        frame, nxt, nbytes = decode(httpx.Response(200, headers={"x-marketpipe-sim": "1"}, content=body))
        page = BarPage(
            frame=frame,
            symbols=syms,
            timeframe=tf,
            start=start,
            end=end,
            feed="sip",
            source="sim:alpaca",
            request_id="bench",
            fetched_at=now,
            next_page_token=nxt,
            page_number=1,
            last_page=not nxt,
            nbytes=nbytes,
        )
        return check_page(page, {}, "alpaca", now).write

    return cpu


def bench_window(days: int, n_symbols: int) -> tuple[Any, datetime, list[Any], datetime, datetime, list[str]]:
    """The benches' data: the last ``days`` complete sessions (with the hours around them) and
    ``n_symbols`` synthetic symbols the simulator serves; (calendar, now, sessions, start, end, symbols)."""
    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.timeutil import utcnow

    cal = get_calendar()
    now = utcnow()
    sessions = [s for s in cal.sessions(now - timedelta(days=days * 2), now) if s.close < now][-days:]
    start, end = sessions[0].open - timedelta(hours=6), sessions[-1].close + timedelta(hours=1)
    return cal, now, sessions, start, end, [f"B{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(n_symbols)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=11)
    ap.add_argument("--days", type=int, default=252, help="sessions per symbol")
    ap.add_argument("--skip-alpaca-py", action="store_true")
    ap.add_argument("--concurrency", type=int, default=4, help="marketpipe requests in flight")
    ap.add_argument("--quick", action="store_true", help="4 symbols x 60 sessions (under a minute)")
    args = ap.parse_args()
    if args.quick:
        args.symbols, args.days = 4, 60

    from marketpipe.core.config import RetryPolicy
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.providers.alpaca import AlpacaProvider
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.service.backfill import run_backfill
    from marketpipe.store.duckdb import DuckDBStore

    cal, now, sessions, start, end, symbols = bench_window(args.days, args.symbols)
    tf = Timeframe.parse("1Min")
    expected = args.symbols * cal.regular_minutes(start, end)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(target=run_sim, args=(port,), daemon=True)
    proc.start()
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    try:
        wait_up(url)
        cfg = AlpacaConfig(
            base_url=url,
            plan="unlimited",
            rate_limit_per_min=1_000_000,
            max_in_flight=args.concurrency,
            read_timeout=120,
            retry=RetryPolicy(attempts=2),
        )
        env = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}

        # Collect the page bytes of marketpipe's own request plan; this also warms the simulator.
        t0 = time.perf_counter()
        pages = collect_pages(url, tmp, symbols, start, end)
        warm = time.perf_counter() - t0
        print(
            f"warm-up: {len(pages)} pages, {sum(len(p) for p, _ in pages) / 1e6:.0f} MB in {warm:.1f}s "
            f"(simulator + plain httpx)",
            file=sys.stderr,
        )

        results: dict[str, tuple[float, int]] = {}

        # (a) alpaca-py
        if not args.skip_alpaca_py:
            from alpaca.data.enums import DataFeed
            from alpaca.data.historical import StockHistoricalDataClient
            from alpaca.data.requests import StockBarsRequest
            from alpaca.data.timeframe import TimeFrame

            client_a = StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=url)
            t0 = time.perf_counter()
            bars = client_a.get_stock_bars(
                StockBarsRequest(
                    symbol_or_symbols=symbols,
                    timeframe=TimeFrame.Minute,
                    start=start,
                    end=end - timedelta(microseconds=1),
                    feed=DataFeed.SIP,
                )
            )
            df = bars.df
            results["(a) alpaca-py get_stock_bars + .df"] = (time.perf_counter() - t0, len(df))

        # (b) marketpipe backfill, end to end
        async def backfill() -> tuple[float, int]:
            store = DuckDBStore(tmp / "b.duckdb")
            provider = AlpacaProvider.from_config(cfg, env=env)
            try:
                t = time.perf_counter()
                stats = await run_backfill(
                    provider, store, cal, symbols, tf, start, end, feed="sip", concurrency=args.concurrency
                )
                store.close()  # includes the checkpoint DuckDB deferred during the run
                return time.perf_counter() - t, stats.bars_received
            finally:
                await provider.aclose()

        results["(b) marketpipe backfill -> DuckDB"] = asyncio.run(backfill())

        # (c) CPU path from bytes in memory, pipelined as the backfill runs it: decode + check on two
        # threads (polars' JSON reader and the checks run without the GIL), commits of WRITER_ROWS bars.
        from concurrent.futures import ThreadPoolExecutor

        from marketpipe.service.backfill import WRITER_ROWS

        store_c = DuckDBStore(tmp / "c.duckdb")
        provider_c = AlpacaProvider.from_config(cfg, env=env)
        cpu = page_checker(provider_c, tf, start, end, now)

        t0 = time.perf_counter()
        n = 0
        batch = []
        rows = 0
        with ThreadPoolExecutor(2) as pool:
            for write in pool.map(cpu, pages):
                batch.append(write)
                n += write.ingest.rows_received
                rows += write.ingest.rows_received
                if rows >= WRITER_ROWS:
                    store_c.write_pages(batch)
                    batch, rows = [], 0
        if batch:
            store_c.write_pages(batch)
        store_c.close()  # includes the deferred checkpoint
        results["(c) marketpipe CPU path (decode+check+store)"] = (time.perf_counter() - t0, n)
        asyncio.run(provider_c.aclose())

        # (d) read back one symbol x one day: from DuckDB (the store's L1 off: every read a query), the same
        # day each time and a different symbol-day each time; then (e) the same read from the store's L1
        reads: dict[str, list[float]] = {}
        rows = 0
        store_b = DuckDBStore(tmp / "b.duckdb", read_cache_bytes=0)
        day = sessions[len(sessions) // 2]
        keys = [(sym, d) for d in sessions for sym in symbols]
        random.Random(7).shuffle(keys)
        for label, pick in (("same day", lambda i: (symbols[0], day)), ("other days", lambda i: keys[i % len(keys)])):
            times = reads.setdefault(label, [])
            for i in range(300):
                sym, d = pick(i)
                t = time.perf_counter()
                rows = store_b.read_bars([sym], "1Min", d.open, d.close).height
                times.append(time.perf_counter() - t)
        store_b.close()
        store_b = DuckDBStore(tmp / "b.duckdb")
        store_b.read_bars([symbols[0]], "1Min", day.open, day.close)
        times = reads.setdefault("L1", [])
        for _ in range(300):
            t = time.perf_counter()
            store_b.read_bars([symbols[0]], "1Min", day.open, day.close)
            times.append(time.perf_counter() - t)
        store_b.close()
    finally:
        proc.terminate()
        proc.join(5)

    print()
    print(
        f"{args.symbols} symbols x {args.days} sessions of 1Min bars = {expected:,} bars expected; {len(pages)} pages"
    )
    print(f"{'run':48} {'seconds':>9} {'bars':>11} {'bars/s':>12}")
    rate = {}
    for name, (secs, count) in results.items():
        rate[name] = count / secs
        print(f"{name:48} {secs:9.2f} {count:11,} {rate[name]:12,.0f}")
    keys = list(results)
    if keys[0].startswith("(a)"):
        a = rate[keys[0]]
        print(f"\nratio (b)/(a): {rate[keys[1]] / a:6.1f}x    ratio (c)/(a): {rate[keys[2]] / a:6.1f}x")
    for label, times in reads.items():
        times.sort()
        where = "from the store's L1" if label == "L1" else f"from DuckDB, {label}"
        print(
            f"read 1 symbol x 1 day ({rows} bars) {where}: p50 {statistics.median(times) * 1e3:.2f} ms, "
            f"p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
