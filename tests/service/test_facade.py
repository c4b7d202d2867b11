"""One façade, one failover path: ``marketpipe.*``, the CLI's MarketData and the gateway fetch latest
values and snapshots through the router's ``first`` call, against Alpaca, Polygon and Yahoo
simulator faces over one market — so each entry point fails over the same way, and says which
vendor served every value."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import marketpipe as mp
from marketpipe.core.config import Config, config_from_dict
from marketpipe.core.errors import AllProvidersFailed
from marketpipe.core.timeutil import parse_time, utcnow
from marketpipe.providers.base import feed_for
from marketpipe.service.data import MarketData, SyncMarketData
from marketpipe.service.gateway import Gateway
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from tests.service.vendors import ENV, FAST

SYMS = ["AAPL", "MSFT"]


pytestmark = pytest.mark.usefixtures("clean_vendors")


def three_vendors(vendors: dict[str, SimServer], tmp_path: Path) -> Config:
    cfg = config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": vendors["alpaca"].url, "plan": "unlimited", **FAST},
                "polygon": {"base_url": vendors["polygon"].url, "plan": "unlimited", **FAST},
                "yahoo": {"base_url": vendors["yahoo"].url, "enabled": True, **FAST},
            }
        }
    )
    cfg.store.path = str(tmp_path / "facade.duckdb")
    return cfg


@pytest.fixture
def sync_client(vendors: dict[str, SimServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``marketpipe.latest_trade`` & co. on a default client built from this test's config."""
    client = mp.client(config=three_vendors(vendors, tmp_path), env=ENV)
    monkeypatch.setattr(mp, "_default", client)
    yield client
    client.close()


@pytest.fixture
async def data(vendors: dict[str, SimServer], tmp_path: Path) -> AsyncIterator[MarketData]:
    md = MarketData(three_vendors(vendors, tmp_path), env=ENV)
    yield md
    await md.aclose()


def test_mp_latest_values_come_from_alpaca_while_it_answers(sync_client: SyncMarketData) -> None:
    trade, quote = mp.latest_trade("AAPL"), mp.latest_quote("AAPL")
    assert trade is not None and trade.source == "sim:alpaca" and trade.price > 0
    assert quote is not None and quote.source == "sim:alpaca"
    assert {s.source for s in mp.snapshots(SYMS).values()} == {"sim:alpaca"}


@pytest.mark.parametrize("kind", ["http_500", "reset", "truncated_json"])
def test_mp_latest_trade_quote_snapshots_fail_over_to_polygon(
    sync_client: SyncMarketData, vendors: dict[str, SimServer], kind: str
) -> None:
    """Before the one façade, ``mp.latest_*`` called Alpaca alone and raised when it failed."""
    vendors["alpaca"].faults.set([FaultRule(kind=kind)])
    trade = mp.latest_trade("AAPL", feed="iex")  # polygon takes no feed: it is not handed one
    assert trade is not None and trade.symbol == "AAPL" and trade.price > 0
    assert trade.source == "sim:polygon"
    quote = mp.latest_quote("MSFT")
    assert quote is not None and quote.source == "sim:polygon" and quote.bid_price is not None
    snaps = mp.snapshots(SYMS)
    assert sorted(snaps) == SYMS
    assert {s.source for s in snaps.values()} == {"sim:polygon"}
    assert all(s.latest_trade is not None and s.latest_trade.source == "sim:polygon" for s in snaps.values())


async def test_gateway_and_facade_fail_over_alike_with_the_same_attribution(
    data: MarketData, vendors: dict[str, SimServer]
) -> None:
    gateway = Gateway(data)
    vendors["alpaca"].faults.set([FaultRule(kind="http_503")])
    served = await data.latest_served("quote", SYMS)
    assert served.source == "polygon"
    # every provider considered is accounted for: alpaca failed, yahoo was ruled out by its capabilities
    assert [(a.provider, a.code) for a in served.attempts] == [
        ("yahoo", "UNSUPPORTED"),
        ("alpaca", "PROVIDER_UNAVAILABLE"),
    ]
    via_gateway = await gateway.latest("trade", SYMS)
    via_facade = await data.latest_trades(SYMS)
    assert {t.source for t in via_gateway.values()} == {t.source for t in via_facade.values()} == {"sim:polygon"}
    # after its failures the health monitor ranks alpaca behind polygon: polygon is asked first now
    again = await data.latest_served("trade", SYMS)
    assert again.source == "polygon" and all(a.code != "PROVIDER_UNAVAILABLE" for a in again.attempts)


