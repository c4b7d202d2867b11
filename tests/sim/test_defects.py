"""Fault kind ``bad_data``: plausible-but-wrong bars on every face, over real HTTP.

Every defect is checked row by row against the same request without the fault: the hit rows change
exactly as documented, every other row is untouched, and the result still passes the row checks
(``check_bars`` quarantines nothing), so only anomaly and completeness checks can catch it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import orjson
import pytest

from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.validate import check_bars
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import DEFECTS, FaultRule, Faults, apply_defect
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_rest import bars_to_frame

Row = dict[str, Any]
DAY = {"timeframe": "1Min", "start": "2024-03-05T00:00:00Z", "end": "2024-03-06T00:00:00Z"}  # Tue, 390 bars
TWO_DAYS = {**DAY, "end": "2024-03-07T00:00:00Z"}
T15 = "2024-03-05T15:00:00Z"
POLY_DAY = "/v2/aggs/ticker/AAPL/range/1/minute/2024-03-05/2024-03-05"
CHART = "/v8/finance/chart/AAPL"
YAHOO_NOW = datetime(2024, 3, 15, 20, 30, tzinfo=UTC)  # 1m charts reach 30 days back from here
MARCH_5 = (int(datetime(2024, 3, 5, 5, tzinfo=UTC).timestamp()), int(datetime(2024, 3, 6, 5, tzinfo=UTC).timestamp()))


def bad(defect: str, **kw: Any) -> FaultRule:
    return FaultRule(kind="bad_data", defect=defect, **kw)  # type: ignore[arg-type]


def get_bars(http: httpx.Client, params: dict[str, Any], symbol: str = "AAPL") -> list[Row]:
    r = http.get(f"/v2/stocks/{symbol}/bars", params={"limit": 10000, **params})
    assert r.status_code == 200, r.text
    rows: list[Row] = r.json()["bars"] or []
    return rows


def all_pages(http: httpx.Client, path: str, params: dict[str, Any]) -> tuple[list[Any], int]:
    """Every page of an Alpaca bars query joined (a list, or per-symbol lists), and the page count."""
    got: list[Any] = []
    token: str | None = None
    pages = 0
    while True:
        r = http.get(path, params={**params, **({"page_token": token} if token else {})})
        assert r.status_code == 200, r.text
        doc = r.json()
        pages += 1
        got.extend(doc["bars"] or [])
        token = doc["next_page_token"]
        if token is None:
            return got, pages


def by_t(rows: list[Row]) -> dict[str, Row]:
    return {r["t"]: r for r in rows}


def assert_valid(rows: list[Row], timeframe: str = "1Min") -> None:
    """The row checks the pipeline runs, by hand and through ``check_bars``: none may fire."""
    for r in rows:
        assert min(r["o"], r["h"], r["l"], r["c"]) > 0, r
        assert r["h"] >= max(r["o"], r["c"], r["l"]) and r["l"] <= min(r["o"], r["c"], r["h"]), r
        assert r["v"] >= 0 and r.get("n", 0) >= 0, r
        if "vw" in r:
            assert r["l"] <= r["vw"] <= r["h"], r
    if not rows or "vw" not in rows[0]:
        return
    frame = bars_to_frame([("AAPL", msgspec.Raw(orjson.dumps(rows)))], timeframe, "sim", "sip", datetime.now(UTC))
    checked = check_bars(frame, timeframe=Timeframe.parse(timeframe))
    assert checked.rejected == 0, checked.quarantine
    assert checked.good.height == len(rows)


def only_changed(clean: list[Row], dirty: list[Row]) -> list[str]:
    """Stamps of the rows that differ (same stamps in both)."""
    assert [r["t"] for r in clean] == [r["t"] for r in dirty]
    return [a["t"] for a, b in zip(clean, dirty, strict=True) if a != b]


# --- Alpaca: each defect ---------------------------------------------------------------------------


def test_spike_hits_one_bar(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("spike", at=[T15])])
    dirty = get_bars(http, DAY)
    assert only_changed(clean, dirty) == [T15]
    was, now = by_t(clean)[T15], by_t(dirty)[T15]
    c = round(was["c"] * 1.5, 2)
    assert now == {**was, "c": c, "h": max(was["h"], c), "l": min(was["l"], c)}
    assert now["h"] == c  # 1.5x is above anything the bar traded at
    assert_valid(dirty)
    assert get_bars(http, DAY) == dirty  # the same answer every time


def test_spike_down_with_factor_and_symbols(sim_server: SimServer, http: httpx.Client) -> None:
    params: dict[str, Any] = {**DAY, "symbols": "AAPL,MSFT", "limit": 10000}
    clean = http.get("/v2/stocks/bars", params=params).json()["bars"]
    sim_server.faults.set([bad("spike", at=[T15, "2024-03-05T16:00:00Z"], factor=0.8, symbols=["MSFT"])])
    dirty = http.get("/v2/stocks/bars", params=params).json()["bars"]
    assert dirty["AAPL"] == clean["AAPL"]  # not in symbols
    assert only_changed(clean["MSFT"], dirty["MSFT"]) == [T15, "2024-03-05T16:00:00Z"]
    for t in (T15, "2024-03-05T16:00:00Z"):
        was, now = by_t(clean["MSFT"])[t], by_t(dirty["MSFT"])[t]
        c = round(was["c"] * 0.8, 2)
        assert now == {**was, "c": c, "h": was["h"], "l": c}
    assert_valid(dirty["MSFT"])


def test_split_before_a_stamp(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("split", at=[T15], factor=4)])
    dirty = get_bars(http, DAY)
    before = [r["t"] for r in clean if r["t"] < T15]
    assert len(before) == 30 and only_changed(clean, dirty) == before
    for was, now in zip(clean, dirty, strict=True):
        if was["t"] >= T15:
            assert now == was
            continue
        want = {k: round(was[k] * 4, 4) for k in ("o", "h", "l", "c", "vw")}
        assert now == {**was, **want, "v": max(1, round(was["v"] / 4))}
    assert_valid(dirty)


def test_split_on_a_day_with_daily_bars(sim_server: SimServer, http: httpx.Client) -> None:
    params = {"timeframe": "1Day", "start": "2024-02-26", "end": "2024-03-08"}
    clean = get_bars(http, params)
    sim_server.faults.set([bad("split", at=["2024-03-05"])])  # default ratio 2: a 2-for-1 split
    dirty = get_bars(http, params)
    first_after = "2024-03-05T05:00:00Z"  # 1Day bars are stamped at New York midnight
    assert only_changed(clean, dirty) == [r["t"] for r in clean if r["t"] < first_after]
    assert len(clean) == 10 and len(only_changed(clean, dirty)) == 6
    jump = by_t(dirty)[first_after]["o"] / by_t(dirty)["2024-03-04T05:00:00Z"]["c"]
    assert 0.45 < jump < 0.55  # the overnight gap a split-unaware detector sees
    assert_valid(dirty, "1Day")


def test_frozen_run(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("frozen", at=[T15], run=5)])
    dirty = get_bars(http, DAY)
    run = [r["t"] for r in clean if r["t"] >= T15][:5]
    assert only_changed(clean, dirty) == run and run[-1] == "2024-03-05T15:04:00Z"
    price = by_t(clean)[T15]["o"]
    for t in run:
        was, now = by_t(clean)[t], by_t(dirty)[t]
        assert now == {**was, "o": price, "h": price, "l": price, "c": price, "vw": price}
    assert_valid(dirty)


def test_frozen_default_run_is_30_and_needs_no_page_of_its_own(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([bad("frozen", at=[T15])])
    whole = get_bars(http, DAY)
    frozen = [r for r in whole if r["o"] == r["h"] == r["l"] == r["c"] == r["vw"]]
    assert len(frozen) == 30 and frozen[0]["t"] == T15 and frozen[-1]["t"] == "2024-03-05T15:29:00Z"
    # A window that starts inside the run, and small pages: the same run at the same price.
    late = get_bars(http, {**DAY, "start": "2024-03-05T15:10:00Z"})
    assert late == [r for r in whole if r["t"] >= "2024-03-05T15:10:00Z"]
    paged, pages = all_pages(http, "/v2/stocks/AAPL/bars", {**DAY, "limit": 7})
    assert paged == whole and pages > 50


def test_frozen_run_crosses_the_overnight_break(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, TWO_DAYS)
    sim_server.faults.set([bad("frozen", at=["2024-03-05T20:55:00Z"], run=10)])
    dirty = get_bars(http, TWO_DAYS)
    changed = only_changed(clean, dirty)
    # the run counts bars, not wall time: the last 5 minutes of Tuesday and the first 5 of Wednesday
    assert changed[:5] == [f"2024-03-05T20:5{m}:00Z" for m in range(5, 10)]
    assert changed[5:] == [f"2024-03-06T14:3{m}:00Z" for m in range(5)]
    price = by_t(clean)["2024-03-05T20:55:00Z"]["o"]
    assert {by_t(dirty)[t]["c"] for t in changed} == {price}
    assert_valid(dirty)


def test_frozen_at_a_date_starts_at_its_first_bar(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("frozen", at=["2024-03-05"], run=3)])
    dirty = get_bars(http, DAY)
    assert only_changed(clean, dirty) == ["2024-03-05T14:30:00Z", "2024-03-05T14:31:00Z", "2024-03-05T14:32:00Z"]
    assert dirty[2]["c"] == clean[0]["o"]


def test_volume_spike_at_stamps(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("volume_spike", at=[T15])])
    dirty = get_bars(http, DAY)
    assert only_changed(clean, dirty) == [T15]
    was = by_t(clean)[T15]
    assert by_t(dirty)[T15] == {**was, "v": was["v"] * 50}  # n stays: many shares, no more trades
    assert_valid(dirty)


def test_volume_spike_by_hash_is_seeded_and_page_independent(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("volume_spike", factor=10, row_ratio=0.05)])
    dirty = get_bars(http, DAY)
    hit = only_changed(clean, dirty)
    assert 5 <= len(hit) <= 45
    for t in hit:
        assert by_t(dirty)[t] == {**by_t(clean)[t], "v": by_t(clean)[t]["v"] * 10}
    assert get_bars(http, DAY) == dirty
    paged, _ = all_pages(http, "/v2/stocks/AAPL/bars", {**DAY, "limit": 13})
    assert paged == dirty  # no "at least one row" rule: which rows are hit never depends on the page


def test_zero_volume_move(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    stamps = [T15, "2024-03-05T15:01:00Z", "2024-03-05T18:30:00Z"]
    sim_server.faults.set([bad("zero_volume_move", at=stamps)])
    dirty = get_bars(http, DAY)
    assert only_changed(clean, dirty) == stamps
    for t in stamps:
        assert by_t(dirty)[t] == {**by_t(clean)[t], "v": 0, "n": 0}
    i = [r["t"] for r in dirty].index(T15)
    assert (dirty[i]["c"], dirty[i + 1]["c"]) != (dirty[i - 1]["c"], dirty[i]["c"])  # prices still move
    assert_valid(dirty)


def test_drop_stamps_and_days(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, TWO_DAYS)
    sim_server.faults.set([bad("drop", at=[T15, "2024-03-05T15:01:00Z"])])
    dirty = get_bars(http, TWO_DAYS)
    assert dirty == [r for r in clean if r["t"] not in (T15, "2024-03-05T15:01:00Z")]
    assert len(dirty) == 778
    sim_server.faults.set([bad("drop", at=["2024-03-06"])])  # a whole New York day
    assert get_bars(http, TWO_DAYS) == [r for r in clean if r["t"] < "2024-03-06"]
    assert_valid(dirty)


def test_drop_leaves_no_empty_symbol_behind(sim_server: SimServer, http: httpx.Client) -> None:
    sim_server.faults.set([bad("drop", at=["2024-03-05"], symbols=["MSFT"])])
    r = http.get("/v2/stocks/bars", params={**DAY, "symbols": "AAPL,MSFT"})
    assert r.status_code == 200 and list(r.json()["bars"]) == ["AAPL"]
    single = http.get("/v2/stocks/MSFT/bars", params=DAY).json()
    assert single["bars"] is None and single["symbol"] == "MSFT"  # the vendor's single shape without bars


@pytest.mark.parametrize("defect", DEFECTS)
def test_every_defect_passes_the_row_checks(sim_server: SimServer, http: httpx.Client, defect: str) -> None:
    clean = get_bars(http, TWO_DAYS)
    at = ["2024-03-06"] if defect in ("split", "frozen") else None
    sim_server.faults.set([bad(defect, at=at, row_ratio=0.1)])
    dirty = get_bars(http, TWO_DAYS)
    assert dirty != clean
    assert_valid(dirty)


# --- paging ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["asc", "desc"])
def test_split_and_drop_are_the_same_on_any_page_size(sim_server: SimServer, http: httpx.Client, sort: str) -> None:
    # With limit 50 the first page ends at 15:19 and the second starts at 15:20 (ascending).
    edges = ["2024-03-05T15:19:00Z", "2024-03-05T15:20:00Z", "2024-03-06T14:30:00Z"]
    params = {**TWO_DAYS, "sort": sort}
    for rule in (bad("split", at=["2024-03-05T15:20:00Z"], factor=3), bad("drop", at=edges)):
        sim_server.faults.set([rule])
        whole = get_bars(http, params)
        for limit in (50, 17):
            paged, pages = all_pages(http, "/v2/stocks/AAPL/bars", {**params, "limit": limit})
            assert paged == whole and pages == -(-780 // limit), (rule.defect, limit)
        if rule.defect == "drop":
            assert len(whole) == 777 and not {r["t"] for r in whole} & set(edges)
        else:
            assert_valid(whole)


def test_multi_symbol_paging_with_drop(sim_server: SimServer, http: httpx.Client) -> None:
    params = {**DAY, "symbols": "AAPL,MSFT"}
    sim_server.faults.set([bad("drop", at=["2024-03-05T20:59:00Z", "2024-03-05T14:30:00Z"])])
    whole = http.get("/v2/stocks/bars", params={**params, "limit": 10000}).json()["bars"]
    assert [len(whole[s]) for s in ("AAPL", "MSFT")] == [388, 388]
    token: str | None = None
    got: dict[str, list[Row]] = {}
    while True:
        extra = {"page_token": token} if token else {}
        doc = http.get("/v2/stocks/bars", params={**params, "limit": 390, **extra}).json()
        for sym, rows in doc["bars"].items():
            got.setdefault(sym, []).extend(rows)
        token = doc["next_page_token"]
        if token is None:
            break
    assert got == whole  # AAPL's dropped last bar ended page 1, and the token still led on


# --- firing, paths, configuration ------------------------------------------------------------------


def test_fires_per_request_on_bar_paths_only(sim_server: SimServer, http: httpx.Client) -> None:
    clean = get_bars(http, DAY)
    sim_server.faults.set([bad("drop", at=[T15], times=1)])
    trades = http.get("/v2/stocks/AAPL/trades", params={"start": T15, "end": "2024-03-05T15:01:00Z", "limit": 5})
    assert trades.status_code == 200 and trades.json()["trades"]
    assert sim_server.faults.to_dict()["counters"] == [{"seen": 0, "applied": 0}]
    assert len(get_bars(http, DAY)) == 389
    assert get_bars(http, DAY) == clean  # times=1 is used up
    sim_server.faults.set([bad("drop", at=[T15], after=1)])
    assert len(get_bars(http, DAY)) == 390 and len(get_bars(http, DAY)) == 389


def test_put_over_http_round_trips(sim_server: SimServer, http: httpx.Client) -> None:
    admin = sim_server.url + "/_sim/faults"
    rule = {"kind": "bad_data", "defect": "spike", "at": [T15], "symbols": ["AAPL"], "factor": 3.0}
    r = httpx.put(admin, json={"rules": [rule]})
    assert r.status_code == 200 and r.json()["rules"] == [rule]
    assert sim_server.faults.rules == [bad("spike", at=[T15], symbols=["AAPL"], factor=3.0)]
    assert by_t(get_bars(http, DAY))[T15]["h"] > 600  # AAPL trades near 250 that day
    frozen = {"kind": "bad_data", "defect": "frozen", "at": ["2024-03-05"], "run": 5}
    assert httpx.put(admin, json={"rules": [frozen]}).json()["rules"] == [frozen]


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"kind": "bad_data"}, "bad_data needs a defect"),
    ({"kind": "bad_data", "defect": "meteor"}, "Invalid enum value 'meteor'"),
    ({"kind": "bad_data", "defect": "split"}, "split needs at with exactly one entry"),
    ({"kind": "bad_data", "defect": "split", "at": ["2024-03-05", "2024-03-06"]}, "exactly one entry"),
    ({"kind": "bad_data", "defect": "frozen", "at": []}, "frozen needs at"),
    ({"kind": "bad_data", "defect": "drop", "at": ["2024-03-05T15:00:00"]}, "neither an RFC-3339 time"),
    ({"kind": "bad_data", "defect": "drop", "at": ["2024-02-30"]}, "'2024-02-30' is neither"),
    ({"kind": "bad_data", "defect": "drop", "at": "2024-03-05"}, "Expected `array | null`, got `str`"),
    ({"kind": "bad_data", "defect": "drop", "factor": 2}, "factor applies to defects"),
    ({"kind": "bad_data", "defect": "spike", "factor": 0}, "factor must be a finite number > 0"),
    ({"kind": "bad_data", "defect": "frozen", "at": ["2024-03-05"], "run": 0}, "run must be >= 1"),
    ({"kind": "bad_data", "defect": "spike", "run": 5}, "run applies to defect frozen only"),
    ({"kind": "bad_data", "defect": "spike", "symbols": []}, "symbols must not be empty"),
    ({"kind": "http_500", "defect": "spike"}, "apply to kind bad_data only"),
    ({"kind": "bad_data", "defect": "spike", "sev": 1}, "unknown field `sev`"),
]


@pytest.mark.parametrize(("rule", "text"), BAD_BODIES)
def test_bad_rules_are_400(sim_server: SimServer, rule: dict[str, Any], text: str) -> None:
    r = httpx.put(sim_server.url + "/_sim/faults", json={"rules": [rule]})
    assert r.status_code == 400
    message = r.json()["message"]
    assert message.startswith("invalid fault config: ") and text in message, message
    assert sim_server.faults.rules == []  # nothing half-applied


def test_rules_check_themselves_in_python() -> None:
    with pytest.raises(ValueError, match="bad_data needs a defect"):
        FaultRule(kind="bad_data")
    with pytest.raises(ValueError, match="exactly one entry"):
        bad("split", at=["2024-03-05", "2024-03-06"])
    with pytest.raises(ValueError, match="unknown defect"):
        bad("meteor")
    assert bad("spike").matches("/v2/stocks/AAPL/bars") and not bad("spike").matches("/v2/stocks/AAPL/trades")
    assert bad("drop").matches("/v2/aggs/ticker/AAPL/range/1/minute/2024-03-05/2024-03-05")
    assert bad("drop").matches("/v8/finance/chart/AAPL")
    assert Faults([bad("drop")]).decide("/v2/stocks/bars").fault == bad("drop")


def test_apply_defect_alone() -> None:
    rows: list[Row] = [
        {"t": f"2024-03-05T15:0{m}:00Z", "o": 10.0, "h": 11.0, "l": 9.0, "c": 10.5, "v": 100, "n": 5, "vw": 10.2}
        for m in range(4)
    ]
    doc: dict[str, Any] = {"bars": {"X": rows, "Y": [dict(r) for r in rows]}}
    assert apply_defect(doc, bad("drop", at=["2024-03-05"], symbols=["X"]), seed=0) == 4
    assert list(doc["bars"]) == ["Y"]
    # without a lookup a frozen run is counted and priced within the response
    assert apply_defect(doc, bad("frozen", at=["2024-03-05T15:01:00Z"], run=2), seed=0) == 2
    assert [r["c"] for r in doc["bars"]["Y"]] == [10.5, 10.0, 10.0, 10.5]
    assert apply_defect(doc, FaultRule(kind="http_500"), seed=0) == 0


# --- Polygon -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def polygon(market: SimMarket) -> Iterator[SimServer]:
    with SimServer(market, vendor="polygon") as server:
        yield server


@pytest.fixture(scope="module")
def yahoo(market: SimMarket) -> Iterator[SimServer]:
    with SimServer(market, vendor="yahoo") as server:
        server.face.clock = YAHOO_NOW.timestamp
        yield server


@pytest.fixture(autouse=True)
def _clear_other_faces(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("polygon", "yahoo"):
        if name in request.fixturenames:
            server: SimServer = request.getfixturevalue(name)
            server.faults.clear()


@pytest.fixture
def poly(polygon: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=polygon.url, headers={"Authorization": "Bearer POLYKEY"}, timeout=10) as client:
        yield client


def aggs(poly: httpx.Client, **params: Any) -> dict[str, Any]:
    r = poly.get(POLY_DAY, params=params)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_polygon_spike_and_drop(polygon: SimServer, poly: httpx.Client) -> None:
    clean = aggs(poly)["results"]
    polygon.faults.set([bad("spike", at=[T15])])
    dirty = aggs(poly)["results"]
    hit = [i for i, (a, b) in enumerate(zip(clean, dirty, strict=True)) if a != b]
    assert hit == [30] and dirty[30]["t"] == ms(T15)
    c = round(clean[30]["c"] * 1.5, 2)
    assert dirty[30] == {**clean[30], "c": c, "h": max(clean[30]["h"], c), "l": min(clean[30]["l"], c)}
    assert all(isinstance(r["v"], float) for r in dirty)  # still the vendor's float volumes

    polygon.faults.set([bad("drop", at=[T15, "2024-03-05T20:59:00Z"])])
    doc = aggs(poly)
    assert doc["results"] == [r for r in clean if r["t"] not in (ms(T15), ms("2024-03-05T20:59:00Z"))]
    assert doc["resultsCount"] == doc["count"] == 388
    polygon.faults.set([bad("drop", at=["2024-03-05"])])
    doc = aggs(poly)
    assert "results" not in doc and doc["resultsCount"] == doc["count"] == 0  # the vendor's empty shape


def test_polygon_paging_split_drop_and_frozen(polygon: SimServer, poly: httpx.Client) -> None:
    for rule in (
        bad("split", at=["2024-03-05T15:20:00Z"]),
        bad("drop", at=["2024-03-05T15:19:00Z", "2024-03-05T15:20:00Z"]),
        bad("frozen", at=["2024-03-05T15:15:00Z"], run=10),
    ):
        polygon.faults.set([rule])
        whole = aggs(poly)["results"]
        doc = aggs(poly, limit=50)
        paged = list(doc["results"])
        while "next_url" in doc:
            doc = poly.get(doc["next_url"]).json()
            paged += doc["results"]
        assert paged == whole, rule.defect
    frozen = [r for r in whole if r["t"] >= ms("2024-03-05T15:15:00Z")][:10]
    assert len({(r["o"], r["h"], r["l"], r["c"], r["vw"]) for r in frozen}) == 1


# --- Yahoo -------------------------------------------------------------------------------------------


def chart(client: httpx.Client, **params: Any) -> dict[str, Any]:
    r = client.get(CHART, params=params)
    assert r.status_code == 200, r.text
    res: dict[str, Any] = r.json()["chart"]["result"][0]
    return res


def columns(res: dict[str, Any]) -> list[tuple[Any, ...]]:
    q = res["indicators"]["quote"][0]
    return list(zip(res["timestamp"], q["open"], q["high"], q["low"], q["close"], q["volume"], strict=True))


def test_yahoo_spike_and_frozen(yahoo: SimServer) -> None:
    params = {"interval": "1m", "period1": MARCH_5[0], "period2": MARCH_5[1]}
    t15 = ms(T15) // 1000
    with httpx.Client(base_url=yahoo.url, timeout=10) as yc:
        clean = columns(chart(yc, **params))
        yahoo.faults.set([bad("spike", at=[T15])])
        dirty = columns(chart(yc, **params))
        assert [a[0] for a, b in zip(clean, dirty, strict=True) if a != b] == [t15]
        t, o, h, lo, c, v = dirty[30]
        assert (t, o, lo, v) == (t15, clean[30][1], clean[30][3], clean[30][5])
        assert round(c, 2) == round(round(clean[30][4], 2) * 1.5, 2) and h == c

        yahoo.faults.set([bad("frozen", at=[T15], run=4)])
        res = chart(yc, **{**params, "period1": t15 + 120})  # starts inside the run
        rows = columns(res)
        price = clean[30][1]
        assert [r[1:5] for r in rows[:2]] == [(price, price, price, price)] * 2
        assert rows[2] == clean[34]  # the run was 4 bars from 15:00, whatever the window


def test_yahoo_drop_keeps_the_arrays_parallel(yahoo: SimServer) -> None:
    params = {"interval": "1d", "range": "1mo"}
    with httpx.Client(base_url=yahoo.url, timeout=10) as yc:
        clean = chart(yc, **params)
        yahoo.faults.set([bad("drop", at=["2024-03-05", "2024-03-07"])])
        dirty = chart(yc, **params)
    days = {"2024-03-05", "2024-03-07"}  # daily bars are stamped at the 09:30 open: UTC date = NY date
    kept = [row for row in columns(clean) if datetime.fromtimestamp(row[0], UTC).date().isoformat() not in days]
    assert len(kept) == len(columns(clean)) - 2  # both days were in the window
    assert columns(dirty) == kept
    adj = dirty["indicators"]["adjclose"][0]["adjclose"]
    assert adj == dirty["indicators"]["quote"][0]["close"] and len(adj) == len(dirty["timestamp"])
