"""The simulator's crypto face, read by alpaca-py's CryptoHistoricalDataClient unchanged and over raw HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from alpaca.data.historical.crypto import CryptoHistoricalDataClient
from alpaca.data.requests import (
    CryptoBarsRequest,
    CryptoLatestOrderbookRequest,
    CryptoLatestQuoteRequest,
    CryptoLatestTradeRequest,
    CryptoSnapshotRequest,
    CryptoTradesRequest,
)
from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer

SAT = datetime(2024, 3, 2, tzinfo=UTC)
MON = datetime(2024, 3, 4, tzinfo=UTC)
END = MON - timedelta(seconds=1)  # the vendor's end is inclusive: the weekend, Monday's first bar left out


@pytest.fixture
def client(sim: SimServer) -> CryptoHistoricalDataClient:
    return CryptoHistoricalDataClient(url_override=sim.url)  # no keys: crypto data needs none


@pytest.fixture
def chicago(sim: SimServer) -> Iterator[None]:
    cfg = sim.face.crypto.config
    cfg.daily_tz = "America/Chicago"
    yield
    cfg.daily_tz = "UTC"


def test_a_weekend_of_minute_bars_has_every_minute(client: CryptoHistoricalDataClient) -> None:
    req = CryptoBarsRequest(symbol_or_symbols=["BTC/USD", "ETH/USD"], timeframe=TimeFrame.Minute, start=SAT, end=END)
    bars = client.get_crypto_bars(req)
    for sym in ("BTC/USD", "ETH/USD"):
        stamps = [b.timestamp for b in bars[sym]]
        assert len(stamps) == 2880  # followed next_page_token over the 1000-row... pages alpaca-py asks for
        assert stamps[0] == SAT and stamps[-1] == MON - timedelta(minutes=1)
        assert all(b.low <= min(b.open, b.close) <= max(b.open, b.close) <= b.high for b in bars[sym])
        assert all(b.low <= b.vwap <= b.high and b.volume > 0 for b in bars[sym])
    # fractional volumes with many decimals, as sent
    assert any(0 < b.volume < 1 and len(repr(b.volume).split(".")[1]) >= 6 for b in bars["BTC/USD"])


def test_bars_are_the_aggregates_of_the_trades(client: CryptoHistoricalDataClient) -> None:
    start = SAT + timedelta(hours=13, minutes=7)
    (bar,) = client.get_crypto_bars(
        CryptoBarsRequest(
            symbol_or_symbols="BTC/USD", timeframe=TimeFrame.Minute, start=start, end=start + timedelta(seconds=59)
        )
    )["BTC/USD"]
    trades = client.get_crypto_trades(
        CryptoTradesRequest(symbol_or_symbols="BTC/USD", start=start, end=start + timedelta(microseconds=59_999_999))
    )["BTC/USD"]
    assert len(trades) == bar.trade_count
    assert (trades[0].price, trades[-1].price) == (bar.open, bar.close)
    assert max(t.price for t in trades) == bar.high and min(t.price for t in trades) == bar.low
    assert round(sum(t.size for t in trades), 9) == bar.volume
    assert all(t.size == round(t.size, 8) and t.size > 0 for t in trades)


def test_daily_bars_follow_the_alignment_setting(
    sim: SimServer, client: CryptoHistoricalDataClient, chicago: None
) -> None:
    req = CryptoBarsRequest(symbol_or_symbols="BTC/USD", timeframe=TimeFrame.Day, start=SAT, end=END)
    stamps = [b.timestamp for b in client.get_crypto_bars(req)["BTC/USD"]]
    assert stamps == [datetime(2024, 3, d, 6, tzinfo=UTC) for d in (2, 3)]  # Chicago midnight (CST)


def test_daily_bars_at_utc_midnight_by_default(client: CryptoHistoricalDataClient) -> None:
    req = CryptoBarsRequest(symbol_or_symbols="BTC/USD", timeframe=TimeFrame(4, TimeFrameUnit.Hour), start=SAT, end=END)
    assert len(client.get_crypto_bars(req)["BTC/USD"]) == 12
    req = CryptoBarsRequest(symbol_or_symbols="BTC/USD", timeframe=TimeFrame.Day, start=SAT, end=END)
    assert [b.timestamp for b in client.get_crypto_bars(req)["BTC/USD"]] == [SAT, SAT + timedelta(days=1)]


def test_latest_values_orderbook_and_snapshot(client: CryptoHistoricalDataClient) -> None:
    trade = client.get_crypto_latest_trade(CryptoLatestTradeRequest(symbol_or_symbols="BTC/USD"))["BTC/USD"]
    quote = client.get_crypto_latest_quote(CryptoLatestQuoteRequest(symbol_or_symbols="BTC/USD"))["BTC/USD"]
    assert quote.bid_price < quote.ask_price and abs(quote.bid_price - trade.price) / trade.price < 0.01
    book = client.get_crypto_latest_orderbook(CryptoLatestOrderbookRequest(symbol_or_symbols=["BTC/USD", "ETH/USD"]))
    bids, asks = book["BTC/USD"].bids, book["BTC/USD"].asks
    assert len(bids) == len(asks) == 20
    assert [b.price for b in bids] == sorted((b.price for b in bids), reverse=True)
    assert bids[0].price < asks[0].price and all(level.size > 0 for level in bids + asks)
    snap = client.get_crypto_snapshot(CryptoSnapshotRequest(symbol_or_symbols="ETH/USD"))["ETH/USD"]
    assert snap.daily_bar is not None and snap.previous_daily_bar is not None and snap.minute_bar is not None
    assert snap.previous_daily_bar.timestamp == snap.daily_bar.timestamp - timedelta(days=1)


def test_pages_over_symbols_and_sorts(sim: SimServer) -> None:
    url = f"{sim.url}/v1beta3/crypto/us/bars"
    q = {
        "symbols": "ETH/USD,BTC/USD",
        "timeframe": "1Hour",
        "start": "2024-03-02",
        "end": "2024-03-02T23:59:59Z",
        "limit": "30",
    }
    got: dict[str, list[str]] = {}
    pages = 0
    with httpx.Client() as http:
        token = None
        while True:
            body = http.get(url, params={**q, **({"page_token": token} if token else {})}).json()
            pages += 1
            for sym, rows in body["bars"].items():
                got.setdefault(sym, []).extend(r["t"] for r in rows)
            token = body["next_page_token"]
            if token is None:
                break
        assert pages == 2 and list(got) == ["BTC/USD", "ETH/USD"] and [len(v) for v in got.values()] == [24, 24]
        desc = http.get(url, params={**q, "symbols": "BTC/USD", "sort": "desc", "limit": "3"}).json()
        assert [r["t"] for r in desc["bars"]["BTC/USD"]] == got["BTC/USD"][::-1][:3]
        # the URL-encoded slash alpaca-py sends is the same symbol
        enc = http.get(f"{url}?symbols=BTC%2FUSD&timeframe=1Hour&start=2024-03-02&end=2024-03-02T23:59:59Z").json()
        assert [r["t"] for r in enc["bars"]["BTC/USD"]] == got["BTC/USD"]


def test_bad_input(sim: SimServer) -> None:
    with httpx.Client(base_url=sim.url) as http:
        r = http.get("/v1beta3/crypto/us/bars", params={"symbols": "BTCUSD", "timeframe": "1Min"})
        assert r.status_code == 400 and r.json() == {"message": "invalid symbol: BTCUSD"}
        r = http.get("/v1beta3/crypto/us/latest/trades", params={"symbols": "ZZZ/USD,BTC/USD"})
        assert r.status_code == 200 and list(r.json()["trades"]) == ["BTC/USD"]  # unknown pair left out
        r = http.get("/v1beta3/crypto/us/bars", params={"symbols": "ZZZ/USD", "timeframe": "1Min"})
        assert r.json() == {"bars": {}, "next_page_token": None}
        assert http.get("/v1beta3/crypto/mars/bars", params={"symbols": "BTC/USD"}).status_code == 404
        assert (
            http.get("/v1beta3/crypto/us/bars", params={"symbols": "BTC/USD", "timeframe": "7Min"}).status_code == 400
        )
        r = http.get("/v1beta3/crypto/eu-1/latest/trades", params={"symbols": "BTC/EUR"})
        assert list(r.json()["trades"]) == ["BTC/EUR"]  # eu-1 lists the EUR pairs, us does not
        assert http.get("/v1beta3/crypto/us/latest/trades", params={"symbols": "BTC/EUR"}).json() == {"trades": {}}
        cfg = sim.face.crypto.config
        cfg.locations = ("us",)
        try:
            r = http.get("/v1beta3/crypto/eu-1/latest/trades", params={"symbols": "BTC/EUR"})
            assert r.status_code == 403 and "not enabled" in r.json()["message"]
        finally:
            cfg.locations = ("us", "us-1", "us-2", "eu-1", "bs-1")


def test_faults_reach_the_crypto_routes(sim: SimServer) -> None:
    sim.faults.set([FaultRule(kind="http_500", times=1)])
    with httpx.Client(base_url=sim.url) as http:
        params = {"symbols": "BTC/USD", "timeframe": "1Min", "start": "2024-03-02", "end": "2024-03-02T00:04:59Z"}
        assert http.get("/v1beta3/crypto/us/bars", params=params).status_code == 500
        assert len(http.get("/v1beta3/crypto/us/bars", params=params).json()["bars"]["BTC/USD"]) == 5
        sim.faults.set([FaultRule(kind="token_loop")])
        body = http.get("/v1beta3/crypto/us/bars", params=params).json()
        assert body["next_page_token"] is not None  # a last page that points back at the start
