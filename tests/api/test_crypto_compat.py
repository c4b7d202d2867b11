"""alpaca-py's CryptoHistoricalDataClient, unchanged, against the gateway's /v1beta3/crypto routes — the
vendor played by the simulator. Historical answers must be the vendor's, byte for byte in their values."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from alpaca.common.exceptions import APIError
from alpaca.data import requests as rq
from alpaca.data.historical.crypto import CryptoHistoricalDataClient
from alpaca.data.timeframe import TimeFrame

from marketpipe.api.app import create_app
from marketpipe.core.errors import StreamFailed
from marketpipe.core.metrics import REGISTRY
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config, serving

SAT = datetime(2024, 3, 2, tzinfo=UTC)
MON = datetime(2024, 3, 4, tzinfo=UTC)


@pytest.fixture(scope="module")
def gateway(vendor: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose upstream Alpaca is the simulator (crypto needs no client keys)."""
    app = create_app(gateway_config(vendor.url, tmp_path_factory.mktemp("crypto") / "gw.duckdb"), env=ENV)
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def gw(gateway: str) -> CryptoHistoricalDataClient:
    return CryptoHistoricalDataClient(url_override=gateway)


@pytest.fixture(scope="module")
def direct(vendor: SimServer) -> CryptoHistoricalDataClient:
    return CryptoHistoricalDataClient(url_override=vendor.url)


def test_a_weekend_of_bars_through_the_gateway_is_the_vendors(
    gw: CryptoHistoricalDataClient, direct: CryptoHistoricalDataClient
) -> None:
    req = rq.CryptoBarsRequest(
        symbol_or_symbols=["ETH/USD", "BTC/USD"], timeframe=TimeFrame.Minute, start=SAT, end=MON - timedelta(seconds=1)
    )
    via, raw = gw.get_crypto_bars(req), direct.get_crypto_bars(req)
    assert {s: len(v) for s, v in via.data.items()} == {"BTC/USD": 2880, "ETH/USD": 2880}  # pages followed
    assert via.data == raw.data  # every value, fractional volumes included
    df = gw.get_crypto_bars(req).df
    assert df.index.names == ["symbol", "timestamp"] and df["volume"].dtype == "float64"


def test_trades_quotes_latest_books_and_snapshots(
    gw: CryptoHistoricalDataClient, direct: CryptoHistoricalDataClient
) -> None:
    treq = rq.CryptoTradesRequest(symbol_or_symbols="BTC/USD", start=SAT, end=SAT + timedelta(minutes=3))
    assert gw.get_crypto_trades(treq).data == direct.get_crypto_trades(treq).data
    qreq = rq.CryptoQuoteRequest(symbol_or_symbols="ETH/USD", start=SAT, end=SAT + timedelta(minutes=1))
    assert gw.get_crypto_quotes(qreq).data == direct.get_crypto_quotes(qreq).data
    trade = gw.get_crypto_latest_trade(rq.CryptoLatestTradeRequest(symbol_or_symbols=["BTC/USD", "ETH/USD"]))
    assert set(trade) == {"BTC/USD", "ETH/USD"} and trade["BTC/USD"].size > 0
    quote = gw.get_crypto_latest_quote(rq.CryptoLatestQuoteRequest(symbol_or_symbols="BTC/USD"))["BTC/USD"]
    assert quote.bid_price < quote.ask_price
    book = gw.get_crypto_latest_orderbook(rq.CryptoLatestOrderbookRequest(symbol_or_symbols="BTC/USD"))["BTC/USD"]
    assert len(book.bids) == len(book.asks) == 20 and book.bids[0].price < book.asks[0].price
    snap = gw.get_crypto_snapshot(rq.CryptoSnapshotRequest(symbol_or_symbols=["BTC/USD", "ZZZ/USD"]))
    assert set(snap) == {"BTC/USD"}
    s = snap["BTC/USD"]
    assert s.daily_bar is not None and s.previous_daily_bar is not None and s.latest_trade is not None


def test_bad_input_gets_the_vendors_error_shape(gateway: str, gw: CryptoHistoricalDataClient) -> None:
    with httpx.Client(base_url=gateway) as http:
        r = http.get("/v1beta3/crypto/us/bars", params={"symbols": "BTCUSD", "timeframe": "1Min"})
        assert r.status_code == 400 and "did you mean 'BTC/USD'" in r.json()["message"]
        r = http.get("/v1beta3/crypto/mars/latest/trades", params={"symbols": "BTC/USD"})
        assert r.status_code == 400 and "unknown crypto location" in r.json()["message"]
        r = http.get("/v1beta3/crypto/us/latest/trades", params={"symbols": "ZZZ/USD"})
        assert r.status_code == 200 and r.json() == {"trades": {}}
        r = http.get("/v1beta3/crypto/us/bars", params={"symbols": "BTC/USD", "timeframe": "1Min", "start": "x"})
        assert r.status_code == 400 and r.json()["message"] == "invalid start"
        r = http.get(
            "/v1beta3/crypto/us/bars", params={"symbols": "BTC/USD", "timeframe": "1Min", "start": "2024-03-02"}
        )
        assert r.headers["X-Marketpipe-Source"] == "sim:alpaca"
    with pytest.raises(APIError):
        gw.get_crypto_bars(rq.CryptoBarsRequest(symbol_or_symbols="BTCUSD", timeframe=TimeFrame.Minute, start=SAT))


