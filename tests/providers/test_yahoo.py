"""The Yahoo adapter against the simulator over real HTTP: shapes, stamps, padding and partial rows,
1m windows and lookback limits, every error and fault kind, and the same series as Alpaca's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta

import httpx
import msgspec
import numpy as np
import polars as pl
import pytest

from marketpipe.core.config import RetryPolicy
from marketpipe.core.errors import (
    InvalidArgument,
    InvalidTimeframe,
    MalformedResponse,
    NotFound,
    ProviderBadRequest,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.schema import BAR_SCHEMA, UTC_US
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.providers.base import BarPage
from marketpipe.providers.yahoo import (
    BROWSER_USER_AGENT,
    DEFAULT_BASE_URL,
    YahooProvider,
    _Result,
    from_yahoo,
    map_http_error,
    splits_of,
    to_yahoo,
    unadjust_splits,
    wire_windows,
)
from marketpipe.providers.yahoo_config import YahooConfig
from marketpipe.quality.validate import check_bars
from marketpipe.sim.faults import FaultKind, FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.sim.yahoo import YahooFace
from tests.conftest import provider_config

NOW = datetime(2024, 3, 15, 20, 30, tzinfo=UTC)  # a Friday after the close; the simulator's clock too
MIN1, DAY1 = Timeframe.parse("1Min"), Timeframe.parse("1Day")
MARCH_5 = (parse_time("2024-03-05"), parse_time("2024-03-05", end=True))


@pytest.fixture(scope="module")
def ysim(sim: SimServer) -> Iterator[SimServer]:
    """A Yahoo face over the very SimMarket the shared Alpaca simulator serves."""
    with SimServer(sim.market, vendor="yahoo") as server:
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


def make(url: str, **kw: object) -> YahooProvider:
    return YahooProvider(config=provider_config(url, YahooConfig, **kw), now=lambda: NOW)  # type: ignore[arg-type]


@pytest.fixture
async def yahoo(ysim: SimServer) -> AsyncIterator[YahooProvider]:
    p = make(ysim.url)
    yield p
    await p.aclose()


async def pages_of(p: YahooProvider | AlpacaProvider, symbols: list[str], tf: Timeframe, start: datetime,
                   end: datetime, **kw: object) -> list[BarPage]:  # fmt: skip
    return [page async for page in p.iter_bars(symbols, tf, start, end, **kw)]  # type: ignore[arg-type]


async def frame_of(p: YahooProvider | AlpacaProvider, symbols: list[str], tf: Timeframe, start: datetime,
                   end: datetime, **kw: object) -> pl.DataFrame:  # fmt: skip
    frames = [page.frame for page in await pages_of(p, symbols, tf, start, end, **kw)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=BAR_SCHEMA)


OHLCV = ["ts", "open", "high", "low", "close", "volume"]


# --- shapes ----------------------------------------------------------------------------------------


async def test_daily_bars_shape_labels_and_winter_stamp(yahoo: YahooProvider) -> None:
    pages = await pages_of(yahoo, ["AAPL", "BRK.B"], DAY1, parse_time("2024-01-08"), parse_time("2024-01-12", end=True))
    frame = pl.concat([p.frame for p in pages])
    assert frame.drop("raw_ts").schema == pl.Schema(BAR_SCHEMA)
    assert frame.group_by("symbol").len().sort("symbol").rows() == [("AAPL", 5), ("BRK.B", 5)]
    assert frame["ts"].to_list()[:5] == [datetime(2024, 1, d, 5, tzinfo=UTC) for d in range(8, 13)]
    assert frame["raw_ts"][0] == str(int(datetime(2024, 1, 8, 14, 30, tzinfo=UTC).timestamp()))  # Yahoo's 09:30
    assert frame["source"].unique().to_list() == ["sim:yahoo"]
    assert frame["feed"].unique().to_list() == ["yahoo"]
    assert frame["trade_count"].null_count() == frame["vwap"].null_count() == frame.height
    assert [p.symbols for p in pages] == [["AAPL", "BRK.B"]] * 2
    assert [p.last_page for p in pages] == [False, True]
    assert pages[0].complete_through == {"AAPL": parse_time("2024-01-12", end=True)}
    assert check_bars(frame, timeframe=DAY1).rejected == 0


async def test_daily_summer_stamp_and_partial_day_bounds(yahoo: YahooProvider) -> None:
    frame = await frame_of(yahoo, ["AAPL"], DAY1, parse_time("2023-07-10"), parse_time("2023-07-11", end=True))
    assert frame["ts"].to_list() == [datetime(2023, 7, 10, 4, tzinfo=UTC), datetime(2023, 7, 11, 4, tzinfo=UTC)]
    # A start after midnight excludes that day's bar (its canonical stamp is before the start).
    late = await frame_of(yahoo, ["AAPL"], DAY1, datetime(2023, 7, 10, 15, tzinfo=UTC), parse_time("2023-07-12"))
    assert late["ts"].to_list() == [datetime(2023, 7, 11, 4, tzinfo=UTC)]
    # No canonical stamp inside the window: no request, one empty page that still completes the range.
    before = yahoo.requests
    pages = await pages_of(
        yahoo, ["AAPL"], DAY1, datetime(2023, 7, 10, 15, tzinfo=UTC), datetime(2023, 7, 10, 19, tzinfo=UTC)
    )
    assert yahoo.requests == before and len(pages) == 1 and pages[0].frame.height == 0 and pages[0].last_page


async def test_same_bars_as_alpaca(yahoo: YahooProvider, alpaca: AlpacaProvider) -> None:
    for tf, start, end in (
        (MIN1, *MARCH_5),
        (Timeframe.parse("5Min"), *MARCH_5),
        (DAY1, parse_time("2024-01-01"), parse_time("2024-02-29", end=True)),
        (Timeframe.parse("1Week"), parse_time("2024-01-01"), parse_time("2024-02-29", end=True)),
        (Timeframe.parse("1Month"), parse_time("2023-01-01"), parse_time("2023-12-31", end=True)),
    ):
        y = (await frame_of(yahoo, ["AAPL"], tf, start, end)).select(OHLCV)
        a = (await frame_of(alpaca, ["AAPL"], tf, start, end)).select(OHLCV)
        assert y.height > 0 and y.equals(a), tf  # float32 prices decoded back to exact cents


async def test_1m_history_comes_in_7_day_windows(ysim: SimServer, yahoo: YahooProvider, alpaca: AlpacaProvider) -> None:
    start, end = parse_time("2024-03-01"), parse_time("2024-03-12", end=True)
    ysim.reset_stats()
    pages = await pages_of(yahoo, ["AAPL", "MSFT"], MIN1, start, end)
    assert ysim.stats()["requests"] == 6  # 12 days = 7 + 5, and one split-history request, per symbol
    assert [p.complete_through for p in pages] == [
        {"AAPL": start + timedelta(days=7)},
        {"AAPL": end},
        {"MSFT": start + timedelta(days=7)},
        {"MSFT": end},
    ]
    frame = pl.concat([p.frame for p in pages])
    assert frame.filter(pl.col("symbol") == "AAPL").height == 8 * 390
    a = await frame_of(alpaca, ["AAPL", "MSFT"], MIN1, start, end)
    assert frame.select(["symbol", *OHLCV]).equals(a.select(["symbol", *OHLCV]))


def test_wire_windows() -> None:
    start = datetime(2024, 3, 1, 14, 30, 0, 500, tzinfo=UTC)
    windows = wire_windows(MIN1, start, start + timedelta(days=15))
    assert len(windows) == 3 and all(p2 - p1 <= 7 * 86400 for p1, p2, _ in windows)
    assert windows[0][0] == int(datetime(2024, 3, 1, 14, 30, 1, tzinfo=UTC).timestamp())  # rounded up
    assert windows[-1][2] == start + timedelta(days=15)
    weekly = wire_windows(Timeframe.parse("1Week"), parse_time("2024-01-10"), parse_time("2024-01-31"))
    assert len(weekly) == 1
    p1, p2, _ = weekly[0]
    assert datetime.fromtimestamp(p1, UTC) == datetime(2024, 1, 15, 5, tzinfo=UTC)  # next Monday, NY midnight
    assert datetime.fromtimestamp(p2, UTC) == datetime(2024, 2, 5, 5, tzinfo=UTC)
    assert to_yahoo("BRK.B") == "BRK-B" and from_yahoo("BRK-B") == "BRK.B"


# --- padding and partial rows ------------------------------------------------------------------------


async def test_null_padding_dropped_partial_rows_kept_for_quarantine(ysim: SimServer, yahoo: YahooProvider) -> None:
    halted = datetime(2024, 3, 5, 15, 0, tzinfo=UTC)
    half = datetime(2024, 3, 5, 15, 5, tzinfo=UTC)
    ysim.face.null_rows = {int(halted.timestamp()), int(halted.timestamp()) - 3600}  # a halt and a pre-open pad
    ysim.face.partial_rows = {int(half.timestamp())}
    frame = await frame_of(yahoo, ["AAPL"], MIN1, *MARCH_5)
    assert frame.height == 389 and halted not in frame["ts"].to_list()  # padding is not data: never filled
    assert yahoo.padding_rows_dropped == 2
    row = frame.filter(pl.col("ts") == half).row(0, named=True)
    assert row["high"] is None and row["low"] is None and row["open"] is not None
    checked = check_bars(frame, timeframe=MIN1, start=MARCH_5[0], end=MARCH_5[1])
    assert checked.rejected == 1 and checked.quarantine["reason"][0] == "missing_field"


# --- capability and lookback ---------------------------------------------------------------------------


def test_supports() -> None:
    p = YahooProvider(base_url="http://127.0.0.1:9")
    now = NOW
    assert p.supports("bars", MIN1, now - timedelta(days=20), now, now) is None
    assert "30 days" in (p.supports("bars", MIN1, now - timedelta(days=31), now, now) or "")
    assert "30 days" in (p.supports("bars", MIN1, now - timedelta(days=30), now, now) or "")  # margin
    assert p.supports("bars", Timeframe.parse("5Min"), now - timedelta(days=50), now, now) is None
    assert "60 days" in (p.supports("bars", Timeframe.parse("15Min"), now - timedelta(days=70), now, now) or "")
    assert "half hour" in (p.supports("bars", Timeframe.parse("1Hour"), None, None, now) or "")
    assert p.supports("bars", Timeframe.parse("3Min"), None, None, now) is not None
    assert p.supports("trades", None, None, None, now) is not None
    assert p.supports("bars", DAY1, datetime(2001, 1, 2, tzinfo=UTC), now, now) is None


async def test_lookback_and_span_limits_are_bad_requests(yahoo: YahooProvider) -> None:
    with pytest.raises(ProviderBadRequest) as info:
        await frame_of(yahoo, ["AAPL"], MIN1, NOW - timedelta(days=40), NOW - timedelta(days=39))
    assert "within the last 30 days" in info.value.message
    assert info.value.details["vendor_code"] == "Unprocessable Entity"
    with pytest.raises(ProviderBadRequest, match="within the last 60 days"):
        await frame_of(yahoo, ["AAPL"], Timeframe.parse("2Min"), NOW - timedelta(days=70), NOW - timedelta(days=69))
    assert yahoo.resilience.retries == 0  # a rejected request is not retried


async def test_unknown_symbol_is_not_found_after_the_known_ones(yahoo: YahooProvider) -> None:
    got: list[BarPage] = []
    with pytest.raises(NotFound) as info:
        async for page in yahoo.iter_bars(["AAPL", "ZZZZ"], DAY1, *MARCH_5):
            got.append(page)
    assert [p.complete_through for p in got] == [{"AAPL": MARCH_5[1]}]
    assert "delisted" in info.value.message and info.value.code == "NOT_FOUND"


async def test_invalid_arguments_never_reach_the_wire(yahoo: YahooProvider) -> None:
    with pytest.raises(InvalidTimeframe):
        await frame_of(yahoo, ["AAPL"], Timeframe.parse("1Hour"), *MARCH_5)
    with pytest.raises(InvalidArgument):
        await frame_of(yahoo, ["AAPL"], DAY1, *MARCH_5, adjustment="all")
    with pytest.raises(InvalidArgument):
        await frame_of(yahoo, ["AAPL"], DAY1, MARCH_5[1], MARCH_5[0])
    with pytest.raises(InvalidArgument):
        await frame_of(yahoo, [], DAY1, *MARCH_5)
    assert yahoo.requests == 0
    # one consolidated feed, whatever is asked for
    frame = await frame_of(yahoo, ["AAPL"], DAY1, *MARCH_5, feed="sip", adjustment="split")
    assert frame["feed"].to_list() == ["yahoo"]


def test_error_mapping_from_real_responses(ysim: SimServer) -> None:
    with httpx.Client(base_url=ysim.url) as c:
        bad = c.get("/v8/finance/chart/AAPL", params={"interval": "5d"})
        err = map_http_error(bad.status_code, bad.content, bad.headers, "chart")
        assert isinstance(err, ProviderBadRequest) and "interval=5d is not supported" in err.message
        gone = c.get("/v8/finance/chart/ZZZZ")
        assert isinstance(map_http_error(gone.status_code, gone.content, gone.headers, "chart"), NotFound)
        ysim.faults.set([FaultRule(kind="rate_limit", times=1)])
        busy = c.get("/v8/finance/chart/AAPL")
        limited = map_http_error(busy.status_code, busy.content, busy.headers, "chart")
        assert isinstance(limited, RateLimited) and "Too Many Requests" in limited.message


async def test_default_host_headers_and_query() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"chart": {"result": [{"meta": {}, "indicators": {"quote": [{}]}}], "error": None}}
        )

    # A mock only to see what would leave for the real host; the simulator cannot stand in for it.
    p = YahooProvider.from_config(None, env={}, transport=httpx.MockTransport(answer))
    try:
        pages = await pages_of(p, ["BRK.B"], DAY1, *MARCH_5)
    finally:
        await p.aclose()
    assert pages[0].frame.height == 0 and pages[0].source == "yahoo"
    history, req = seen  # the splits from the window's start to now (to un-adjust), then the bars
    assert str(req.url).startswith(DEFAULT_BASE_URL + "/v8/finance/chart/BRK-B?")
    assert req.headers["user-agent"] == BROWSER_USER_AGENT
    assert dict(req.url.params) == {
        "interval": "1d",
        "period1": str(int(MARCH_5[0].timestamp())),
        "period2": str(int(MARCH_5[1].timestamp())),
        "includePrePost": "false",
        "events": "split",
    }
    h = dict(history.url.params)
    assert h["interval"] == "3mo" and h["events"] == "split" and h["period1"] == str(int(MARCH_5[0].timestamp()))
    assert int(h["period2"]) > time.time()
    assert p.config.rate_limit_per_min == 60 and p.config.feed == "yahoo"


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("http_500", ProviderUnavailable),
        ("http_502", ProviderUnavailable),
        ("http_503", ProviderUnavailable),
        ("reset", ProviderUnavailable),
        ("truncated_json", MalformedResponse),
        ("html_200", MalformedResponse),
        ("rate_limit", RateLimited),
    ],
)
async def test_persistent_faults_give_typed_errors_after_retries(
    ysim: SimServer, yahoo: YahooProvider, kind: FaultKind, error: type
) -> None:
    ysim.faults.set([FaultRule(kind=kind)])
    with pytest.raises(error):
        await frame_of(yahoo, ["AAPL"], DAY1, *MARCH_5)
    assert yahoo.resilience.retries == 2  # attempts=3


@pytest.mark.parametrize("kind", ["http_500", "http_503", "reset", "truncated_json", "html_200", "rate_limit"])
async def test_transient_faults_are_retried_transparently(
    ysim: SimServer, yahoo: YahooProvider, kind: FaultKind
) -> None:
    ysim.faults.set([FaultRule(kind=kind, times=1)])
    frame = await frame_of(yahoo, ["AAPL"], DAY1, *MARCH_5)
    assert frame.height == 1 and yahoo.resilience.retries == 1


@pytest.mark.parametrize(
    ("kind", "text"), [("empty_json", "lacks the required key(s) chart"), ("null_page", "at `$.chart`")]
)
async def test_a_chart_answer_without_the_envelope_is_malformed(
    ysim: SimServer, yahoo: YahooProvider, kind: FaultKind, text: str
) -> None:
    ysim.faults.set([FaultRule(kind=kind)])
    with pytest.raises(MalformedResponse) as info:
        await frame_of(yahoo, ["AAPL"], DAY1, *MARCH_5)
    assert info.value.message.startswith("yahoo chart: ") and text in info.value.message
    assert info.value.details["endpoint"] == "chart" and yahoo.resilience.retries == 2


async def test_a_single_empty_chart_answer_is_retried(ysim: SimServer, yahoo: YahooProvider) -> None:
    ysim.faults.set([FaultRule(kind="empty_json", times=1)])
    frame = await frame_of(yahoo, ["AAPL"], DAY1, *MARCH_5)
    assert frame.height == 1 and yahoo.resilience.retries == 1


async def test_hang_is_a_timeout(ysim: SimServer) -> None:
    p = make(ysim.url, read_timeout=0.3, connect_timeout=0.2, retry=RetryPolicy(attempts=1))
    ysim.faults.set([FaultRule(kind="hang", hang_seconds=3)])
    try:
        with pytest.raises(ProviderTimeout):
            await frame_of(p, ["AAPL"], DAY1, *MARCH_5)
    finally:
        await p.aclose()


async def test_invalid_rows_reach_quarantine(ysim: SimServer, yahoo: YahooProvider) -> None:
    ysim.faults.set([FaultRule(kind="invalid_rows", row_ratio=0.02, row_kinds=["high_lt_low", "negative_volume"])])
    frame = await frame_of(yahoo, ["AAPL"], MIN1, *MARCH_5)
    assert frame.height == 390
    checked = check_bars(frame, timeframe=MIN1, start=MARCH_5[0], end=MARCH_5[1])
    assert 0 < checked.rejected < 390
    assert set(",".join(checked.quarantine["reason"].to_list()).split(",")) <= {"ohlc_inconsistent", "negative_volume"}


# --- deliberate disagreement ---------------------------------------------------------------------------


async def test_disagreement_options_are_visible(ysim: SimServer, yahoo: YahooProvider, alpaca: AlpacaProvider) -> None:
    start, end = parse_time("2024-01-08"), parse_time("2024-01-12", end=True)
    a = await frame_of(alpaca, ["AAPL"], DAY1, start, end)
    ysim.face.price_shift_pct = -2.0
    ysim.face.volume_ratio = 1.5
    ysim.face.missing_days = {date(2024, 1, 10)}
    y = await frame_of(yahoo, ["AAPL"], DAY1, start, end)
    assert y.height == 4 and datetime(2024, 1, 10, 5, tzinfo=UTC) not in y["ts"].to_list()
    both = y.join(a, on="ts", suffix="_a")
    assert ((both["close"] / both["close_a"] - 0.98).abs() < 0.0001).all()
    assert ((both["volume"] - both["volume_a"] * 1.5).abs() <= 1).all()
    # the simulator's source label stays: disagreement is a test of reconciliation, not real data
    assert y["source"].unique().to_list() == ["sim:yahoo"]


def test_from_config_builds_without_credentials() -> None:
    p = YahooProvider.from_config(YahooConfig(base_url="http://127.0.0.1:9"), env={})
    assert p.name == "yahoo" and p.base_url == "http://127.0.0.1:9"
    assert YahooProvider.from_config(None).base_url == DEFAULT_BASE_URL


# --- the vendor's "current price" point (issue 13) --------------------------------------------

LIVE = datetime(2024, 3, 15, 15, 7, 23, tzinfo=UTC)  # 11:07:23 New York, a session running


@pytest.fixture
def live_face(ysim: SimServer) -> Iterator[SimServer]:
    ysim.face.clock = LIVE.timestamp
    yield ysim
    ysim.face.clock = NOW.timestamp


async def test_current_price_point_is_not_a_bar(live_face: SimServer, alpaca: AlpacaProvider) -> None:
    """While a session runs Yahoo ends the chart with a point at ``regularMarketTime`` (o=h=l=c,
    v=0), outside the window asked for and off the bar grid: the adapter drops it, and counts it."""
    async with httpx.AsyncClient(base_url=live_face.url) as raw:
        window = {"period1": int(MARCH_5[0].timestamp()), "period2": int(MARCH_5[1].timestamp())}
        res = (await raw.get("/v8/finance/chart/AAPL", params={"interval": "1m", **window})).json()
    res = res["chart"]["result"][0]
    q = res["indicators"]["quote"][0]
    assert res["timestamp"][-1] == res["meta"]["regularMarketTime"] == int(LIVE.timestamp())
    assert q["open"][-1] == q["high"][-1] == q["low"][-1] == q["close"][-1] and q["volume"][-1] == 0
    labels = {"provider": "yahoo", "reason": "not_a_bar"}
    before = REGISTRY.get_sample_value("marketpipe_vendor_points_dropped_total", labels) or 0.0
    p = YahooProvider(config=provider_config(live_face.url, YahooConfig), now=lambda: LIVE)  # type: ignore[arg-type]
    try:
        for tf, start, end in (
            (MIN1, *MARCH_5),  # a past window: the point lies outside it
            (Timeframe.parse("15Min"), parse_time("2024-03-15"), parse_time("2024-03-16")),  # today: off the grid
            (DAY1, parse_time("2024-03-11"), parse_time("2024-03-16")),  # today's date: beside today's bar
        ):
            y = (await frame_of(p, ["AAPL"], tf, start, end)).select(OHLCV)
            assert y.height > 0 and y["volume"].min() > 0, tf  # type: ignore[operator]
            assert y["ts"].is_unique().all() and y["ts"].max() < end, tf  # type: ignore[operator]
            if tf is MIN1:
                a = (await frame_of(alpaca, ["AAPL"], tf, start, end)).select(OHLCV)
                assert y.equals(a)
        assert p.non_bar_points_dropped == 3
    finally:
        await p.aclose()
    assert REGISTRY.get_sample_value("marketpipe_vendor_points_dropped_total", labels) == before + 3


# --- split-adjusted wire, raw store ------------------------------------------------------------------


async def _wire_quote(ysim: SimServer, symbol: str, start: datetime, end: datetime) -> dict:
    params = {"interval": "1d", "period1": int(start.timestamp()), "period2": int(end.timestamp())}
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{ysim.url}/v8/finance/chart/{symbol}", params=params)
    result = r.json()["chart"]["result"][0]
    assert "events" not in result  # not asked for
    return result["indicators"]["quote"][0]


@pytest.mark.parametrize(
    ("symbol", "ratio", "start", "end", "tfs"),
    [
        ("AAPL", 4, "2020-08-03", "2020-09-25", ("1Day", "1Week")),  # ex Monday 2020-08-31: weeks are whole
        ("TSLA", 3, "2022-08-15", "2022-09-02", ("1Day",)),  # thirds: float32 on the wire, cents after un-adjusting
    ],
)
async def test_split_adjusted_wire_is_stored_raw(
    ysim: SimServer, yahoo: YahooProvider, alpaca: AlpacaProvider, symbol: str, ratio: int, start: str, end: str,
    tfs: tuple[str, ...],
) -> None:  # fmt: skip
    """The Yahoo face sends bars before a split divided by the ratio (volume times it), as the real chart
    API does; the adapter un-adjusts them with Yahoo's own split events, so they equal Alpaca's raw bars."""
    s, e = parse_time(start), parse_time(end, end=True)
    raw = await frame_of(alpaca, [symbol], DAY1, s, e)
    wire = await _wire_quote(ysim, symbol, s, e)
    assert wire["close"][0] == pytest.approx(raw["close"][0] / ratio, rel=1e-6)
    assert wire["volume"][0] == raw["volume"][0] * ratio
    assert wire["close"][-1] == pytest.approx(raw["close"][-1], rel=1e-6)  # after the split: as it was
    for name in tfs:
        tf = Timeframe.parse(name)
        y = await frame_of(yahoo, [symbol], tf, s, e)
        a = raw if tf == DAY1 else await frame_of(alpaca, [symbol], tf, s, e)
        assert y["ts"].to_list() == a["ts"].to_list() and y.height > 2
        for col in ("open", "high", "low", "close"):
            np.testing.assert_allclose(y[col].to_numpy(), a[col].to_numpy(), rtol=1e-9, err_msg=f"{name} {col}")
        assert y["volume"].to_list() == a["volume"].to_list()
    # adjustment="split": Yahoo's prices as sent, the split's ratio below the raw ones before it
    sent = await frame_of(yahoo, [symbol], DAY1, s, e, adjustment="split")
    k = (raw["close"] / sent["close"]).to_numpy()
    before = raw["ts"].dt.date() < _ex(symbol)
    np.testing.assert_allclose(k[before.to_numpy()], ratio, rtol=1e-6)
    np.testing.assert_allclose(k[~before.to_numpy()], 1.0, rtol=1e-6)


def _ex(symbol: str) -> date:
    return {"AAPL": date(2020, 8, 31), "TSLA": date(2022, 8, 25)}[symbol]


@pytest.mark.parametrize(
    "split",
    [
        '{"date": 1598880600, "numerator": 4, "denominator": 0}',
        '{"date": 1598880600, "numerator": null, "denominator": 1}',
        '{"date": 1598880600, "numerator": -4, "denominator": 1}',
    ],
)
def test_a_split_event_without_a_usable_ratio_is_malformed(split: str) -> None:
    """Un-adjusting with it would mis-scale every bar before it: a clear error instead (the router fails over)."""
    meta = '"meta": {"exchangeTimezoneName": "America/New_York"}'
    body = "{" + meta + ', "events": {"splits": {"1598880600": ' + split + "}}}"
    result = msgspec.json.decode(body, type=_Result)
    with pytest.raises(MalformedResponse, match="no usable ratio"):
        splits_of(result, "AAPL")


def test_unadjust_splits_takes_a_week_bar_by_its_last_day() -> None:
    """A week bar wholly before the split is scaled; the week that holds the split stays post-split."""
    ts = [datetime(2022, 8, 15, 4, tzinfo=UTC), datetime(2022, 8, 22, 4, tzinfo=UTC)]  # Mondays, NY midnight
    prices = {"open": [300.0, 296.0], "high": [310.0, 300.0], "low": [290.0, 280.0], "close": [297.1, 290.0]}
    frame = pl.DataFrame({"ts": ts, **prices, "volume": [300, 600]}).with_columns(pl.col("ts").cast(UTC_US))
    split = {"1661434200": (date(2022, 8, 25), 3.0)}
    out = unadjust_splits(frame, Timeframe.parse("1Week"), split, "America/New_York", 2)
    assert out["close"].to_list() == [891.3, 290.0] and out["volume"].to_list() == [100, 600]
