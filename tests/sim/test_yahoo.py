"""The Yahoo chart face over real HTTP: shapes, meta, buckets, windows, limits, errors, faults and
the deliberate disagreement options — checked against the Alpaca face over the same SimMarket."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import httpx
import orjson
import pytest

from marketpipe.sim.admin import Stats
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultKind, FaultRule, Faults
from marketpipe.sim.server import SimServer
from marketpipe.sim.yahoo import VALID_INTERVALS, YahooFace, make_face
from tests.sim.conftest import AUTH

# The face's clock is pinned: lookback limits and "now" are then the same on every run.
NOW = datetime(2024, 3, 15, 20, 30, tzinfo=UTC)  # a Friday, after the close (EDT)
CHART = "/v8/finance/chart/"


def ts(y: int, mo: int, d: int, h: int, mi: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp())


WINTER_DAY = (ts(2024, 1, 9, 5), ts(2024, 1, 10, 5))  # Tuesday 2024-01-09, NY midnight to midnight
MARCH_DAY = (ts(2024, 3, 5, 5), ts(2024, 3, 6, 5))  # within 30 days of NOW


@pytest.fixture(scope="module")
def ysim(market: SimMarket) -> Iterator[SimServer]:
    with SimServer(market, vendor="yahoo") as server:
        server.face.clock = NOW.timestamp
        yield server


@pytest.fixture(autouse=True)
def _reset_face(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "ysim" in request.fixturenames:
        server: SimServer = request.getfixturevalue("ysim")
        server.faults.clear()
        face: YahooFace = server.face
        face.price_shift_pct, face.volume_ratio = 0.0, 1.0
        face.missing_days, face.null_rows, face.partial_rows = set(), set(), set()


@pytest.fixture
def yc(ysim: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ysim.url, timeout=10) as client:
        yield client


def chart(client: httpx.Client, symbol: str = "AAPL", status: int = 200, /, **params: str | int) -> dict[str, Any]:
    r = client.get(CHART + symbol, params=params)
    assert r.status_code == status, r.text
    assert r.headers["x-marketpipe-sim"] == "1"
    doc: dict[str, Any] = orjson.loads(r.content)
    return doc


def result(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["chart"]["error"] is None
    res: dict[str, Any] = doc["chart"]["result"][0]
    return res


def quote(res: dict[str, Any]) -> dict[str, list[Any]]:
    q: dict[str, list[Any]] = res["indicators"]["quote"][0]
    return q


def alpaca_bars(sim_server: SimServer, tf: str, start: str, end: str) -> list[dict[str, Any]]:
    r = httpx.get(
        sim_server.url + "/v2/stocks/AAPL/bars",
        params={"timeframe": tf, "start": start, "end": end, "limit": 10000},
        headers=AUTH,
    )
    assert r.status_code == 200
    rows: list[dict[str, Any]] = r.json()["bars"]
    return rows


# --- shapes ----------------------------------------------------------------------------------------


def test_daily_shape_meta_and_open_stamps(yc: httpx.Client) -> None:
    res = result(chart(yc, interval="1d", period1=ts(2024, 1, 8, 5), period2=ts(2024, 1, 13, 5), events="div,splits"))
    assert set(res) == {"meta", "timestamp", "indicators"}  # no actions in the window: no "events"
    meta = res["meta"]
    for key in ("currency", "symbol", "exchangeTimezoneName", "dataGranularity", "validRanges", "currentTradingPeriod"):
        assert key in meta
    assert meta["currency"] == "USD" and meta["exchangeTimezoneName"] == "America/New_York"
    assert meta["dataGranularity"] == "1d" and meta["range"] == "" and "max" in meta["validRanges"]
    assert set(meta["currentTradingPeriod"]) == {"pre", "regular", "post"}
    regular = meta["currentTradingPeriod"]["regular"]
    assert regular["start"] == ts(2024, 3, 15, 13, 30) and regular["gmtoffset"] == -14400
    # daily bars are stamped at the 09:30 New York open (14:30Z in winter)
    assert res["timestamp"] == [ts(2024, 1, d, 14, 30) for d in (8, 9, 10, 11, 12)]
    q = quote(res)
    assert set(q) == {"open", "high", "low", "close", "volume"}
    assert all(len(col) == 5 for col in q.values())
    # AAPL pays dividends after these days: adjclose is below close by the same factor on each (no ex-date
    # between them), and the factor is the product of (C_prev - D) / C_prev (tests/sim/test_actions.py)
    ratio = [a / c for a, c in zip(res["indicators"]["adjclose"][0]["adjclose"], q["close"], strict=True)]
    assert all(0.9 < r < 1 for r in ratio) and max(ratio) - min(ratio) < 1e-6
    assert all(isinstance(v, int) for v in q["volume"])


def test_same_series_as_the_alpaca_face(yc: httpx.Client, sim_server: SimServer) -> None:
    q = quote(result(chart(yc, interval="1m", period1=MARCH_DAY[0], period2=MARCH_DAY[1])))
    rows = alpaca_bars(sim_server, "1Min", "2024-03-05T00:00:00Z", "2024-03-05T23:59:59Z")
    assert len(q["close"]) == len(rows) == 390
    for key, letter in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c")):
        assert [round(x, 2) for x in q[key]] == [r[letter] for r in rows]
    assert q["volume"] == [r["v"] for r in rows]
    # float32 widened to double, like Yahoo's own prices
    assert any(round(x, 2) != x for x in q["close"])

    daily = quote(result(chart(yc, interval="1d", period1=ts(2024, 1, 1, 5), period2=ts(2024, 2, 1, 5))))
    drows = alpaca_bars(sim_server, "1Day", "2024-01-01", "2024-01-31")
    assert [round(x, 2) for x in daily["close"]] == [r["c"] for r in drows]
    assert daily["volume"] == [r["v"] for r in drows]


def test_hourly_buckets_start_at_the_open(yc: httpx.Client) -> None:
    minutes = quote(result(chart(yc, interval="1m", period1=MARCH_DAY[0], period2=MARCH_DAY[1])))
    res = result(chart(yc, interval="60m", period1=MARCH_DAY[0], period2=MARCH_DAY[1]))
    assert res["timestamp"] == [ts(2024, 3, 5, 14, 30) + 3600 * k for k in range(7)]  # 09:30 ... 15:30
    hourly = quote(res)
    assert hourly["open"][0] == minutes["open"][0] and hourly["close"][-1] == minutes["close"][-1]
    assert hourly["volume"][0] == sum(minutes["volume"][:60]) and hourly["volume"][-1] == sum(minutes["volume"][360:])
    assert sum(hourly["volume"]) == sum(minutes["volume"])
    assert quote(result(chart(yc, interval="1h", period1=MARCH_DAY[0], period2=MARCH_DAY[1]))) == hourly
    ninety = result(chart(yc, interval="90m", period1=MARCH_DAY[0], period2=MARCH_DAY[1]))
    assert ninety["timestamp"] == [ts(2024, 3, 5, 14, 30) + 5400 * k for k in range(5)]
    five = result(chart(yc, interval="5m", period1=MARCH_DAY[0], period2=MARCH_DAY[1]))
    assert len(five["timestamp"]) == 78 and five["meta"]["dataGranularity"] == "5m"


def test_weekly_and_monthly_bars(yc: httpx.Client, sim_server: SimServer) -> None:
    res = result(chart(yc, interval="1wk", period1=ts(2024, 1, 8, 5), period2=ts(2024, 1, 22, 5)))
    # the week of 2024-01-15 (Martin Luther King Day) starts trading on Tuesday
    assert res["timestamp"] == [ts(2024, 1, 8, 14, 30), ts(2024, 1, 16, 14, 30)]
    weeks = alpaca_bars(sim_server, "1Week", "2024-01-08", "2024-01-15")
    assert [round(x, 2) for x in quote(res)["high"]] == [w["h"] for w in weeks]
    assert quote(res)["volume"] == [w["v"] for w in weeks]
    months = result(chart(yc, interval="1mo", period1=ts(2024, 1, 1, 5), period2=ts(2024, 3, 1, 5)))
    assert months["timestamp"] == [ts(2024, 1, 2, 14, 30), ts(2024, 2, 1, 14, 30)]
    # adjclose is the month's last close adjusted with that session's factor: January's for the dividend
    # ex 2024-02-09, February's for none (the face's clock stands in March 2024)
    daily = alpaca_bars(sim_server, "1Day", "2024-01-02", "2024-02-29")
    last = {d["t"][:7]: d["c"] for d in daily}
    assert [round(c, 2) for c in quote(months)["close"]] == [last["2024-01"], last["2024-02"]]
    adj = months["indicators"]["adjclose"][0]["adjclose"]
    assert 0.99 < adj[0] / quote(months)["close"][0] < 1 and adj[1] == quote(months)["close"][1]
    quarters = result(chart(yc, interval="3mo", period1=ts(2023, 1, 1, 5), period2=ts(2024, 1, 1, 5)))
    assert len(quarters["timestamp"]) == 4


def test_window_without_bars(yc: httpx.Client) -> None:
    res = result(chart(yc, interval="1m", period1=ts(2024, 3, 9, 5), period2=ts(2024, 3, 10, 5)))  # Saturday
    assert "timestamp" not in res and res["indicators"]["quote"] == [{}]
    daily = result(chart(yc, interval="1d", period1=ts(2024, 3, 9, 5), period2=ts(2024, 3, 11, 4)))
    assert "timestamp" not in daily and daily["indicators"] == {"quote": [{}], "adjclose": [{}]}


def test_ranges_and_defaults(yc: httpx.Client) -> None:
    res = result(chart(yc, interval="1d", range="5d"))
    assert res["meta"]["range"] == "5d" and len(res["timestamp"]) == 5
    assert res["timestamp"][-1] == ts(2024, 3, 15, 13, 30)
    default = result(chart(yc))  # interval 1d, range 1d: the current session
    assert default["timestamp"] == [ts(2024, 3, 15, 13, 30)] and default["meta"]["dataGranularity"] == "1d"
    # period1/period2 win over range
    both = result(chart(yc, interval="1d", range="1y", period1=WINTER_DAY[0], period2=WINTER_DAY[1]))
    assert both["timestamp"] == [ts(2024, 1, 9, 14, 30)] and both["meta"]["range"] == ""
    assert len(result(chart(yc, interval="1mo", range="ytd"))["timestamp"]) == 3
    assert len(result(chart(yc, interval="1m", range="1d", includePrePost="true"))["timestamp"]) == 390


def test_share_class_symbols(yc: httpx.Client) -> None:
    res = result(chart(yc, "BRK-B", interval="1d", period1=WINTER_DAY[0], period2=WINTER_DAY[1]))
    assert res["meta"]["symbol"] == "BRK-B" and len(res["timestamp"]) == 1


# --- errors ----------------------------------------------------------------------------------------


def error(doc: dict[str, Any], key: str = "chart") -> dict[str, str]:
    assert doc[key]["result"] is None
    err: dict[str, str] = doc[key]["error"]
    return err


def test_unknown_symbol_is_404(yc: httpx.Client) -> None:
    for sym in ("ZZZZ", "^GSPC"):
        err = error(chart(yc, sym, 404, interval="1d"))
        assert err == {"code": "Not Found", "description": "No data found, symbol may be delisted"}
    assert error(chart(yc, "AAPL/extra", 404), key="finance")["code"] == "Not Found"


def test_bad_interval_and_parameters_are_400(yc: httpx.Client) -> None:
    for bad in ("7m", "5d", "4h"):
        err = error(chart(yc, "AAPL", 400, interval=bad))
        assert err["code"] == "Bad Request"
        assert (
            err["description"] == f"Invalid input - interval={bad} is not supported. Valid intervals: {VALID_INTERVALS}"
        )
    assert "range=7x" in error(chart(yc, "AAPL", 400, range="7x"))["description"]
    assert "period1" in error(chart(yc, "AAPL", 400, period1="yesterday"))["description"]
    assert error(chart(yc, "AAPL", 400, period1=WINTER_DAY[1], period2=WINTER_DAY[0]))["code"] == "Bad Request"


def test_intraday_meta_has_trading_periods_in_yahoo_shape(yc: httpx.Client) -> None:
    """Issue 13: yfinance's intraday history reads ``meta.tradingPeriods`` (KeyError without it): one array
    per session day, each with that day's ``{timezone, start, end, gmtoffset}``; ``{pre, regular, post}``
    with includePrePost. yfinance cannot be pointed at a local URL (its chart URL and crumb hosts are fixed),
    so the shape is checked exactly here."""
    week = (ts(2024, 3, 4, 5), ts(2024, 3, 9, 5))  # Monday 2024-03-04 .. Friday 03-08, NY midnights (EST)
    meta = result(chart(yc, interval="1m", period1=week[0], period2=week[1]))["meta"]
    days = [(4 + k, ts(2024, 3, 4 + k, 14, 30), ts(2024, 3, 4 + k, 21)) for k in range(5)]
    regular = [[{"timezone": "EST", "start": o, "end": c, "gmtoffset": -18000}] for _, o, c in days]
    assert meta["tradingPeriods"] == regular
    both = result(chart(yc, interval="5m", period1=week[0], period2=week[1], includePrePost="true"))["meta"]
    assert both["tradingPeriods"] == {
        "pre": [[{"timezone": "EST", "start": o - 19800, "end": o, "gmtoffset": -18000}] for _, o, _ in days],
        "regular": regular,
        "post": [[{"timezone": "EST", "start": c, "end": c + 14400, "gmtoffset": -18000}] for _, _, c in days],
    }
    after_dst = result(chart(yc, interval="1m", period1=MARCH_DAY[0] + 7 * 86400, period2=MARCH_DAY[1] + 7 * 86400))
    assert after_dst["meta"]["tradingPeriods"] == [
        [{"timezone": "EDT", "start": ts(2024, 3, 12, 13, 30), "end": ts(2024, 3, 12, 20), "gmtoffset": -14400}]
    ]
    weekend = result(chart(yc, interval="1m", period1=ts(2024, 3, 9, 5), period2=ts(2024, 3, 11, 4)))
    assert weekend["meta"]["tradingPeriods"] == []
    assert "tradingPeriods" not in result(chart(yc, interval="1d", period1=week[0], period2=week[1]))["meta"]


def test_intraday_lookback_limits_are_422(yc: httpx.Client) -> None:
    now = int(NOW.timestamp())
    p1, p2 = now - 8 * 86400, now
    err = error(chart(yc, "AAPL", 422, interval="1m", period1=p1, period2=p2))
    assert err["code"] == "Unprocessable Entity"
    assert err["description"] == (
        f"1m data not available for startTime={p1} and endTime={p2}. "
        "Only 7 days worth of 1m granularity data are allowed to be fetched per request."
    )
    chart(yc, interval="1m", period1=now - 7 * 86400, period2=now)  # exactly 7 days is fine
    old = (now - 31 * 86400, now - 30 * 86400)
    err = error(chart(yc, "AAPL", 422, interval="1m", period1=old[0], period2=old[1]))
    assert err["description"].endswith("The requested range must be within the last 30 days.")
    assert "1m data not available for startTime=" in err["description"]
    chart(yc, interval="5m", period1=now - 59 * 86400, period2=now)
    err = error(chart(yc, "AAPL", 422, interval="90m", period1=now - 61 * 86400, period2=now))
    assert err["description"].endswith("within the last 60 days.")
    chart(yc, interval="1h", period1=now - 700 * 86400, period2=now - 690 * 86400)
    err = error(chart(yc, "AAPL", 422, interval="60m", period1=now - 731 * 86400, period2=now - 700 * 86400))
    assert err["description"].endswith("within the last 730 days.")
    assert error(chart(yc, "AAPL", 422, interval="1m", range="1mo"))["code"] == "Unprocessable Entity"
    chart(yc, interval="1d", period1=ts(2001, 1, 2, 5), period2=ts(2001, 1, 10, 5))  # daily: full history


# --- faults ----------------------------------------------------------------------------------------


def test_faults_use_yahoo_shapes(ysim: SimServer, yc: httpx.Client) -> None:
    params: dict[str, str | int] = {"interval": "1d", "period1": WINTER_DAY[0], "period2": WINTER_DAY[1]}
    cases: list[tuple[FaultKind, int, bytes]] = [
        ("rate_limit", 429, b"Too Many Requests"),
        ("http_500", 500, b'"code":"Internal Server Error"'),
        ("http_502", 502, b"502 Bad Gateway"),
        ("http_503", 503, b"503 Service"),
        ("html_200", 200, b"Will be right back"),
    ]
    for kind, status, needle in cases:
        ysim.faults.set([FaultRule(kind=kind, times=1)])
        r = yc.get(CHART + "AAPL", params=params)
        assert r.status_code == status and needle in r.content, kind
        assert r.headers["x-marketpipe-sim"] == "1"
        assert yc.get(CHART + "AAPL", params=params).status_code == 200  # times=1: the next one is fine
    assert yc.get(CHART + "AAPL", params=params).headers["content-type"].startswith("application/json")

    ysim.faults.set([FaultRule(kind="truncated_json", times=1)])
    r = yc.get(CHART + "AAPL", params=params)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(r.content)

    ysim.faults.set([FaultRule(kind="reset", times=1)])
    with pytest.raises(httpx.TransportError):
        yc.get(CHART + "AAPL", params=params)

    ysim.faults.set([], rate_limit_per_min=1)
    codes = [yc.get(CHART + "AAPL", params=params).status_code for _ in range(3)]
    assert codes[-1] == 429


def test_envelope_faults_use_the_chart_key(ysim: SimServer, yc: httpx.Client) -> None:
    params: dict[str, str | int] = {"interval": "1d", "period1": WINTER_DAY[0], "period2": WINTER_DAY[1]}
    ysim.faults.set([FaultRule(kind="empty_json", times=1), FaultRule(kind="null_page", times=1)])
    r = yc.get(CHART + "AAPL", params=params)
    assert (r.status_code, r.content) == (200, b"{}") and r.headers["x-marketpipe-sim"] == "1"
    assert yc.get(CHART + "AAPL", params=params).json() == {"chart": None}
    assert yc.get(CHART + "AAPL", params=params).json()["chart"]["result"]
    ysim.faults.set([FaultRule(kind="token_loop")])  # the chart does not paginate: never matched
    assert yc.get(CHART + "AAPL", params=params).json()["chart"]["result"]
    assert ysim.faults.to_dict()["counters"] == [{"seen": 0, "applied": 0}]


def test_paths_regex_sees_the_alpaca_form(ysim: SimServer, yc: httpx.Client) -> None:
    ysim.faults.set([FaultRule(kind="http_503", paths="/chart/MSFT$")])
    assert yc.get(CHART + "MSFT").status_code == 503
    assert yc.get(CHART + "AAPL").status_code == 200


def test_invalid_rows_corrupts_chart_rows(ysim: SimServer, yc: httpx.Client) -> None:
    params: dict[str, str | int] = {"interval": "1m", "period1": MARCH_DAY[0], "period2": MARCH_DAY[1]}
    clean = quote(result(chart(yc, **params)))
    ysim.faults.set([FaultRule(kind="invalid_rows", row_ratio=1.0, row_kinds=["negative_volume"])])
    bad = quote(result(chart(yc, **params)))
    assert bad["volume"] == [-v for v in clean["volume"]]
    ysim.faults.set([FaultRule(kind="invalid_rows", row_ratio=0.05, row_kinds=["misaligned_ts"])])
    stamps = result(chart(yc, **params))["timestamp"]
    assert len(stamps) == 390 and any(t % 60 == 17 for t in stamps)


def test_stats_count_chart_requests(ysim: SimServer, yc: httpx.Client) -> None:
    ysim.reset_stats()
    chart(yc, interval="1d")
    chart(yc, "ZZZZ", 404)
    stats = ysim.stats()
    assert stats["by_path"][CHART + "AAPL"] == {"200": 1}
    assert stats["by_path"][CHART + "ZZZZ"] == {"404": 1}


# --- deliberate disagreement ---------------------------------------------------------------------


def test_null_and_partial_rows(ysim: SimServer, yc: httpx.Client) -> None:
    params: dict[str, str | int] = {"interval": "1m", "period1": MARCH_DAY[0], "period2": MARCH_DAY[1]}
    halted, half, pre = ts(2024, 3, 5, 15, 0), ts(2024, 3, 5, 15, 5), ts(2024, 3, 5, 14, 29)
    ysim.face.null_rows = {halted, pre}
    ysim.face.partial_rows = {half}
    res = result(chart(yc, **params))
    q = quote(res)
    assert len(res["timestamp"]) == 391 and res["timestamp"][0] == pre  # padded where no bar existed
    i = res["timestamp"].index(halted)
    assert [q[k][i] for k in ("open", "high", "low", "close", "volume")] == [None] * 5
    assert [q[k][0] for k in ("open", "high", "low", "close", "volume")] == [None] * 5
    j = res["timestamp"].index(half)
    assert q["high"][j] is None and q["low"][j] is None
    assert q["open"][j] is not None and q["close"][j] is not None and q["volume"][j] is not None


def test_price_volume_and_missing_days(ysim: SimServer, yc: httpx.Client) -> None:
    params: dict[str, str | int] = {"interval": "1d", "period1": ts(2024, 1, 8, 5), "period2": ts(2024, 1, 13, 5)}
    base = quote(result(chart(yc, **params)))
    ysim.face.price_shift_pct = 1.0
    ysim.face.volume_ratio = 0.5
    ysim.face.missing_days = {date(2024, 1, 10)}
    res = result(chart(yc, **params))
    shifted = quote(res)
    assert ts(2024, 1, 10, 14, 30) not in res["timestamp"] and len(res["timestamp"]) == 4
    kept = [0, 1, 3, 4]
    assert [round(shifted["close"][k], 2) for k in range(4)] == [round(base["close"][i] * 1.01, 2) for i in kept]
    assert shifted["volume"] == [round(base["volume"][i] * 0.5) for i in kept]
    minutes = result(chart(yc, interval="1m", period1=ts(2024, 3, 4, 5), period2=ts(2024, 3, 7, 5)))
    assert len(minutes["timestamp"]) == 3 * 390  # missing_days only hides 2024-01-10
    ysim.face.missing_days = {date(2024, 3, 5)}
    minutes = result(chart(yc, interval="1m", period1=ts(2024, 3, 4, 5), period2=ts(2024, 3, 7, 5)))
    assert len(minutes["timestamp"]) == 2 * 390


def test_make_face_keywords(market: SimMarket) -> None:
    face = make_face(
        market,
        Faults(),
        {},
        Stats(),
        clock=NOW.timestamp,
        price_shift_pct=2.0,
        volume_ratio=3.0,
        missing_days=[date(2024, 1, 2)],
        null_rows=[1],
        partial_rows=[2],
    )
    assert isinstance(face, YahooFace)
    assert (face.price_shift_pct, face.volume_ratio) == (2.0, 3.0)
    assert face.missing_days == {date(2024, 1, 2)} and face.null_rows == {1} and face.partial_rows == {2}
    assert face.now_ns() == int(NOW.timestamp()) * 10**9
    assert face.build_app().router is not None
