"""The official alpaca-py client, unchanged, against the gateway's Alpaca-compatible v2 routes — the
vendor played by the simulator. Every answer is compared with the simulator's own answer to the
same request: the gateway must be indistinguishable from the vendor, apart from its headers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from alpaca.common.exceptions import APIError
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

from marketpipe.api.app import create_app
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config, serving

VENDOR_AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}


@pytest.fixture(scope="module")
def gateway(vendor: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = gateway_config(vendor.url, tmp_path_factory.mktemp("alpaca_compat") / "gw.duckdb")
    with serving(create_app(cfg, env=ENV)) as url:
        yield url


@pytest.fixture(scope="module")
def gw_client(gateway: str) -> StockHistoricalDataClient:
    # any keys: the gateway checks none unless MARKETPIPE_API_KEYS is set
    return StockHistoricalDataClient("ANYKEY", "ANYSECRET", url_override=gateway)


@pytest.fixture(scope="module")
def sim_client(vendor: SimServer) -> StockHistoricalDataClient:
    return StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=vendor.url)


@pytest.fixture(scope="module")
def gw_http(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, headers=VENDOR_AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def sim_http(vendor: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vendor.url, headers=VENDOR_AUTH, timeout=30) as c:
        yield c


def _both(gw_http: httpx.Client, sim_http: httpx.Client, path: str, params: dict[str, Any]) -> tuple[Any, Any]:
    g, s = gw_http.get(path, params=params), sim_http.get(path, params=params)
    assert g.status_code == s.status_code == 200, (g.text, s.text)
    return g.json(), s.json()


def _pages(http: httpx.Client, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    pages, token = [], None
    while True:
        r = http.get(path, params={**params, **({"page_token": token} if token else {})})
        assert r.status_code == 200, r.text
        pages.append(r.json())
        token = pages[-1]["next_page_token"]
        if token is None:
            return pages


# --- historical bars --------------------------------------------------------------------------------


def test_bars_multi_symbol_followed_across_pages_equal_the_vendor(
    gw_client: StockHistoricalDataClient, sim_client: StockHistoricalDataClient
) -> None:
    # 2 symbols x 15 sessions x 390 = 11,700 minute bars: alpaca-py must follow next_page_token
    req = StockBarsRequest(
        symbol_or_symbols=["MSFT", "AAPL"],
        timeframe=TimeFrame.Minute,
        start=datetime(2024, 3, 4, tzinfo=UTC),
        end=datetime(2024, 3, 22, 23, tzinfo=UTC),
    )
    got, want = gw_client.get_stock_bars(req), sim_client.get_stock_bars(req)
    assert {s: len(v) for s, v in got.data.items()} == {"AAPL": 5850, "MSFT": 5850}
    pd.testing.assert_frame_equal(got.df, want.df)
    assert got.data["AAPL"][0].timestamp == datetime(2024, 3, 4, 14, 30, tzinfo=UTC)


def test_bars_single_symbol_with_overall_limit_equal_the_vendor(
    gw_client: StockHistoricalDataClient, sim_client: StockHistoricalDataClient
) -> None:
    req = StockBarsRequest(
        symbol_or_symbols="SPY",
        timeframe=TimeFrame(15, TimeFrameUnit.Minute),
        start=datetime(2024, 3, 5, tzinfo=UTC),
        end=datetime(2024, 3, 7, tzinfo=UTC),
        limit=20,
    )
    got, want = gw_client.get_stock_bars(req), sim_client.get_stock_bars(req)
    assert len(got.data["SPY"]) == 20
    pd.testing.assert_frame_equal(got.df, want.df)
    daily = StockBarsRequest(
        symbol_or_symbols=["SPY", "AAPL"],
        timeframe=TimeFrame.Day,
        start=datetime(2024, 3, 4, tzinfo=UTC),
        end=datetime(2024, 3, 8, 23, tzinfo=UTC),
    )
    got_d, want_d = gw_client.get_stock_bars(daily), sim_client.get_stock_bars(daily)
    assert len(got_d.data["SPY"]) == 5
    pd.testing.assert_frame_equal(got_d.df, want_d.df)


def _merged(pages: list[dict[str, Any]], key: str) -> dict[str, list[Any]]:
    """Each symbol's rows across pages, in order (as a client merges them)."""
    out: dict[str, list[Any]] = {}
    for page in pages:
        for sym, rows in page[key].items():
            out.setdefault(sym, []).extend(rows)
    return out


