"""Live streaming benchmark: simulator stream at R msgs/s → gateway (one upstream connection, checks,
router, fan-out) → N WebSocket clients on /v1/stream.

    ./dev bench stream [--seconds 5] [--rates 10000,25000,50000,100000,200000] [--latency-rate 10000]

Three processes: the vendor simulator, the gateway (pinned to one core, so "ingest on one core" is
what is measured; run as ``marketpipe serve`` runs it) and this one (the clients). It reports

1. added latency at N = 1, 10, 100 clients at ``--latency-rate`` msgs/s: each client subscribes to one
   of the ten simulator symbols. Client-observed: per frame, client receive time minus the gateway's
   receive time of the frame's oldest message (``received_at``) — the time in the gateway plus the
   client's own loop delay (the clients share a core with the simulator). Gateway-side: the gateway's
   ``marketpipe_fanout_latency_seconds`` histogram over the same run (interpolated in its buckets);
2. ingest: for each offered rate, the messages the gateway took in per second (from its
   ``/health/datasource`` counters), against what the simulator sent, and the gateway's CPU use;
   the max sustained ingest rate is the highest rate taken in at >= 95 % of what was offered;
3. the peer: alpaca-py's ``StockDataStream`` handler throughput on the same simulator feed (its own
   process, one core), against marketpipe's stream client (``AlpacaStream``) doing the same work —
   decode into records and call a handler.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from _sim import free_port, wait_up

SYMBOLS = ["AAPL", "MSFT", "AMZN", "GOOGL", "META", "NVDA", "TSLA", "AMD", "SPY", "QQQ"]
BASE_RATE = 10_000.0
ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})


def run_sim(port: int) -> None:
    pin(1)
    from marketpipe.sim.server import SimServer
    from marketpipe.sim.stream import StreamConfig

    async def main() -> None:
        s = SimServer(port=port, stream_config=StreamConfig(rate=BASE_RATE, slow_client_timeout_s=30.0))
        await s.start_async()
        await asyncio.Event().wait()

    asyncio.run(main())


def run_gateway(port: int, sim_url: str, store: str, bus_url: str | None = None) -> None:
    """A gateway as ``marketpipe serve`` runs it, pinned to core 0; with ``bus_url``, one of the gateways
    that share one upstream stream over the bus (bench/distributed.py)."""
    pin(0)
    import uvicorn

    from marketpipe.api.app import create_app
    from marketpipe.core.config import config_from_dict

    doc: dict[str, Any] = {
        "providers": {
            "alpaca": {"base_url": sim_url, "plan": "unlimited", "rate_limit_per_min": 100_000},
            "polygon": {"enabled": False},
            "yahoo": {"enabled": False},
        },
        "stream": {"cross_check_seconds": 0, "client_queue": 200_000, "max_symbols_per_client": 50},
    }
    if bus_url:
        doc["bus"] = {"url": bus_url, "rate_share": False}
    cfg = config_from_dict(doc)
    cfg.store.path = store
    os.environ.update(ENV)
    uvicorn.run(
        create_app(cfg),
        host="127.0.0.1",
        port=port,
        log_level="error",
        access_log=False,
        ws_per_message_deflate=cfg.server.ws_compression,  # as marketpipe serve runs it
    )


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_rate(sim: str, rate: float) -> None:
    httpx.put(sim + "/_sim/stream/faults", json={"rate_factor": rate / BASE_RATE}, timeout=5).raise_for_status()


def live_stats(gw: str) -> dict[str, Any]:
    return httpx.get(gw + "/health/datasource", timeout=5).json()["live"]["stats"]  # type: ignore[no-any-return]


def sim_sent(sim: str) -> int:
    stats = httpx.get(sim + "/_sim/stream", timeout=5).json()["stats"]
    return int(stats.get("messages", 0))


def latency_buckets(gw: str) -> dict[float, float]:
    """The gateway's own fan-out latency histogram (v1): upper bound -> cumulative count."""
    out: dict[float, float] = {}
    for line in httpx.get(gw + "/metrics", timeout=5).text.splitlines():
        if line.startswith("marketpipe_fanout_latency_seconds_bucket{") and 'protocol="v1"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Quantile (ms) of the observations between two histogram readings, interpolated in its bucket."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    total = cum[-1] if cum else 0.0
    if total <= 0:
        return float("nan")
    target, lo, prev = q * total, 0.0, 0.0
    for b, c in zip(bounds, cum, strict=True):
        if c >= target:
            if b == float("inf"):
                return lo * 1000.0
            return (lo + (b - lo) * ((target - prev) / (c - prev) if c > prev else 1.0)) * 1000.0
        lo, prev = b, c
    return lo * 1000.0


