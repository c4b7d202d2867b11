"""Crypto pairs on the project's own stream (/v1/stream) and on /v1 latest/snapshots: the gateway's live
hub serves BTC/USD through its crypto lane, one upstream per location shared with /v1beta3/crypto, the
same router and stale rules as stocks. The vendor is the simulator's crypto face."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from marketpipe.api.app import create_app
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_crypto import LOCATIONS, LocalBook

from .conftest import ENV, gateway_config, serving

pytestmark = pytest.mark.timeout(60)
LIVE = {"grace_seconds": 0.3, "stale_seconds": 1.0, "fallback_poll_seconds": 0.2, "cross_check_seconds": 0}
ALL = ["prices", "trades", "quotes", "bars", "daily_bars", "orderbooks"]


@pytest.fixture(scope="module")
def gateway(vendor: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = gateway_config(vendor.url, tmp_path_factory.mktemp("livecrypto") / "gw.duckdb", stream=LIVE)
    with serving(create_app(cfg, env=ENV)) as url:
        yield url


def ws_url(base: str) -> str:
    return "ws" + base[4:] + "/v1/stream"


async def frame(ws: ClientConnection, within: float = 5.0) -> list[dict[str, Any]]:
    doc = orjson.loads(await asyncio.wait_for(ws.recv(), within))
    assert isinstance(doc, list)
    return doc


async def collect(ws: ClientConnection, done: Any, within: float = 10.0) -> list[dict[str, Any]]:
    """Messages until ``done(messages)`` holds."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while not done(got):
        got += await frame(ws, max(0.1, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            raise AssertionError(f"not enough after {within} s: {sorted({m['type'] for m in got})}")
    return got


def of(msgs: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    return [m for m in msgs if m["type"] == kind and all(m.get(k) == v for k, v in match.items())]


async def test_pairs_stream_trades_quotes_bars_books_and_prices_over_one_upstream(
    gateway: str, vendor: SimServer
) -> None:
    assert vendor.crypto_stream is not None
    async with connect(ws_url(gateway)) as a, connect(ws_url(gateway)) as b:
        await frame(a)  # welcome
        await frame(b)
        await a.send(orjson.dumps({"action": "subscribe", "symbols": ["AAPL"]}).decode())
        await a.send(orjson.dumps({"action": "subscribe", "symbols": ["btc/usd"], "channels": ALL}).decode())
        got = await collect(
            a,
            lambda ms: all(of(ms, k, symbol="BTC/USD") for k in ("price", "trade", "quote", "bar", "orderbook")),
        )
        sub = of(got, "subscribed")[-1]
        assert sub["symbols"] == ["AAPL", "BTC/USD"]
        assert sub["channels"]["orderbooks"] == ["BTC/USD"]  # for the pair only; a stock has no book
        trade = of(got, "trade")[0]
        assert trade["source"] == "sim:alpaca" and trade["feed"] == "us"
        assert isinstance(trade["size"], float) and trade["size"] > 0 and trade["timestamp_ns"] > 0
        price = of(got, "price", symbol="BTC/USD")[0]
        assert price["is_real_time"] is True and price["stale"] is False and price["quality_score"] == 1.0
        quote = of(got, "quote")[0]
        assert 0 < quote["bid_price"] < quote["ask_price"] and isinstance(quote["bid_size"], float)
        assert of(got, "bar")[0]["timeframe"] == "1Min" and isinstance(of(got, "bar")[0]["volume"], float)
        books = of(got, "orderbook")
        assert books[0]["reset"] is True and books[0]["bids"] and books[0]["asks"]
        # the second client: the current whole book at once, over the same upstream connection
        await b.send(orjson.dumps({"action": "subscribe", "symbols": ["BTC/USD"], "channels": ["orderbooks"]}).decode())
        first = await collect(b, lambda ms: bool(of(ms, "orderbook")))
        assert of(first, "orderbook")[0]["reset"] is True
        assert len(vendor.crypto_stream._conns) == 1
        # the book a client builds from the messages: reset replaces, levels update
        book = LocalBook("BTC/USD")
        more = await collect(b, lambda ms: len(of(ms, "orderbook")) >= 3)
        for m in of(first, "orderbook") + of(more, "orderbook"):
            book.apply(
                {
                    "r": m["reset"],
                    "b": [{"p": p, "s": s} for p, s in m["bids"]],
                    "a": [{"p": p, "s": s} for p, s in m["asks"]],
                }
            )
        bid, ask = book.best()
        assert bid is not None and ask is not None and bid < ask
        # bad input: a stock-only channel for a pair, a book for a stock
        await b.send(orjson.dumps({"action": "subscribe", "symbols": ["BTC/USD"], "channels": ["statuses"]}).decode())
        assert of(await collect(b, lambda ms: bool(of(ms, "error"))), "error")[0]["code"] == "INVALID_ARGUMENT"
        await b.send(orjson.dumps({"action": "subscribe", "symbols": ["AAPL"], "channels": ["orderbooks"]}).decode())
        assert of(await collect(b, lambda ms: bool(of(ms, "error"))), "error")[0]["code"] == "INVALID_ARGUMENT"


async def test_an_upstream_outage_is_labelled_and_the_stream_resumes(gateway: str, vendor: SimServer) -> None:
    stream = vendor.crypto_stream
    assert stream is not None and vendor._loop is not None
    face = stream.face.config
    async with connect(ws_url(gateway)) as ws:
        await frame(ws)
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["ETH/USD"]}).decode())
        await collect(ws, lambda ms: bool(of(ms, "price", symbol="ETH/USD")))
        face.locations = tuple(x for x in LOCATIONS if x != "us")  # the vendor refuses "us": stream and REST
        try:
            asyncio.run_coroutine_threadsafe(stream.drop(), vendor._loop).result(5)
            down = await collect(ws, lambda ms: bool(of(ms, "status", state="both_unavailable")), within=20)
            statuses = of(down, "status")
            assert all(s["asset_class"] == "crypto" for s in statuses)
            assert [s["state"] for s in statuses][-2:] == ["fallback_active", "both_unavailable"]
            # a late subscriber's first value is the last one, labelled stale (never made up)
            async with connect(ws_url(gateway)) as late:
                await frame(late)
                await late.send(orjson.dumps({"action": "subscribe", "symbols": ["ETH/USD"]}).decode())
                last = of(await collect(late, lambda ms: bool(of(ms, "price"))), "price")[0]
                assert last["stale"] is True and last["quality_score"] == 0.5
        finally:
            face.locations = LOCATIONS
        back = await collect(ws, lambda ms: bool(of(ms, "status", state="primary_active")), within=30)
        assert of(back, "status", state="primary_active")[0]["asset_class"] == "crypto"
        fresh = await collect(ws, lambda ms: bool(of(ms, "price", stale=False)))
        assert of(fresh, "price", stale=False)[0]["is_real_time"] is True


