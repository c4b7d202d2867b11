"""The Polygon adapter against the simulator over real HTTP: the same market through the Alpaca and
the Polygon face gives the same canonical bars; pagination, plans, every error and fault kind; the
API key never shows in an error, a log line or a metric."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import msgspec
import polars as pl
import pytest
from structlog.testing import capture_logs

from marketpipe.core.config import CircuitPolicy, ProviderConfig, RetryPolicy
from marketpipe.core.errors import (
    AuthFailed,
    InvalidArgument,
    MalformedResponse,
    MissingCredentials,
    NotEntitled,
    PaginationLoop,
    ProviderBadRequest,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import NY, parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.polygon import KEY_VAR, PolygonProvider, _quote_record, _trade_record, _WQuote, _WTrade
from marketpipe.providers.polygon_config import PolygonConfig
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.polygon import PolygonFace
from marketpipe.sim.server import SimServer

MIN1, DAY1, WEEK1 = (Timeframe.parse(t) for t in ("1Min", "1Day", "1Week"))
DAY = (parse_time("2024-03-05"), parse_time("2024-03-05", end=True))
MARCH = (parse_time("2024-03-01"), parse_time("2024-03-29", end=True))
SECRET = "PolySecret-8f3a91"  # a key distinctive enough to search for in every output
KEYS = {"POLYKEY": "unlimited", "POLYDELAYED": "delayed", "POLYFREE": "free", SECRET: "unlimited"}
CANONICAL = ["symbol", "timeframe", "ts", "open", "high", "low", "close", "volume", "trade_count", "vwap", "feed"]


def config(url: str, kind: type[ProviderConfig] = PolygonConfig, **kw: object) -> ProviderConfig:
    values: dict[str, object] = {
        "base_url": url,
        "plan": "unlimited",
        "rate_limit_per_min": 100_000,
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "retry": RetryPolicy(attempts=3, base_seconds=0.01, max_seconds=0.05),
        "circuit": CircuitPolicy(failure_threshold=50, recovery_seconds=0.5),
    }
    values.update(kw)
    return kind(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def shared_market() -> SimMarket:
    return SimMarket()


@pytest.fixture(scope="session")
def polygon_sim(shared_market: SimMarket) -> Iterator[SimServer]:
    with SimServer(shared_market, keys=KEYS, vendor="polygon") as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(scope="session")
def alpaca_sim(shared_market: SimMarket) -> Iterator[SimServer]:
    with SimServer(shared_market) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_polygon_sim(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "polygon_sim" in request.fixturenames:
        server: SimServer = request.getfixturevalue("polygon_sim")
        server.faults.clear()
        face: PolygonFace = server.face
        face.price_shift_pct, face.volume_ratio, face.missing_days = 0.0, 1.0, set()


@pytest.fixture
async def polygon(polygon_sim: SimServer) -> AsyncIterator[PolygonProvider]:
    p = PolygonProvider.from_config(config(polygon_sim.url), env={KEY_VAR: "POLYKEY"})
    yield p
    await p.aclose()


@pytest.fixture
async def alpaca(alpaca_sim: SimServer) -> AsyncIterator[AlpacaProvider]:
    p = AlpacaProvider.from_config(
        config(alpaca_sim.url, AlpacaConfig), env={"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}
    )
    yield p
    await p.aclose()


async def collect(p: PolygonProvider | AlpacaProvider, symbols: list[str], tf: Timeframe, start: datetime,
                  end: datetime, **kw: object) -> pl.DataFrame:  # fmt: skip
    frames = [page.frame async for page in p.iter_bars(symbols, tf, start, end, **kw)]  # type: ignore[arg-type]
    return pl.concat(frames) if frames else pl.DataFrame(schema=BAR_SCHEMA)


# --- bars --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tf", "span"), [(MIN1, DAY), (Timeframe.parse("15Min"), DAY), (DAY1, MARCH), (WEEK1, MARCH)])
async def test_same_market_same_bars_through_both_faces(
    polygon: PolygonProvider, alpaca: AlpacaProvider, tf: Timeframe, span: tuple[datetime, datetime]
) -> None:
    poly = await collect(polygon, ["AAPL", "MSFT"], tf, *span)
    alp = await collect(alpaca, ["AAPL", "MSFT"], tf, *span)
    assert poly.height == alp.height > 0
    assert poly.select(CANONICAL).equals(alp.select(CANONICAL))
    assert poly.drop("raw_ts").schema == pl.Schema(BAR_SCHEMA)
    assert poly["source"].unique().to_list() == ["sim:polygon"]


async def test_pages_follow_next_url(polygon: PolygonProvider) -> None:
    pages = [p async for p in polygon.iter_bars(["AAPL", "MSFT"], MIN1, *DAY, limit=150)]
    assert [(p.symbols, p.frame.height, p.last_page) for p in pages] == [
        (["AAPL"], 150, False),
        (["AAPL"], 150, False),
        (["AAPL"], 90, True),
        (["MSFT"], 150, False),
        (["MSFT"], 150, False),
        (["MSFT"], 90, True),
    ]
    assert [p.page_number for p in pages] == [1, 2, 3, 1, 2, 3]
    assert pages[0].complete_through == {"AAPL": pages[0].frame["ts"].max() + timedelta(microseconds=1)}
    assert pages[2].complete_through == {"AAPL": DAY[1]}
    assert pages[0].next_page_token and "cursor=" in pages[0].next_page_token
    assert all(len(p.request_id) == 32 for p in pages)  # the vendor's request_id
    whole = await collect(polygon, ["AAPL"], MIN1, *DAY)
    assert pl.concat([p.frame for p in pages[:3]]).drop("fetched_at").equals(whole.drop("fetched_at"))


async def test_sort_desc_and_half_open_range(polygon: PolygonProvider) -> None:
    s = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    frame = await collect(polygon, ["AAPL"], MIN1, s, s + timedelta(minutes=10))
    assert frame.height == 10 and frame["ts"].max() == s + timedelta(minutes=9)
    # A start inside a minute: the vendor snaps out to that minute, which lies before the range.
    inside = await collect(polygon, ["AAPL"], MIN1, s + timedelta(seconds=30), s + timedelta(minutes=3))
    assert inside["ts"].to_list() == [s + timedelta(minutes=1), s + timedelta(minutes=2)]
    desc = [p async for p in polygon.iter_bars(["AAPL"], MIN1, *DAY, limit=200, sort="desc")]
    ts = pl.concat([p.frame for p in desc])["ts"]
    assert ts.is_sorted(descending=True) and ts.len() == 390
    assert desc[0].complete_through == {} and desc[-1].complete_through == {"AAPL": DAY[1]}


async def test_daily_and_weekly_stamps(polygon: PolygonProvider) -> None:
    daily = await collect(polygon, ["AAPL"], DAY1, parse_time("2024-03-04"), parse_time("2024-03-08", end=True))
    assert daily.height == 5 and daily["ts"][0] == datetime(2024, 3, 4, 5, tzinfo=UTC)
    summer = await collect(polygon, ["AAPL"], DAY1, parse_time("2024-07-01"), parse_time("2024-07-01", end=True))
    assert summer["ts"].to_list() == [datetime(2024, 7, 1, 4, tzinfo=UTC)]
    weekly = await collect(polygon, ["AAPL"], WEEK1, *MARCH)
    # Canonical weeks start Monday (Alpaca's stamp); the vendor's Sunday stays in raw_ts.
    assert weekly["ts"][0] == datetime(2024, 3, 4, 5, tzinfo=UTC)
    assert weekly["raw_ts"][0] == str(int(datetime(2024, 3, 3, 5, tzinfo=UTC).timestamp() * 1000))
    assert (weekly["ts"].dt.convert_time_zone("America/New_York").dt.weekday() == 1).all()


async def test_unknown_ticker_is_empty_and_symbols_are_canonical(polygon: PolygonProvider) -> None:
    pages = [p async for p in polygon.iter_bars(["ZZZZ"], DAY1, *MARCH)]
    assert len(pages) == 1 and pages[0].frame.height == 0 and pages[0].last_page
    assert pages[0].complete_through == {"ZZZZ": MARCH[1]}
    brk = await collect(polygon, ["brk-b"], DAY1, *MARCH)  # BRK-B has no data at Polygon: BRK.B
    assert brk.height > 0 and brk["symbol"].unique().to_list() == ["BRK.B"]


async def test_arguments_are_checked_before_the_wire(polygon: PolygonProvider) -> None:
    for kw in ({"feed": "iex"}, {"adjustment": "dividend"}, {"limit": 50_001}, {"asof": "2024-01-01"}):
        with pytest.raises(InvalidArgument):
            await collect(polygon, ["AAPL"], DAY1, *MARCH, **kw)
    with pytest.raises(InvalidArgument):
        await collect(polygon, ["AAPL"], DAY1, MARCH[1], MARCH[0])
    assert polygon.requests == 0


@pytest.mark.parametrize(("adjustment", "adjusted"), [("raw", "false"), ("split", "true"), ("all", "true")])
async def test_request_on_the_wire(adjustment: str, adjusted: str) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "OK", "resultsCount": 0, "request_id": "r"})

    p = PolygonProvider("K", config=config("https://api.massive.com"), transport=httpx.MockTransport(answer))
    try:
        await collect(p, ["BRK.B"], Timeframe.parse("5Min"), *DAY, adjustment=adjustment, limit=777)
    finally:
        await p.aclose()
    (req,) = seen
    lo, hi = int(DAY[0].timestamp() * 1000), int(DAY[1].timestamp() * 1000) - 1  # inclusive on the wire
    assert req.url.path == f"/v2/aggs/ticker/BRK.B/range/5/minute/{lo}/{hi}"
    assert dict(req.url.params) == {"adjusted": adjusted, "sort": "asc", "limit": "777"}
    assert req.headers["authorization"] == "Bearer K" and "apiKey" not in str(req.url)


# --- plans -------------------------------------------------------------------------------------


async def test_delayed_answers_clamp_the_page_end(polygon_sim: SimServer) -> None:
    p = PolygonProvider.from_config(config(polygon_sim.url), env={KEY_VAR: "POLYDELAYED"})
    now = datetime.now(UTC)
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], MIN1, now - timedelta(days=4), now)]
        assert pages[-1].end <= now - timedelta(minutes=15) + timedelta(seconds=5)
        assert pages[-1].complete_through["AAPL"] == pages[-1].end
    finally:
        await p.aclose()


async def test_free_plan(polygon_sim: SimServer) -> None:
    now = datetime.now(UTC)
    # the provider's clock is the test's, so "15 minutes before now" means the same instant to both
    p = PolygonProvider.from_config(config(polygon_sim.url, plan="free"), env={KEY_VAR: "POLYFREE"}, now=lambda: now)
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], DAY1, now - timedelta(days=10), now)]
        assert pages[-1].end <= now - timedelta(minutes=15)
        local = pages[-1].end.astimezone(NY)  # through the previous session: New York midnight today
        assert (local.hour, local.minute) == (0, 0) or now - pages[-1].end < timedelta(minutes=16)
        assert p.supports("latest_trade", None, None, None, now) is not None
        assert p.supports("bars", DAY1, now - timedelta(minutes=1), now, now) is not None
        assert p.supports("bars", DAY1, now - timedelta(days=10), now, now) is None
        with pytest.raises(NotEntitled):
            await p.latest_trades(["AAPL"])
        with pytest.raises(NotEntitled):
            await collect(p, ["AAPL"], MIN1, now - timedelta(minutes=5), now)
    finally:
        await p.aclose()


async def test_plan_misconfigured_as_unlimited_gets_not_entitled(polygon_sim: SimServer) -> None:
    p = PolygonProvider.from_config(config(polygon_sim.url), env={KEY_VAR: "POLYFREE"})
    try:
        with pytest.raises(NotEntitled) as info:
            await p.snapshots(["AAPL"])
        assert info.value.details["vendor_status"] == "NOT_AUTHORIZED"
        assert "not entitled" in info.value.message
        assert p.resilience.retries == 0
    finally:
        await p.aclose()


def test_supports() -> None:
    p = PolygonProvider("K", config=PolygonConfig(plan="unlimited"))
    now = datetime.now(UTC)
    assert p.supports("bars", MIN1, now - timedelta(days=1), now, now) is None
    assert p.supports("snapshot", None, None, None, now) is None
    assert "no historical trades" in (p.supports("trades", None, None, None, now) or "")
    assert p.supports("options", None, None, None, now) is not None


# --- latest and snapshots ----------------------------------------------------------------------


async def test_latest_and_snapshots_match_the_alpaca_face(polygon: PolygonProvider, alpaca: AlpacaProvider) -> None:
    # the simulator's "latest" moves with the wall clock: Polygon's answer is asked between two of Alpaca's
    # and must equal one of them (on a loaded machine a tick can land between two requests)
    def trade(t: Any) -> tuple[Any, ...]:
        return (t.ts, t.price, t.size, t.exchange, t.trade_id, t.conditions, t.tape)

    a1 = await alpaca.latest_trades(["AAPL", "MSFT"])
    pt = await polygon.latest_trades(["AAPL", "MSFT", "ZZZZ"])
    a2 = await alpaca.latest_trades(["AAPL", "MSFT"])
    assert set(pt) == {"AAPL", "MSFT"}
    for sym in pt:
        assert trade(pt[sym]) in (trade(a1[sym]), trade(a2[sym]))
        assert pt[sym].source == "sim:polygon" and pt[sym].feed == "sip"

    def quote(q: Any) -> tuple[Any, ...]:
        return (q.ts, q.bid_price, q.ask_price, q.bid_size, q.ask_size, q.bid_exchange, q.ask_exchange)

    q1 = (await alpaca.latest_quotes(["AAPL"]))["AAPL"]
    pq = (await polygon.latest_quotes(["AAPL"]))["AAPL"]
    q2 = (await alpaca.latest_quotes(["AAPL"]))["AAPL"]
    assert quote(pq) in (quote(q1), quote(q2))

    def snap(s: Any) -> tuple[Any, ...]:
        assert s.latest_trade and s.minute_bar and s.daily_bar and s.prev_daily_bar
        return (
            s.latest_trade.price, s.minute_bar.ts, s.minute_bar.close, s.daily_bar.ts, s.daily_bar.close,
            s.prev_daily_bar.ts,
        )  # fmt: skip

    s1 = (await alpaca.snapshots(["AAPL"]))["AAPL"]
    ps = await polygon.snapshots(["AAPL", "ZZZZ"])
    s2 = (await alpaca.snapshots(["AAPL"]))["AAPL"]
    assert set(ps) == {"AAPL"}
    assert snap(ps["AAPL"]) in (snap(s1), snap(s2))
    assert await polygon.snapshot("AAPL") is not None


# --- errors and faults -------------------------------------------------------------------------


def test_missing_key_names_the_variable() -> None:
    with pytest.raises(MissingCredentials) as info:
        PolygonProvider.from_config(PolygonConfig(), env={})
    assert KEY_VAR in info.value.message


@pytest.mark.parametrize("auth", ["header", "query"])
async def test_wrong_key_is_auth_failed_and_never_echoed(
    polygon_sim: SimServer, auth: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Wrong-" + SECRET
    p = PolygonProvider.from_config(config(polygon_sim.url), env={KEY_VAR: wrong}, auth=auth)
    caplog.set_level(logging.DEBUG)  # httpx logs every request line, URL and query included
    try:
        with capture_logs() as logs, pytest.raises(AuthFailed) as info:
            await collect(p, ["AAPL"], DAY1, *MARCH)
        exc = info.value
        assert "Unknown API Key" in exc.message and KEY_VAR in exc.message
        texts = [str(exc), repr(exc), str(exc.details), str(logs), caplog.text]
        assert all(wrong not in t and SECRET not in t for t in texts)
        assert "provider_error" in str(logs)
        if auth == "query":
            assert "apiKey=***" in caplog.text  # the request line is there, the key is not
    finally:
        await p.aclose()
    assert SECRET not in str([s for m in REGISTRY.collect() for s in m.samples])


async def test_key_in_query_works_and_stays_out_of_page_tokens(polygon_sim: SimServer) -> None:
    p = PolygonProvider.from_config(config(polygon_sim.url), env={KEY_VAR: SECRET}, auth="query")
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], MIN1, *DAY, limit=200)]
        assert sum(pg.frame.height for pg in pages) == 390 and len(pages) == 2
        assert all(SECRET not in (pg.next_page_token or "") for pg in pages)
    finally:
        await p.aclose()


async def test_connection_refused_is_unavailable_without_the_key() -> None:
    p = PolygonProvider(SECRET, config=config("http://127.0.0.1:9"), auth="query")
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await collect(p, ["AAPL"], DAY1, *MARCH)
        cause = info.value.__cause__
        assert SECRET not in str(info.value) and (cause is None or SECRET not in str(cause))
    finally:
        await p.aclose()


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
    polygon: PolygonProvider, polygon_sim: SimServer, kind: str, error: type
) -> None:
    polygon_sim.faults.set([FaultRule(kind=kind)])  # type: ignore[arg-type]
    with pytest.raises(error):
        await collect(polygon, ["AAPL"], DAY1, *MARCH)
    assert polygon.resilience.retries == 2  # attempts=3


@pytest.mark.parametrize("kind", ["http_500", "http_503", "reset", "truncated_json", "html_200", "rate_limit"])
async def test_transient_faults_are_retried_transparently(
    polygon: PolygonProvider, polygon_sim: SimServer, kind: str
) -> None:
    polygon_sim.faults.set([FaultRule(kind=kind, times=1, after=1)])  # type: ignore[arg-type]
    frame = await collect(polygon, ["AAPL"], MIN1, *DAY, limit=100)  # fails on the second page
    assert frame.height == 390 and frame["ts"].is_unique().all()
    assert polygon.resilience.retries == 1


def errors_counted(code: str) -> float:
    return REGISTRY.get_sample_value("marketpipe_provider_errors_total", {"provider": "polygon", "code": code}) or 0.0


@pytest.mark.parametrize(
    ("kind", "missing"), [("empty_json", ["status", "results or resultsCount"]), ("null_page", ["status"])]
)
async def test_an_aggregates_answer_without_status_is_malformed(
    polygon: PolygonProvider, polygon_sim: SimServer, kind: str, missing: list[str]
) -> None:
    polygon_sim.faults.set([FaultRule(kind=kind)])  # type: ignore[arg-type]
    before = errors_counted("MALFORMED_RESPONSE")
    with pytest.raises(MalformedResponse) as info:
        await collect(polygon, ["AAPL"], MIN1, *DAY)
    assert type(info.value) is MalformedResponse and info.value.message.startswith("polygon aggs: ")
    assert info.value.details["missing"] == missing and info.value.details["endpoint"] == "aggs"
    assert polygon.resilience.retries == 2 and polygon.requests == 3  # retried, then raised
    assert errors_counted("MALFORMED_RESPONSE") - before == 3


async def test_a_single_empty_answer_mid_pagination_is_retried(
    polygon: PolygonProvider, polygon_sim: SimServer
) -> None:
    polygon_sim.faults.set([FaultRule(kind="empty_json", times=1, after=1)])
    frame = await collect(polygon, ["AAPL"], MIN1, *DAY, limit=100)
    assert frame.height == 390 and frame["ts"].is_unique().all() and polygon.resilience.retries == 1


@pytest.mark.parametrize("limit", [100, 50_000])
async def test_a_next_url_that_points_back_is_a_pagination_loop(
    polygon: PolygonProvider, polygon_sim: SimServer, limit: int
) -> None:
    polygon_sim.faults.set([FaultRule(kind="token_loop")])
    before = errors_counted("PAGINATION_LOOP")
    pages = []
    with pytest.raises(PaginationLoop) as info:
        async for page in polygon.iter_bars(["AAPL", "MSFT"], MIN1, *DAY, limit=limit):
            pages.append(page)
    exc = info.value
    assert isinstance(exc, MalformedResponse) and exc.code == "PAGINATION_LOOP"
    assert exc.details == {"provider": "polygon", "endpoint": "aggs", "page": 2}
    assert "polygon aggs: page 2 repeats" in exc.message and "cursor=" in exc.message
    # page 1 (no cursor) is whole; page 2, asked with its cursor, points back at that cursor: not used
    assert polygon.requests == 2 and len(pages) == 1 and pages[0].symbols == ["AAPL"]
    assert errors_counted("PAGINATION_LOOP") - before == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"results": null}',
        b"[]",
        b'{"resultsCount": 0}',
        b'{"status": "OK"}',
        b'{"status": "OK", "resultsCount": 2}',
    ],
)
async def test_aggregates_bodies_without_the_envelope(body: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    p = PolygonProvider(
        SECRET, config=config("http://polygon.invalid", retry=RetryPolicy(attempts=1)), transport=transport
    )
    try:
        with pytest.raises(MalformedResponse, match=r"^MALFORMED_RESPONSE: polygon aggs: "):
            await collect(p, ["AAPL"], DAY1, *MARCH)
    finally:
        await p.aclose()


@pytest.mark.parametrize(
    "body", [b'{"status": "OK", "resultsCount": 0, "request_id": "r"}', b'{"status": "DELAYED", "resultsCount": 0}']
)
async def test_the_documented_empty_window_stays_empty(body: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    p = PolygonProvider(
        SECRET, config=config("http://polygon.invalid", retry=RetryPolicy(attempts=1)), transport=transport
    )
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], DAY1, *MARCH)]
        assert len(pages) == 1 and pages[0].last_page and pages[0].frame.height == 0
    finally:
        await p.aclose()


async def test_hang_times_out(polygon_sim: SimServer) -> None:
    p = PolygonProvider.from_config(
        config(polygon_sim.url, read_timeout=0.3, connect_timeout=0.3, retry=RetryPolicy(attempts=1)),
        env={KEY_VAR: "POLYKEY"},
    )
    polygon_sim.faults.set([FaultRule(kind="hang", hang_seconds=5)])
    try:
        t0 = datetime.now(UTC)
        with pytest.raises(ProviderTimeout):
            await collect(p, ["AAPL"], DAY1, *MARCH)
        assert (datetime.now(UTC) - t0).total_seconds() < 2
    finally:
        await p.aclose()


async def test_plan_quota_429_with_json_body(polygon_sim: SimServer) -> None:
    p = PolygonProvider.from_config(
        config(polygon_sim.url, retry=RetryPolicy(attempts=1)), env={KEY_VAR: "POLYDELAYED"}
    )
    polygon_sim.faults.rate_limit_per_min = 0  # every request is over the quota
    try:
        with pytest.raises(RateLimited) as info:
            await collect(p, ["AAPL"], DAY1, *MARCH)
        assert "exceeded the maximum requests" in info.value.message
    finally:
        await p.aclose()


async def test_invalid_rows_arrive_as_data(polygon: PolygonProvider, polygon_sim: SimServer) -> None:
    polygon_sim.faults.set(
        [FaultRule(kind="invalid_rows", row_kinds=["high_lt_low", "negative_volume"], row_ratio=0.1)]
    )
    frame = await collect(polygon, ["AAPL"], MIN1, *DAY)
    assert frame.height == 390
    assert (frame["high"] < frame["low"]).any() or (frame["volume"] < 0).any()


async def test_disagreements_show_through_the_adapter(
    polygon: PolygonProvider, alpaca: AlpacaProvider, polygon_sim: SimServer
) -> None:
    face: PolygonFace = polygon_sim.face
    face.price_shift_pct, face.volume_ratio, face.missing_days = 0.5, 0.025, {date(2024, 3, 6)}
    poly = await collect(polygon, ["AAPL"], DAY1, parse_time("2024-03-04"), parse_time("2024-03-08", end=True))
    alp = await collect(alpaca, ["AAPL"], DAY1, parse_time("2024-03-04"), parse_time("2024-03-08", end=True))
    assert poly.height == 4 and alp.height == 5
    joined = poly.join(alp, on="ts", suffix="_a")
    assert ((joined["close"] / joined["close_a"] - 1.005).abs() < 1e-5).all()
    assert ((joined["volume"] / joined["volume_a"] - 0.025).abs() < 1e-3).all()


# --- a 200 that says ERROR: the simulator never sends one, so a stand-in transport plays it -----


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"status":"ERROR","request_id":"r","error":"Unknown API Key"}', AuthFailed),
        (b'{"status":"ERROR","request_id":"r","error":"Invalid timespan"}', ProviderBadRequest),
        (
            b'{"status":"ERROR","request_id":"r","error":"You\'ve exceeded the maximum requests per minute"}',
            RateLimited,
        ),
        (b'{"status":"NOT_AUTHORIZED","request_id":"r","message":"You are not entitled to this data."}', NotEntitled),
        (b'{"status":"OK","results":[{"t":"soon"}]}', MalformedResponse),
    ],
)
async def test_ok_status_code_with_an_error_body(body: bytes, error: type) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    p = PolygonProvider(
        SECRET, config=config("http://polygon.invalid", retry=RetryPolicy(attempts=1)), transport=transport
    )
    try:
        with pytest.raises(error) as info:
            await collect(p, ["AAPL"], DAY1, *MARCH)
        assert SECRET not in str(info.value)
    finally:
        await p.aclose()


async def test_next_url_on_another_host_is_rebased() -> None:
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        if "cursor" in request.url.params:
            return httpx.Response(200, json={"status": "OK", "resultsCount": 0, "request_id": "b"})
        nxt = "https://api.polygon.io/v2/aggs/ticker/AAPL/range/1/day/1709269200000/1711756799999?cursor=YWJj"
        return httpx.Response(200, json={"status": "OK", "resultsCount": 0, "request_id": "a", "next_url": nxt})

    p = PolygonProvider("K", config=config("https://api.massive.com"), transport=httpx.MockTransport(answer))
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], DAY1, *MARCH)]
    finally:
        await p.aclose()
    assert len(pages) == 2 and [u.host for u in seen] == ["api.massive.com", "api.massive.com"]
    assert seen[1].params["cursor"] == "YWJj" and "limit" not in seen[1].params


# --- vendor payloads read exactly (issue 13) ---------------------------------------------------

BEFORE_SHARES = datetime(2024, 3, 5, 16, 0, tzinfo=UTC)  # a session hour while SIP quote sizes were round lots


@pytest.fixture
def lots_era(polygon_sim: SimServer, alpaca_sim: SimServer) -> Iterator[datetime]:
    """Both faces' clocks in a session before 2025-11-03, when quote sizes were round lots."""
    saved = polygon_sim.face.clock, alpaca_sim.face.clock
    polygon_sim.face.clock = alpaca_sim.face.clock = BEFORE_SHARES.timestamp
    yield BEFORE_SHARES
    polygon_sim.face.clock, alpaca_sim.face.clock = saved


