"""Option contracts on the project's own stream (/v1/stream): the gateway's live hub serves OCC contracts
through its options lane — one upstream options stream per feed (shared with /v1beta1/{indicative,opra}),
its own router (``live_options``), the options REST latest values as the fallback, labelled delayed. The
vendor is the simulator's options face (msgpack stream and REST)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
import requests
from websockets.asyncio.client import connect

from marketpipe.api.app import create_app
from marketpipe.sim.server import SimServer

from .conftest import ENV, gateway_config, serving
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
