"""Option contracts on the project's own stream (/v1/stream): the gateway's live hub serves OCC contracts
through its options lane — one upstream options stream per feed (shared with /v1beta1/{indicative,opra}),
its own router (``live_options``), the options REST latest values as the fallback, labelled delayed. The
vendor is the simulator's options face (msgpack stream and REST)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import requests
from websockets.asyncio.client import connect

from marketpipe.api.app import create_app
from marketpipe.sim.server import SimServer

from .conftest import ENV, gateway_config, serving
from .test_live_api import sse_events
from .test_live_crypto import LIVE, collect, frame, of, ws_url

pytestmark = pytest.mark.timeout(60)
AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}
ADMIN = {"Authorization": "Bearer admintoken"}


@pytest.fixture(scope="module")
def gateway(vendor: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = gateway_config(vendor.url, tmp_path_factory.mktemp("liveoptions") / "gw.duckdb", stream=LIVE)
    with serving(create_app(cfg, env=ENV)) as url:
        yield url


@pytest.fixture(scope="module")
def contracts(vendor: SimServer) -> list[str]:
    """SPY calls the simulator quotes two-sided and has a last trade for (REST and stream agree on them)."""
    doc = requests.get(
        f"{vendor.url}/v1beta1/options/snapshots/SPY", params={"type": "call", "limit": 1000}, headers=AUTH, timeout=10
    ).json()
    quoted = sorted(
        s for s, v in doc["snapshots"].items() if v.get("latestTrade") and v.get("latestQuote", {}).get("bp", 0) > 0
    )
    assert len(quoted) >= 2
    return quoted


async def test_a_contract_streams_real_time_prices_trades_and_quotes(gateway: str, contracts: list[str]) -> None:
    occ = contracts[0]
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http, connect(ws_url(gateway)) as ws:
        await frame(ws)  # welcome
        await ws.send(
            orjson.dumps(
                {"action": "subscribe", "symbols": [occ.lower()], "channels": ["prices", "trades", "quotes"]}
            ).decode()
        )
        got = await collect(ws, lambda ms: all(of(ms, k, symbol=occ) for k in ("price", "trade", "quote")))
        assert of(got, "subscribed")[-1]["symbols"] == [occ]
        price = of(got, "price", symbol=occ)[0]
        assert price["is_real_time"] is True and price["stale"] is False and price["quality_score"] == 1.0
        assert price["source"] == "sim:alpaca"
        trade, quote = of(got, "trade")[0], of(got, "quote")[0]
        assert trade["feed"] == "opra" and trade["price"] > 0 and trade["size"] > 0  # the unlimited plan's feed
        assert 0 < quote["bid_price"] <= quote["ask_price"]
        assert not any(k in m for m in (price, trade, quote) for k in ("delta", "gamma", "implied_volatility"))
        lane = (await http.get("/health/datasource")).json()["live"]["options"]
        assert lane["asset_class"] == "option" and lane["primary"]["stream"]["encoding"] == "msgpack"
        assert lane["primary"]["stream"]["connected"] is True
        # bad input: a channel options do not stream, a contract that cannot exist
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": [occ], "channels": ["bars"]}).decode())
        assert of(await collect(ws, lambda ms: bool(of(ms, "error"))), "error")[0]["code"] == "INVALID_ARGUMENT"
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["SPY261218C00000000"]}).decode())
        err = of(await collect(ws, lambda ms: bool(of(ms, "error"))), "error")[0]
        assert err["code"] == "INVALID_OPTION_SYMBOL"


async def test_while_failed_over_contracts_are_polled_from_the_options_rest_api_labelled_delayed(
    gateway: str, contracts: list[str]
) -> None:
    first, fresh = contracts[0], contracts[-1]
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http, connect(ws_url(gateway)) as ws:
        await frame(ws)
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": [first]}).decode())
        await collect(ws, lambda ms: bool(of(ms, "price", symbol=first, is_real_time=True)))
        r = await http.post("/admin/failover", json={"live": "fallback"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        try:
            # a contract the board has not seen: the REST latest trade is older than what the stream gave
            # for the first one, and a poll publishes only what is newer than the board holds
            await ws.send(orjson.dumps({"action": "subscribe", "symbols": [fresh]}).decode())
            polled = await collect(ws, lambda ms: bool(of(ms, "price", symbol=fresh, is_real_time=False)))
            p = of(polled, "price", symbol=fresh, is_real_time=False)[0]
            assert p["source"] == "sim:alpaca" and p["quality_score"] == 0.8 and p["stale"] is False
            assert "fallback_active" in [m["state"] for m in of(polled, "status", asset_class="option")]
            lane = (await http.get("/health/datasource")).json()["live"]["options"]
            assert lane["stats"]["fallback_polls"] >= 1
        finally:
            await http.post("/admin/failover", json={"live": "auto"}, headers=ADMIN)


async def options_lane(http: httpx.AsyncClient, done: Any, within: float = 20.0) -> dict[str, Any]:
    """The options lane of /health/datasource once ``done(lane)`` holds."""
    deadline = time.monotonic() + within
    while True:
        lane: dict[str, Any] = (await http.get("/health/datasource")).json()["live"]["options"]
        if done(lane):
            return lane
        if time.monotonic() > deadline:
            raise AssertionError(f"options lane not as expected after {within} s: {lane['state']}")
        await asyncio.sleep(0.1)


async def test_a_lost_upstream_fails_over_to_rest_labelled_delayed_then_the_lane_reconnects_and_resubscribes(
    gateway: str, vendor: SimServer, contracts: list[str]
) -> None:
    """A real upstream loss: the simulator drops the gateway's options stream connection and, while the
    fault holds, every connection the gateway opens again right after it authenticates (no data). The lane
    fails over to the options REST latest values, labelled delayed; once the vendor keeps connections
    again the lane reconnects, subscribes again (a contract asked for while it was down included) and
    real-time values flow."""
    stream = vendor.options_stream
    assert stream is not None and len(contracts) >= 3
    first, fresh = contracts[0], contracts[1]  # the other tests of this module use contracts[0] and [-1] only
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http, connect(ws_url(gateway)) as ws:
        await frame(ws)
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": [first]}).decode())
        await collect(ws, lambda ms: bool(of(ms, "price", symbol=first, is_real_time=True)))
        lane = await options_lane(http, lambda lane: lane["state"] == "primary_active")  # an earlier test's
        assert lane["primary"]["stream"]["connected"] is True  # failover ends once the stream is back
        before = lane["primary"]["stream"]["reconnects"]
        try:
            assert await asyncio.to_thread(vendor.drop_option_streams) >= 1  # the gateway's connection, cut
            stream.set_faults(drop_after_s=0.01)  # and each one it opens again, at its first tick, before data
            down = await collect(
                ws, lambda ms: bool(of(ms, "status", asset_class="option", state="fallback_active")), within=30
            )
            assert not of(down, "status", asset_class="equity")  # the stock lane lost nothing
            # a contract the board has not seen (a poll publishes only what is newer than the board holds)
            await ws.send(orjson.dumps({"action": "subscribe", "symbols": [fresh]}).decode())
            polled = await collect(ws, lambda ms: bool(of(ms, "price", symbol=fresh, is_real_time=False)), within=30)
            p = of(polled, "price", symbol=fresh, is_real_time=False)[0]
            assert p["source"] == "sim:alpaca" and p["quality_score"] == 0.8 and p["stale"] is False
            assert not of(polled, "price", symbol=fresh, is_real_time=True)  # no stream data while it is down
            lane = (await http.get("/health/datasource")).json()["live"]["options"]
            assert lane["stats"]["fallback_polls"] >= 1
            assert lane["primary"]["stream"]["reconnects"] > before
        finally:
            stream.clear_faults()
        back = await collect(
            ws, lambda ms: bool(of(ms, "status", asset_class="option", state="primary_active")), within=30
        )
        assert of(back, "status", asset_class="option", state="primary_active")[-1]["active_source"] == "primary"
        # subscribed again upstream: both contracts stream in real time, the one asked for while down too
        live = await collect(
            ws,
            lambda ms: all(of(ms, "price", symbol=s, is_real_time=True, stale=False) for s in (first, fresh)),
            within=30,
        )
        assert of(live, "price", symbol=fresh, is_real_time=True)[0]["quality_score"] == 1.0
        lane = (await http.get("/health/datasource")).json()["live"]["options"]
        assert lane["primary"]["stream"]["connected"] is True
        assert sorted(lane["primary"]["stream"]["server_subscriptions"]["trades"]) == sorted([first, fresh])


async def test_sse_takes_option_contracts_and_pairs_with_channels(gateway: str, contracts: list[str]) -> None:
    occ = contracts[0]

    def got(events: list[tuple[str, dict[str, Any]]], kind: str, symbol: str) -> list[dict[str, Any]]:
        return [d for e, d in events if e == kind and d.get("symbol") == symbol]

    events = await asyncio.to_thread(
        sse_events,
        gateway,
        {"symbols": f"{occ.lower()},btc/usd", "channels": "prices,quotes"},
        lambda ev: all(got(ev, k, s) for k in ("price", "quote") for s in (occ, "BTC/USD")),
    )
    assert events[0][0] == "welcome"
    price = got(events, "price", occ)[-1]
    assert price["source"] == "sim:alpaca" and price["quality_score"] in (1.0, 0.8)
    quote = got(events, "quote", occ)[0]
    assert quote["type"] == "quote" and quote["feed"] == "opra" and 0 < quote["bid_price"] <= quote["ask_price"]
    assert not any(k in d for _, d in events for k in ("delta", "gamma", "implied_volatility"))  # never computed
    assert got(events, "quote", "BTC/USD")[0]["feed"] == "us"
    # bad input is a 400 before the stream starts
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
        r = await http.get("/v1/stream/sse", params={"symbols": "SPY261218C00000000"})  # a zero strike
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_OPTION_SYMBOL"
        r = await http.get("/v1/stream/sse", params={"symbols": occ, "channels": "prices,nope"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT"
