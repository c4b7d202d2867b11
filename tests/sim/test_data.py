"""The synthetic market through its pure-Python API: calendar, aggregation, consistency, determinism."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pytest

from marketpipe.core.errors import InvalidArgument, InvalidSymbol, InvalidTimeframe
from marketpipe.core.timeframe import Timeframe
from marketpipe.sim.data import IEX_SHARE, Page, SimMarket, ns_strings, to_ns

NS_MIN = 60_000_000_000


def day_range(day: str) -> tuple[str, str]:
    return f"{day}T00:00:00Z", f"{day}T23:59:59Z"


def utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def test_regular_session_has_one_bar_per_minute(market: SimMarket) -> None:
    bars = market.bars_frame("AAPL", "1Min", *day_range("2024-03-05"))
    assert len(bars["t"]) == 390
    assert utc(bars["t"][0]) == datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    assert utc(bars["t"][-1]) == datetime(2024, 3, 5, 20, 59, tzinfo=UTC)
    assert (np.diff(bars["t"]) == NS_MIN).all()


def test_early_close_and_closures(market: SimMarket) -> None:
    early = market.bars_frame("AAPL", "1Min", *day_range("2024-11-29"))
    assert len(early["t"]) == 210
    assert utc(early["t"][-1]) == datetime(2024, 11, 29, 17, 59, tzinfo=UTC)  # 13:00 ET close
    assert len(market.bars_frame("AAPL", "1Min", *day_range("2024-03-29"))["t"]) == 0  # Good Friday
    assert len(market.bars_frame("AAPL", "1Min", *day_range("2025-01-09"))["t"]) == 0  # national day of mourning
    assert len(market.bars_frame("AAPL", "1Day", "2025-01-06", "2025-01-10T23:00:00Z")["t"]) == 4


def test_ohlc_invariants_and_rounding(market: SimMarket) -> None:
    b = market.bars_frame("MSFT", "1Min", "2024-03-04", "2024-03-09")
    assert len(b["t"]) == 5 * 390
    assert (b["h"] >= np.maximum(b["o"], b["c"])).all() and (b["l"] <= np.minimum(b["o"], b["c"])).all()
    assert (b["l"] > 0).all() and (b["v"] > 0).all() and (b["n"] >= 3).all()
    assert np.allclose(np.round(b["o"], 2), b["o"], atol=0, rtol=0)
    assert ((b["vw"] >= b["l"] - 1e-9) & (b["vw"] <= b["h"] + 1e-9)).all()
    assert 20 <= b["o"][0] <= 1500


def test_trades_aggregate_exactly_to_minute_bars(market: SimMarket) -> None:
    s, e = "2024-03-05T14:30:00Z", "2024-03-05T15:29:59.999999999Z"
    bars = market.bars_frame("AAPL", "1Min", s, e)
    tr = market.trades_frame("AAPL", s, e)
    minute = (tr["t"] - bars["t"][0]) // NS_MIN
    assert len(np.unique(tr["t"])) == len(tr["t"]) and (np.diff(tr["t"]) > 0).all()
    assert len(np.unique(minute)) == len(bars["t"]) == 60
    for k in range(60):
        sel = minute == k
        p, sz = tr["p"][sel], tr["s"][sel]
        assert (p[0], p.max(), p.min(), p[-1]) == (bars["o"][k], bars["h"][k], bars["l"][k], bars["c"][k])
        assert (sz.sum(), sel.sum()) == (bars["v"][k], bars["n"][k])
        assert round(float((p * sz).sum() / sz.sum()), 4) == pytest.approx(bars["vw"][k], abs=1e-4)
    assert set(tr["x"].tolist()) <= set("ABCDHJKMNPQUVXYZ")


def test_quotes_bracket_the_last_trade(market: SimMarket) -> None:
    s, e = "2024-03-05T14:30:00Z", "2024-03-05T16:00:00Z"
    q = market.quotes_frame("AAPL", s, e)
    tr = market.trades_frame("AAPL", s, e)
    assert len(q["t"]) > 90 * 2 and (q["bp"] < q["ap"]).all() and (q["bs"] > 0).all()
    k = np.searchsorted(tr["t"], q["t"], side="right") - 1
    after = k >= 0
    last = tr["p"][k[after]]
    assert ((q["bp"][after] <= last) & (last < q["ap"][after])).all()


def test_quote_sizes_switch_from_round_lots_to_shares(market: SimMarket) -> None:
    before = market.quotes_frame("AAPL", *day_range("2025-10-31"))
    after = market.quotes_frame("AAPL", *day_range("2025-11-03"))
    assert before["bs"].max() < 100 and (after["bs"] % 100 == 0).all()


@pytest.mark.parametrize("tf", ["5Min", "15T", "7Min", "1Hour", "2H"])
def test_intraday_aggregation_from_minute_bars(market: SimMarket, tf: str) -> None:
    s, e = "2024-07-01", "2024-07-03T23:00:00Z"  # summer: NY = UTC-4
    m = market.bars_frame("SPY", "1Min", s, e)
    agg = market.bars_frame("SPY", tf, s, e)
    width = Timeframe.parse(tf).seconds * 1_000_000_000
    midnight = to_ns("2024-07-01T04:00:00Z")
    # buckets aligned to the New York clock: floor of the time of day since NY midnight
    day = (m["t"] - midnight) // (86_400 * 10**9)
    keys = midnight + day * 86_400 * 10**9 + ((m["t"] - midnight) % (86_400 * 10**9)) // width * width
    stamps = np.unique(keys)
    assert (agg["t"] == stamps).all()
    for k, stamp in enumerate(stamps):
        sel = keys == stamp
        assert agg["o"][k] == m["o"][sel][0] and agg["c"][k] == m["c"][sel][-1]
        assert agg["h"][k] == m["h"][sel].max() and agg["l"][k] == m["l"][sel].min()
        assert agg["v"][k] == m["v"][sel].sum() and agg["n"][k] == m["n"][sel].sum()
    if tf == "1Hour":
        assert utc(agg["t"][0]) == datetime(2024, 7, 1, 13, 0, tzinfo=UTC)  # 09:00 ET holds 09:30-09:59


def test_daily_bars_stamped_at_new_york_midnight(market: SimMarket) -> None:
    winter = market.bars_frame("AAPL", "1Day", "2024-01-05", "2024-01-05T12:00:00Z")
    summer = market.bars_frame("AAPL", "1Day", "2024-07-05", "2024-07-05T12:00:00Z")
    assert ns_strings(winter["t"]) == ["2024-01-05T05:00:00Z"]
    assert ns_strings(summer["t"]) == ["2024-07-05T04:00:00Z"]
    m = market.bars_frame("AAPL", "1Min", *day_range("2024-07-05"))
    assert (summer["o"][0], summer["h"][0], summer["l"][0], summer["c"][0]) == (
        m["o"][0],
        m["h"].max(),
        m["l"].min(),
        m["c"][-1],
    )
    assert summer["v"][0] == m["v"].sum() and summer["n"][0] == m["n"].sum()


def test_weekly_bar_stamped_on_monday_even_when_a_holiday(market: SimMarket) -> None:
    week = market.bars_frame("AAPL", "1Week", "2024-01-15", "2024-01-19T23:00:00Z")  # MLK day Monday
    daily = market.bars_frame("AAPL", "1Day", "2024-01-15", "2024-01-19T23:00:00Z")
    assert ns_strings(week["t"]) == ["2024-01-15T05:00:00Z"]
    assert len(daily["t"]) == 4
    assert week["o"][0] == daily["o"][0] and week["c"][0] == daily["c"][-1]
    assert week["h"][0] == daily["h"].max() and week["l"][0] == daily["l"].min()
    assert week["v"][0] == daily["v"].sum()
    # a start inside a week leaves that week out rather than returning a partial one
    assert len(market.bars_frame("AAPL", "1Week", "2024-01-17", "2024-01-19T23:00:00Z")["t"]) == 0


def test_monthly_bars(market: SimMarket) -> None:
    months = market.bars_frame("AAPL", "1Month", "2024-03-01", "2024-04-30")
    assert ns_strings(months["t"]) == ["2024-03-01T05:00:00Z", "2024-04-01T04:00:00Z"]
    daily = market.bars_frame("AAPL", "1Day", "2024-03-01", "2024-03-31T23:00:00Z")
    assert len(daily["t"]) == 20  # March 2024 had 20 sessions (Good Friday closed)
    assert months["v"][0] == daily["v"].sum() and months["h"][0] == daily["h"].max()
    quarters = market.bars_frame("AAPL", "3Month", "2024-01-01", "2024-12-31")
    assert ns_strings(quarters["t"]) == [
        "2024-01-01T05:00:00Z",
        "2024-04-01T04:00:00Z",
        "2024-07-01T04:00:00Z",
        "2024-10-01T04:00:00Z",
    ]
    year = market.bars_frame("AAPL", "12Month", "2024-01-01", "2024-12-31")
    assert year["v"][0] == quarters["v"].sum()


def test_iex_feed_scales_volume_and_keeps_prices(market: SimMarket) -> None:
    sip = market.bars_frame("AAPL", "1Min", *day_range("2024-03-05"))
    iex = market.bars_frame("AAPL", "1Min", *day_range("2024-03-05"), feed="iex")
    for k in ("t", "o", "h", "l", "c", "vw"):
        assert (sip[k] == iex[k]).all()
    assert (iex["v"] >= 1).all() and (iex["v"] == np.maximum(1, np.rint(sip["v"] * IEX_SHARE))).all()
    assert (iex["n"] >= 1).all() and iex["n"].sum() < sip["n"].sum() / 10
    iex_trades = market.trades_frame("AAPL", *day_range("2024-03-05"), feed="iex")
    assert set(iex_trades["x"].tolist()) == {"V"}
    assert len(market.bars_frame("AAPL", "1Min", *day_range("2024-03-05"), feed="otc")["t"]) == 0


def test_deterministic_across_instances_and_seeds() -> None:
    a, b, c = SimMarket(), SimMarket(), SimMarket(seed=1)
    args = ("NVDA", "1Min", "2024-05-01", "2024-05-02")
    fa, fb, fc = a.bars_frame(*args), b.bars_frame(*args), c.bars_frame(*args)
    assert all((fa[k] == fb[k]).all() for k in fa)
    assert not (fa["c"] == fc["c"]).all()
    assert (
        a.trades_frame("NVDA", "2024-05-01", "2024-05-02")["p"]
        == b.trades_frame("NVDA", "2024-05-01", "2024-05-02")["p"]
    ).all()
    assert a.page(
        "bars", ["NVDA", "AMD"], to_ns("2024-05-01"), to_ns("2024-05-03"), timeframe=Timeframe.parse("1Min")
    ) == b.page("bars", ["NVDA", "AMD"], to_ns("2024-05-01"), to_ns("2024-05-03"), timeframe=Timeframe.parse("1Min"))


def test_unknown_and_invalid_symbols(market: SimMarket) -> None:
    assert len(market.bars_frame("ZZZZ", "1Min", *day_range("2024-03-05"))["t"]) == 0
    assert market.latest_trade("ZZZZ") is None and market.snapshot("NOPE") is None
    assert len(market.bars_frame("BRK.B", "1Min", *day_range("2024-03-05"))["t"]) == 390
    with pytest.raises(InvalidSymbol):
        market.bars_frame("aapl", "1Min", *day_range("2024-03-05"))
    with pytest.raises(InvalidTimeframe):
        market.bars_frame("AAPL", "5Month", *day_range("2024-03-05"))
    with pytest.raises(InvalidArgument):
        market.bars_frame("AAPL", "1Min", *day_range("2024-03-05"), feed="nasdaq")


def test_a_running_session_shows_only_the_past(market: SimMarket) -> None:
    now = datetime(2024, 3, 5, 15, 0, 30, tzinfo=UTC)
    bars = market.bars_frame("AAPL", "1Min", *day_range("2024-03-05"), now=now)
    assert len(bars["t"]) == 30 and utc(bars["t"][-1]) == datetime(2024, 3, 5, 14, 59, tzinfo=UTC)  # complete minutes
    trades = market.trades_frame("AAPL", *day_range("2024-03-05"), now=now)
    assert utc(trades["t"][-1]) < now and utc(trades["t"][-1]) >= now - timedelta(seconds=30)
    daily = market.bars_frame("AAPL", "1Day", "2024-03-05", "2024-03-05T12:00:00Z", now=now)
    assert daily["v"][0] == bars["v"].sum() and daily["h"][0] == bars["h"].max()
    hourly = market.bars_frame("AAPL", "1Hour", *day_range("2024-03-05"), now=now)
    assert len(hourly["t"]) == 1 and hourly["v"][0] == bars["v"].sum()  # the 09:00 ET bucket, partial

    snap = market.snapshot("AAPL", now=now)
    assert snap is not None and snap["minuteBar"]["t"] == "2024-03-05T14:59:00Z"
    assert snap["dailyBar"]["t"] == "2024-03-05T05:00:00Z" and snap["dailyBar"]["v"] == int(bars["v"].sum())
    assert snap["prevDailyBar"]["t"] == "2024-03-04T05:00:00Z"
    assert snap["latestTrade"]["p"] == float(trades["p"][-1])


def test_latest_when_the_market_is_closed(market: SimMarket) -> None:
    saturday = datetime(2024, 3, 9, 15, 0, tzinfo=UTC)
    trade = market.latest_trade("AAPL", now=saturday)
    bar = market.latest_bar("AAPL", now=saturday)
    quote = market.latest_quote("AAPL", now=saturday)
    assert trade is not None and trade["t"].startswith("2024-03-08T20:59:")
    assert bar == {**bar, "t": "2024-03-08T20:59:00Z"} and bar["c"] == trade["p"]  # type: ignore[index]
    assert quote is not None and quote["bp"] < quote["ap"]
    snap = market.snapshot("AAPL", now=saturday)
    assert snap is not None and snap["dailyBar"]["t"] == "2024-03-08T05:00:00Z"
    assert snap["prevDailyBar"]["t"] == "2024-03-07T05:00:00Z"
    # before the first minute of a session is over, the snapshot's daily bar is the previous session's
    opening = datetime(2024, 3, 11, 13, 30, 30, tzinfo=UTC)
    early = market.snapshot("AAPL", now=opening)
    assert early is not None and early["dailyBar"]["t"] == "2024-03-08T05:00:00Z"
    assert early["latestTrade"]["t"].startswith("2024-03-11T13:30:")


def _rows(page: Page) -> dict[str, list[dict[str, object]]]:
    return {sym: orjson.loads(b"[" + b",".join(runs) + b"]") for sym, runs in page.parts}


@pytest.mark.parametrize("desc", [False, True])
def test_pages_split_and_resume_exactly(market: SimMarket, desc: bool) -> None:
    tf = Timeframe.parse("1Min")
    s, e = to_ns("2024-03-04"), to_ns("2024-03-07")
    whole = market.page("bars", ["MSFT", "AAPL"], s, e, timeframe=tf, limit=10_000, desc=desc)
    assert whole.next_cursor is None and whole.count == 2 * 3 * 390
    assert [sym for sym, _ in whole.parts] == ["AAPL", "MSFT"]  # symbols ascending whatever the sort
    expected = _rows(whole)
    assert (expected["AAPL"][0]["t"] > expected["AAPL"][-1]["t"]) is desc
    got: dict[str, list[dict[str, object]]] = {}
    cursor = None
    counts = []
    while True:
        p = market.page("bars", ["MSFT", "AAPL"], s, e, timeframe=tf, limit=500, desc=desc, cursor=cursor)
        counts.append(p.count)
        for sym, rows in _rows(p).items():
            got.setdefault(sym, []).extend(rows)
        cursor = p.next_cursor
        if cursor is None:
            break
    assert counts == [500, 500, 500, 500, 340]  # the limit counts rows across symbols
    assert got == expected


def test_time_parsing_keeps_nanoseconds() -> None:
    base = to_ns(datetime(2024, 3, 5, 14, 30, tzinfo=UTC))
    assert to_ns("2024-03-05T14:30:00.000000001Z") == base + 1
    assert to_ns("2024-03-05T09:30:00.5-05:00") == base + 500_000_000
    assert to_ns("2024-03-05") == to_ns(datetime(2024, 3, 5, tzinfo=UTC))
    with pytest.raises(InvalidArgument):
        to_ns("05/03/2024")
