"""The simulator's corporate actions: raw bars jump at real splits, every face serves the actions and
adjusts the way its vendor does, and faults make one vendor wrong."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import date

import httpx
import numpy as np
import pytest

from marketpipe.sim.actions import DEFAULT_ACTIONS, ActionBook, ActionFault
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_actions import PLURAL

SPLITS = [("AAPL", "2020-08-28", "2020-08-31", 4.0), ("NVDA", "2024-06-07", "2024-06-10", 10.0),
          ("TSLA", "2022-08-24", "2022-08-25", 3.0)]  # fmt: skip


@pytest.fixture(scope="module")
def faces() -> Iterator[dict[str, SimServer]]:
    market = SimMarket()
    with SimServer(market, vendor="polygon") as p, SimServer(market, vendor="yahoo") as y:
        yield {"polygon": p, "yahoo": y}


@pytest.fixture(autouse=True)
def _clean(market: SimMarket) -> Iterator[None]:
    yield
    market.actions.clear_faults()


@pytest.mark.parametrize(("symbol", "before", "ex", "ratio"), SPLITS)
def test_raw_bars_jump_by_the_ratio_and_split_adjustment_undoes_it(
    market: SimMarket, symbol: str, before: str, ex: str, ratio: float
) -> None:
    raw = market.bars_frame(symbol, "1Day", before, ex + "T23:00:00Z")
    adj = market.bars_frame(symbol, "1Day", before, ex + "T23:00:00Z", adjustment="split")
    assert len(raw["c"]) == 2
    # the day before the ex-date: raw is the ratio above the split-adjusted price, volume the ratio below
    assert raw["c"][0] / adj["c"][0] == pytest.approx(ratio, rel=1e-12)
    assert adj["v"][0] == round(raw["v"][0] * ratio)
    assert (raw["c"][1], raw["v"][1]) == (adj["c"][1], adj["v"][1])  # on and after the ex-date: unchanged
    assert 0.5 < adj["c"][1] / adj["c"][0] < 2  # adjusted, the jump is gone
    assert 0.5 * ratio < raw["c"][0] / raw["c"][1] < 2 * ratio


def test_dividend_factor_is_on_the_raw_previous_close(market: SimMarket) -> None:
    raw = market.bars_frame("AAPL", "1Day", "2020-11-05", "2020-11-06T23:00:00Z")
    adj = market.bars_frame("AAPL", "1Day", "2020-11-05", "2020-11-06T23:00:00Z", adjustment="dividend")
    f_before, f_on = adj["c"][0] / raw["c"][0], adj["c"][1] / raw["c"][1]
    c_prev = raw["c"][0]
    assert f_before / f_on == pytest.approx((c_prev - 0.205) / c_prev, rel=1e-12)
    assert (adj["v"] == raw["v"]).all()  # dividends leave volume alone


def test_alpaca_bars_adjustment_values(http: httpx.Client, market: SimMarket) -> None:
    q = {"timeframe": "1Day", "start": "2020-08-27", "end": "2020-09-01"}
    got = {}
    for adj in ("raw", "split", "dividend", "all", "split,dividend"):
        r = http.get("/v2/stocks/AAPL/bars", params={**q, "adjustment": adj})
        assert r.status_code == 200, r.text
        got[adj] = np.array([b["c"] for b in r.json()["bars"]])
    ref = market.bars_frame("AAPL", "1Day", "2020-08-27", "2020-09-01T23:00:00Z", adjustment="all")
    np.testing.assert_allclose(got["all"], ref["c"], rtol=1e-12)
    np.testing.assert_allclose(got["split,dividend"], got["all"], rtol=1e-12)
    assert got["raw"][0] / got["split"][0] == pytest.approx(4.0)


GE_SPIN_OFFS = [("GEHC", "2023-01-03", "2023-01-04", 3.0), ("GEV", "2024-04-01", "2024-04-02", 4.0)]


@pytest.mark.parametrize(("line", "before", "ex", "per"), GE_SPIN_OFFS)
def test_ge_drops_by_the_spin_off_value_and_the_new_line_trades_from_the_ex_date(
    market: SimMarket, http: httpx.Client, line: str, before: str, ex: str, per: float
) -> None:
    """GE's real spin-offs: 1 GEHC per 3 GE ex 2023-01-04, 1 GEV per 4 GE ex 2024-04-02. GE's raw prices
    before the ex-date hold V = P_new(ex) / per (the walk is continuous, the raw series drops by V); the
    new line has no bars, trades or quotes before its ex-date; adjustment=spin-off|all scales GE's
    earlier bars by 1 - V / C_prev (raw closes) and leaves volume alone."""
    raw = market.bars_frame("GE", "1Day", before, ex + "T23:00:00Z")
    new = market.bars_frame(line, "1Day", "2020-01-01", ex + "T23:00:00Z")
    assert len(raw["c"]) == 2 and len(new["c"]) == 1  # the new line's first bar is its ex-date's
    assert not len(market.bars_frame(line, "1Min", "2020-01-01", before + "T23:00:00Z")["t"])
    assert not len(market.trades_frame(line, "2020-01-01", before + "T23:00:00Z")["t"])
    value = new["c"][0] / per
    # the same market without this spin-off: GE's close before the ex-date is V lower (both closes rounded
    # to cents), from the ex-date on the same
    bare = SimMarket(actions=ActionBook(tuple(a for a in DEFAULT_ACTIONS if a.new_symbol != line)))
    alone = bare.bars_frame("GE", "1Day", before, ex + "T23:00:00Z")
    assert abs(raw["c"][0] - alone["c"][0] - value) <= 0.0101 and raw["c"][1] == alone["c"][1]
    assert len(bare.bars_frame(line, "1Day", before, before + "T23:00:00Z")["c"]) == 1  # a plain symbol there
    for adj in ("spin-off", "all", "split,spin-off"):
        a = market.bars_frame("GE", "1Day", before, ex + "T23:00:00Z", adjustment=adj)
        assert (a["c"][0] / raw["c"][0]) / (a["c"][1] / raw["c"][1]) == pytest.approx(
            1 - value / raw["c"][0], rel=1e-12
        )
        assert (a["v"] == raw["v"]).all()
    plain = market.bars_frame("GE", "1Day", before, ex + "T23:00:00Z", adjustment="split,dividend")
    np.testing.assert_array_equal(plain["c"], raw["c"])  # GE has no splits or dividends in the book
    r = http.get("/v2/stocks/GE/bars", params={"timeframe": "1Day", "start": before, "end": ex, "adjustment": "all"})
    assert r.status_code == 200
    np.testing.assert_allclose([b["c"] for b in r.json()["bars"]], market.bars_frame(
        "GE", "1Day", before, ex + "T23:00:00Z", adjustment="all")["c"], rtol=1e-12)  # fmt: skip


def test_alpaca_lists_ge_spin_offs(http: httpx.Client) -> None:
    q = {"symbols": "GE", "start": "2023-01-01", "end": "2024-12-31", "types": "spin_off"}
    got = http.get("/v1/corporate-actions", params=q).json()["corporate_actions"]["spin_offs"]
    assert [(s["source_symbol"], s["new_symbol"], s["source_rate"], s["new_rate"], s["ex_date"]) for s in got] == [
        ("GE", "GEHC", 3, 1, "2023-01-04"), ("GE", "GEV", 4, 1, "2024-04-02")
    ]  # fmt: skip


@pytest.mark.parametrize("query", ["adjustment=both", "adjustment=", "adjustment=split,split",
                                   "adjustment=split&adjustment=all", "adjustment=Split"])  # fmt: skip
def test_alpaca_refuses_bad_adjustment(http: httpx.Client, query: str) -> None:
    r = http.get(f"/v2/stocks/AAPL/bars?timeframe=1Day&start=2020-08-27&{query}")
    assert (r.status_code, r.json()) == (400, {"message": "invalid adjustment"})


def test_alpaca_corporate_actions_all_keys_and_paging(http: httpx.Client) -> None:
    q = {"symbols": "AAPL,NVDA,TSLA", "start": "2020-01-01", "end": "2024-12-31"}
    whole = http.get("/v1/corporate-actions", params={**q, "limit": 1000}).json()
    assert set(whole["corporate_actions"]) == set(PLURAL.values())  # all 15 plural keys, even empty
    assert whole["next_page_token"] is None
    splits = {
        (s["symbol"], s["ex_date"], s["new_rate"], s["old_rate"]) for s in whole["corporate_actions"]["forward_splits"]
    }
    assert splits == {("AAPL", "2020-08-31", 4, 1), ("NVDA", "2024-06-10", 10, 1), ("TSLA", "2022-08-25", 3, 1)}
    divs = {(d["ex_date"], d["rate"]) for d in whole["corporate_actions"]["cash_dividends"]}
    assert ("2020-11-06", 0.205) in divs
    # paging: limit counts all types together; pages concatenate per key
    seen: list[str] = []
    token = None
    while True:
        page = http.get(
            "/v1/corporate-actions", params={**q, "limit": 7, **({"page_token": token} if token else {})}
        ).json()
        seen += [r["id"] for rows in page["corporate_actions"].values() for r in rows]
        token = page["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(r["id"] for rows in whole["corporate_actions"].values() for r in rows)


def test_alpaca_corporate_actions_filter_on_process_date(http: httpx.Client) -> None:
    """Trap 2: a dividend ex 2020-11-06 is processed a week later; a window ending on the ex-date misses it."""
    q = {"symbols": "AAPL", "types": "cash_dividend"}
    narrow = http.get("/v1/corporate-actions", params={**q, "start": "2020-11-01", "end": "2020-11-06"}).json()
    assert narrow["corporate_actions"]["cash_dividends"] == []
    wide = http.get("/v1/corporate-actions", params={**q, "start": "2020-11-01", "end": "2020-11-20"}).json()
    assert [d["ex_date"] for d in wide["corporate_actions"]["cash_dividends"]] == ["2020-11-06"]
    assert http.get("/v1/corporate-actions", params={**q, "types": "bogus"}).status_code == 400


def test_polygon_splits_and_dividends_both_generations(faces: dict[str, SimServer]) -> None:
    base = faces["polygon"].url
    new = httpx.get(base + "/stocks/v1/splits", params={"ticker": "AAPL", "apiKey": "POLYKEY"}).json()
    (row,) = new["results"]
    assert (row["execution_date"], row["split_from"], row["split_to"], row["adjustment_type"]) == (
        "2020-08-31", 1, 4, "forward_split")  # fmt: skip
    assert row["historical_adjustment_factor"] == 0.25
    old = httpx.get(base + "/v3/reference/splits", params={"ticker": "NVDA", "apiKey": "POLYKEY"}).json()
    assert [(r["execution_date"], r["split_to"]) for r in old["results"]] == [("2024-06-10", 10)]
    divs = httpx.get(base + "/stocks/v1/dividends", params={"ticker": "AAPL", "ex_dividend_date": "2020-11-06",
                                                            "apiKey": "POLYKEY"}).json()  # fmt: skip
    assert [(r["cash_amount"], r["currency"]) for r in divs["results"]] == [(0.205, "USD")]
    page = httpx.get(base + "/v3/reference/dividends", params={"ticker": "AAPL", "limit": 3, "apiKey": "POLYKEY"})
    nxt = page.json()["next_url"]
    assert "POLYKEY" not in nxt and "POLYKEY" not in base64.urlsafe_b64decode(nxt.split("cursor=")[1]).decode()
    more = httpx.get(nxt, headers={"Authorization": "Bearer POLYKEY"}).json()
    assert (
        len(more["results"]) == 3
        and more["results"][0]["ex_dividend_date"] < page.json()["results"][-1]["ex_dividend_date"]
    )


def test_yahoo_events_and_adjclose(faces: dict[str, SimServer], market: SimMarket) -> None:
    """Keys as in the real recording chart-AAPL-2020-08-31-to-2020-11-07: the ex-dates' session opens."""
    q = {"interval": "1d", "period1": 1598500000, "period2": 1604900000, "events": "div,split"}
    r = httpx.get(faces["yahoo"].url + "/v8/finance/chart/AAPL", params=q)
    res = r.json()["chart"]["result"][0]
    assert res["events"]["splits"]["1598880600"]["splitRatio"] == "4:1"
    assert res["events"]["dividends"]["1604673000"]["amount"] == 0.205
    ref = market.bars_frame("AAPL", "1Day", "2020-08-27", "2020-11-06T23:00:00Z", adjustment="all", vendor="yahoo")
    np.testing.assert_allclose(res["indicators"]["adjclose"][0]["adjclose"], ref["c"], rtol=1e-6)  # float32 on the wire


