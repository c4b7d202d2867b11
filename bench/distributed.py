"""Distributed backfill benchmark: 1, 2 and 4 `marketpipe worker` processes against a single-process
backfill of the same data, in the same run; and the latency the bus adds to a live frame.

    ./dev bench distributed [--symbols 8] [--days 20] [--page-limit 2000] [--runs 3]

Servers: a throwaway PostgreSQL (Debian binaries, durable defaults, ``tests/pg_server.py``), a nats-server
with JetStream (``tests/nats_server.py``) and the simulator in its own process. Every run writes into a fresh
database. Single process: ``MarketData.fill`` here (4 requests in flight). Distributed: the workers are
started first and idle; the clock runs from the coordinator's enqueue to the last item leaving the work queue.

Bus latency: a publisher process sends upstream-shaped frames (10 trades each, ~200 B a trade) on
``mp.live.<feed>`` through core NATS at the given rate; a ``BusStream`` in this process decodes each and hands
it to its handler, which takes the time against the publish stamp in the frame (same host clock).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _sim import free_port, wait_up
from backfill import run_sim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIM_ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}
SYMBOLS = ["AAPL", "MSFT", "SPY", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK.B", "JPM", "V", "XOM"]


def config(sim_url: str, store_url: str, bus_url: str, page_limit: int) -> Any:
    from marketpipe.core.config import config_from_dict

    return config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": sim_url, "plan": "unlimited", "rate_limit_per_min": 1_000_000},
                "polygon": {"enabled": False},
                "yahoo": {"enabled": False},
            },
            "store": {"url": store_url},
            "backfill": {"page_limit": page_limit},
            "bus": {"url": bus_url, "rate_share": False},
        }
    )


def write_toml(path: Path, sim_url: str, store_url: str, bus_url: str, page_limit: int) -> None:
    path.write_text(
        f'[store]\nurl = "{store_url}"\n[backfill]\npage_limit = {page_limit}\n'
        f'[providers.alpaca]\nbase_url = "{sim_url}"\nplan = "unlimited"\nrate_limit_per_min = 1000000\n'
        "[providers.polygon]\nenabled = false\n[providers.yahoo]\nenabled = false\n"
        f'[bus]\nurl = "{bus_url}"\nrate_share = false\n'
    )


async def single(cfg: Any, symbols: list[str], start: Any, end: Any) -> tuple[float, int]:
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.service.data import MarketData

    data = MarketData(cfg, env=SIM_ENV)
    try:
        t = time.perf_counter()
        stats = await data.fill(symbols, Timeframe.parse("1Min"), start, end)
        return time.perf_counter() - t, stats.bars_stored
    finally:
        await data.aclose()


async def distributed(cfg: Any, toml: Path, n: int, symbols: list[str], start: Any, end: Any) -> tuple[float, int, int]:
    from marketpipe.bus.client import connect
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.service.data import MarketData
    from marketpipe.service.distributed import enqueue, follow

    env = {**os.environ, **SIM_ENV, "PYTHONPATH": str(ROOT / "src")}
    workers = [
        subprocess.Popen(  # noqa: ASYNC220 -- started once before the clock, never awaited
            [sys.executable, "-m", "marketpipe.cli.main", "worker", "--config", str(toml)],
            env=env,
            stdout=open(toml.with_suffix(f".worker{i}.log"), "wb"),  # noqa: SIM115, ASYNC230
            stderr=subprocess.STDOUT,
        )
        for i in range(n)
    ]
    data = MarketData(cfg, env=SIM_ENV)
    bus = await connect(cfg.bus)
    try:
        await bus.ensure_streams()
        logs = [toml.with_suffix(f".worker{i}.log") for i in range(n)]
        for _ in range(1200):  # every worker started and warm (it says "worker NAME ready"); not timed
            if all(p.exists() and b" ready" in p.read_bytes() for p in logs):
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("the workers did not start")
        t = time.perf_counter()
        enq = await enqueue(data, bus, symbols, Timeframe.parse("1Min"), start, end)
        prog = await follow(bus, enq, poll=0.05)
        took = (prog.ended or time.perf_counter()) - t
        assert not prog.dead, prog.dead
        return took, prog.bars_stored, len(enq.items)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(30)
        await bus.close()
        await data.aclose()


def publisher(url: str, rate: int, seconds: float, per_frame: int) -> None:
    async def go() -> None:
        import nats

        from marketpipe.bus import subjects
        from marketpipe.bus.frames import encode_frame
        from marketpipe.core.schema import Trade
        from marketpipe.core.timeutil import utcnow

        nc = await nats.connect(url)
        frames_per_s = rate / per_frame
        now = utcnow()
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            recs = [
                (
                    "trades",
                    Trade(
                        symbol="AAPL",
                        ts=now,
                        price=170.0 + k * 0.01,
                        size=100,
                        exchange="V",
                        conditions=("@",),
                        tape="C",
                        trade_id=i * per_frame + k,
                        source="sim:alpaca",
                        feed="sip",
                        fetched_at=now,
                    ),
                )
                for k in range(per_frame)
            ]
            await nc.publish(subjects.live("sip"), encode_frame(recs))  # type: ignore[arg-type]
            i += 1
            delay = t0 + i / frames_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await nc.flush()
        await nc.close()

    asyncio.run(go())


async def bus_latency(url: str, rate: int, seconds: float, per_frame: int = 10) -> tuple[list[float], int]:
    from marketpipe.bus.client import connect
    from marketpipe.core.config import config_from_dict
    from marketpipe.service.live.shared import BusStream

    bus = await connect(config_from_dict({"bus": {"url": url}}).bus)
    stream = BusStream(bus, "sip", "bench")
    stream.keep_latency = True
    got = [0]
    stream.add_batch_handler(lambda msgs: got.__setitem__(0, got[0] + len(msgs)))
    await stream.start()
    proc = mp.get_context("spawn").Process(target=publisher, args=(url, rate, seconds, per_frame))
    proc.start()
    await asyncio.to_thread(proc.join)
    await asyncio.sleep(0.5)
    await stream.close()
    await bus.close()
    lat = sorted(x / 1e6 for x in stream.latency_ns[len(stream.latency_ns) // 10 :])  # warm-up tenth dropped
    return lat, got[0]


def _wait_http(url: str, ok: Any = None, tries: int = 600) -> None:
    import httpx

    for _ in range(tries):
        try:
            r = httpx.get(url, timeout=1)
            if ok is None or ok(r):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer")


def _holds_lease(r: Any) -> bool:
    lines = r.text.splitlines()
    return any(x.startswith("marketpipe_stream_lease_held{") and x.rstrip().endswith(" 1.0") for x in lines)


def end_to_end(nats_url: str, rate: float, seconds: float, runs: int) -> dict[str, list[tuple[float, float, int]]]:
    """Client-observed latency of a live price, upstream frame in -> /v1/stream client, in the same run:
    ``direct``: simulator -> one gateway (its own upstream) -> client; ``bus``: simulator -> gateway A (the
    lease holder, which publishes each frame) -> NATS -> gateway B -> a client of B. Both are the client's
    receive time minus the ``received_at`` of the frame's oldest message, which is the time the process
    holding the upstream took it in (it travels in the record), so ``bus`` - ``direct`` is what the bus adds.
    Per run: (p50 ms, p99 ms, frames)."""
    import stream as sb

    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-e2e-"))
    sim_port = free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    procs = [ctx.Process(target=sb.run_sim, args=(sim_port,), daemon=True)]
    procs[0].start()
    out: dict[str, list[tuple[float, float, int]]] = {"direct": [], "bus": []}

    def gateway(name: str, bus: str | None) -> str:
        port = free_port()
        proc = ctx.Process(target=sb.run_gateway, args=(port, sim, str(tmp / f"{name}.duckdb"), bus), daemon=True)
        proc.start()
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health")
        return url

    def measure(kind: str, gw: str) -> None:
        ws = "ws" + gw[4:] + "/v1/stream"
        asyncio.run(sb.run_clients(ws, 1, 2.0, 1, True))  # warm: the subscription reaches the upstream
        for _ in range(runs):
            lat = [v for c in asyncio.run(sb.run_clients(ws, 1, seconds, 1, True)) for v in c.latencies]
            out[kind].append((sb.pct(lat, 0.5), sb.pct(lat, 0.99), len(lat)))

    try:
        wait_up(sim)
        sb.set_rate(sim, rate)
        direct = gateway("direct", None)
        measure("direct", direct)
        procs.pop().terminate()
        owner = gateway("owner", nats_url)
        _wait_http(owner + "/metrics", _holds_lease)  # A holds the upstream before B starts
        measure("bus", gateway("follower", nats_url))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=8)
    ap.add_argument("--days", type=int, default=20, help="sessions per symbol")
    ap.add_argument("--page-limit", type=int, default=2000, help="smaller pages: more work items to share")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--rate", type=int, default=10_000, help="live messages/s for the latency run")
    ap.add_argument("--latency-only", action="store_true", help="skip the backfill runs")
    args = ap.parse_args()

    from tests.nats_server import NatsServer
    from tests.pg_server import PgServer

    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.timeutil import NY, parse_range

    sessions = get_calendar().sessions(datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 12, 31, tzinfo=UTC))
    last = sessions[args.days - 1].open.astimezone(NY).date().isoformat()
    start, end = parse_range("2024-01-02", last)
    symbols = SYMBOLS[: args.symbols]
    pg = PgServer(durable=True)
    nats = NatsServer()
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}"
    sim = mp.get_context("spawn").Process(target=run_sim, args=(port,), daemon=True)
    sim.start()
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-dist-"))
    counts = [int(x) for x in args.workers.split(",")]
    times: dict[str, list[float]] = {"single": [], **{f"{n} workers": [] for n in counts}}
    bars: dict[str, int] = {}
    items = 0
    try:
        wait_up(sim_url)
        # warm the simulator's caches once (not timed)
        asyncio.run(single(config(sim_url, pg.database(), nats.url, args.page_limit), symbols, start, end))
        for r in range(0 if args.latency_only else args.runs):
            url = pg.database()
            t, n = asyncio.run(single(config(sim_url, url, nats.url, args.page_limit), symbols, start, end))
            times["single"].append(t)
            bars["single"] = n
            for k in counts:
                # a fresh bus per run: the same range enqueued again within duplicate_window is (rightly)
                # de-duplicated, which would leave the workers nothing to do
                nats.close()
                nats = NatsServer()
                url = pg.database()
                toml = tmp / f"w{k}-{r}.toml"
                write_toml(toml, sim_url, url, nats.url, args.page_limit)
                cfg = config(sim_url, url, nats.url, args.page_limit)
                t, n, items = asyncio.run(distributed(cfg, toml, k, symbols, start, end))
                times[f"{k} workers"].append(t)
                bars[f"{k} workers"] = n
            print(f"run {r + 1}/{args.runs} done", file=sys.stderr)
        lats = [asyncio.run(bus_latency(nats.url, args.rate, 5.0)) for _ in range(args.runs)]
        sim.terminate()  # the end-to-end runs start their own simulator, with its stream
        e2e = end_to_end(nats.url, args.rate, 5.0, args.runs)
    finally:
        sim.terminate()
        nats.close()
        pg.close()

    if not args.latency_only:
        print(
            f"\n{len(symbols)} symbols x {args.days} sessions of 1Min bars, page limit {args.page_limit}: "
            f"{bars['single']:,} bars, {items} work items; {os.cpu_count()} cores; "
            f"{args.runs} runs (min / median / max)"
        )
        print(f"{'run':14} {'seconds':>22} {'bars/s (median)':>16} {'vs single':>10}")
        base = statistics.median(times["single"])
        for name, ts in times.items():
            med = statistics.median(ts)
            spread = f"{min(ts):6.2f} / {med:6.2f} / {max(ts):6.2f}"
            print(f"{name:14} {spread} {bars[name] / med:16,.0f} {base / med:9.2f}x")
    p50s = sorted(statistics.median(lat) for lat, _ in lats)
    p99s = sorted(lat[int(len(lat) * 0.99)] for lat, _ in lats)
    got = [n for _, n in lats]
    print(
        f"\nbus added latency, owner publish -> gateway BusStream handler, {args.rate:,} msgs/s in frames of 10, "
        f"5 s each ({min(got):,}-{max(got):,} messages received), min / median / max over {len(lats)} runs:\n"
        f"  p50 {p50s[0]:.2f} / {statistics.median(p50s):.2f} / {p50s[-1]:.2f} ms   "
        f"p99 {p99s[0]:.2f} / {statistics.median(p99s):.2f} / {p99s[-1]:.2f} ms   (target p99 < 5 ms)"
    )

    print(
        f"\nend to end, upstream frame in -> /v1/stream client (1 client, {args.rate:,} msgs/s offered, 5 s a run), "
        f"p50 / p99 ms per run; bus - direct = what the bus adds:"
    )
    for kind, label in (("direct", "direct: simulator -> gateway -> client"),
                        ("bus", "bus: simulator -> owner -> NATS -> gateway -> client")):  # fmt: skip
        runs = "   ".join(f"{p50:.2f} / {p99:.2f} ({n:,} frames)" for p50, p99, n in e2e[kind])
        print(f"  {label:56} {runs}")
    d99 = sorted(b[1] - d[1] for d, b in zip(e2e["direct"], e2e["bus"], strict=True))
    d50 = sorted(b[0] - d[0] for d, b in zip(e2e["direct"], e2e["bus"], strict=True))
    b99 = sorted(b[1] for b in e2e["bus"])
    print(
        f"  bus added (min / median / max): p50 {d50[0]:+.2f} / {statistics.median(d50):+.2f} / {d50[-1]:+.2f} ms, "
        f"p99 {d99[0]:+.2f} / {statistics.median(d99):+.2f} / {d99[-1]:+.2f} ms;  "
        f"owner -> gateway -> client p99 {b99[0]:.2f} / {statistics.median(b99):.2f} / {b99[-1]:.2f} ms (target < 5 ms)"
    )


if __name__ == "__main__":
    main()