async def test_round_lot_quote_sizes_become_shares(
    lots_era: datetime, polygon: PolygonProvider, alpaca: AlpacaProvider, polygon_sim: SimServer
) -> None:
    """Before 2025-11-03 the vendor's ``s``/``S`` count round lots of 100: the canonical quote is in
    shares, the same as the Alpaca face's quote of the same market."""
    async with httpx.AsyncClient(base_url=polygon_sim.url, headers={"Authorization": "Bearer POLYKEY"}) as raw:
        wire = (await raw.get("/v2/last/nbbo/AAPL")).json()["results"]
    pq, aq = (await polygon.latest_quotes(["AAPL"]))["AAPL"], (await alpaca.latest_quotes(["AAPL"]))["AAPL"]
    assert pq.ts == aq.ts and pq.ts < lots_era
    assert (pq.bid_size, pq.ask_size) == (wire["s"] * 100, wire["S"] * 100) == (aq.bid_size, aq.ask_size)
    snap = (await polygon.snapshots(["AAPL"]))["AAPL"].latest_quote
    ref = (await alpaca.snapshots(["AAPL"]))["AAPL"].latest_quote
    assert snap and ref and (snap.bid_size, snap.ask_size) == (ref.bid_size, ref.ask_size)


def test_quote_sizes_after_the_switch_are_shares() -> None:
    """Recorded-shape NBBO answers either side of the switch: lots (×100) before, shares after."""
    before = b'{"results": {"T": "AAPL", "P": 170.14, "S": 2, "p": 170.12, "s": 3, "x": 11, "X": 12, "c": [1],'
    before += b' "t": 1709758799912233000, "z": 3}, "status": "OK"}'
    after = before.replace(b"1709758799912233000", b"1764772200123456789")  # 2025-12-03
    for body, lot in ((before, 100), (after, 1)):
        w = msgspec.json.decode(body)["results"]
        q = _quote_record("AAPL", msgspec.convert(w, _WQuote), "polygon", datetime.now(UTC))
        assert (q.bid_size, q.ask_size) == (3 * lot, 2 * lot)
        assert q.conditions == ("R",)