async def test_alpaca_py_crypto_stream_through_the_gateway_shares_one_upstream(gateway: str, vendor: SimServer) -> None:
    from alpaca.data.live import CryptoDataStream

    got: dict[str, list[Any]] = {"trades": [], "orderbooks": []}
    enough = asyncio.Event()

    async def on_trade(item: Any) -> None:
        got["trades"].append(item)
        if len(got["trades"]) >= 5 and len(got["orderbooks"]) >= 3:
            enough.set()

    async def on_book(item: Any) -> None:
        got["orderbooks"].append(item)
        if len(got["trades"]) >= 5 and len(got["orderbooks"]) >= 3:
            enough.set()

    stream = CryptoDataStream("ANYKEY", "ANYSECRET", url_override="ws" + gateway[4:] + "/v1beta3/crypto/us")
    stream.subscribe_trades(on_trade, "BTC/USD")
    stream.subscribe_orderbooks(on_book, "ETH/USD")
    task = asyncio.create_task(stream._run_forever())
    try:
        await asyncio.wait_for(enough.wait(), 15)
        # a second client, raw JSON: the hub hands it the current whole book at once, over the same upstream
        async with aiohttp.ClientSession() as http, http.ws_connect("ws" + gateway[4:] + "/v1beta3/crypto/us") as ws:
            assert orjson.loads((await ws.receive()).data) == [{"T": "success", "msg": "connected"}]
            await ws.send_str('{"action":"auth","key":"k","secret":"s"}')
            assert orjson.loads((await ws.receive()).data)[0]["msg"] == "authenticated"
            await ws.send_str('{"action":"subscribe","orderbooks":["ETH/USD"]}')
            replies = [orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data) for _ in range(2)]
            assert {r[0]["T"] for r in replies} == {"subscription", "o"}
            (book,) = next(r for r in replies if r[0]["T"] == "o")
            assert book["r"] is True and book["b"] and book["a"]
            assert vendor.crypto_stream is not None and len(vendor.crypto_stream._conns) == 1
            await ws.send_str('{"action":"subscribe","trades":["BTCUSD"]}')
            assert orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)[0]["code"] == 400
    finally:
        await stream.stop_ws()
        await asyncio.wait_for(task, 10)
    assert {t.symbol for t in got["trades"]} == {"BTC/USD"} and all(t.size > 0 for t in got["trades"])
    assert got["orderbooks"][0].reset is True and not any(o.reset for o in got["orderbooks"][1:])


def test_v1_bars_serve_crypto_pairs_with_fractional_volumes(gateway: str, direct: CryptoHistoricalDataClient) -> None:
    params = {"symbols": "BTC/USD,ETH/USD", "timeframe": "1Hour", "start": "2024-03-02T00:00:00Z"}
    params |= {"end": "2024-03-03T00:00:00Z", "limit": "30"}
    rows: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(base_url=gateway, timeout=30) as http:
        token = None
        while True:
            body = http.get("/v1/bars", params={**params, **({"page_token": token} if token else {})}).json()
            rows += [(sym, bar) for sym, bars in body["bars"].items() for bar in bars]
            token = body.get("next_page_token")
            if not token:
                break
    assert [sym for sym, _ in rows] == ["BTC/USD"] * 24 + ["ETH/USD"] * 24  # across two pages
    vendor = direct.get_crypto_bars(
        rq.CryptoBarsRequest(
            symbol_or_symbols="BTC/USD", timeframe=TimeFrame.Hour, start=SAT, end=SAT + timedelta(hours=23)
        )
    )["BTC/USD"]
    assert [bar["volume"] for _, bar in rows[:24]] == [b.volume for b in vendor]  # fractions, exactly


async def test_the_gateway_reconnects_a_dropped_upstream_and_clients_keep_their_subscription(
    gateway: str, vendor: SimServer
) -> None:
    assert vendor.crypto_stream is not None and vendor._loop is not None

    async def trades(ws: aiohttp.ClientWebSocketResponse, n: int) -> int:
        seen = 0
        while seen < n:
            frame = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
            seen += sum(1 for m in frame if m.get("T") == "t" and m["S"] == "LTC/USD")
        return seen

    async with aiohttp.ClientSession() as http, http.ws_connect("ws" + gateway[4:] + "/v1beta3/crypto/us") as ws:
        await ws.receive()
        await ws.send_str('{"action":"auth","key":"k","secret":"s"}')
        await ws.receive()
        await ws.send_str('{"action":"subscribe","trades":["LTC/USD"]}')
        assert await trades(ws, 3) >= 3
        labels = {"provider": "alpaca_crypto", "reason": StreamFailed.code}
        before = REGISTRY.get_sample_value("marketpipe_stream_reconnects_total", labels) or 0.0
        dropped = asyncio.run_coroutine_threadsafe(vendor.crypto_stream.drop(), vendor._loop).result(5)
        assert dropped >= 1
        for _ in range(100):  # the hub notices the drop and schedules a reconnect
            if (REGISTRY.get_sample_value("marketpipe_stream_reconnects_total", labels) or 0.0) > before:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no reconnect counted")
        assert await trades(ws, 3) >= 3  # the hub reconnected and subscribed again; the client noticed nothing
        assert len(vendor.crypto_stream._conns) >= 1