class Client:
    """A /v1/stream client that measures, per frame, now minus the oldest message's received_at."""

    def __init__(self, url: str, symbols: list[str], parse: bool) -> None:
        self.url, self.symbols, self.parse = url, symbols, parse
        self.latencies: list[float] = []
        self.messages = 0
        self.frames = 0
        self.measuring = False

    async def run(self, ready: asyncio.Event, stop: asyncio.Event) -> None:
        import websockets

        async with websockets.connect(self.url, max_size=None) as ws:
            await ws.send(orjson.dumps({"action": "subscribe", "symbols": self.symbols}).decode())
            ready.set()
            while not stop.is_set():
                try:
                    frame = await asyncio.wait_for(ws.recv(decode=False), 0.5)  # bytes: no UTF-8 decode
                except TimeoutError:
                    continue
                now = time.time()
                if not self.measuring:
                    continue
                raw = frame
                self.frames += 1
                self.messages += raw.count(b'"type":"price"')
                if self.parse:
                    i = raw.find(b'"received_at":"')
                    if i >= 0:
                        stamp = raw[i + 15 : raw.index(b'"', i + 15)].decode()
                        self.latencies.append((now - datetime.fromisoformat(stamp).timestamp()) * 1000.0)


async def run_clients(gw_ws: str, n: int, seconds: float, per_client: int, parse: bool) -> list[Client]:
    clients = [
        Client(gw_ws, [SYMBOLS[(i * per_client + k) % len(SYMBOLS)] for k in range(per_client)], parse)
        for i in range(n)
    ]
    stop = asyncio.Event()
    readies = [asyncio.Event() for _ in clients]
    tasks = [asyncio.create_task(c.run(r, stop)) for c, r in zip(clients, readies, strict=True)]
    await asyncio.gather(*(r.wait() for r in readies))
    await asyncio.sleep(1.5)  # let the upstream subscription settle
    for c in clients:
        c.measuring = True
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return clients


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def alpaca_py_rate(ws_url: str, seconds: float, out: Any) -> None:
    """alpaca-py's StockDataStream, its own process and core: handler calls per second."""
    pin(1)
    import threading

    from alpaca.data.live import StockDataStream

    count = [0]

    async def on_any(_: Any) -> None:
        count[0] += 1

    stream = StockDataStream("SIMKEY", "SIMSECRET", url_override=ws_url)
    stream.subscribe_trades(on_any, *SYMBOLS)
    stream.subscribe_quotes(on_any, *SYMBOLS)
    threading.Thread(target=stream.run, daemon=True).start()
    time.sleep(2.0)
    c0, t0 = count[0], time.perf_counter()
    time.sleep(seconds)
    out.put((count[0] - c0) / (time.perf_counter() - t0))
    out.close()
    out.join_thread()  # flushed before the hard exit (its stream thread never returns)
    os._exit(0)


def marketpipe_client_rate(ws_url: str, seconds: float, out: Any) -> None:
    """marketpipe's AlpacaStream doing the same: decode to records, call a handler."""
    pin(1)
    from marketpipe.providers.alpaca_stream import AlpacaStream

    async def main() -> float:
        count = [0]

        def on_any(_: Any) -> None:
            count[0] += 1

        base = ws_url.rsplit("/v2/", 1)[0]
        async with AlpacaStream("sip", base_url=base, key="SIMKEY", secret="SIMSECRET") as s:
            s.add_handler(on_any)
            await s.subscribe(trades=SYMBOLS, quotes=SYMBOLS)
            await asyncio.sleep(2.0)
            c0, t0 = count[0], time.perf_counter()
            await asyncio.sleep(seconds)
            return (count[0] - c0) / (time.perf_counter() - t0)

    out.put(asyncio.run(main()))