@pytest.mark.parametrize("sort", ["asc", "desc"])
def test_raw_pages_across_symbols_equal_the_vendor(gw_http: httpx.Client, sim_http: httpx.Client, sort: str) -> None:
    params = {
        "symbols": "MSFT,AAPL,ZZZZ",
        "timeframe": "5Min",
        "start": "2024-03-05T14:30:00Z",
        "end": "2024-03-06T21:00:00Z",
        "limit": 70,
        "sort": sort,
    }
    got, want = _pages(gw_http, "/v2/stocks/bars", params), _pages(sim_http, "/v2/stocks/bars", params)
    assert len(got) >= len(want) > 4  # 2 x 2 sessions x 78 bars, 70 a page: pages straddle symbols
    for page in got:
        assert list(page) == ["bars", "next_page_token"] and 0 < sum(map(len, page["bars"].values())) <= 70
    merged = _merged(got, "bars")
    assert merged == _merged(want, "bars") and list(merged) == ["AAPL", "MSFT"]
    ts = [b["t"] for b in merged["AAPL"]]
    assert ts == sorted(ts, reverse=sort == "desc") and len(ts) == 156


def test_single_symbol_bars_shape_and_date_only_end(gw_http: httpx.Client, sim_http: httpx.Client) -> None:
    params = {"timeframe": "1Day", "start": "2024-03-04", "end": "2024-03-05", "currency": "USD"}
    g, s = _both(gw_http, sim_http, "/v2/stocks/MSFT/bars", params)
    assert list(g) == ["bars", "symbol", "next_page_token", "currency"] and g == s
    assert [b["t"] for b in g["bars"]] == ["2024-03-04T05:00:00Z", "2024-03-05T05:00:00Z"]
    assert list(g["bars"][0]) == ["t", "o", "h", "l", "c", "v", "n", "vw"]
    r = gw_http.get("/v2/stocks/MSFT/bars", params=params)
    assert r.headers["x-marketpipe-source"] == "sim:alpaca"
    assert r.headers["x-marketpipe-fetched-at"] and float(r.headers["x-marketpipe-data-age"]) > 0
    assert r.headers["x-marketpipe-cache"] == "memory"  # the second time round
    assert r.headers["content-type"].startswith("application/json")


def test_unknown_symbols_give_empty_shapes(gw_http: httpx.Client, sim_http: httpx.Client) -> None:
    day = {"timeframe": "1Min", "start": "2024-03-05", "end": "2024-03-06"}
    g, s = _both(gw_http, sim_http, "/v2/stocks/ZZZZ/bars", day)
    assert g == s == {"bars": None, "symbol": "ZZZZ", "next_page_token": None}
    g, s = _both(gw_http, sim_http, "/v2/stocks/bars", {**day, "symbols": "ZZZZ"})
    assert g == s == {"bars": {}, "next_page_token": None}
    g, s = _both(gw_http, sim_http, "/v2/stocks/ZZZZ/trades/latest", {})
    assert g == s == {"symbol": "ZZZZ", "trade": None}


# --- historical trades and quotes --------------------------------------------------------------------


def test_trades_and_quotes_equal_the_vendor(
    gw_client: StockHistoricalDataClient, sim_client: StockHistoricalDataClient
) -> None:
    window = {"start": datetime(2024, 3, 5, 14, 30, tzinfo=UTC), "end": datetime(2024, 3, 5, 14, 35, tzinfo=UTC)}
    treq = StockTradesRequest(symbol_or_symbols=["AAPL", "MSFT"], **window)
    got, want = gw_client.get_stock_trades(treq), sim_client.get_stock_trades(treq)
    assert set(got.data) == {"AAPL", "MSFT"} and len(got.data["AAPL"]) > 5 * 3
    pd.testing.assert_frame_equal(got.df, want.df)
    qreq = StockQuotesRequest(symbol_or_symbols="AAPL", **window)
    got_q, want_q = gw_client.get_stock_quotes(qreq), sim_client.get_stock_quotes(qreq)
    assert len(got_q.data["AAPL"]) > 5 * 2
    pd.testing.assert_frame_equal(got_q.df, want_q.df)  # sizes in round lots before 2025-11-03, as sent


