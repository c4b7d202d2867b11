"""Scale benchmark: the backfill benchmark's data into PostgreSQL and into DuckDB, in the same run.

    ./dev bench scale [--symbols 11] [--days 252] [--pg-url postgresql://...]

The simulator (own process) serves the backfill bench's 1-minute bars once (``backfill.collect_pages``);
they are decoded and checked into the page writes the backfill commits (``backfill.page_checker``,
not timed). Then, per engine:

(w) store write: the pages committed in groups of 16, as the backfill's writer does (bars/s)
(b) backfill end to end: plan, fetch from the simulator, check, store (bars/s)
(r) one symbol x one day of minute bars read back: p50 / p99 over 300 reads

PostgreSQL: ``--pg-url`` (an empty database), or by default a throwaway server from the Debian
binaries (``tests/pg_server.py``, PostgreSQL's durable defaults: fsync and synchronous commit on).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _sim import free_port, wait_up
from backfill import bench_window, collect_pages, page_checker, run_sim

ROOT = Path(__file__).resolve().parents[1]


def write_all(store: Any, writes: list[Any]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(writes), 16):
        batch = writes[i : i + 16]
        n += sum(store.write_pages(batch))
    return time.perf_counter() - t0, n


def read_times(store: Any, symbol: str, start: Any, end: Any, repeat: int) -> tuple[list[float], int]:
    times, rows = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        rows = store.read_bars([symbol], "1Min", start, end).height
        times.append(time.perf_counter() - t)
    times.sort()
    return times, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=11)
    ap.add_argument("--days", type=int, default=252, help="sessions per symbol")
    ap.add_argument("--concurrency", type=int, default=4, help="backfill requests in flight")
    ap.add_argument("--pg-url", help="an empty PostgreSQL database (default: a throwaway server)")
    ap.add_argument("--reads", type=int, default=300)
    args = ap.parse_args()

    from marketpipe.core.config import RetryPolicy
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.providers.alpaca import AlpacaProvider
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.service.backfill import run_backfill
    from marketpipe.store.duckdb import DuckDBStore
    from marketpipe.store.postgres import PostgresStore

    cal, now, sessions, start, end, symbols = bench_window(args.days, args.symbols)
    tf = Timeframe.parse("1Min")

    server = None
    if args.pg_url:
        admin = args.pg_url
    else:
        sys.path.insert(0, str(ROOT))
        from tests.pg_server import PgServer

        server = PgServer(durable=True)
        admin = server.admin_url
    pg_urls = {name: new_database(admin, name) for name in ("w", "b")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(target=run_sim, args=(port,), daemon=True)
    proc.start()
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-scale-"))
    results: dict[str, dict[str, Any]] = {"DuckDB": {}, "PostgreSQL": {}}
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
        pages = collect_pages(url, tmp, symbols, start, end)
        provider = AlpacaProvider.from_config(cfg, env=env)
        with ThreadPoolExecutor(2) as pool:
            writes = list(pool.map(page_checker(provider, tf, start, end, now), pages))
        asyncio.run(provider.aclose())
        bars = sum(w.bars.height for w in writes)
        print(f"{len(pages)} pages, {bars:,} bars checked (not timed)", file=sys.stderr)

        def opener(engine: str, name: str) -> Any:
            if engine == "DuckDB":
                return DuckDBStore(tmp / f"{name}.duckdb")
            return PostgresStore(pg_urls[name])

        for engine in ("DuckDB", "PostgreSQL"):
            store = opener(engine, "w")
            secs, n = write_all(store, writes)
            store.close()  # DuckDB: includes the checkpoint it deferred during the run
            results[engine]["w"] = (secs, n)

        for engine in ("DuckDB", "PostgreSQL"):

            async def backfill(store: Any) -> tuple[float, int]:
                prov = AlpacaProvider.from_config(cfg, env=env)
                try:
                    t = time.perf_counter()
                    stats = await run_backfill(
                        prov, store, cal, symbols, tf, start, end, feed="sip", concurrency=args.concurrency
                    )
                    store.close()
                    return time.perf_counter() - t, stats.bars_received
                finally:
                    await prov.aclose()

            results[engine]["b"] = asyncio.run(backfill(opener(engine, "b")))

        day = sessions[len(sessions) // 2]
        for engine in ("DuckDB", "PostgreSQL"):
            store = opener(engine, "w")
            read_times(store, symbols[0], day.open, day.close, 20)  # warm caches and plans
            results[engine]["r"] = read_times(store, symbols[0], day.open, day.close, args.reads)
            store.close()
    finally:
        proc.terminate()
        proc.join(5)
        if server is not None:
            server.close()
        else:
            for url in pg_urls.values():
                drop_database(admin, url)

    print()
    print(f"{args.symbols} symbols x {args.days} sessions of 1Min bars = {bars:,} bars; {len(pages)} pages")
    print(f"{'run':44} {'DuckDB bars/s':>14} {'PostgreSQL bars/s':>18} {'PG/DuckDB':>10}")
    for key, label in (("w", "(w) store write, 16-page commits"), ("b", "(b) backfill end to end")):
        duck, pg = results["DuckDB"][key], results["PostgreSQL"][key]
        d_rate = duck[1] / duck[0]
        p_rate = pg[1] / pg[0]
        print(f"{label:44} {d_rate:14,.0f} {p_rate:18,.0f} {p_rate / d_rate:9.2f}x")
    print(f"\n{'read 1 symbol x 1 day':44} {'p50 ms':>10} {'p99 ms':>10} {'bars':>8}")
    for engine in ("DuckDB", "PostgreSQL"):
        times, rows = results[engine]["r"]
        p50, p99 = statistics.median(times) * 1e3, times[int(len(times) * 0.99)] * 1e3
        print(f"{engine:44} {p50:10.2f} {p99:10.2f} {rows:8}")
    pg_w = results["PostgreSQL"]["w"]
    print(f"\ntargets: PostgreSQL write >= 150,000 bars/s (got {pg_w[1] / pg_w[0]:,.0f}); read p50 < 5 ms")


def new_database(admin_url: str, name: str) -> str:
    """A fresh database on the server of ``admin_url``; its URL."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import adbc_driver_postgresql.dbapi as pgdb

    db = f"mp_bench_{name}_{uuid.uuid4().hex[:8]}"
    with pgdb.connect(admin_url, autocommit=True) as con, con.cursor() as cur:
        cur.execute(f"CREATE DATABASE {db}")
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{db}"))


def drop_database(admin_url: str, url: str) -> None:
    import adbc_driver_postgresql.dbapi as pgdb

    with pgdb.connect(admin_url, autocommit=True) as con, con.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]}")


if __name__ == "__main__":
    main()