def peer(target: Any, ws_url: str, seconds: float) -> float:
    q: Any = mp.Queue()
    p = mp.Process(target=target, args=(ws_url, seconds, q))
    p.start()
    rate = float(q.get(timeout=seconds + 60))
    p.join(10)
    if p.is_alive():
        p.kill()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rates", default="10000,25000,50000,75000,100000,200000")
    ap.add_argument("--latency-rate", type=float, default=10_000.0)
    ap.add_argument("--clients", default="1,10,100")
    ap.add_argument("--peer-rate", type=float, default=200_000.0)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    ns = [int(n) for n in args.clients.split(",")]

    sim_port, gw_port = free_port(), free_port()
    sim, gw = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    store = str(Path(tempfile.mkdtemp(prefix="mp-bench-stream-")) / "gw.duckdb")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=run_sim, args=(sim_port,), daemon=True),
        ctx.Process(target=run_gateway, args=(gw_port, sim, store), daemon=True),
    ]
    procs[0].start()
    wait_up(sim)
    procs[1].start()
    for _ in range(300):
        try:
            httpx.get(gw + "/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    gw_pid = procs[1].pid
    assert gw_pid is not None
    gw_ws = "ws" + gw[4:] + "/v1/stream"
    pin(1)
    print(f"simulator {sim}  gateway {gw} (pid {gw_pid}, pinned to one core)  {os.cpu_count()} cores\n")

    # 1. latency (first: a clean gateway, no backlog from a saturating run)
    set_rate(sim, args.latency_rate)
    print(f"1. added latency at {args.latency_rate:,.0f} msgs/s offered (each client: one symbol)")
    print("   client-observed (client receive time − gateway receive time of the frame's oldest message)")
    head = ["clients", "delivered msgs/s", "frames", "p50 ms", "p95 ms", "p99 ms", "max ms", "gateway CPU"]
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (8, 17, 8, 8, 8, 8, 8, 14), strict=True)))
    rows = []
    for n in ns:
        c0, t0, h0 = cpu_seconds(gw_pid), time.perf_counter(), latency_buckets(gw)
        clients = asyncio.run(run_clients(gw_ws, n, args.seconds, 1, True))
        gw_cpu = (cpu_seconds(gw_pid) - c0) / (time.perf_counter() - t0) * 100.0
        h1 = latency_buckets(gw)
        rows.append((n, *(bucket_quantile(h0, h1, q) for q in (0.5, 0.95, 0.99))))
        lat = [v for c in clients for v in c.latencies]
        delivered = sum(c.messages for c in clients) / args.seconds
        frames = sum(c.frames for c in clients)
        print(
            f"{n:>8} {delivered:>17,.0f} {frames:>8,} {pct(lat, 0.5):>8.2f} {pct(lat, 0.95):>8.2f} "
            f"{pct(lat, 0.99):>8.2f} {max(lat, default=float('nan')):>8.2f} {gw_cpu:>13.0f}%"
        )
    print("   gateway-side (its own histogram: upstream frame in → client frame written; includes the 1 s settle)")
    print(" ".join(f"{h:>{w}}" for h, w in zip(("clients", "p50 ms", "p95 ms", "p99 ms"), (8, 8, 8, 8), strict=True)))
    for n, p50, p95, p99 in rows:
        print(f"{n:>8} {p50:>8.2f} {p95:>8.2f} {p99:>8.2f}")
    dropped = live_stats(gw)
    print(f"gateway stats after the runs: received {dropped['received']:,}, rejected {dropped['rejected']:,}\n")

    # 2. ingest
    print("2. ingest: simulator → gateway (one client subscribed to all ten symbols, frames counted, not parsed)")
    print(f"{'offered msgs/s':>15} {'sent msgs/s':>12} {'ingested msgs/s':>16} {'taken %':>8} {'gateway CPU %':>14}")
    best = 0.0
    for rate in rates:
        set_rate(sim, rate)

        async def one(rate: float = rate) -> tuple[float, float, float]:
            holder: dict[str, float] = {}

            async def sample() -> None:
                await asyncio.sleep(1.5)  # the clients' own settle time
                s0, r0, c0, t0 = sim_sent(sim), live_stats(gw)["received"], cpu_seconds(gw_pid), time.perf_counter()
                await asyncio.sleep(args.seconds)
                s1, r1, c1, t1 = sim_sent(sim), live_stats(gw)["received"], cpu_seconds(gw_pid), time.perf_counter()
                holder.update(sent=(s1 - s0) / (t1 - t0), got=(r1 - r0) / (t1 - t0), cpu=(c1 - c0) / (t1 - t0))

            await asyncio.gather(run_clients(gw_ws, 1, args.seconds + 1.5, len(SYMBOLS), False), sample())
            return holder["sent"], holder["got"], holder["cpu"]

        sent, got, cpu = asyncio.run(one())
        taken = got / rate * 100.0
        if taken >= 95.0:
            best = max(best, got)
        print(f"{rate:>15,.0f} {sent:>12,.0f} {got:>16,.0f} {taken:>7.1f}% {cpu * 100:>13.0f}%")
    print(f"max sustained ingest (>= 95 % of offered): {best:,.0f} msgs/s on one core\n")

    # 3. the peer
    for p in procs:
        p.kill()
    print(f"3. stream client throughput, simulator at {args.peer_rate:,.0f} msgs/s offered, ten symbols")
    procs = [ctx.Process(target=run_sim, args=(sim_port,), daemon=True)]
    procs[0].start()
    wait_up(sim)
    set_rate(sim, args.peer_rate)
    ws_url = "ws" + sim[4:] + "/v2/sip"
    ours = peer(marketpipe_client_rate, ws_url, args.seconds)
    theirs = peer(alpaca_py_rate, ws_url, args.seconds)
    print(f"{'client':>40} {'handler calls/s':>16}")
    print(f"{'alpaca-py StockDataStream':>40} {theirs:>16,.0f}")
    print(f"{'marketpipe AlpacaStream':>40} {ours:>16,.0f}")
    print(f"ratio marketpipe / alpaca-py: {ours / theirs if theirs else float('nan'):.2f}x")
    for p in procs:
        p.kill()


if __name__ == "__main__":
    main()