def test_raw_trades_pages_and_nanosecond_stamps(gw_http: httpx.Client, sim_http: httpx.Client) -> None:
    params = {"start": "2024-03-05T14:30:00Z", "end": "2024-03-05T14:32:00Z", "limit": 10}
    got = _pages(gw_http, "/v2/stocks/AAPL/trades", params)
    want = _pages(sim_http, "/v2/stocks/AAPL/trades", params)
    assert len(got) == len(want) > 1
    assert [p["trades"] for p in got] == [p["trades"] for p in want]
    assert list(got[0]) == ["trades", "symbol", "next_page_token"]
    assert list(got[0]["trades"][0]) == ["t", "x", "p", "s", "c", "i", "z"]
    r = gw_http.get("/v2/stocks/AAPL/trades", params=params)
    assert r.headers["x-marketpipe-source"] == "sim:alpaca" and float(r.headers["x-marketpipe-data-age"]) > 0
    bad = gw_http.get("/v2/stocks/AAPL/trades", params={**params, "page_token": "null"})
    assert bad.status_code == 400 and bad.json()["message"] == "invalid page token"  # the vendor's verdict
    g, s = _both(gw_http, sim_http, "/v2/stocks/quotes", {**params, "symbols": "AAPL,MSFT"})
    assert g["quotes"] == s["quotes"] and list(g["quotes"]["AAPL"][0]) == list(s["quotes"]["AAPL"][0])


# --- latest and snapshots ------------------------------------------------------------------------------


def _stable(sim: Any, gw: Any) -> tuple[Any, Any, Any]:
    """The vendor's answer before and after the gateway's: the data moves while the market is open."""
    before = sim()
    got = gw()
    return before, got, sim()


def test_latest_trade_quote_and_bar(
    gw_client: StockHistoricalDataClient, sim_client: StockHistoricalDataClient
) -> None:
    for method, req in (
        ("get_stock_latest_trade", StockLatestTradeRequest(symbol_or_symbols=["AAPL", "ZZZZ"])),
        ("get_stock_latest_quote", StockLatestQuoteRequest(symbol_or_symbols=["AAPL", "MSFT"])),
        ("get_stock_latest_bar", StockLatestBarRequest(symbol_or_symbols="AAPL")),
    ):
        before, got, after = _stable(
            lambda m=method, r=req: getattr(sim_client, m)(r), lambda m=method, r=req: getattr(gw_client, m)(r)
        )
        assert set(got) == set(before)
        assert "ZZZZ" not in got
        if before == after:
            assert got == before, method


def test_snapshots_multi_and_single(
    gw_client: StockHistoricalDataClient,
    sim_client: StockHistoricalDataClient,
    gw_http: httpx.Client,
    sim_http: httpx.Client,
) -> None:
    req = StockSnapshotRequest(symbol_or_symbols=["AAPL", "MSFT", "ZZZZ"])
    before, got, after = _stable(lambda: sim_client.get_stock_snapshot(req), lambda: gw_client.get_stock_snapshot(req))
    assert set(got) == {"AAPL", "MSFT"}
    snap = got["MSFT"]
    assert snap.latest_trade and snap.latest_quote and snap.minute_bar and snap.daily_bar and snap.previous_daily_bar
    if before == after:
        assert got == before
    raw = gw_http.get("/v2/stocks/snapshots", params={"symbols": "AAPL,ZZZZ"}).json()
    assert list(raw) == ["AAPL"]  # no "snapshots" wrapper
    assert list(raw["AAPL"]) == ["latestTrade", "latestQuote", "minuteBar", "dailyBar", "prevDailyBar"]
    one = gw_http.get("/v2/stocks/AAPL/snapshot").json()
    assert list(one) == ["symbol", "latestTrade", "latestQuote", "minuteBar", "dailyBar", "prevDailyBar"]
    g, s = _both(gw_http, sim_http, "/v2/stocks/ZZZZ/snapshot", {})
    assert g == s == {"symbol": "ZZZZ"}
    r = gw_http.get("/v2/stocks/AAPL/quotes/latest", params={"currency": "USD"})
    assert list(r.json()) == ["symbol", "quote", "currency"] and r.headers["x-marketpipe-source"] == "sim:alpaca"