def _adj_close(market: SimMarket, vendor: str, adjustment: str, start: str, end: str) -> np.ndarray:
    return market.bars_frame("AAPL", "1Day", start, end + "T23:00:00Z", adjustment=adjustment, vendor=vendor)["c"]


@pytest.mark.parametrize(
    ("kind", "expect"),
    [("missing_split", 1.0), ("doubled_split", 1 / 16), ("wrong_ratio", 1 / 5)],
)
def test_split_faults_change_one_vendor_only(market: SimMarket, kind: str, expect: float) -> None:
    market.actions.set_faults([ActionFault(vendor="yahoo", kind=kind, symbol="AAPL")])  # type: ignore[arg-type]
    raw = market.bars_frame("AAPL", "1Day", "2020-08-28", "2020-08-28T23:00:00Z")["c"]
    wrong = _adj_close(market, "yahoo", "split", "2020-08-28", "2020-08-28")
    right = _adj_close(market, "alpaca", "split", "2020-08-28", "2020-08-28")
    assert wrong[0] / raw[0] == pytest.approx(expect)
    assert right[0] / raw[0] == pytest.approx(0.25)


def test_unadjusted_dividend_fault(market: SimMarket) -> None:
    fault = ActionFault(vendor="alpaca", kind="unadjusted_dividend", symbol="AAPL", ex_date=date(2025, 11, 10))
    market.actions.set_faults([fault])
    raw = market.bars_frame("AAPL", "1Day", "2025-11-07", "2025-11-07T23:00:00Z")["c"]
    assert _adj_close(market, "alpaca", "dividend", "2025-11-07", "2025-11-07")[0] == raw[0]
    assert _adj_close(market, "polygon", "dividend", "2025-11-07", "2025-11-07")[0] < raw[0]
    listed = [a.ex_date.isoformat() for a in market.actions.view("AAPL", "alpaca").listed]
    assert "2025-11-10" in listed  # still listed: only the adjustment leaves it out