async def test_while_failed_over_pairs_are_polled_from_the_crypto_rest_api_labelled_delayed(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http, connect(ws_url(gateway)) as ws:
        await frame(ws)
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["SOL/USD"]}).decode())
        await collect(ws, lambda ms: bool(of(ms, "price", is_real_time=True)))
        ds = (await http.get("/health/datasource")).json()["live"]
        lane = ds["crypto"]
        assert lane["asset_class"] == "crypto" and lane["primary"]["stream"]["feed"] == "us"
        r = await http.post(
            "/admin/failover", json={"live": "fallback"}, headers={"Authorization": "Bearer admintoken"}
        )
        assert r.status_code == 200, r.text
        # a pair the board has not seen: the simulator stamps its stream trades with the time of sending, so
        # its REST trades (about five a minute) are older than what SOL/USD's stream already gave, and a
        # poll publishes only what is newer than the board holds
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["AVAX/USD"]}).decode())
        polled = await collect(ws, lambda ms: bool(of(ms, "price", symbol="AVAX/USD", is_real_time=False)))
        p = of(polled, "price", symbol="AVAX/USD", is_real_time=False)[0]
        assert p["source"] == "sim:alpaca" and p["quality_score"] == 0.8 and p["stale"] is False
        # forced over before the fallback has answered once, the lane may say both_unavailable first; the
        # poll that brought the price made it fallback_active
        assert "fallback_active" in [m["state"] for m in of(polled, "status", asset_class="crypto")]
        await http.post("/admin/failover", json={"live": "auto"}, headers={"Authorization": "Bearer admintoken"})


async def test_latest_and_snapshots_for_pairs_on_v1(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
        t = (await http.get("/v1/trades/BTC%2FUSD/latest")).json()
        assert t["symbol"] == "BTC/USD" and isinstance(t["size"], float) and t["location"] == "us"
        q = (await http.get("/v1/quotes/ETH%2FUSD/latest")).json()
        assert q["bid"] < q["ask"] and q["source"] == "sim:alpaca" and q["asset_class"] == "crypto"
        r = await http.get("/v1/snapshots", params={"symbols": "BTC/USD,AAPL"})
        assert r.status_code == 200, r.text
        snaps = r.json()["snapshots"]
        assert set(snaps) == {"BTC/USD", "AAPL"}
        btc = snaps["BTC/USD"]
        assert btc["asset_class"] == "crypto" and btc["location"] == "us" and btc["source"] == "sim:alpaca"
        assert isinstance(btc["latest_trade"]["size"], float) and btc["is_market_hours"] is True
        assert "asset_class" not in snaps["AAPL"]
