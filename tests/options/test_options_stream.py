"""The simulator's options stream: msgpack only (412 for JSON), no star quotes (413), trades and quotes
channels only; alpaca-py's OptionDataStream works against it unchanged."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import orjson
from alpaca.data.enums import OptionsFeed
from alpaca.data.historical.option import OptionHistoricalDataClient
from alpaca.data.live.option import OptionDataStream
from alpaca.data.requests import OptionChainRequest

from marketpipe.sim.server import SimServer

MSGPACK = {"Content-Type": "application/msgpack"}


async def _session(url: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url, headers=headers or {})
    return http, ws


async def test_json_client_gets_412(sim: SimServer) -> None:
    http, ws = await _session(sim.ws_url("indicative"))
    try:
        msg = await ws.receive(timeout=5)
        assert orjson.loads(msg.data) == [
            {"T": "error", "code": 412, "msg": "option messages are only available in MsgPack format"}
        ]
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await ws.close()
        await http.close()


async def _authed(sim: SimServer, feed: str = "indicative", key: str = "SIMKEY", secret: str = "SIMSECRET"):  # type: ignore[no-untyped-def]
    http, ws = await _session(sim.ws_url(feed), MSGPACK)
    assert msgpack.unpackb((await ws.receive(timeout=5)).data) == [{"T": "success", "msg": "connected"}]
    await ws.send_bytes(msgpack.packb({"action": "auth", "key": key, "secret": secret}))
    return http, ws, msgpack.unpackb((await ws.receive(timeout=5)).data)


async def test_star_quotes_413_and_bad_channels(sim: SimServer) -> None:
    http, ws, auth = await _authed(sim)
    try:
        assert auth == [{"T": "success", "msg": "authenticated"}]
        await ws.send_bytes(msgpack.packb({"action": "subscribe", "quotes": ["*"]}))
        assert msgpack.unpackb((await ws.receive(timeout=5)).data) == [
            {"T": "error", "code": 413, "msg": "star subscription is not allowed for option quotes"}
        ]
        await ws.send_bytes(msgpack.packb({"action": "subscribe", "bars": ["SPY261218C00240000"]}))
        assert msgpack.unpackb((await ws.receive(timeout=5)).data)[0]["code"] == 400  # no bars channel
        await ws.send_bytes(msgpack.packb({"action": "subscribe", "quotes": ["TSLA"]}))
        assert msgpack.unpackb((await ws.receive(timeout=5)).data)[0]["code"] == 400
    finally:
        await ws.close()
        await http.close()
    http, ws, auth = await _authed(sim, "opra", "FREEKEY", "FREESECRET")
    try:
        assert auth[0]["code"] == 409
    finally:
        await ws.close()
        await http.close()


def test_alpaca_py_option_stream(sim: SimServer) -> None:
    chain = OptionHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=sim.url).get_option_chain(
        OptionChainRequest(underlying_symbol="SPY", type="call")
    )
    contract = next(s for s, v in sorted(chain.items()) if v.latest_trade is not None)
    stream = OptionDataStream("SIMKEY", "SIMSECRET", feed=OptionsFeed.OPRA, url_override=sim.ws_url("opra"))
    got: dict[str, list[object]] = {"q": [], "t": []}

    async def on_quote(q: object) -> None:
        got["q"].append(q)

    async def on_trade(t: object) -> None:
        got["t"].append(t)
        if len(got["t"]) >= 2 and got["q"]:
            await stream.stop_ws()

    stream.subscribe_quotes(on_quote, contract)
    stream.subscribe_trades(on_trade, contract)

    async def main() -> None:
        task = asyncio.create_task(stream._run_forever())
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except TimeoutError:
            await stream.stop_ws()
        task.cancel()

    asyncio.run(main())
    assert got["q"] and got["t"]
    q = got["q"][0]
    assert q.symbol == contract and q.bid_price <= q.ask_price  # type: ignore[attr-defined]
    assert got["t"][0].price > 0  # type: ignore[attr-defined]
