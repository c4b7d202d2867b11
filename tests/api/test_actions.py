"""Adjusted bars and corporate actions through the gateway, with the official alpaca-py client
unchanged: ``get_stock_bars(..., adjustment=Adjustment.ALL/SPLIT/DIVIDEND)`` gives the same frame
against the gateway as against the vendor (the simulator) to 1e-9 relative, and
``CorporateActionsClient`` reads the gateway's ``/v1/corporate-actions``. Plus ``/v1/bars`` and
``/v1/actions``, and the vendor's strict 400s for bad ``adjustment`` values."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime

import httpx
import numpy as np
import pytest
from alpaca.data.enums import Adjustment, CorporateActionsType
from alpaca.data.historical import StockHistoricalDataClient
from alpaca.data.historical.corporate_actions import CorporateActionsClient
from alpaca.data.requests import CorporateActionsRequest, StockBarsRequest
from alpaca.data.timeframe import TimeFrame

from marketpipe.api.app import create_app
from marketpipe.sim.actions import DEFAULT_ACTIONS, ActionBook, SimAction
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_actions import PLURAL
from tests.api.conftest import ENV, gateway_config, serving

AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}


@pytest.fixture(scope="module")
def gateway(vendor: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = gateway_config(vendor.url, tmp_path_factory.mktemp("actions") / "gw.duckdb")
    with serving(create_app(cfg, env=ENV)) as url:
        yield url


def _bars(client: StockHistoricalDataClient, symbol: str, tf: TimeFrame, start: datetime, end: datetime,
          adjustment: Adjustment) -> object:  # fmt: skip
    req = StockBarsRequest(symbol_or_symbols=symbol, timeframe=tf, start=start, end=end, adjustment=adjustment)
    return client.get_stock_bars(req).df


@pytest.mark.parametrize("adjustment", [Adjustment.ALL, Adjustment.SPLIT, Adjustment.DIVIDEND, Adjustment.RAW])
@pytest.mark.parametrize(
    ("symbol", "tf", "start", "end"),
    [
        ("AAPL", TimeFrame.Day, datetime(2020, 8, 3, tzinfo=UTC), datetime(2020, 11, 30, tzinfo=UTC)),
        ("NVDA", TimeFrame.Day, datetime(2024, 5, 20, tzinfo=UTC), datetime(2024, 6, 28, tzinfo=UTC)),
        ("TSLA", TimeFrame.Minute, datetime(2022, 8, 24, 13, tzinfo=UTC), datetime(2022, 8, 25, 21, tzinfo=UTC)),
        # GE's spin-offs (GEHC ex 2023-01-04, GEV ex 2024-04-02): ALL includes them at the vendor and here
        ("GE", TimeFrame.Day, datetime(2022, 12, 1, tzinfo=UTC), datetime(2024, 4, 30, tzinfo=UTC)),
    ],
)
def test_alpaca_py_adjusted_bars_same_against_gateway_and_vendor(
    gateway: str, vendor: SimServer, symbol: str, tf: TimeFrame, start: datetime, end: datetime, adjustment: Adjustment
) -> None:
    gw = _bars(StockHistoricalDataClient("ANY", "ANY", url_override=gateway), symbol, tf, start, end, adjustment)
    sim = _bars(StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=vendor.url), symbol, tf, start, end,
                adjustment)  # fmt: skip
    assert list(gw.index) == list(sim.index) and len(gw) > 0  # type: ignore[attr-defined]
    for col in ("open", "high", "low", "close", "vwap"):
        np.testing.assert_allclose(gw[col].to_numpy(), sim[col].to_numpy(), rtol=1e-9, err_msg=col)  # type: ignore[index]
    assert gw["volume"].tolist() == sim["volume"].tolist()  # type: ignore[index]


def test_adjusted_answer_names_the_actions(gateway: str) -> None:
    q = {"timeframe": "1Day", "start": "2020-08-24", "end": "2020-09-04", "adjustment": "split"}
    r = httpx.get(gateway + "/v2/stocks/AAPL/bars", params=q, headers=AUTH)
    assert r.status_code == 200
    header = r.headers["X-Marketpipe-Adjustment"]
    assert header.startswith("split; as_of=latest; actions=alpaca:")
    v1 = httpx.get(gateway + "/v1/bars/AAPL", params={**q, "adjustment": "all"}).json()
    applied = v1["adjustment"]["applied"]
    assert {(a["type"], a["ex_date"], a["price_factor"]) for a in applied if a["type"] == "forward_split"} == {
        ("forward_split", "2020-08-31", 0.25)
    }
    assert all(a["source"] == "sim:alpaca" for a in applied)
    raw = httpx.get(gateway + "/v1/bars/AAPL", params={**q, "adjustment": "raw"}).json()
    assert "adjustment" not in raw and raw["bars"][0]["close"] / v1["bars"][0]["close"] > 3.9
    pit = httpx.get(gateway + "/v1/bars/AAPL", params={**q, "adjustment": "all", "as_of": "2020-08-28"}).json()
    assert pit["adjustment"]["applied"] == [] and pit["bars"][0]["close"] == raw["bars"][0]["close"]


@pytest.mark.parametrize("query", ["adjustment=both", "adjustment=", "adjustment=split,split",
                                   "adjustment=split&adjustment=all", "adjustment=Split"])  # fmt: skip
def test_bad_adjustment_gets_the_vendors_400(gateway: str, vendor: SimServer, query: str) -> None:
    path = f"/v2/stocks/AAPL/bars?timeframe=1Day&start=2020-08-24&end=2020-08-28&{query}"
    gw = httpx.get(gateway + path, headers=AUTH)
    assert gw.status_code == 400 and gw.json()["message"] == "invalid adjustment"
    assert httpx.get(vendor.url + path, headers=AUTH).status_code == 400  # as the vendor does


def test_v1_bad_adjustment_and_as_of(gateway: str) -> None:
    base = {"timeframe": "1Day", "start": "2020-08-24", "end": "2020-08-28"}
    r = httpx.get(gateway + "/v1/bars/AAPL", params={**base, "adjustment": "both"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert r.json()["error"]["details"]["parameter"] == "adjustment"
    r = httpx.get(gateway + "/v1/bars/AAPL", params={**base, "adjustment": "all", "as_of": "2099-01-01"})
    assert r.status_code == 400 and "future" in r.json()["error"]["message"]
    r = httpx.get(gateway + "/v1/bars/AAPL", params={**base, "adjustment": "all", "as_of": "2020-01-01"})
    assert r.status_code == 400 and "before the range" in r.json()["error"]["message"]


def test_corporate_actions_client_unchanged_against_the_gateway(gateway: str, vendor: SimServer) -> None:
    req = CorporateActionsRequest(symbols=["AAPL", "NVDA", "TSLA"], start=date(2020, 1, 1), end=date(2024, 12, 31))
    gw = CorporateActionsClient("ANY", "ANY", url_override=gateway).get_corporate_actions(req)
    sim = CorporateActionsClient("SIMKEY", "SIMSECRET", url_override=vendor.url).get_corporate_actions(req)
    assert set(gw.data) == set(sim.data)
    for kind in sim.data:
        ours = sorted((a.symbol, str(a.ex_date), a.id) for a in gw.data[kind])
        theirs = sorted((a.symbol, str(a.ex_date), a.id) for a in sim.data[kind])
        assert ours == theirs, kind
    splits = {(a.symbol, a.ex_date, a.new_rate, a.old_rate) for a in gw.data["forward_splits"]}
    assert splits == {("AAPL", date(2020, 8, 31), 4, 1), ("NVDA", date(2024, 6, 10), 10, 1),
                      ("TSLA", date(2022, 8, 25), 3, 1)}  # fmt: skip
    assert any(d.rate == 0.205 and d.ex_date == date(2020, 11, 6) for d in gw.data["cash_dividends"])
    only = CorporateActionsRequest(symbols=["AAPL"], types=[CorporateActionsType.CASH_DIVIDEND],
                                   start=date(2020, 11, 1), end=date(2020, 11, 30), limit=1)  # fmt: skip
    got = CorporateActionsClient("ANY", "ANY", url_override=gateway).get_corporate_actions(only)
    assert [str(d.ex_date) for d in got.data["cash_dividends"]] == ["2020-11-06"]  # filtered on process date


def test_corporate_actions_wire_shape(gateway: str) -> None:
    q = {"symbols": "AAPL", "start": "2020-01-01", "end": "2020-12-31", "limit": 2}
    r = httpx.get(gateway + "/v1/corporate-actions", params=q, headers=AUTH)
    doc = r.json()
    assert set(doc["corporate_actions"]) == set(PLURAL.values()) and doc["next_page_token"]
    assert sum(len(v) for v in doc["corporate_actions"].values()) == 2
    bad = httpx.get(gateway + "/v1/corporate-actions", params={"symbols": "AAPL", "types": "bogus"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json() == {"message": "invalid types", "code": 42210000}
    none = httpx.get(gateway + "/v1/corporate-actions", headers=AUTH)
    assert none.status_code == 400 and "symbols" in none.json()["message"]


def test_v1_actions(gateway: str) -> None:
    r = httpx.get(gateway + "/v1/actions", params={"symbols": "AAPL", "start": "2020-08-01", "end": "2020-12-31"})
    doc = r.json()
    assert r.status_code == 200 and doc["sources"] == ["sim:alpaca"]
    assert [(a["type"], a["ex_date"]) for a in doc["actions"]] == [
        ("cash_dividend", "2020-08-07"),
        ("forward_split", "2020-08-31"),
        ("cash_dividend", "2020-11-06"),
    ]
    assert doc["actions"][1]["new_rate"] == 4.0 and doc["actions"][1]["vendor_id"]
    pit = httpx.get(gateway + "/v1/actions", params={"symbols": "AAPL", "start": "2020-08-01", "end": "2020-12-31",
                                                     "as_of": "2020-09-01"}).json()  # fmt: skip
    assert [a["ex_date"] for a in pit["actions"]] == ["2020-08-07", "2020-08-31"]
    bad = httpx.get(gateway + "/v1/actions", params={"symbols": "AAPL", "start": "2020-08-01", "types": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["parameter"] == "type"


def test_spin_off_adjustment_same_against_gateway_and_vendor(gateway: str, vendor: SimServer) -> None:
    """alpaca-py has no enum member for ``spin-off``; its client sends the value as given."""
    q = {"symbols": "GE", "timeframe": "1Day", "start": "2022-12-20", "end": "2023-01-10", "adjustment": "spin-off"}
    gw = StockHistoricalDataClient("ANY", "ANY", url_override=gateway).get("/stocks/bars", q)
    sim = StockHistoricalDataClient("SIMKEY", "SIMSECRET", url_override=vendor.url).get("/stocks/bars", q)
    got, want = gw["bars"]["GE"], sim["bars"]["GE"]  # type: ignore[call-overload,index]
    assert [b["t"] for b in got] == [b["t"] for b in want] and len(got) > 5
    np.testing.assert_allclose([b["c"] for b in got], [b["c"] for b in want], rtol=1e-9)
    raw = httpx.get(gateway + "/v2/stocks/GE/bars", params={**q, "adjustment": "raw"}, headers=AUTH).json()["bars"]
    ratio = [g["c"] / r["c"] for g, r in zip(got, raw, strict=True)]
    assert ratio[0] < ratio[-1] < 1  # GEHC's factor before its ex-date, GEV's (2024) on every bar here


@pytest.fixture(scope="module")
def unpriced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway over a market whose one spin-off creates a line no vendor has bars of (``NOPE``)."""
    book = ActionBook((*DEFAULT_ACTIONS, SimAction("IBM", "spin_off", date(2021, 11, 4), old_rate=5.0, new_rate=1.0,
                                                   new_symbol="NOPE")))  # fmt: skip
    with SimServer(SimMarket(actions=book), vendor="alpaca") as sim:
        cfg = gateway_config(sim.url, tmp_path_factory.mktemp("unpriced") / "gw.duckdb")
        with serving(create_app(cfg, env=ENV)) as url:
            yield url


def test_spin_off_without_the_new_lines_price_is_skipped_and_said(unpriced: str) -> None:
    q = {"timeframe": "1Day", "start": "2021-10-25", "end": "2021-11-10", "adjustment": "all"}
    v1 = httpx.get(unpriced + "/v1/bars/IBM", params=q)
    assert v1.status_code == 200
    doc = v1.json()["adjustment"]
    assert doc["applied"] == [] and [(s["type"], s["ex_date"], s["reason"]) for s in doc["skipped"]] == [
        ("spin_off", "2021-11-04", "no raw close of the new line NOPE on the ex-date")
    ]
    assert "no raw close of the new line NOPE" in v1.headers["X-Marketpipe-Adjustment-Skipped"]
    raw = httpx.get(unpriced + "/v1/bars/IBM", params={**q, "adjustment": "raw"}).json()["bars"]
    assert [b["close"] for b in v1.json()["bars"]] == [b["close"] for b in raw]  # nothing guessed, nothing applied
    v2 = httpx.get(unpriced + "/v2/stocks/IBM/bars", params=q, headers=AUTH)
    assert v2.status_code == 200 and "NOPE" in v2.headers["X-Marketpipe-Adjustment-Skipped"]
