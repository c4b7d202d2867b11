"""HTTP client benchmark for bulk pages: httpx vs aiohttp vs httpx over marketpipe's AiohttpTransport.

    ./dev bench transport [--symbols 11] [--days 252] [--repeat 3] [--quick]

The pages are the backfill bench's own (marketpipe's request plan for 1Min SIP bars, fetched once from
the simulator), served again by a bare aiohttp server in its own process so that only the clients
differ: the server answers from memory, as is (gzip off) or pre-compressed at level 6 with
``Content-Encoding: gzip`` (gzip on; the vendor compresses when asked). Four requests in flight, as the
backfill. Per client: wall seconds and the client process's CPU seconds (min / median / max of
``--repeat`` runs), and JSON MB read per CPU second.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import multiprocessing as mp
import pickle
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from _sim import free_port, wait_up


def serve_pages(port: int, path: str) -> None:
    from aiohttp import web

    pages: list[bytes] = pickle.loads(Path(path).read_bytes())
    packed = [gzip.compress(b, 6) for b in pages]

    async def page(req: web.Request) -> web.Response:
        i = int(req.match_info["i"])
        if req.query.get("gz") == "1" and "gzip" in req.headers.get("Accept-Encoding", ""):
            return web.Response(
                body=packed[i], headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )
        return web.Response(body=pages[i], content_type="application/json")

    async def health(req: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/p/{i}", page)
    app.router.add_get("/_sim/faults", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _encoding(gz: bool) -> dict[str, str]:
    return {"Accept-Encoding": "gzip, deflate" if gz else "identity"}


async def with_httpx(url: str, n: int, gz: bool, transport: httpx.AsyncBaseTransport | None = None) -> int:
    sem = asyncio.Semaphore(4)
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=4)
    async with httpx.AsyncClient(base_url=url, limits=limits, transport=transport) as client:

        async def one(i: int) -> int:
            async with sem:
                r = await client.get(f"/p/{i}", params={"gz": int(gz)}, headers=_encoding(gz))
                return len(r.content)

        return sum(await asyncio.gather(*(one(i) for i in range(n))))


async def with_aiohttp(url: str, n: int, gz: bool) -> int:
    import aiohttp

    sem = asyncio.Semaphore(4)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=8)) as session:

        async def one(i: int) -> int:
            async with sem, session.get(f"/p/{i}", params={"gz": int(gz)}, headers=_encoding(gz)) as r:
                return len(await r.read())

        return sum(await asyncio.gather(*(one(i) for i in range(n))))


async def with_transport(url: str, n: int, gz: bool) -> int:
    from marketpipe.providers.http import AiohttpTransport

    return await with_httpx(url, n, gz, AiohttpTransport(max_connections=8, max_keepalive=4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=11)
    ap.add_argument("--days", type=int, default=252)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 symbols x 60 sessions")
    args = ap.parse_args()
    if args.quick:
        args.symbols, args.days = 4, 60

    from backfill import bench_window, collect_pages, run_sim

    _, _, _, start, end, symbols = bench_window(args.days, args.symbols)
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    port = free_port()
    sim = mp.get_context("spawn").Process(target=run_sim, args=(port,), daemon=True)
    sim.start()
    try:
        wait_up(f"http://127.0.0.1:{port}")
        pages = [body for body, _ in collect_pages(f"http://127.0.0.1:{port}", tmp, symbols, start, end)]
    finally:
        sim.terminate()
        sim.join(5)
    (tmp / "pages.pkl").write_bytes(pickle.dumps(pages))
    raw = sum(len(p) for p in pages)
    print(
        f"{len(pages)} pages, {raw / 1e6:.0f} MB of JSON ({args.symbols} symbols x {args.days} sessions)",
        file=sys.stderr,
    )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = mp.get_context("spawn").Process(target=serve_pages, args=(port, str(tmp / "pages.pkl")), daemon=True)
    server.start()
    clients: dict[str, Callable[[str, int, bool], Awaitable[int]]] = {
        "httpx (its own transport)": with_httpx,
        "aiohttp": with_aiohttp,
        "httpx + AiohttpTransport": with_transport,
    }
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    try:
        wait_up(url)
        for _ in range(args.repeat):  # interleaved, so a busy moment hits every client alike
            for gz in (False, True):
                for name, fn in clients.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    got = asyncio.run(fn(url, len(pages), gz))
                    results.setdefault((name, gz), []).append((time.perf_counter() - t0, time.process_time() - c0))
                    assert got == raw, (name, gz, got, raw)
    finally:
        server.terminate()
        server.join(5)

    print(f"\n{'client':28} {'gzip':5} {'wall s min/med/max':>20} {'client CPU s min/med/max':>26} {'MB/CPU-s':>9}")
    base = {
        gz: sorted(c for _, c in results[("httpx (its own transport)", gz)])[
            len(results[("httpx (its own transport)", gz)]) // 2
        ]
        for gz in (False, True)
    }
    for (name, gz), runs in results.items():
        walls = sorted(w for w, _ in runs)
        cpus = sorted(c for _, c in runs)
        mid = len(runs) // 2
        print(
            f"{name:28} {'on' if gz else 'off':5} {walls[0]:6.2f}/{walls[mid]:.2f}/{walls[-1]:.2f}{'':3}"
            f" {cpus[0]:8.2f}/{cpus[mid]:.2f}/{cpus[-1]:.2f}{'':4} {raw / 1e6 / cpus[mid]:9.0f}"
            f"   CPU vs httpx {cpus[mid] / base[gz]:.2f}x"
        )


if __name__ == "__main__":
    main()