def test_action_faults_over_the_admin_surface(faces: dict[str, SimServer]) -> None:
    base = faces["polygon"].url  # any face: they share the market
    assert any(a["symbol"] == "NVDA" and a["new_rate"] == 10 for a in httpx.get(base + "/_sim/actions").json())
    body = [{"vendor": "yahoo", "kind": "missing_split", "symbol": "AAPL"}]
    assert httpx.put(base + "/_sim/actions/faults", json=body).json() == [{**body[0], "ex_date": None, "factor": 1.25}]
    try:
        q = {"interval": "1d", "period1": 1598500000, "period2": 1599500000, "events": "div,split"}
        res = httpx.get(faces["yahoo"].url + "/v8/finance/chart/AAPL", params=q).json()["chart"]["result"][0]
        assert "events" not in res  # the split is gone from Yahoo's view only
        assert httpx.get(base + "/stocks/v1/splits", params={"ticker": "AAPL", "apiKey": "POLYKEY"}).json()["results"]
        wrong = [{"vendor": "bloomberg", "kind": "missing_split", "symbol": "A"}]
        bad = httpx.put(base + "/_sim/actions/faults", json=wrong)
        assert bad.status_code == 400 and "vendor" in bad.json()["message"]
    finally:
        assert httpx.delete(base + "/_sim/actions/faults").json() == []
