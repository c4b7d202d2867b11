"""The simulator's options stream: msgpack only (412 for JSON), no star quotes (413), trades and quotes
channels only; alpaca-py's OptionDataStream works against it unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


# --- through the gateway -------------------------------------------------------------------------------


def test_gateway_options_stream_one_upstream_for_many_clients(tmp_path: Path) -> None:
    from marketpipe.api.app import create_app
    from tests.api.conftest import ENV, gateway_config, serving

    with SimServer() as vendor:
        chain = OptionHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=vendor.url).get_option_chain(
            OptionChainRequest(underlying_symbol="AAPL", type="put")
        )
        contract = next(s for s, v in sorted(chain.items()) if v.latest_trade is not None)
        app = create_app(gateway_config(vendor.url, tmp_path / "gw.duckdb"), env=ENV)
        with serving(app) as url:
            ws_url = "ws" + url[4:] + "/v1beta1/opra"

            async def main() -> tuple[list[object], list[object]]:
                async def one() -> list[object]:
                    http = aiohttp.ClientSession()
                    ws = await http.ws_connect(ws_url, headers=MSGPACK)
                    try:
                        assert msgpack.unpackb((await ws.receive(timeout=5)).data)[0]["msg"] == "connected"
                        await ws.send_bytes(msgpack.packb({"action": "auth", "key": "ANY", "secret": "ANY"}))
                        assert msgpack.unpackb((await ws.receive(timeout=5)).data)[0]["msg"] == "authenticated"
                        await ws.send_bytes(msgpack.packb({"action": "subscribe", "quotes": ["*"]}))
                        assert msgpack.unpackb((await ws.receive(timeout=5)).data)[0]["code"] == 413
                        await ws.send_bytes(
                            msgpack.packb({"action": "subscribe", "quotes": [contract], "trades": [contract]})
                        )
                        sub = msgpack.unpackb((await ws.receive(timeout=5)).data)[0]
                        assert sub == {"T": "subscription", "trades": [contract], "quotes": [contract]}
                        got: list[object] = []
                        while len(got) < 6:
                            frame = msgpack.unpackb((await ws.receive(timeout=5)).data, timestamp=3)
                            got += frame
                        return got
                    finally:
                        await ws.close()
                        await http.close()

                a, b = await asyncio.gather(one(), one())
                return a, b

            a, b = asyncio.run(main())
            for got in (a, b):
                assert {m["T"] for m in got} <= {"q", "t"} and all(m["S"] == contract for m in got)  # type: ignore[index]
                q = next(m for m in got if m["T"] == "q")  # type: ignore[index]
                assert q["bp"] <= q["ap"] and q["t"].tzinfo is not None  # type: ignore[index]
            live = app.state.mp.options_live
            assert list(live.upstreams) == ["opra"] and live.upstreams["opra"].connects == 1  # one upstream
            assert live.upstreams["opra"].source == "sim:alpaca"
            assert vendor.options_stream is not None

            # alpaca-py's OptionDataStream, unchanged, against the gateway
            stream = OptionDataStream("ANY", "ANY", feed=OptionsFeed.OPRA, url_override=ws_url)
            seen: list[object] = []

            async def on_quote(q: object) -> None:
                seen.append(q)
                await stream.stop_ws()

            stream.subscribe_quotes(on_quote, contract)

            async def run() -> None:
                task = asyncio.create_task(stream._run_forever())
                try:
                    await asyncio.wait_for(asyncio.shield(task), 15)
                except TimeoutError:
                    await stream.stop_ws()
                task.cancel()

            asyncio.run(run())
            assert seen and seen[0].symbol == contract  # type: ignore[attr-defined]

            # a JSON client is refused with the vendor's 412
            async def json_client() -> object:
                http = aiohttp.ClientSession()
                ws = await http.ws_connect(ws_url)
                try:
                    return orjson.loads((await ws.receive(timeout=5)).data)
                finally:
                    await ws.close()
                    await http.close()

            assert asyncio.run(json_client()) == [
                {"T": "error", "code": 412, "msg": "option messages are only available in MsgPack format"}
            ]
