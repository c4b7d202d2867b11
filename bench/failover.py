"""Failover benchmark: the primary (Alpaca face) hangs or answers 5xx in the middle of a backfill.

    ./dev bench failover [--symbols 4] [--days 20] [--timeout 2.0]

Alpaca and Polygon simulator faces serve one market from a separate process, so the same bars come
back whichever vendor serves them. For each scenario this measures:
- time to switch: from the start of the primary's first failing call to the fallback's first
  successful page (it should be the configured timeout plus milliseconds for a hang, milliseconds
  for a 5xx — no retry storm);
- the backfill's total time against a healthy run, and which provider served how many bars.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx

from _sim import free_port, wait_up


def serve(alpaca_port: int, polygon_port: int) -> None:
    from marketpipe.sim.data import SimMarket
    from marketpipe.sim.server import SimServer

    async def main() -> None:
        market = SimMarket()
        a = SimServer(market, vendor="alpaca", port=alpaca_port)
        p = SimServer(market, vendor="polygon", port=polygon_port)
        await a.start_async()
        await p.start_async()
        await asyncio.Event().wait()

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=4)
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=2.0, help="primary read timeout (s)")
    ap.add_argument("--fail-after", type=int, default=3, help="primary requests served before the fault")
    args = ap.parse_args()

    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.config import config_from_dict
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.core.timeutil import utcnow
    from marketpipe.service.backfill import run_backfill
    from marketpipe.service.router import build_router
    from marketpipe.store.duckdb import DuckDBStore

    cal = get_calendar()
    now = utcnow()
    sessions = [s for s in cal.sessions(now - timedelta(days=args.days * 2 + 10), now) if s.close < now][-args.days :]
    start, end = sessions[0].open - timedelta(hours=6), sessions[-1].close + timedelta(hours=1)
    symbols = [f"F{chr(65 + i)}" for i in range(args.symbols)]
    ap_port, pg_port = free_port(), free_port()
    a_url, p_url = f"http://127.0.0.1:{ap_port}", f"http://127.0.0.1:{pg_port}"
    proc = mp.get_context("spawn").Process(target=serve, args=(ap_port, pg_port), daemon=True)
    proc.start()
    tmp = Path(tempfile.mkdtemp(prefix="mp-failover-"))
    env = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "POLYGON_API_KEY": "POLYKEY"}
    common = {"rate_limit_per_min": 1_000_000, "connect_timeout": 2.0, "max_in_flight": 4}

    def faults(rules: list[dict[str, object]]) -> None:
        httpx.put(a_url + "/_sim/faults", json={"rules": rules}, timeout=5).raise_for_status()

    async def run(name: str, rules: list[dict[str, object]]) -> dict[str, object]:
        faults(rules)
        cfg = config_from_dict(
            {
                "backfill": {"page_limit": 2000},
                "providers": {
                    "alpaca": {"base_url": a_url, "plan": "unlimited", "read_timeout": args.timeout, **common},
                    "polygon": {"base_url": p_url, "plan": "unlimited", "read_timeout": 30.0, **common},
                },
            }
        )
        router = build_router(cfg, env=env)
        marks: dict[str, float] = {}
        primary, fallback = router.get("alpaca"), router.get("polygon")

        def on_primary(ok: bool, code: str | None, seconds: float) -> None:
            if not ok and "fail_start" not in marks:
                marks["fail_start"] = time.perf_counter() - seconds

        def on_fallback(ok: bool, code: str | None, seconds: float) -> None:
            if ok and "fail_start" in marks and "switched" not in marks:
                marks["switched"] = time.perf_counter()

        primary.resilience.observers.append(on_primary)
        fallback.resilience.observers.append(on_fallback)
        store = DuckDBStore(tmp / f"{name}.duckdb")
        try:
            t0 = time.perf_counter()
            stats = await run_backfill(
                router, store, cal, symbols, Timeframe.parse("1Min"), start, end, page_limit=2000, concurrency=2
            )
            total = time.perf_counter() - t0
        finally:
            store.close()
            await router.aclose()
            faults([])
        switch = marks["switched"] - marks["fail_start"] if "switched" in marks else None
        return {
            "scenario": name,
            "seconds": total,
            "bars": stats.bars_received,
            "by_provider": dict(stats.rows_by_provider),
            "failovers": stats.failovers,
            "retries": stats.retries,
            "switch": switch,
            "ok": stats.ok,
        }

    try:
        wait_up(a_url)
        wait_up(p_url)
        asyncio.run(run("warmup", []))
        results = [
            asyncio.run(run("healthy", [])),
            asyncio.run(run("primary 503 mid-run", [{"kind": "http_503", "after": args.fail_after}])),
            asyncio.run(run("primary hangs mid-run", [{"kind": "hang", "after": args.fail_after, "hang_seconds": 60}])),
        ]
    finally:
        proc.terminate()
        proc.join(5)

    base = results[0]["seconds"]
    print(f"\n{args.symbols} symbols x {args.days} sessions of 1Min bars; primary read timeout {args.timeout}s")
    print(f"{'scenario':24} {'seconds':>8} {'vs healthy':>10} {'switch':>9} {'failovers':>9} {'retries':>7}  served by")
    for r in results:
        switch = "-" if r["switch"] is None else f"{r['switch']:.3f}s"
        served = ", ".join(f"{k} {v:,}" for k, v in r["by_provider"].items())  # type: ignore[attr-defined]
        print(
            f"{r['scenario']:24} {r['seconds']:8.2f} {r['seconds'] / base:9.2f}x {switch:>9} "  # type: ignore[operator]
            f"{r['failovers']:>9} {r['retries']:>7}  {served}{'' if r['ok'] else '  (errors!)'}"
        )


if __name__ == "__main__":
    main()