def test_condition_codes_read_by_the_vendor_tables() -> None:
    """The reference's recorded last trade (``c: [14, 41]`` on tape 3, UTP) and the same codes on a
    CTA tape; an id no table names stays marked, is counted every time and logged once."""
    trade = {"T": "AAPL", "c": [14, 41], "i": "71675577320245", "p": 170.13, "s": 200, "x": 4, "z": 3,
             "t": 1709758799873522400}  # fmt: skip
    fetched = datetime.now(UTC)
    t = _trade_record("AAPL", msgspec.convert(trade, _WTrade), "polygon", fetched)
    assert t.conditions == ("F", "X")
    cta = _trade_record("AAPL", msgspec.convert({**trade, "z": 1, "c": [0, 41, 37]}, _WTrade), "polygon", fetched)
    assert cta.conditions == ("@", "1", "I")
    before = (
        REGISTRY.get_sample_value(
            "marketpipe_provider_unknown_codes_total", {"provider": "polygon", "table": "trade_conditions"}
        )
        or 0.0
    )
    with capture_logs() as logs:
        odd = [_trade_record("AAPL", msgspec.convert({**trade, "c": [14, 777]}, _WTrade), "polygon", fetched)
               for _ in range(3)]  # fmt: skip
    assert all(o.conditions == ("F", "polygon:777") for o in odd)
    assert [e["code"] for e in logs if e.get("event") == "unknown vendor code"] == [777]
    after = REGISTRY.get_sample_value(
        "marketpipe_provider_unknown_codes_total", {"provider": "polygon", "table": "trade_conditions"}
    )
    assert after == before + 3
    # Quote ids are a table of their own: 41 on a quote is not the trade's "Trade Thru Exempt".
    quote = {"P": 170.14, "S": 2, "p": 170.12, "s": 3, "t": 1764772200123456789, "c": [1, 41]}
    q = _quote_record("AAPL", msgspec.convert(quote, _WQuote), "polygon", fetched)
    assert q.conditions == ("R", "polygon:41")


async def test_quote_conditions_match_the_alpaca_face(polygon: PolygonProvider, alpaca: AlpacaProvider) -> None:
    pq, aq = (await polygon.latest_quotes(["AAPL"]))["AAPL"], (await alpaca.latest_quotes(["AAPL"]))["AAPL"]
    assert pq.conditions == aq.conditions == ("R",)