async def test_all_providers_failed_lists_every_attempt(data: MarketData, vendors: dict[str, SimServer]) -> None:
    vendors["alpaca"].faults.set([FaultRule(kind="http_500")])
    vendors["polygon"].faults.set([FaultRule(kind="http_502")])
    with pytest.raises(AllProvidersFailed) as err:
        await data.snapshots(SYMS)
    attempts = [(a["provider"], a["code"]) for a in err.value.details["attempts"]]
    assert attempts == [
        ("yahoo", "UNSUPPORTED"),
        ("alpaca", "PROVIDER_UNAVAILABLE"),
        ("polygon", "PROVIDER_UNAVAILABLE"),
    ]
    assert err.value.details["symbols"] == SYMS


async def test_a_pinned_provider_serves_latest_values_and_bars_and_survives_a_reconnect(
    data: MarketData,
) -> None:
    gateway = Gateway(data)
    gateway.failover("polygon")
    await gateway.reconnect()  # new provider clients: the pin is the façade's, not the old router's
    assert gateway.pinned == "polygon" and data.router.pinned == "polygon"
    assert {t.source for t in (await data.latest_trades(SYMS)).values()} == {"sim:polygon"}
    day = (parse_time("2024-03-05"), parse_time("2024-03-05", end=True))
    page = await gateway.bars(["AAPL"], "1Day", *day)
    assert page.frame["source"].to_list() == ["sim:polygon"]
    gateway.failover(None)
    assert {t.source for t in (await data.latest_trades(SYMS)).values()} == {"sim:alpaca"}


async def test_capability_tables_answer_every_kind_and_say_who_takes_a_feed(data: MarketData) -> None:
    r, now = data.router, utcnow()
    table = {
        (p.name, kind): p.supports(kind, None, None, None, now) is None
        for p in r.providers
        for kind in ("latest_trade", "latest_quote", "latest_bar", "snapshot", "trades", "quotes")
    }
    assert [k for k, ok in table.items() if ok] == [
        ("alpaca", "latest_trade"),
        ("alpaca", "latest_quote"),
        ("alpaca", "latest_bar"),
        ("alpaca", "snapshot"),
        ("alpaca", "trades"),
        ("alpaca", "quotes"),
        ("polygon", "latest_trade"),
        ("polygon", "latest_quote"),
        ("polygon", "snapshot"),
    ]
    alpaca, polygon, yahoo = (r.get(n) for n in ("alpaca", "polygon", "yahoo"))
    assert feed_for(alpaca, "latest_trade", "iex") == "iex"
    assert feed_for(polygon, "latest_trade", "iex") is None
    assert feed_for(polygon, "bars", "sip") == "sip"  # its aggregates take its one feed (and refuse others)
    assert feed_for(yahoo, "bars", "sip") is None


async def test_historical_ticks_have_one_provider_and_name_it(data: MarketData, vendors: dict[str, SimServer]) -> None:
    start, end = parse_time("2024-03-05T14:30:00Z"), parse_time("2024-03-05T14:31:00Z")
    frame, _, source = await data.ticks("trades", ["AAPL"], start, end, limit=50)
    assert source == "alpaca" and 0 < frame.height <= 50
    vendors["alpaca"].faults.set([FaultRule(kind="http_500")])
    with pytest.raises(AllProvidersFailed) as err:
        await data.ticks("trades", ["AAPL"], start, end, limit=50)
    codes = {(a["provider"], a["code"]) for a in err.value.details["attempts"]}
    assert codes == {("polygon", "UNSUPPORTED"), ("yahoo", "UNSUPPORTED"), ("alpaca", "PROVIDER_UNAVAILABLE")}
