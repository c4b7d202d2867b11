"""The official alpaca-py client, unchanged, against the simulator."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alpaca.common.exceptions import APIError
from alpaca.data.enums import DataFeed
from alpaca.data.historical import StockHistoricalDataClient
from alpaca.data.requests import (
    StockBarsRequest,
    StockLatestBarRequest,
    StockLatestQuoteRequest,
    StockLatestTradeRequest,
    StockQuotesRequest,
    StockSnapshotRequest,
    StockTradesRequest,
)
from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer


@pytest.fixture
def client(sim_server: SimServer) -> StockHistoricalDataClient:
    return StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=sim_server.url)


def test_get_stock_bars_multi_symbol_with_pagination(client: StockHistoricalDataClient) -> None:
    # 2 symbols x 15 sessions x 390 = 11,700 bars: more than one 10,000-row page
    req = StockBarsRequest(
        symbol_or_symbols=["AAPL", "MSFT"],
        timeframe=TimeFrame.Minute,
        start=datetime(2024, 3, 4, tzinfo=UTC),
        end=datetime(2024, 3, 22, 23, tzinfo=UTC),
    )
    barset = client.get_stock_bars(req)
    assert {s: len(v) for s, v in barset.data.items()} == {"AAPL": 5850, "MSFT": 5850}
    first = barset.data["AAPL"][0]
    assert first.timestamp == datetime(2024, 3, 4, 14, 30, tzinfo=UTC)
    assert first.high >= first.low and first.volume > 0 and first.trade_count and first.vwap
    df = barset.df
    assert len(df) == 11_700 and set(df.index.get_level_values("symbol")) == {"AAPL", "MSFT"}


def test_get_stock_bars_matches_the_market(client: StockHistoricalDataClient, market: SimMarket) -> None:
    req = StockBarsRequest(
        symbol_or_symbols="SPY",
        timeframe=TimeFrame(15, TimeFrameUnit.Minute),
        start=datetime(2024, 3, 5, tzinfo=UTC),
        end=datetime(2024, 3, 6, tzinfo=UTC),
        feed=DataFeed.IEX,
        limit=20,
    )
    bars = client.get_stock_bars(req).data["SPY"]
    ref = market.bars_frame("SPY", "15Min", "2024-03-05", "2024-03-06", feed="iex")
    assert len(bars) == 20  # alpaca-py's overall limit
    assert [b.close for b in bars] == ref["c"][:20].tolist()
    assert [int(b.volume) for b in bars] == ref["v"][:20].tolist()


def test_get_stock_trades_and_quotes(client: StockHistoricalDataClient) -> None:
    window = {"start": datetime(2024, 3, 5, 14, 30, tzinfo=UTC), "end": datetime(2024, 3, 5, 14, 40, tzinfo=UTC)}
    trades = client.get_stock_trades(StockTradesRequest(symbol_or_symbols=["AAPL", "MSFT"], **window))
    assert set(trades.data) == {"AAPL", "MSFT"} and len(trades.data["AAPL"]) > 10 * 3
    t = trades.data["AAPL"][0]
    assert t.price > 0 and t.size > 0 and t.exchange and t.id and t.tape in ("A", "B", "C")
    quotes = client.get_stock_quotes(StockQuotesRequest(symbol_or_symbols="AAPL", **window))
    qs = quotes.data["AAPL"]
    assert len(qs) > 10 * 2 and all(q.bid_price < q.ask_price for q in qs)


def test_latest_and_snapshot(client: StockHistoricalDataClient) -> None:
    trade = client.get_stock_latest_trade(StockLatestTradeRequest(symbol_or_symbols=["AAPL", "ZZZZ"]))
    assert set(trade) == {"AAPL"} and trade["AAPL"].price > 0
    quote = client.get_stock_latest_quote(StockLatestQuoteRequest(symbol_or_symbols="AAPL"))
    assert quote["AAPL"].bid_price < quote["AAPL"].ask_price
    bar = client.get_stock_latest_bar(StockLatestBarRequest(symbol_or_symbols="AAPL"))
    assert bar["AAPL"].timestamp < datetime.now(UTC)
    snaps = client.get_stock_snapshot(StockSnapshotRequest(symbol_or_symbols=["AAPL", "MSFT"]))
    assert set(snaps) == {"AAPL", "MSFT"}
    snap = snaps["MSFT"]
    assert snap.latest_trade and snap.latest_quote and snap.minute_bar
    assert snap.daily_bar and snap.previous_daily_bar
    assert snap.previous_daily_bar.timestamp < snap.daily_bar.timestamp


def test_wrong_keys_raise_api_error(sim_server: SimServer) -> None:
    bad = StockHistoricalDataClient("SIMKEY", "WRONG", url_override=sim_server.url)
    with pytest.raises(APIError) as info:
        bad.get_stock_latest_trade(StockLatestTradeRequest(symbol_or_symbols="AAPL"))
    assert info.value.status_code == 403 and "forbidden" in str(info.value)


def test_oauth_and_basic_auth(sim_server: SimServer) -> None:
    oauth = StockHistoricalDataClient(oauth_token="SIMKEY", url_override=sim_server.url)
    assert "AAPL" in oauth.get_stock_latest_trade(StockLatestTradeRequest(symbol_or_symbols="AAPL"))
    basic = StockHistoricalDataClient("SIMKEY", "SIMSECRET", use_basic_auth=True, url_override=sim_server.url)
    assert "AAPL" in basic.get_stock_latest_quote(StockLatestQuoteRequest(symbol_or_symbols="AAPL"))
