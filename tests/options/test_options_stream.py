"""The simulator's options stream: msgpack only (412 for JSON), no star quotes (413), trades and quotes
channels only; alpaca-py's OptionDataStream works against it unchanged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
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


async def _run_until_stopped(stream: OptionDataStream, within: float = 15.0) -> None:
    """Run alpaca-py's stream until a handler stops it (or ``within`` seconds pass)."""
    task = asyncio.create_task(stream._run_forever())
    try:
        await asyncio.wait_for(asyncio.shield(task), within)
    except TimeoutError:
        await stream.stop_ws()
    task.cancel()


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

    asyncio.run(_run_until_stopped(stream))
    assert got["q"] and got["t"]
    q = got["q"][0]
    assert q.symbol == contract and q.bid_price <= q.ask_price  # type: ignore[attr-defined]
    assert got["t"][0].price > 0  # type: ignore[attr-defined]


# --- through the gateway -------------------------------------------------------------------------------


@contextmanager
def _gateway(tmp_path: Path, underlying: str, type: str) -> Iterator[tuple[SimServer, Any, str, str]]:
    """A simulator and a gateway over it: (vendor, app, a contract of ``underlying`` with a last trade and a
    quote, the gateway's ``/v1beta1/opra`` URL)."""
    from marketpipe.api.app import create_app
    from tests.api.conftest import ENV, gateway_config, serving

    with SimServer() as vendor:
        chain = OptionHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=vendor.url).get_option_chain(
            OptionChainRequest(underlying_symbol=underlying, type=type)
        )
        contract = next(
            s for s, v in sorted(chain.items()) if v.latest_trade is not None and v.latest_quote is not None
        )
        app = create_app(gateway_config(vendor.url, tmp_path / "gw.duckdb"), env=ENV)
        with serving(app) as url:
            yield vendor, app, contract, "ws" + url[4:] + "/v1beta1/opra"


def test_gateway_options_stream_one_upstream_for_many_clients(tmp_path: Path) -> None:
    with _gateway(tmp_path, "AAPL", "put") as (vendor, app, contract, ws_url):

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

        asyncio.run(_run_until_stopped(stream))
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


async def _until(done: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"not so after {within} s"
        await asyncio.sleep(0.05)


async def _closed_without_close_frame(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read until the connection ends; it must end by a cut (TCP abort), not by a close frame."""
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
            assert msg.type != aiohttp.WSMsgType.CLOSE, "a close frame: the connection was closed, not dropped"
            return


async def test_the_options_stream_drops_connections_now_and_after_auth_as_the_stock_stream(sim: SimServer) -> None:
    stream = sim.options_stream
    assert stream is not None
    contract = "SPY261218C00240000"
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as admin:
        http, ws, _ = await _authed(sim, "opra")
        try:
            await ws.send_bytes(msgpack.packb({"action": "subscribe", "quotes": [contract]}))
            await ws.receive(timeout=5)  # the subscription
            assert msgpack.unpackb((await ws.receive(timeout=5)).data)[0]["T"] == "q"
            bad = await admin.post("/_sim/options/stream/drop", json={"feed": "iex"})  # a stock feed
            assert bad.status_code == 400
            r = await admin.post("/_sim/options/stream/drop", json={"feed": "opra"})
            assert r.status_code == 200 and r.json() == {"dropped": 1}
            await _closed_without_close_frame(ws)
        finally:
            await ws.close()
            await http.close()
        assert (await admin.put("/_sim/options/stream/faults", json={"stall": True})).status_code == 400  # not played
        r = await admin.put("/_sim/options/stream/faults", json={"drop_after_s": 0.2})
        assert r.status_code == 200 and r.json()["faults"] == {"drop_after_s": 0.2}
        http, ws, auth = await _authed(sim, "indicative")
        try:
            assert auth == [{"T": "success", "msg": "authenticated"}]  # authenticated, then cut
            await ws.send_bytes(msgpack.packb({"action": "subscribe", "quotes": [contract]}))
            await _closed_without_close_frame(ws)
        finally:
            await ws.close()
            await http.close()
        r = await admin.delete("/_sim/options/stream/faults")
        assert r.json()["faults"] == {"drop_after_s": None} and stream.faults.drop_after_s is None
        assert (await admin.get("/_sim/options/stream")).json()["stats"] == {"open": 0}


def test_alpaca_py_through_the_gateway_keeps_receiving_when_the_gateways_upstream_drops(tmp_path: Path) -> None:
    """The gateway's upstream options connection is cut by the vendor: the gateway re-opens it and subscribes
    again; alpaca-py's OptionDataStream, on its one connection to the gateway, keeps receiving quotes. Like
    the compatible stock stream, the gateway sends its clients nothing of the outage (Alpaca has no such
    message): a raw client sees only the vendor's data messages."""
    with _gateway(tmp_path, "QQQ", "call") as (vendor, app, contract, ws_url):
        stream = OptionDataStream("ANY", "ANY", feed=OptionsFeed.OPRA, url_override=ws_url)
        quotes: list[Any] = []

        async def on_quote(q: object) -> None:
            quotes.append(q)

        stream.subscribe_quotes(on_quote, contract)

        async def main() -> None:
            task = asyncio.create_task(stream._run_forever())
            http = aiohttp.ClientSession()
            raw = await http.ws_connect(ws_url, headers=MSGPACK)
            try:
                await raw.receive(timeout=5)  # connected
                await raw.send_bytes(msgpack.packb({"action": "auth", "key": "ANY", "secret": "ANY"}))
                await raw.receive(timeout=5)  # authenticated
                await raw.send_bytes(msgpack.packb({"action": "subscribe", "quotes": [contract]}))
                assert msgpack.unpackb((await raw.receive(timeout=5)).data)[0]["T"] == "subscription"
                await _until(lambda: len(quotes) >= 3)
                client_ws = stream._ws
                up = app.state.mp.options_live.upstreams["opra"]  # the one upstream, opened on first use
                assert up.connects == 1
                assert await asyncio.to_thread(vendor.drop_option_streams, "opra") == 1
                await _until(lambda: up.connects == 2)  # re-opened by the gateway, subscribed again
                reopened = up.connected_since
                assert reopened is not None and up.losses >= 1
                seen = len(quotes)
                await _until(lambda: any(q.timestamp >= reopened for q in quotes[seen:]))
                assert stream._ws is client_ws  # alpaca-py's own connection was never touched
                # what a client got across the outage: the vendor's data messages and nothing else
                got: list[dict[str, Any]] = []
                while not any(m["t"] >= reopened for m in got):
                    got += msgpack.unpackb((await raw.receive(timeout=10)).data, timestamp=3)
                assert {m["T"] for m in got} == {"q"} and {m["S"] for m in got} == {contract}
            finally:
                await stream.stop_ws()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await raw.close()
                await http.close()

        asyncio.run(main())
        assert quotes[0].symbol == contract
