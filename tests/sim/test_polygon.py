"""The Polygon face over real HTTP: wire shapes, pagination, plans, errors, faults, disagreements."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from marketpipe.core.timeframe import Timeframe
from marketpipe.sim.admin import Stats
from marketpipe.sim.data import SimMarket, to_ns
from marketpipe.sim.faults import FaultRule, Faults
from marketpipe.sim.polygon import DEFAULT_KEYS, PolygonFace, make_face
from marketpipe.sim.server import SimServer

KEYS = {**DEFAULT_KEYS, "POLYRL": "unlimited", "POLYFREE2": "free"}
BEARER = {"Authorization": "Bearer POLYKEY"}
AGGS = "/v2/aggs/ticker/{}/range/{}/{}/{}/{}"
DAY = "2024-03-05"


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def aggs(c: httpx.Client, ticker: str, mult: int, span: str, lo: object, hi: object, **q: Any) -> httpx.Response:
    return c.get(AGGS.format(ticker, mult, span, lo, hi), params=q)


@pytest.fixture(scope="module")
def polygon(market: SimMarket) -> Iterator[SimServer]:
    with SimServer(market, keys=KEYS, vendor="polygon") as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "polygon" in request.fixturenames:
        server: SimServer = request.getfixturevalue("polygon")
        server.faults.clear()
        face: PolygonFace = server.face
        face.price_shift_pct, face.volume_ratio, face.missing_days = 0.0, 1.0, set()


@pytest.fixture
def http(polygon: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=polygon.url, headers=BEARER, timeout=10) as client:
        yield client


# --- aggregates --------------------------------------------------------------------------------


def test_minute_aggregates_shape_and_values(http: httpx.Client, market: SimMarket) -> None:
    r = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=50000)
    doc = r.json()
    assert r.status_code == 200 and r.headers["x-marketpipe-sim"] == "1"
    assert list(doc) == ["ticker", "queryCount", "resultsCount", "adjusted", "results", "status", "request_id", "count"]
    assert (doc["ticker"], doc["status"], doc["adjusted"]) == ("AAPL", "OK", True)
    assert doc["resultsCount"] == doc["count"] == doc["queryCount"] == 390
    assert len(doc["request_id"]) == 32
    first = doc["results"][0]
    assert list(first) == ["v", "vw", "o", "c", "h", "l", "t", "n"]
    assert first["t"] == ms(datetime(2024, 3, 5, 14, 30, tzinfo=UTC))  # milliseconds
    assert isinstance(first["v"], float) and isinstance(first["n"], int)
    want = market.bars_frame("AAPL", "1Min", "2024-03-05T00:00:00Z", "2024-03-05T23:59:59Z")
    got = doc["results"]
    assert [b["t"] * 1_000_000 for b in got] == want["t"].tolist()
    for key in ("o", "h", "l", "c", "vw", "n"):
        assert [b[key] for b in got] == want[key].tolist()
    assert [int(b["v"]) for b in got] == want["v"].tolist()


def test_pagination_follows_next_url_with_cursor(http: httpx.Client, polygon: SimServer) -> None:
    whole = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=50000).json()["results"]
    r = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=100, adjusted="false")
    pages = [r.json()]
    while "next_url" in pages[-1]:
        nxt = pages[-1]["next_url"]
        assert nxt.startswith(polygon.url + "/v2/aggs/ticker/AAPL/range/1/minute/") and "apiKey" not in nxt
        pages.append(http.get(nxt).json())  # the cursor carries limit, sort and adjusted
    assert [len(p["results"]) for p in pages] == [100, 100, 100, 90]
    assert all(p["adjusted"] is False for p in pages)
    assert [b for p in pages for b in p["results"]] == whole
    cursor = pages[0]["next_url"].split("cursor=")[1]
    assert base64.urlsafe_b64decode(cursor + "==").decode() == "adjusted=false&limit=100&sort=asc"


def test_sort_desc_pages_backwards(http: httpx.Client) -> None:
    whole = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=50000).json()["results"]
    doc = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=300, sort="desc").json()
    rest = http.get(doc["next_url"]).json()
    assert doc["results"] + rest["results"] == whole[::-1]
    assert "next_url" not in rest


def test_limit_counts_base_aggregates(http: httpx.Client) -> None:
    doc = aggs(http, "AAPL", 1, "hour", DAY, DAY, limit=100).json()
    # 09:30-10:00 (30 minute bars) and 10:00-11:00 (60) fit in 100; the next hour does not.
    assert (doc["resultsCount"], doc["queryCount"]) == (2, 90)
    assert doc["results"][0]["t"] == ms(datetime(2024, 3, 5, 14, tzinfo=UTC))
    one = aggs(http, "AAPL", 1, "hour", DAY, DAY, limit=1).json()
    assert one["resultsCount"] == 1  # never an empty page while bars remain


def test_bounds_inclusive_and_snapped_outward(http: httpx.Client) -> None:
    t0 = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    exact = aggs(http, "AAPL", 1, "minute", ms(t0), ms(t0 + timedelta(minutes=4))).json()
    assert exact["resultsCount"] == 5  # both ends inclusive
    inside = aggs(http, "AAPL", 1, "minute", ms(t0) + 30_000, ms(t0) + 30_000).json()
    assert [b["t"] for b in inside["results"]] == [ms(t0)]  # the bucket holding the instant
    five = aggs(http, "AAPL", 5, "minute", ms(t0 + timedelta(minutes=7)), ms(t0 + timedelta(minutes=7))).json()
    assert [b["t"] for b in five["results"]] == [ms(t0 + timedelta(minutes=5))]


def test_daily_weekly_monthly_stamps(http: httpx.Client) -> None:
    day = aggs(http, "AAPL", 1, "day", "2024-03-04", "2024-03-08").json()["results"]
    assert [b["t"] for b in day][:2] == [
        ms(datetime(2024, 3, 4, 5, tzinfo=UTC)),
        ms(datetime(2024, 3, 5, 5, tzinfo=UTC)),
    ]
    summer = aggs(http, "AAPL", 1, "day", "2024-07-01", "2024-07-01").json()["results"]
    assert summer[0]["t"] == ms(datetime(2024, 7, 1, 4, tzinfo=UTC))  # New York midnight in EDT
    weeks = aggs(http, "AAPL", 1, "week", "2024-03-04", "2024-03-15").json()
    sundays = [datetime.fromtimestamp(b["t"] / 1000, UTC) for b in weeks["results"]]
    assert sundays == [datetime(2024, 3, 3, 5, tzinfo=UTC), datetime(2024, 3, 10, 5, tzinfo=UTC)]  # DST starts at 2am
    assert weeks["queryCount"] == 10  # two weeks of daily base aggregates
    week_sum = sum(b["v"] for b in day)
    assert weeks["results"][0]["v"] == week_sum
    months = aggs(http, "AAPL", 1, "quarter", "2024-01-01", "2024-06-30").json()["results"]
    assert [b["t"] for b in months] == [
        ms(datetime(2024, 1, 1, 5, tzinfo=UTC)),
        ms(datetime(2024, 4, 1, 4, tzinfo=UTC)),
    ]


def test_unknown_ticker_has_no_results_key(http: httpx.Client) -> None:
    for ticker in ("ZZZZ", "aapl"):  # tickers are case-sensitive
        doc = aggs(http, ticker, 1, "day", "2024-03-01", "2024-03-10").json()
        assert doc["status"] == "OK" and doc["resultsCount"] == 0 and "results" not in doc
        assert doc["ticker"] == ticker


def test_class_shares_use_the_dot(http: httpx.Client) -> None:
    doc = aggs(http, "BRK.B", 1, "day", "2024-03-04", "2024-03-08").json()
    assert doc["ticker"] == "BRK.B" and doc["resultsCount"] == 5


@pytest.mark.parametrize(
    ("path", "q", "text"),
    [
        (AGGS.format("AAPL", 1, "fortnight", DAY, DAY), {}, "timespan"),
        (AGGS.format("AAPL", 0, "day", DAY, DAY), {}, "multiplier"),
        (AGGS.format("AAPL", 1, "second", DAY, DAY), {}, "second"),
        (AGGS.format("AAPL", 7, "month", DAY, DAY), {}, "7-month"),
        (AGGS.format("AAPL", 1, "day", "yesterday", DAY), {}, "'from'"),
        (AGGS.format("AAPL", 1, "day", DAY, "2024-02-30"), {}, "'to'"),
        (AGGS.format("AAPL", 1, "day", DAY, DAY), {"limit": "lots"}, "limit"),
        (AGGS.format("AAPL", 1, "day", DAY, DAY), {"sort": "up"}, "sort"),
        (AGGS.format("AAPL", 1, "day", DAY, DAY), {"adjusted": "maybe"}, "adjusted"),
        (AGGS.format("AAPL", 1, "day", DAY, DAY), {"cursor": "!!"}, "cursor"),
    ],
)
def test_bad_parameters_are_400_error_bodies(http: httpx.Client, path: str, q: dict[str, str], text: str) -> None:
    r = http.get(path, params=q)
    doc = r.json()
    assert r.status_code == 400 and doc["status"] == "ERROR" and text in doc["error"] and doc["request_id"]


def test_prev_close(http: httpx.Client, market: SimMarket) -> None:
    doc = http.get("/v2/aggs/ticker/AAPL/prev").json()
    bar = doc["results"][0]
    assert doc["resultsCount"] == 1 and bar["T"] == "AAPL"
    day = datetime.fromtimestamp(bar["t"] / 1000, UTC)
    assert day < datetime.now(UTC) - timedelta(hours=4)  # a finished session before today
    want = market.bars_frame("AAPL", "1Day", day, day)
    assert bar["c"] == want["c"][0] and int(bar["v"]) == want["v"][0]
    assert "results" not in http.get("/v2/aggs/ticker/ZZZZ/prev").json()


# --- last trade, NBBO, snapshots -----------------------------------------------------------------


def test_last_trade_and_nbbo(http: httpx.Client, market: SimMarket) -> None:
    doc = http.get("/v2/last/trade/AAPL").json()
    t = doc["results"]
    assert doc["status"] == "OK" and set(t) == {"T", "c", "i", "p", "s", "x", "t", "y", "q", "z"}
    assert isinstance(t["i"], str) and isinstance(t["x"], int) and t["c"] == [0] and t["z"] in (1, 2, 3)
    assert t["t"] > 1e18 and t["y"] < t["t"]  # nanoseconds; participant time before the SIP's
    ref = market.latest_trade("AAPL", "sip")
    assert ref is not None and (t["p"], t["s"], t["i"]) == (ref["p"], ref["s"], str(ref["i"]))
    q = http.get("/v2/last/nbbo/AAPL").json()["results"]
    assert {"T", "P", "S", "X", "p", "s", "x", "t", "y", "q", "z"} <= set(q)
    assert q["p"] < q["P"]  # bid below ask
    missing = http.get("/v2/last/trade/ZZZZ")
    assert missing.status_code == 404 and missing.json()["status"] == "NOT_FOUND" and "message" in missing.json()


def test_snapshots_single_and_multi(http: httpx.Client) -> None:
    one = http.get("/v2/snapshot/locale/us/markets/stocks/tickers/AAPL").json()
    snap = one["ticker"]
    assert one["status"] == "OK" and snap["ticker"] == "AAPL"
    assert {"day", "prevDay", "min", "lastTrade", "lastQuote", "todaysChange", "todaysChangePerc", "updated"} <= set(
        snap
    )
    assert snap["min"]["av"] == snap["day"]["v"] and snap["min"]["c"] == snap["day"]["c"]
    # The last trade closes the day bar once its minute is complete. While a session runs it may fall in
    # the minute still forming (after the last complete one), which no bar holds yet.
    last_ns, forming_from_ns = snap["lastTrade"]["t"], (snap["min"]["t"] + 60_000) * 1_000_000
    assert snap["lastTrade"]["p"] == snap["day"]["c"] or last_ns >= forming_from_ns
    assert snap["todaysChange"] == pytest.approx(snap["day"]["c"] - snap["prevDay"]["c"])
    multi = http.get("/v2/snapshot/locale/us/markets/stocks/tickers", params={"tickers": "AAPL,ZZZZ,MSFT"}).json()
    assert [s["ticker"] for s in multi["tickers"]] == ["AAPL", "MSFT"] and multi["count"] == 2
    assert http.get("/v2/snapshot/locale/us/markets/stocks/tickers/ZZZZ").status_code == 404


# --- auth and plans --------------------------------------------------------------------------------


def test_authentication(polygon: SimServer) -> None:
    path = AGGS.format("AAPL", 1, "day", DAY, DAY)
    with httpx.Client(base_url=polygon.url, timeout=10) as anon:
        missing = anon.get(path)
        assert missing.status_code == 401 and missing.json()["status"] == "ERROR"
        assert missing.json()["error"] == "API Key was not provided"
        wrong = anon.get(path, params={"apiKey": "NOPE"})
        assert (wrong.status_code, wrong.json()["error"]) == (401, "Unknown API Key")
        assert anon.get(path, params={"apiKey": "POLYKEY"}).status_code == 200
        assert anon.get(path, headers={"Authorization": "Bearer NOPE"}).status_code == 401
        assert anon.get("/nowhere").status_code == 404  # outside the API: no auth asked


def test_free_plan(polygon: SimServer) -> None:
    with httpx.Client(base_url=polygon.url, params={"apiKey": "POLYFREE"}, timeout=10) as free:
        today = datetime.now(UTC).date()
        doc = aggs(free, "AAPL", 1, "day", (today - timedelta(days=10)).isoformat(), today.isoformat()).json()
        assert doc["status"] == "DELAYED"
        last = datetime.fromtimestamp(doc["results"][-1]["t"] / 1000, UTC)
        assert last < datetime.now(UTC) - timedelta(hours=4)  # nothing from today's session
        denied = free.get("/v2/last/trade/AAPL")
        body = denied.json()
        assert denied.status_code == 403 and body["status"] == "NOT_AUTHORIZED"
        assert "not entitled" in body["message"] and "error" not in body  # `message`, not `error`


def test_delayed_plan_status(polygon: SimServer) -> None:
    with httpx.Client(base_url=polygon.url, headers={"Authorization": "Bearer POLYDELAYED"}, timeout=10) as c:
        now = datetime.now(UTC)
        doc = aggs(c, "AAPL", 1, "minute", ms(now - timedelta(days=5)), ms(now)).json()
        assert doc["status"] == "DELAYED"
        if "results" in doc:
            assert doc["results"][-1]["t"] <= ms(now - timedelta(minutes=15))


def test_free_plan_rate_limit_body(polygon: SimServer) -> None:
    with httpx.Client(base_url=polygon.url, params={"apiKey": "POLYFREE2"}, timeout=10) as c:
        codes = [c.get("/v2/aggs/ticker/AAPL/prev").status_code for _ in range(6)]
        assert codes[:5] == [200] * 5 and codes[5] == 429
        body = c.get("/v2/aggs/ticker/AAPL/prev").json()
        assert body["status"] == "ERROR" and "exceeded the maximum requests per minute" in body["error"]


# --- faults ------------------------------------------------------------------------------------


def test_fault_bodies(polygon: SimServer, http: httpx.Client) -> None:
    path = AGGS.format("AAPL", 1, "day", DAY, DAY)
    polygon.faults.set([FaultRule(kind="http_500", times=1)])
    r = http.get(path)
    assert r.status_code == 500 and r.json()["status"] == "ERROR" and r.headers["x-marketpipe-sim"] == "1"
    for kind, status in (("http_502", 502), ("http_503", 503), ("html_200", 200)):
        polygon.faults.set([FaultRule(kind=kind, times=1)])  # type: ignore[arg-type]
        r = http.get(path)
        assert r.status_code == status and r.headers["content-type"].startswith("text/html")
    polygon.faults.set([FaultRule(kind="rate_limit", times=1)])
    r = http.get(path)
    assert r.status_code == 429 and r.content == b""  # the vendor's occasional empty 429
    whole = http.get(path).content
    polygon.faults.set([FaultRule(kind="truncated_json", times=1)])
    cut = http.get(path).content
    assert whole.startswith(cut) and len(cut) == len(whole) // 2
    polygon.faults.set([FaultRule(kind="reset", times=1)])
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.get(path)
    assert http.get(path).status_code == 200
    assert polygon.stats()["by_path"][path]["reset"] >= 1


def test_envelope_faults(polygon: SimServer, http: httpx.Client) -> None:
    path = AGGS.format("AAPL", 1, "minute", DAY, DAY)
    polygon.faults.set([FaultRule(kind="empty_json", times=1), FaultRule(kind="null_page", times=1)])
    assert http.get(path).content == b"{}"
    r = http.get(path)
    assert (r.status_code, r.json()) == (200, {"results": None}) and r.headers["x-marketpipe-sim"] == "1"
    assert "status" in http.get(path).json()  # both rules used up
    polygon.faults.set([FaultRule(kind="null_page")])
    assert http.get("/v2/last/trade/AAPL").json()["status"] == "OK"  # not a page: untouched, not counted
    assert polygon.faults.to_dict()["counters"] == [{"seen": 0, "applied": 0}]


def test_token_loop_next_url_points_back_at_the_cursor(polygon: SimServer, http: httpx.Client) -> None:
    clean = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=100).json()
    second = http.get(clean["next_url"]).json()
    polygon.faults.set([FaultRule(kind="token_loop")])
    first = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=100).json()
    assert first["next_url"] == clean["next_url"]  # no cursor asked for: the real next_url
    for _ in range(3):  # followed verbatim, it answers the same page and points at itself
        again = http.get(clean["next_url"]).json()
        assert again["results"] == second["results"] and again["next_url"] == clean["next_url"]
    # a window that fits one page gets a next_url for itself, which then repeats
    whole = aggs(http, "AAPL", 1, "day", DAY, DAY).json()
    assert whole["next_url"].split("?")[0].endswith(AGGS.format("AAPL", 1, "day", DAY, DAY))
    assert http.get(whole["next_url"]).json()["next_url"] == whole["next_url"]
    assert "next_url" not in http.get("/v2/aggs/ticker/AAPL/prev").json()  # prev is not paginated
    assert polygon.faults.to_dict()["counters"] == [{"seen": 6, "applied": 6}]
    polygon.faults.clear()
    assert "next_url" not in aggs(http, "AAPL", 1, "day", DAY, DAY).json()


def test_latency_and_hang(polygon: SimServer) -> None:
    path = AGGS.format("AAPL", 1, "day", DAY, DAY)
    polygon.faults.set([FaultRule(kind="latency", latency_ms=150)])
    with httpx.Client(base_url=polygon.url, headers=BEARER, timeout=0.5) as c:
        t0 = time.monotonic()
        assert c.get(path).status_code == 200 and time.monotonic() - t0 >= 0.15
        polygon.faults.set([FaultRule(kind="hang", hang_seconds=2)])
        with pytest.raises(httpx.ReadTimeout):
            c.get(path)


def test_invalid_rows_hit_aggregates(polygon: SimServer, http: httpx.Client) -> None:
    clean = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=50000).json()["results"]
    polygon.faults.set([FaultRule(kind="invalid_rows", row_kinds=["misaligned_ts", "negative_volume"], row_ratio=0.1)])
    dirty = aggs(http, "AAPL", 1, "minute", DAY, DAY, limit=50000).json()
    rows = dirty["results"]
    assert all(isinstance(b["t"], int) for b in rows)  # still the vendor's ms
    assert any(b["t"] % 60_000 == 17_000 for b in rows) or any(b["v"] < 0 for b in rows)
    assert sum(a != b for a, b in zip(clean, rows, strict=True)) >= 1
    assert http.get("/v2/last/trade/AAPL").status_code == 200  # only bar pages are corrupted


def test_faults_can_target_one_path(polygon: SimServer, http: httpx.Client) -> None:
    polygon.faults.set([FaultRule(kind="http_503", paths="^/v2/last/")])
    assert http.get("/v2/last/trade/AAPL").status_code == 503
    assert http.get("/v2/aggs/ticker/AAPL/prev").status_code == 200
    assert http.get("/_sim/faults").json()["counters"][0]["applied"] == 1


# --- deliberate disagreement ---------------------------------------------------------------------


def test_disagreements_are_runtime_settable(polygon: SimServer, http: httpx.Client) -> None:
    base = aggs(http, "AAPL", 1, "day", "2024-03-04", "2024-03-08").json()["results"]
    face: PolygonFace = polygon.face
    face.price_shift_pct = 1.0
    face.volume_ratio = 0.025
    face.missing_days = {date(2024, 3, 6)}
    got = aggs(http, "AAPL", 1, "day", "2024-03-04", "2024-03-08").json()["results"]
    assert len(got) == 4 and ms(datetime(2024, 3, 6, 5, tzinfo=UTC)) not in [b["t"] for b in got]
    by_t = {b["t"]: b for b in base}
    for b in got:
        ref = by_t[b["t"]]
        assert b["c"] == pytest.approx(ref["c"] * 1.01, abs=1e-4) and b["vw"] == pytest.approx(
            ref["vw"] * 1.01, abs=1e-4
        )
        assert b["v"] == max(1, round(ref["v"] * 0.025))
    minutes = aggs(http, "AAPL", 1, "minute", "2024-03-06", "2024-03-06").json()
    assert minutes["resultsCount"] == 0
    week = aggs(http, "AAPL", 1, "week", "2024-03-04", "2024-03-08").json()
    assert week["queryCount"] == 4  # the week rebuilt from the four sessions left
    trade = http.get("/v2/last/trade/AAPL").json()["results"]
    face.price_shift_pct = 0.0
    assert trade["p"] == pytest.approx(http.get("/v2/last/trade/AAPL").json()["results"]["p"] * 1.01, abs=1e-4)


def test_disagreement_as_constructor_options(market: SimMarket) -> None:
    face = make_face(
        market, Faults(), {"K": "unlimited"}, Stats(), price_shift_pct=-2.0, missing_days=[date(2024, 1, 2)]
    )
    assert face.price_shift_pct == -2.0 and face.missing_days == {date(2024, 1, 2)}
    s = face.series("AAPL", Timeframe.parse("1Day"), to_ns("2024-01-02"), to_ns("2024-01-05"), to_ns("2030-01-01"))
    stamps = [datetime.fromtimestamp(t / 1e9, UTC).date() for t in s.bars["t"].tolist()]
    assert date(2024, 1, 2) not in stamps and stamps
    ref = market.bars_frame("AAPL", "1Day", "2024-01-03", "2024-01-04T12:00:00Z")
    assert np.allclose(s.bars["c"][: len(ref["c"])], np.round(ref["c"] * 0.98, 4))
    with pytest.raises(ValueError, match="plan"):
        make_face(market, Faults(), {"K": "gold"}, Stats())


def test_keys_accept_alpaca_shape_and_defaults(market: SimMarket) -> None:
    from marketpipe.sim.alpaca import DEFAULT_KEYS as ALPACA_KEYS

    face = make_face(market, Faults(), ALPACA_KEYS, Stats())
    assert {"POLYKEY", "SIMKEY", "FREEKEY"} <= set(face.keys) and face.keys["FREEKEY"] == "free"
    assert make_face(market, Faults(), {"X": ("secret", "unlimited")}, Stats()).keys == {"X": "unlimited"}


def test_every_response_is_json_or_marked(polygon: SimServer, http: httpx.Client) -> None:
    for path in ("/v2/aggs/ticker/AAPL/prev", "/v2/last/nbbo/AAPL", "/v2/nope"):
        r = http.get(path)
        assert r.headers["x-marketpipe-sim"] == "1"
        orjson.loads(r.content)
