"""Server lifecycle: background thread, inside a running loop, and the blocking foreground mode."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule, Faults
from marketpipe.sim.server import SimServer
from tests.sim.conftest import AUTH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_thread_start_stop_and_fast_shutdown_with_a_hung_request(market: SimMarket) -> None:
    faults = Faults([FaultRule(kind="hang", hang_seconds=30)])
    server = SimServer(market, faults).start()
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    failures: list[BaseException] = []

    def hang() -> None:
        try:
            httpx.get(server.url + "/v2/stocks/meta/exchanges", headers=AUTH, timeout=5)
        except httpx.HTTPError as exc:  # the server going away is the expected outcome
            failures.append(exc)

    hung = threading.Thread(target=hang, daemon=True)
    hung.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3
    hung.join(5)
    assert len(failures) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/_sim/faults", timeout=1)
    server.stop()  # stopping twice is harmless


def test_port_in_use_raises_in_the_caller(sim_server: SimServer, market: SimMarket) -> None:
    with pytest.raises(OSError):
        SimServer(market, port=sim_server.port).start()


def test_fixed_port_and_context_manager(market: SimMarket) -> None:
    port = free_port()
    with SimServer(market, port=port) as server:
        assert server.port == port
        r = httpx.get(server.url + "/v2/stocks/meta/exchanges", headers=AUTH)
        assert r.status_code == 200 and r.headers["x-marketpipe-sim"] == "1"
        assert server.stats()["requests"] == 1
        server.reset_stats()
        assert server.stats() == {"requests": 0, "by_path": {}, "by_status": {}}


async def test_inside_a_running_loop(market: SimMarket) -> None:
    async with SimServer(market) as server, httpx.AsyncClient(base_url=server.url, headers=AUTH) as client:
        r = await client.get("/v2/stocks/AAPL/trades/latest")
        assert r.status_code == 200 and r.json()["symbol"] == "AAPL"


def test_serve_forever_in_the_foreground() -> None:
    port = free_port()
    code = f"from marketpipe.sim.server import serve_forever; serve_forever('127.0.0.1', {port}, seed=3)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                params = {"timeframe": "1Day", "start": "2024-03-04", "end": "2024-03-04"}
                r = httpx.get(f"http://127.0.0.1:{port}/v2/stocks/AAPL/bars", headers=AUTH, timeout=2, params=params)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        expected = SimMarket(seed=3).bars_frame("AAPL", "1Day", "2024-03-04", "2024-03-04T12:00:00Z")
        assert r.json()["bars"][0]["c"] == expected["c"][0]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert out == b""  # prints nothing itself