# --- errors and auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"symbols": "AAPL", "timeframe": "7Fortnight", "start": "2024-03-05"}, "invalid timeframe"),
        (
            {"symbols": "AAPL", "timeframe": "1Min", "start": "2024-03-06", "end": "2024-03-05"},
            "end should not be before start",
        ),
        ({"symbols": "AAPL", "timeframe": "1Min", "start": "yesterday"}, "invalid start"),
        ({"symbols": "AAPL", "timeframe": "1Min", "start": "2024-03-05", "limit": "0"}, "invalid limit"),
        ({"symbols": "AAPL", "timeframe": "1Min", "start": "2024-03-05", "feed": "nyse"}, "invalid feed"),
        ({"symbols": "AAPL", "timeframe": "1Min", "start": "2024-03-05", "page_token": "null"}, "invalid page token"),
        ({"timeframe": "1Min"}, "missing symbols"),
    ],
)
def test_errors_are_the_vendors(
    gw_client: StockHistoricalDataClient, sim_client: StockHistoricalDataClient, params: dict[str, str], message: str
) -> None:
    for client in (gw_client, sim_client):
        with pytest.raises(APIError) as info:
            client.get("/stocks/bars", dict(params))
        assert info.value.status_code == 400 and info.value.message == message


def test_end_before_start_through_the_request_model(gw_client: StockHistoricalDataClient) -> None:
    req = StockBarsRequest(
        symbol_or_symbols="AAPL",
        timeframe=TimeFrame.Minute,
        start=datetime(2024, 3, 6, tzinfo=UTC),
        end=datetime(2024, 3, 5, tzinfo=UTC),
    )
    with pytest.raises(APIError) as info:
        gw_client.get_stock_bars(req)
    assert info.value.status_code == 400 and info.value.message == "end should not be before start"


def test_what_marketpipe_does_not_serve_is_refused(gw_http: httpx.Client) -> None:
    base = {"symbols": "AAPL", "timeframe": "1Day", "start": "2024-03-04", "end": "2024-03-08"}
    r = gw_http.get("/v2/stocks/bars", params={**base, "adjustment": "spin-off"})  # served: AAPL has no spin-offs
    assert r.status_code == 200 and r.json()["bars"] == gw_http.get("/v2/stocks/bars", params=base).json()["bars"]
    assert gw_http.get("/v2/stocks/bars", params={**base, "adjustment": "bogus"}).json()["message"] == (
        "invalid adjustment"
    )
    r = gw_http.get("/v2/stocks/bars", params={**base, "currency": "EUR"})
    assert r.status_code == 400 and "USD" in r.json()["message"]


def test_gateway_client_keys(vendor: SimServer, tmp_path: Path) -> None:
    cfg = gateway_config(vendor.url, tmp_path / "keys.duckdb")
    with serving(create_app(cfg, env={**ENV, "MARKETPIPE_API_KEYS": "gwkey:gwsecret"})) as url:
        req = StockLatestTradeRequest(symbol_or_symbols="AAPL")
        ok = StockHistoricalDataClient("gwkey", "gwsecret", url_override=url)
        assert ok.get_stock_latest_trade(req)["AAPL"].price > 0
        wrong = StockHistoricalDataClient("gwkey", "nope", url_override=url)
        with pytest.raises(APIError) as info:
            wrong.get_stock_latest_trade(req)
        assert info.value.status_code == 403 and info.value.message == "forbidden."
        r = httpx.get(url + "/v2/stocks/AAPL/trades/latest", timeout=10)
        assert r.status_code == 401 and r.json() == {"message": "unauthorized."}


def test_latest_and_snapshot_timestamps_keep_the_vendors_nanoseconds(
    gw_http: httpx.Client, sim_http: httpx.Client
) -> None:
    """The vendor's ``t`` carries nanoseconds; a datetime holds microseconds. The gateway's answer
    repeats the vendor's text exactly (issue 13: they were cut to microseconds)."""
    nanos = 0
    for path, pick in (
        ("/v2/stocks/AAPL/trades/latest", lambda d: d["trade"]["t"]),
        ("/v2/stocks/AAPL/quotes/latest", lambda d: d["quote"]["t"]),
        ("/v2/stocks/MSFT/snapshot", lambda d: (d["latestTrade"]["t"], d["latestQuote"]["t"])),
    ):
        before, got, after = _stable(lambda p=path: sim_http.get(p).json(), lambda p=path: gw_http.get(p).json())
        if before == after:
            assert pick(got) == pick(before), path
            texts = pick(before) if isinstance(pick(before), tuple) else (pick(before),)
            nanos += sum(len(t.rstrip("Z").partition(".")[2]) > 6 for t in texts)
    assert nanos  # the vendor's stamps did carry more than microseconds
