"""The Alpaca v2 stock endpoints over real HTTP: shapes, keys, paging, parameters, errors, limits."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from marketpipe.sim.server import SimServer
from tests.sim.conftest import FREE, RL

BAR_KEYS = ["t", "o", "h", "l", "c", "v", "n", "vw"]
TRADE_KEYS = {"t", "x", "p", "s", "i", "c", "z"}
QUOTE_KEYS = {"t", "ax", "ap", "as", "bx", "bp", "bs", "c", "z"}
BAR_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
NS_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
DAY = {"start": "2024-03-05T00:00:00Z", "end": "2024-03-05T23:59:59Z"}


def get(http: httpx.Client, path: str, **params: object) -> dict:  # type: ignore[type-arg]
    r = http.get(path, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["x-marketpipe-sim"] == "1"
    return orjson.loads(r.content)  # type: ignore[no-any-return]


def pull(http: httpx.Client, path: str, key: str, **params: object) -> tuple[dict[str, list[dict]], int]:  # type: ignore[type-arg]
    """Follow next_page_token; returns rows per symbol and the number of pages."""
    out: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    pages, token = 0, None
    while True:
        doc = get(http, path, **params, **({"page_token": token} if token else {}))
        pages += 1
        data = doc[key]
        if isinstance(data, list) or data is None:
            data = {doc["symbol"]: data or []}
        for sym, rows in data.items():
            out.setdefault(sym, []).extend(rows)
        token = doc["next_page_token"]
        if token is None:
            return out, pages


# --- shapes --------------------------------------------------------------------------------------


def test_multi_bars_shape_and_keys(http: httpx.Client) -> None:
    doc = get(http, "/v2/stocks/bars", symbols="MSFT,SPY", timeframe="1Min", start="2024-03-05T14:30:00Z", limit=3)
    assert list(doc) == ["bars", "next_page_token"]
    assert list(doc["bars"]) == ["MSFT"]  # 3 rows fit in MSFT: the limit counts across symbols
    bar = doc["bars"]["MSFT"][0]
    assert list(bar) == BAR_KEYS
    assert bar["t"] == "2024-03-05T14:30:00Z"
    assert isinstance(bar["v"], int) and isinstance(bar["n"], int) and isinstance(bar["vw"], float)
    sym, ts = base64.b64decode(doc["next_page_token"]).decode().split("|")
    assert sym == "MSFT" and int(ts) == int(datetime(2024, 3, 5, 14, 32, tzinfo=UTC).timestamp()) * 10**9


def test_single_bars_shape(http: httpx.Client) -> None:
    doc = get(http, "/v2/stocks/MSFT/bars", timeframe="1Day", start="2024-03-04", end="2024-03-05")
    assert list(doc) == ["bars", "symbol", "next_page_token"]
    assert doc["symbol"] == "MSFT" and doc["next_page_token"] is None
    # a date-only end includes that day's daily bar, as in the reference example
    assert [b["t"] for b in doc["bars"]] == ["2024-03-04T05:00:00Z", "2024-03-05T05:00:00Z"]


def test_unknown_symbols_give_empty_shapes(http: httpx.Client) -> None:
    assert get(http, "/v2/stocks/bars", symbols="ZZZZ", timeframe="1Min", **DAY) == {
        "bars": {},
        "next_page_token": None,
    }
    assert get(http, "/v2/stocks/ZZZZ/bars", timeframe="1Min", **DAY) == {
        "bars": None,
        "symbol": "ZZZZ",
        "next_page_token": None,
    }
    mixed = get(http, "/v2/stocks/bars", symbols="AAPL,ZZZZ", timeframe="1Min", **DAY, limit=10000)
    assert list(mixed["bars"]) == ["AAPL"]
    assert get(http, "/v2/stocks/trades/latest", symbols="ZZZZ") == {"trades": {}}
    assert get(http, "/v2/stocks/ZZZZ/trades/latest") == {"symbol": "ZZZZ", "trade": None}
    assert get(http, "/v2/stocks/snapshots", symbols="ZZZZ") == {}


def test_closed_days_and_early_close(http: httpx.Client) -> None:
    for day in ("2024-03-29", "2025-01-09"):  # Good Friday; national day of mourning
        doc = get(http, "/v2/stocks/AAPL/bars", timeframe="1Min", start=f"{day}T00:00:00Z", end=f"{day}T23:59:59Z")
        assert doc["bars"] is None
    rows, _ = pull(http, "/v2/stocks/AAPL/bars", "bars", timeframe="1Min", start="2024-11-29", end="2024-11-30")
    assert len(rows["AAPL"]) == 210 and rows["AAPL"][-1]["t"] == "2024-11-29T17:59:00Z"


def test_daily_stamps_winter_and_summer(http: httpx.Client) -> None:
    doc = get(http, "/v2/stocks/bars", symbols="AAPL", timeframe="1D", start="2024-01-05", end="2024-07-05")
    stamps = [b["t"] for b in doc["bars"]["AAPL"]]
    assert stamps[0] == "2024-01-05T05:00:00Z" and stamps[-1] == "2024-07-05T04:00:00Z"
    assert all(BAR_TS.match(t) for t in stamps)


def test_aggregated_timeframes_agree_with_minute_bars(http: httpx.Client) -> None:
    minute = get(http, "/v2/stocks/SPY/bars", timeframe="1Min", **DAY, limit=1000)["bars"]
    for tf, width in (("5Min", 5), ("1Hour", 60)):
        agg = get(http, "/v2/stocks/SPY/bars", timeframe=tf, **DAY)["bars"]
        for bar in agg:
            t0 = datetime.fromisoformat(bar["t"])
            inside = [m for m in minute if t0 <= datetime.fromisoformat(m["t"]) < t0 + timedelta(minutes=width)]
            assert bar["o"] == inside[0]["o"] and bar["c"] == inside[-1]["c"]
            assert bar["h"] == max(m["h"] for m in inside) and bar["l"] == min(m["l"] for m in inside)
            assert bar["v"] == sum(m["v"] for m in inside) and bar["n"] == sum(m["n"] for m in inside)
        assert sum(b["v"] for b in agg) == sum(m["v"] for m in minute)
    week = get(http, "/v2/stocks/SPY/bars", timeframe="1Week", start="2024-03-04", end="2024-03-08")["bars"]
    days = get(http, "/v2/stocks/SPY/bars", timeframe="1Day", start="2024-03-04", end="2024-03-08")["bars"]
    assert [w["t"] for w in week] == ["2024-03-04T05:00:00Z"] and week[0]["v"] == sum(d["v"] for d in days)
    month = get(http, "/v2/stocks/SPY/bars", timeframe="1Month", start="2024-03-01", end="2024-03-31")["bars"]
    assert month[0]["t"] == "2024-03-01T05:00:00Z" and month[0]["h"] >= max(d["h"] for d in days)


def test_trades_aggregate_to_the_minute_bar(http: httpx.Client) -> None:
    window = {"start": "2024-03-05T15:00:00Z", "end": "2024-03-05T15:00:59.999999999Z"}
    trades = get(http, "/v2/stocks/AAPL/trades", **window)["trades"]
    bar = get(http, "/v2/stocks/AAPL/bars", timeframe="1Min", **window)["bars"][0]
    assert set(trades[0]) == TRADE_KEYS and all(NS_TS.match(t["t"]) for t in trades)
    prices = [t["p"] for t in trades]
    assert (prices[0], max(prices), min(prices), prices[-1]) == (bar["o"], bar["h"], bar["l"], bar["c"])
    assert sum(t["s"] for t in trades) == bar["v"] and len(trades) == bar["n"]


def test_quotes_shape_and_spread(http: httpx.Client) -> None:
    rows, _ = pull(
        http,
        "/v2/stocks/quotes",
        "quotes",
        symbols="AAPL,MSFT",
        start="2024-03-05T14:30:00Z",
        end="2024-03-05T15:00:00Z",
        limit=100,
    )
    assert set(rows) == {"AAPL", "MSFT"}
    for quotes in rows.values():
        assert set(quotes[0]) == QUOTE_KEYS
        assert all(q["bp"] < q["ap"] and NS_TS.match(q["t"]) for q in quotes)
        assert [q["t"] for q in quotes] == sorted(q["t"] for q in quotes)


# --- paging ----------------------------------------------------------------------------------------


def test_limit_counts_across_symbols_and_pages_reassemble(http: httpx.Client) -> None:
    params = {"symbols": "SPY,AAPL,MSFT", "timeframe": "1Min", "start": "2024-03-04", "end": "2024-03-06"}
    whole = get(http, "/v2/stocks/bars", **params, limit=10000)
    assert whole["next_page_token"] is None and list(whole["bars"]) == ["AAPL", "MSFT", "SPY"]
    assert all(len(v) == 2 * 390 for v in whole["bars"].values())
    first = get(http, "/v2/stocks/bars", **params, limit=1000)
    assert sum(len(v) for v in first["bars"].values()) == 1000 and list(first["bars"]) == ["AAPL", "MSFT"]
    rows, pages = pull(http, "/v2/stocks/bars", "bars", **params, limit=333)
    assert pages == -(-3 * 780 // 333)
    assert rows == whole["bars"]


def test_sort_desc(http: httpx.Client) -> None:
    asc = get(http, "/v2/stocks/bars", symbols="AAPL,MSFT", timeframe="1Min", **DAY, limit=10000)["bars"]
    rows, pages = pull(
        http, "/v2/stocks/bars", "bars", symbols="AAPL,MSFT", timeframe="1Min", **DAY, limit=300, sort="desc"
    )
    assert pages == 3 and list(rows) == ["AAPL", "MSFT"]
    assert rows["AAPL"] == asc["AAPL"][::-1] and rows["MSFT"] == asc["MSFT"][::-1]
    trades = get(http, "/v2/stocks/AAPL/trades", **DAY, sort="desc", limit=5)["trades"]
    assert [t["t"] for t in trades] == sorted((t["t"] for t in trades), reverse=True)


def test_start_and_end_are_inclusive_and_accept_offsets_and_fractions(http: httpx.Client) -> None:
    def count(start: str, end: str) -> int:
        bars = get(http, "/v2/stocks/AAPL/bars", timeframe="1Min", start=start, end=end)["bars"]
        return len(bars or [])

    assert count("2024-03-05T14:30:00Z", "2024-03-05T14:39:00Z") == 10
    assert count("2024-03-05T09:30:00-05:00", "2024-03-05T09:39:00-05:00") == 10
    assert count("2024-03-05T14:30:00.000000001Z", "2024-03-05T14:39:00Z") == 9
    assert count("2024-03-05T14:30:00.5Z", "2024-03-05T14:38:59.999Z") == 8
    # alpaca-py sends "+00:00"; a client that forgets to encode "+" sends a space
    r = http.get("/v2/stocks/AAPL/bars?timeframe=1Min&start=2024-03-05T14:30:00+00:00&end=2024-03-05T14:31:00+00:00")
    assert r.status_code == 200 and len(r.json()["bars"]) == 2


# --- parameters and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"timeframe": "7Month"}, "invalid timeframe"),
        ({"timeframe": "1Min", "start": "2024-03-06", "end": "2024-03-05"}, "end should not be before start"),
        ({"timeframe": "1Min", "limit": "0"}, "invalid limit"),
        ({"timeframe": "1Min", "limit": "10001"}, "invalid limit"),
        ({"timeframe": "1Min", "limit": "ten"}, "invalid limit"),
        ({"timeframe": "1Min", "page_token": "null"}, "invalid page token"),
        ({"timeframe": "1Min", "page_token": base64.b64encode(b"TSLA|1").decode()}, "invalid page token"),
        ({"timeframe": "1Min", "feed": "nasdaq"}, "invalid feed"),
        ({"timeframe": "1Min", "sort": "up"}, "invalid sort"),
        ({"timeframe": "1Min", "adjustment": "split,magic"}, "invalid adjustment"),
        ({"timeframe": "1Min", "asof": "yesterday"}, "invalid asof"),
        ({"timeframe": "1Min", "currency": "EUR"}, "unsupported currency"),
        ({"timeframe": "1Min", "start": "2024-13-01"}, "invalid start"),
        ({"timeframe": "1Min", "symbols": "AAPL,bad!"}, "invalid symbol"),
        ({"timeframe": "1Min", "symbols": ""}, "missing symbols"),
    ],
)
def test_bad_parameters_are_400_with_a_message(http: httpx.Client, params: dict[str, str], message: str) -> None:
    r = http.get("/v2/stocks/bars", params={"symbols": "AAPL", **DAY, **params})
    assert r.status_code == 400
    body = r.json()
    assert body["message"].startswith(message)
    if message == "invalid timeframe":
        assert body["code"] == 42210000
    assert r.headers["x-ratelimit-limit"] and r.headers["x-marketpipe-sim"] == "1"


def test_accepted_optional_parameters(http: httpx.Client) -> None:
    doc = get(
        http,
        "/v2/stocks/bars",
        symbols="AAPL",
        timeframe="1Min",
        **DAY,
        adjustment="split,dividend",
        asof="2024-03-05",
        currency="USD",
        feed="iex",
        limit=1,
        page_token="",
    )
    assert doc["currency"] == "USD" and len(doc["bars"]["AAPL"]) == 1
    assert get(http, "/v2/stocks/bars", symbols="AAPL", timeframe="1Min", **DAY, asof="-", feed="otc")["bars"] == {}


def test_authentication(sim_server: SimServer, anon: httpx.Client) -> None:
    path, params = "/v2/stocks/AAPL/bars", {"timeframe": "1Day", "start": "2024-03-04", "end": "2024-03-05"}
    r = anon.get(path, params=params)
    assert (r.status_code, r.json()) == (401, {"message": "unauthorized."})
    r = anon.get(path, params=params, headers={"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "WRONG"})
    assert (r.status_code, r.json()) == (403, {"message": "forbidden."})
    assert "WRONG" not in r.text
    assert anon.get(path, params=params, headers={"APCA-API-KEY-ID": "SIMKEY"}).status_code == 401
    assert anon.get(path, params=params, headers={"Authorization": "Bearer SIMKEY"}).status_code == 200
    assert anon.get(path, params=params, headers={"Authorization": "Bearer nobody"}).status_code == 403
    basic = base64.b64encode(b"SIMKEY:SIMSECRET").decode()
    assert anon.get(path, params=params, headers={"Authorization": f"Basic {basic}"}).status_code == 200
    wrong = base64.b64encode(b"SIMKEY:nope").decode()
    assert anon.get(path, params=params, headers={"Authorization": f"Basic {wrong}"}).status_code == 403
    assert anon.get(path, params=params, headers={"Authorization": "Token abc"}).status_code == 401


def test_unknown_routes_are_json_404(http: httpx.Client, anon: httpx.Client) -> None:
    r = http.get("/v2/stocks/AAPL/candles")
    assert (r.status_code, r.json()) == (404, {"message": "not found"})
    assert r.headers["x-ratelimit-remaining"] and r.headers["x-marketpipe-sim"] == "1"
    r = anon.get("/v3/whatever")
    assert (r.status_code, r.json()) == (404, {"message": "not found"})
    assert http.post("/v2/stocks/bars").status_code == 405


def test_rate_limit_headers_and_429(sim_server: SimServer) -> None:
    with httpx.Client(base_url=sim_server.url, headers=RL, timeout=10) as c:
        r = c.get("/v2/stocks/meta/exchanges")
        assert r.headers["x-ratelimit-limit"] == "10000"
        assert int(r.headers["x-ratelimit-reset"]) % 60 == 0
        assert int(r.headers["x-ratelimit-reset"]) > datetime.now(UTC).timestamp()
        before = int(c.get("/v2/stocks/meta/exchanges").headers["x-ratelimit-remaining"])
        after = int(c.get("/v2/stocks/meta/exchanges").headers["x-ratelimit-remaining"])
        assert after == before - 1 or after > before  # a new minute may have begun in between

        sim_server.faults.rate_limit_per_min = 3  # overrides the plan's limit
        statuses = [c.get("/v2/stocks/meta/exchanges") for _ in range(10)]
        limited = [r for r in statuses if r.status_code == 429]
        assert limited and limited[0].json() == {"message": "too many requests."}
        assert limited[0].headers["x-ratelimit-remaining"] == "0" and limited[0].headers["x-ratelimit-limit"] == "3"
        assert int(limited[0].headers["x-ratelimit-reset"]) > datetime.now(UTC).timestamp() - 1


def test_free_plan_recent_sip(sim_server: SimServer) -> None:
    now = datetime.now(UTC)
    recent = (now - timedelta(minutes=5)).isoformat()
    old = (now - timedelta(hours=1)).isoformat()
    start = (now - timedelta(days=3)).isoformat()
    with httpx.Client(base_url=sim_server.url, headers=FREE, timeout=10) as c:
        r = c.get("/v2/stocks/bars", params={"symbols": "AAPL", "timeframe": "1Min", "start": start, "end": recent})
        assert (r.status_code, r.json()) == (403, {"message": "subscription does not permit querying recent SIP data"})
        assert r.headers["x-ratelimit-limit"] == "200"
        for params in ({"end": old}, {}, {"end": recent, "feed": "iex"}):
            ok = c.get("/v2/stocks/bars", params={"symbols": "AAPL", "timeframe": "1Min", "start": start, **params})
            assert ok.status_code == 200, ok.text
        assert c.get("/v2/stocks/trades/latest", params={"symbols": "AAPL"}).status_code == 200  # default iex
        assert c.get("/v2/stocks/trades/latest", params={"symbols": "AAPL", "feed": "sip"}).status_code == 403
        delayed = c.get("/v2/stocks/trades/latest", params={"symbols": "AAPL", "feed": "delayed_sip"})
        t = datetime.fromisoformat(delayed.json()["trades"]["AAPL"]["t"][:26] + "+00:00")
        assert t <= now - timedelta(minutes=15)


# --- latest, snapshots, meta -----------------------------------------------------------------------


def test_latest_endpoints(http: httpx.Client) -> None:
    trades = get(http, "/v2/stocks/trades/latest", symbols="AAPL,MSFT")["trades"]
    assert set(trades) == {"AAPL", "MSFT"} and set(trades["AAPL"]) == TRADE_KEYS
    quote = get(http, "/v2/stocks/AAPL/quotes/latest")
    assert set(quote) == {"symbol", "quote"} and set(quote["quote"]) == QUOTE_KEYS
    assert quote["quote"]["bp"] < quote["quote"]["ap"]
    bars = get(http, "/v2/stocks/bars/latest", symbols="AAPL")["bars"]
    assert list(bars["AAPL"]) == BAR_KEYS and BAR_TS.match(bars["AAPL"]["t"])
    single = get(http, "/v2/stocks/AAPL/bars/latest")
    assert single == {"symbol": "AAPL", "bar": bars["AAPL"]}
    assert datetime.fromisoformat(single["bar"]["t"]) < datetime.now(UTC) - timedelta(minutes=1) + timedelta(seconds=1)
    assert get(http, "/v2/stocks/AAPL/trades/latest", currency="USD")["currency"] == "USD"
    iex = get(http, "/v2/stocks/trades/latest", symbols="AAPL", feed="iex")["trades"]["AAPL"]
    assert iex["x"] == "V"
    assert get(http, "/v2/stocks/trades/latest", symbols="AAPL", feed="overnight") == {"trades": {}}


def test_snapshots(http: httpx.Client) -> None:
    multi = get(http, "/v2/stocks/snapshots", symbols="AAPL,MSFT,ZZZZ")
    assert set(multi) == {"AAPL", "MSFT"}  # no "snapshots" wrapper
    snap = multi["AAPL"]
    assert set(snap) == {"latestTrade", "latestQuote", "minuteBar", "dailyBar", "prevDailyBar"}
    assert snap["prevDailyBar"]["t"] < snap["dailyBar"]["t"]
    assert snap["dailyBar"]["t"].endswith(("T04:00:00Z", "T05:00:00Z"))
    assert snap["minuteBar"]["c"] == snap["latestTrade"]["p"] or snap["latestTrade"]["t"] > snap["minuteBar"]["t"]
    single = get(http, "/v2/stocks/AAPL/snapshot")
    assert single["symbol"] == "AAPL" and set(single) - {"symbol"} == set(snap)


def test_meta_endpoints(http: httpx.Client) -> None:
    exchanges = get(http, "/v2/stocks/meta/exchanges")
    assert exchanges["V"] == "IEX" and exchanges["Q"] == "NASDAQ OMX"
    assert get(http, "/v2/stocks/meta/conditions/trade", tape="C")["@"] == "Regular Sale"
    assert http.get("/v2/stocks/meta/conditions/trade").status_code == 400


def test_stats_count_data_requests_only(sim_server: SimServer, http: httpx.Client) -> None:
    before = sim_server.stats()
    http.get("/v2/stocks/AAPL/bars", params={"timeframe": "1Min", **DAY, "limit": 1})
    http.get("/v2/stocks/AAPL/bars", params={"timeframe": "nope"})
    http.get("/_sim/stats")
    after = httpx.get(sim_server.url + "/_sim/stats").json()
    assert after["requests"] - before["requests"] == 2
    by_status = after["by_path"]["/v2/stocks/AAPL/bars"]
    old = before["by_path"].get("/v2/stocks/AAPL/bars", {})
    assert by_status["200"] - old.get("200", 0) == 1 and by_status["400"] - old.get("400", 0) == 1
