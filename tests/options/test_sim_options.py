"""The simulator's options face, read with alpaca-py's own clients (unchanged) and with plain HTTP:
chains consistent with the underlying, the vendor's filters, feeds and their default rule, contracts
with open interest and its date, pagination, contracts without greeks, bad input and faults."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import requests
from alpaca.common.exceptions import APIError
from alpaca.data.enums import OptionsFeed
from alpaca.data.historical.option import OptionHistoricalDataClient
from alpaca.data.requests import (
    OptionBarsRequest,
    OptionChainRequest,
    OptionLatestQuoteRequest,
    OptionSnapshotRequest,
    OptionTradesRequest,
)
from alpaca.data.timeframe import TimeFrame
from alpaca.trading.client import TradingClient
from alpaca.trading.requests import GetOptionContractsRequest

from marketpipe.core.options import parse_occ
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer

AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}
FREE = {"APCA-API-KEY-ID": "FREEKEY", "APCA-API-SECRET-KEY": "FREESECRET"}


@pytest.fixture
def client(sim: SimServer) -> OptionHistoricalDataClient:
    return OptionHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=sim.url)


def test_chain_is_consistent_with_the_underlying(sim: SimServer, client: OptionHistoricalDataClient) -> None:
    chain = client.get_option_chain(OptionChainRequest(underlying_symbol="SPY"))
    assert len(chain) > 2000  # SPY-sized: thousands of contracts over pages of 1000
    spot = sim.market.latest_trade("SPY")["p"]
    strikes = sorted({parse_occ(s).strike for s in chain})
    assert strikes[0] < spot < strikes[-1]
    with_greeks = without = 0
    for sym, snap in chain.items():
        occ = parse_occ(sym)
        q = snap.latest_quote
        assert q is not None and q.bid_price <= q.ask_price
        intrinsic = max(0.0, spot - occ.strike) if occ.type == "call" else max(0.0, occ.strike - spot)
        assert q.ask_price >= intrinsic * 0.95  # nobody sells below intrinsic (discounting aside)
        if snap.greeks is None:
            assert snap.implied_volatility is None
            without += 1
            continue
        with_greeks += 1
        g = snap.greeks
        assert -1 <= g.delta <= 1 and g.gamma >= 0 and snap.implied_volatility > 0
        assert (g.delta >= 0) == (occ.type == "call")
    assert with_greeks > 1000 and without > 100  # the vendor sends some contracts without greeks


def test_chain_filters(client: OptionHistoricalDataClient) -> None:
    full = client.get_option_chain(OptionChainRequest(underlying_symbol="SPY"))
    exps = sorted({parse_occ(s).expiration for s in full})
    mid = sorted({parse_occ(s).strike for s in full})[len(full) // 8 // len(exps)]
    got = client.get_option_chain(
        OptionChainRequest(
            underlying_symbol="SPY",
            type="put",
            strike_price_gte=mid,
            strike_price_lte=mid + 5,
            expiration_date_gte=exps[1],
            expiration_date_lte=exps[3],
        )
    )
    assert got
    for sym in got:
        o = parse_occ(sym)
        assert o.type == "put" and mid <= o.strike <= mid + 5 and exps[1] <= o.expiration <= exps[3]
    one = client.get_option_chain(
        OptionChainRequest(underlying_symbol="SPY", expiration_date=exps[0], root_symbol="SPY")
    )
    assert one and {parse_occ(s).expiration for s in one} == {exps[0]}
    assert client.get_option_chain(OptionChainRequest(underlying_symbol="SPY", root_symbol="SPY1")) == {}


def test_feed_default_rule_and_entitlement(sim: SimServer) -> None:
    sym = next(
        iter(requests.get(f"{sim.url}/v1beta1/options/snapshots/AAPL", headers=AUTH, timeout=10).json()["snapshots"])
    )
    url = f"{sim.url}/v1beta1/options/quotes/latest"
    # the free key defaults to indicative (wider spreads), the paid one to opra
    paid = requests.get(url, params={"symbols": sym}, headers=AUTH, timeout=10).json()["quotes"][sym]
    opra = requests.get(url, params={"symbols": sym, "feed": "opra"}, headers=AUTH, timeout=10).json()["quotes"][sym]
    free = requests.get(url, params={"symbols": sym}, headers=FREE, timeout=10).json()["quotes"][sym]
    ind = requests.get(url, params={"symbols": sym, "feed": "indicative"}, headers=AUTH, timeout=10).json()["quotes"][
        sym
    ]
    assert paid == opra and free == ind
    assert free["ap"] - free["bp"] >= opra["ap"] - opra["bp"]
    r = requests.get(url, params={"symbols": sym, "feed": "opra"}, headers=FREE, timeout=10)
    assert r.status_code == 403
    free_client = OptionHistoricalDataClient("FREEKEY", "FREESECRET", url_override=sim.url)
    with pytest.raises(APIError):
        free_client.get_option_latest_quote(OptionLatestQuoteRequest(symbol_or_symbols=sym, feed=OptionsFeed.OPRA))
    r = requests.get(url, params={"symbols": sym, "feed": "sip"}, headers=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["message"] == "invalid feed"


def test_bars_trades_snapshots(sim: SimServer, client: OptionHistoricalDataClient) -> None:
    chain = client.get_option_chain(OptionChainRequest(underlying_symbol="AAPL"))
    syms = sorted(chain)[:3]
    start = datetime.now(UTC) - timedelta(days=7)
    bars = client.get_option_bars(OptionBarsRequest(symbol_or_symbols=syms, timeframe=TimeFrame.Minute, start=start))
    assert set(bars.data) <= set(syms) and bars.data
    for rows in bars.data.values():
        for b in rows:
            assert b.low <= min(b.open, b.close) <= max(b.open, b.close) <= b.high and b.volume >= 1
    trades = client.get_option_trades(OptionTradesRequest(symbol_or_symbols=syms, start=start, limit=50))
    assert 0 < sum(len(v) for v in trades.data.values()) <= 50
    snaps = client.get_option_snapshot(OptionSnapshotRequest(symbol_or_symbols=syms))
    assert set(snaps) == set(syms)
    # pages: a small limit walks the tokens to the same rows
    raw = requests.get(
        f"{sim.url}/v1beta1/options/bars",
        params={"symbols": syms[0], "timeframe": "1Min", "start": start.isoformat(), "limit": 7},
        headers=AUTH,
        timeout=10,
    ).json()
    assert len(raw["bars"][syms[0]]) == 7 and raw["next_page_token"]


def test_contracts_carry_open_interest_with_its_date(sim: SimServer) -> None:
    trading = TradingClient("SIMKEY", "SIMSECRET", url_override=sim.url)
    page = trading.get_option_contracts(GetOptionContractsRequest(underlying_symbols=["SPY"], limit=50))
    assert len(page.option_contracts) == 50 and page.next_page_token
    today = date.today()
    for c in page.option_contracts:
        assert c.open_interest is not None and c.open_interest_date is not None and c.open_interest_date < today
        assert c.expiration_date <= today + timedelta(days=7)  # the default: expiring by next weekend
        assert c.size == "100" and c.underlying_symbol == "SPY"
    nxt = trading.get_option_contracts(
        GetOptionContractsRequest(underlying_symbols=["SPY"], limit=50, page_token=page.next_page_token)
    )
    assert not {c.symbol for c in nxt.option_contracts} & {c.symbol for c in page.option_contracts}


def test_bad_input(sim: SimServer) -> None:
    base = f"{sim.url}/v1beta1/options"
    r = requests.get(f"{base}/bars", params={"symbols": "TSLA", "timeframe": "1Min"}, headers=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["message"] == "invalid symbol: TSLA"
    many = ",".join(f"SPY261218C{n:08d}" for n in range(1000, 1000 + 101 * 1000, 1000))
    assert requests.get(f"{base}/trades", params={"symbols": many}, headers=AUTH, timeout=10).status_code == 400
    r = requests.get(f"{base}/snapshots/SPY", params={"strike_price_gte": "abc"}, headers=AUTH, timeout=10)
    assert r.status_code == 400
    assert requests.get(f"{base}/snapshots/SPY", timeout=10).status_code == 401
    # an expired contract has no snapshot
    r = requests.get(f"{base}/snapshots", params={"symbols": "SPY240119C00400000"}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["snapshots"] == {}


def test_faults_hit_the_options_paths(sim: SimServer) -> None:
    sim.faults.set([FaultRule(kind="http_503", times=1, paths="^/v1beta1/options/")])
    url = f"{sim.url}/v1beta1/options/snapshots/SPY"
    assert requests.get(url, headers=AUTH, timeout=10).status_code == 503
    assert requests.get(url, headers=AUTH, timeout=10).status_code == 200
