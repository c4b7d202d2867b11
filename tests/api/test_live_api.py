"""The gateway's live endpoints over real sockets: /v1/stream (protocol, bad input, slow clients, keys),
SSE, /v1/live and /v1/alerts, the live part of /health/datasource, and admin failover/reconnect."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from marketpipe.api.app import create_app
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import StreamConfig

from .conftest import ENV, gateway_config, serving

pytestmark = pytest.mark.timeout(60)
ADMIN = {"Authorization": "Bearer admintoken"}
LIVE = {"grace_seconds": 0.5, "stale_seconds": 2.0, "fallback_poll_seconds": 0.2, "cross_check_seconds": 0}


@pytest.fixture(scope="module")
def sims() -> Iterator[tuple[SimServer, SimServer]]:
    market = SimMarket()
    with (
        SimServer(market, stream_config=StreamConfig(rate=500, bar_interval_s=0.5)) as alpaca,
        SimServer(market, keys={"POLYKEY": "unlimited"}, vendor="polygon") as polygon,  # type: ignore[dict-item]
    ):
        yield alpaca, polygon


@pytest.fixture
def gateway(sims: tuple[SimServer, SimServer], tmp_path: Path) -> Iterator[str]:
    alpaca, polygon = sims
    cfg = gateway_config(alpaca.url, tmp_path / "live.duckdb", stream=LIVE)
    cfg.providers["polygon"].enabled = True
    cfg.providers["polygon"].base_url = polygon.url
    cfg.providers["polygon"].plan = "unlimited"
    cfg.providers["polygon"].rate_limit_per_min = 100_000
    with serving(create_app(cfg, env={**ENV, "POLYGON_API_KEY": "POLYKEY"})) as url:
        yield url
    assert alpaca.stream is not None
    alpaca.stream.clear_faults()


async def get(url: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.get(url, **kw)


async def post(url: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.post(url, **kw)


def ws_url(base: str, query: str = "") -> str:
    return "ws" + base[4:] + "/v1/stream" + query


async def messages(ws: ClientConnection, within: float = 5.0) -> list[dict[str, Any]]:
    frame = await asyncio.wait_for(ws.recv(), within)
    doc = orjson.loads(frame)
    assert isinstance(doc, list)
    return doc


async def until_type(ws: ClientConnection, kind: str, within: float = 5.0, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for m in await messages(ws, deadline - time.monotonic()):
            if m["type"] == kind and all(m.get(k) == v for k, v in match.items()):
                return m
    raise AssertionError(f"no {kind} message {match}")


async def test_protocol_welcome_subscribe_prices_and_bad_input(gateway: str) -> None:
    async with connect(ws_url(gateway)) as ws:
        (welcome,) = await messages(ws)
        assert welcome["type"] == "welcome" and welcome["protocol"] == "marketpipe.v1"
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["aapl", "MSFT"]}).decode())
        sub = await until_type(ws, "subscribed")
        assert sub["symbols"] == ["AAPL", "MSFT"]
        price = await until_type(ws, "price", symbol="AAPL")
        for key in ("price", "bid", "ask", "change", "change_pct", "volume", "timestamp", "source"):
            assert key in price
        assert price["source"] == "sim:alpaca" and price["is_real_time"] is True
        # garbage, unknown actions, bad symbols: an error to this client, the connection stays
        await ws.send("this is not json")
        assert (await until_type(ws, "error"))["code"] == "INVALID_MESSAGE"
        await ws.send(orjson.dumps({"action": "dance"}).decode())
        assert (await until_type(ws, "error"))["code"] == "INVALID_ACTION"
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["BAD SYMBOL"]}).decode())
        assert (await until_type(ws, "error"))["code"] == "INVALID_SYMBOL"
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": []}).decode())
        assert (await until_type(ws, "error"))["code"] == "INVALID_SYMBOLS"
        await ws.send(orjson.dumps({"action": "ping"}).decode())
        await until_type(ws, "pong")
        await ws.send(orjson.dumps({"action": "unsubscribe", "symbols": ["AAPL"]}).decode())
        assert (await until_type(ws, "subscribed"))["symbols"] == ["MSFT"]
        assert (await until_type(ws, "price"))["symbol"] in ("MSFT", "AAPL")  # AAPL may still be in flight


async def test_a_client_that_never_reads_is_dropped_and_others_carry_on(
    gateway: str, sims: tuple[SimServer, SimServer]
) -> None:
    stream = sims[0].stream
    assert stream is not None
    stream.configure(rate=20_000)  # the slow client takes all ten symbols: its buffers fill in seconds
    try:
        all_ten = ",".join(["AAPL", "MSFT", "AMZN", "GOOGL", "META", "NVDA", "TSLA", "AMD", "SPY", "QQQ"])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: its backlog shows at once
        sock.connect(("127.0.0.1", int(gateway.rsplit(":", 1)[1])))
        async with (
            connect(ws_url(gateway, "?symbols=" + all_ten), sock=sock, close_timeout=0.5) as slow,
            connect(ws_url(gateway, "?symbols=SPY"), close_timeout=0.5) as fast,
        ):
            slow.transport.pause_reading()  # never reads again
            got = 0
            deadline = time.monotonic() + 30
            dropped = False
            while time.monotonic() < deadline and not dropped:
                got += sum(1 for m in await messages(fast) if m["type"] == "price")
                metrics = (await get(gateway + "/metrics")).text
                dropped = 'marketpipe_fanout_dropped_clients_total{protocol="v1",reason="slow_consumer"}' in metrics
            assert dropped, "the client that never reads was dropped"
            deadline = time.monotonic() + 10
            while (await get(gateway + "/health/datasource")).json()["live"]["fanout"]["clients"] != 1:
                assert time.monotonic() < deadline, "only the fast client is left"
                got += sum(1 for m in await messages(fast) if m["type"] == "price")
            # the fast client was served all along and still is (on a loaded machine the slow one can be
            # dropped before many prices have gone out, so count until well past it)
            deadline = time.monotonic() + 20
            while got <= 100:
                assert time.monotonic() < deadline, f"the fast client got only {got} prices"
                got += sum(1 for m in await messages(fast) if m["type"] == "price")
            assert any(m["type"] == "price" for m in await messages(fast))  # still served
            # the slow client, reading again: what was buffered, then a close frame that says why
            slow.transport.resume_reading()
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(slow.recv(), 10)
            assert slow.close_code == 1008, (slow.close_code, slow.close_reason)
            assert (slow.close_reason or "").startswith("SLOW_CONSUMER: "), slow.close_reason
    finally:
        stream.configure(rate=500)


def sse_events(url: str, params: dict[str, str], done: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of ``/v1/stream/sse`` until ``done(events)`` holds."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", url + "/v1/stream/sse", params=params, timeout=20) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, orjson.loads(line[6:])))
                if done(events):
                    return events
    raise AssertionError(f"the stream ended early: {sorted({e for e, _ in events})}")


async def test_sse(gateway: str) -> None:
    events = sse_events(gateway, {"symbols": "AAPL"}, lambda ev: sum(1 for e, _ in ev if e == "price") >= 5)
    kinds = [e for e, _ in events]
    assert "welcome" in kinds and kinds.count("price") >= 5
    # the client left: nothing of it is kept, upstream included
    deadline = time.monotonic() + 10
    while True:
        live = (await get(gateway + "/health/datasource")).json()["live"]
        subs = {ch: refs for ch, refs in live["primary"]["stream"]["subscriptions"].items() if refs}
        if live["fanout"]["clients"] == 0 and not subs:
            break
        assert time.monotonic() < deadline, f"left behind: {live['fanout']}, {subs}"
        await asyncio.sleep(0.1)
    assert all(d["symbol"] == "AAPL" for e, d in events if e == "price")
    bad = await get(gateway + "/v1/stream/sse", params={"symbols": "NOT A SYMBOL"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_SYMBOL"


async def test_live_board_alerts_health_and_admin(gateway: str, sims: tuple[SimServer, SimServer]) -> None:
    async with connect(ws_url(gateway, "?symbols=AAPL")) as ws:
        await until_type(ws, "price", symbol="AAPL")
        deadline = time.monotonic() + 10
        while (board := (await get(gateway + "/v1/live", params={"symbols": "AAPL"})).json())["datasource"][
            "state"
        ] != "primary_active":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        row = board["board"][0]
        assert row["symbol"] == "AAPL" and row["price"] > 0 and row["sparkline"]
        assert board["datasource"]["state"] == "primary_active" and board["history"][0]["at_time"]
        alerts = (await get(gateway + "/v1/alerts")).json()
        assert isinstance(alerts["active"], list) and isinstance(alerts["events"], list)
        assert isinstance(board["active_alerts"], list)
        live = (await get(gateway + "/health/datasource")).json()["live"]
        assert live["primary"]["stream"]["connected"] is True and live["stats"]["received"] > 0
        # admin: a provider other than alpaca moves live data to the fallback until released
        assert (await post(gateway + "/admin/failover", json={"provider": "polygon"})).status_code == 401
        doc = (await post(gateway + "/admin/failover", json={"provider": "polygon"}, headers=ADMIN)).json()
        assert doc["live"]["state"] == "fallback_active" and doc["live"]["forced"] is True
        await until_type(ws, "status", state="fallback_active")
        await until_type(ws, "price", source="sim:polygon")
        doc = (await post(gateway + "/admin/failover", json={"provider": None}, headers=ADMIN)).json()
        assert doc["live"]["forced"] is False
        await until_type(ws, "status", state="primary_active", within=10)
        before = doc["live"]["primary"]["stream"]["connections"]
        (await post(gateway + "/admin/reconnect", headers=ADMIN)).raise_for_status()
        deadline = time.monotonic() + 10
        while (await get(gateway + "/health/datasource")).json()["live"]["primary"]["stream"]["connections"] <= before:
            assert time.monotonic() < deadline, "the stream did not reconnect"
            await asyncio.sleep(0.1)
        bad = await post(gateway + "/admin/failover", json={"live": "sideways"}, headers=ADMIN)
        assert bad.status_code == 400


async def test_client_keys_guard_the_stream(sims: tuple[SimServer, SimServer], tmp_path: Path) -> None:
    alpaca, _ = sims
    cfg = gateway_config(alpaca.url, tmp_path / "keys.duckdb", stream=LIVE)
    with serving(create_app(cfg, env={**ENV, "MARKETPIPE_API_KEYS": "app1:s3cret"})) as url:
        with pytest.raises(InvalidStatus) as err:  # refused at the upgrade
            async with connect(ws_url(url)):
                pass
        assert err.value.response.status_code == 403
        async with connect(ws_url(url, "?token=s3cret&symbols=AAPL")) as ws:
            await until_type(ws, "price", symbol="AAPL")
        async with connect(ws_url(url), additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert (await messages(ws))[0]["type"] == "welcome"
