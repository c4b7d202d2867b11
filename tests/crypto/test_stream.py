"""The simulator's crypto stream, read by alpaca-py's CryptoDataStream unchanged and by a raw JSON client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from alpaca.data.live import CryptoDataStream

from marketpipe.core.errors import OrderbookNotReset
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_crypto import LocalBook


async def test_alpaca_py_crypto_stream_gets_trades_quotes_books_and_bars(sim: SimServer) -> None:
    got: dict[str, list[Any]] = {"trades": [], "quotes": [], "orderbooks": [], "bars": [], "daily": []}
    enough = asyncio.Event()

    def collect(kind: str) -> Callable[[Any], Any]:
        async def handler(item: Any) -> None:
            got[kind].append(item)
            if all(len(v) >= (1 if k in ("bars", "daily") else 3) for k, v in got.items()):
                enough.set()

        return handler

    client = CryptoDataStream("SIMKEY", "SIMSECRET", url_override=sim.crypto_ws_url("us"))
    client.subscribe_trades(collect("trades"), "BTC/USD")
    client.subscribe_quotes(collect("quotes"), "ETH/USD")
    client.subscribe_orderbooks(collect("orderbooks"), "BTC/USD")
    client.subscribe_bars(collect("bars"), "BTC/USD")
    client.subscribe_daily_bars(collect("daily"), "BTC/USD")
    task = asyncio.create_task(client._run_forever())
    try:
        await asyncio.wait_for(enough.wait(), 15)
    finally:
        await client.stop_ws()
        await asyncio.wait_for(task, 10)
    assert {t.symbol for t in got["trades"]} == {"BTC/USD"} and all(t.size > 0 for t in got["trades"])
    assert all(q.bid_price < q.ask_price for q in got["quotes"])
    first, *updates = got["orderbooks"]
    assert first.reset is True and len(first.bids) == 20  # the whole book first
    assert updates and not any(u.reset for u in updates)
    assert any(level.size == 0 for u in updates for level in u.bids + u.asks)  # removals
    book = LocalBook("BTC/USD")
    for ob in got["orderbooks"]:
        book.apply(
            {
                "r": ob.reset,
                "b": [{"p": x.price, "s": x.size} for x in ob.bids],
                "a": [{"p": x.price, "s": x.size} for x in ob.asks],
            }
        )
    bid, ask = book.best()
    assert bid is not None and ask is not None and bid < ask
    assert got["bars"][0].timestamp.second == 0 and got["daily"][0].timestamp.hour == 0  # UTC midnight


async def _session(sim: SimServer, path: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(sim.url + path)
    assert orjson.loads((await ws.receive()).data) == [{"T": "success", "msg": "connected"}]
    return http, ws


async def _send(ws: aiohttp.ClientWebSocketResponse, obj: dict[str, Any]) -> list[dict[str, Any]]:
    await ws.send_str(orjson.dumps(obj).decode())
    return orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)


async def test_protocol_errors_and_subscription_state(sim: SimServer) -> None:
    http, ws = await _session(sim, "/v1beta3/crypto/us")
    try:
        assert (await _send(ws, {"action": "subscribe", "trades": ["BTC/USD"]}))[0]["code"] == 401
        assert (await _send(ws, {"action": "auth", "key": "SIMKEY", "secret": "SIMSECRET"}))[0][
            "msg"
        ] == "authenticated"
        assert (await _send(ws, {"action": "subscribe", "trades": ["BTCUSD"]}))[0] == {
            "T": "error",
            "code": 400,
            "msg": "invalid syntax",
        }
        assert (await _send(ws, {"action": "subscribe", "statuses": ["BTC/USD"]}))[0]["code"] == 410
        (sub,) = await _send(ws, {"action": "subscribe", "orderbooks": ["ETH/USD"], "trades": ["BTC/USD"]})
        assert sub == {
            "T": "subscription",
            "trades": ["BTC/USD"],
            "quotes": [],
            "bars": [],
            "updatedBars": [],
            "dailyBars": [],
            "orderbooks": ["ETH/USD"],
        }
    finally:
        await ws.close()
        await http.close()
    async with (
        aiohttp.ClientSession() as s,
        s.get(sim.url + "/v1beta3/crypto/mars", headers={"Upgrade": "websocket", "Connection": "Upgrade"}) as r,
    ):
        assert r.status == 404


@pytest.fixture
def no_reset(sim: SimServer) -> Any:
    assert sim.crypto_stream is not None
    sim.crypto_stream.config.reset_first = False
    yield
    sim.crypto_stream.config.reset_first = True


async def test_order_book_updates_before_a_full_book_are_refused_not_applied(sim: SimServer, no_reset: None) -> None:
    http, ws = await _session(sim, "/v1beta3/crypto/us")
    try:
        await _send(ws, {"action": "auth", "key": "SIMKEY", "secret": "SIMSECRET"})
        await _send(ws, {"action": "subscribe", "orderbooks": ["BTC/USD"]})
        (msg, *_) = orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)
    finally:
        await ws.close()
        await http.close()
    assert msg["T"] == "o" and "r" not in msg
    book = LocalBook("BTC/USD")
    with pytest.raises(OrderbookNotReset):
        book.apply(msg)
    assert book.levels() == {"b": [], "a": []}
