"""The Alpaca adapter against the simulator over real HTTP: shapes, pagination, every fault kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import polars as pl
import pytest

from marketpipe.core.config import RetryPolicy
from marketpipe.core.errors import (
    AuthFailed,
    InvalidArgument,
    MalformedResponse,
    MissingCredentials,
    PaginationLoop,
    ProviderBadRequest,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.sim.faults import FaultRule
from tests.conftest import SIM_ENV, provider_config

TF = Timeframe.parse("1Min")
DAY = (parse_time("2024-03-05"), parse_time("2024-03-05", end=True))


async def collect(p: AlpacaProvider, symbols: list[str], start: datetime, end: datetime, **kw: object) -> pl.DataFrame:
    frames = [page.frame async for page in p.iter_bars(symbols, kw.pop("tf", TF), start, end, **kw)]  # type: ignore[arg-type]
    return pl.concat(frames) if frames else pl.DataFrame(schema=BAR_SCHEMA)


async def test_bars_multi_symbol_pages_and_schema(alpaca: AlpacaProvider) -> None:
    pages = [p async for p in alpaca.iter_bars(["AAPL", "MSFT"], TF, *DAY, limit=500)]
    frame = pl.concat([p.frame for p in pages])
    assert len(pages) == 2 * 390 // 500 + 1  # limit counts rows across symbols
    assert frame.drop("raw_ts").schema == pl.Schema(BAR_SCHEMA)
    assert frame.group_by("symbol").len().sort("symbol").rows() == [("AAPL", 390), ("MSFT", 390)]
    assert frame["source"].unique().to_list() == ["sim:alpaca"]  # simulator data is labelled as such
    assert frame["ts"].min() == datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    assert pages[-1].last_page and pages[-1].next_page_token is None
    assert not pages[0].last_page


async def test_single_symbol_endpoint_matches_multi(alpaca: AlpacaProvider) -> None:
    single = await collect(alpaca, ["AAPL"], *DAY)
    multi = await collect(alpaca, ["AAPL", "MSFT"], *DAY)
    assert single.drop("fetched_at").equals(multi.filter(pl.col("symbol") == "AAPL").drop("fetched_at"))


async def test_complete_through_tracks_symbol_boundaries(alpaca: AlpacaProvider) -> None:
    pages = [p async for p in alpaca.iter_bars(["AAPL", "MSFT"], TF, *DAY, limit=500)]
    first = pages[0].complete_through
    # page 1 holds all 390 AAPL bars and stops 110 bars into MSFT
    assert first["AAPL"] == DAY[1]
    msft = pages[0].frame.filter(pl.col("symbol") == "MSFT")
    assert msft.height == 110
    assert first["MSFT"] == msft["ts"].max() + timedelta(microseconds=1)
    assert pages[-1].complete_through == {"AAPL": DAY[1], "MSFT": DAY[1]}


async def test_half_open_range_end_is_exclusive(alpaca: AlpacaProvider) -> None:
    s = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    frame = await collect(alpaca, ["AAPL"], s, s + timedelta(minutes=10))
    assert frame.height == 10
    assert frame["ts"].max() == s + timedelta(minutes=9)


async def test_unknown_symbol_is_empty_not_an_error(alpaca: AlpacaProvider) -> None:
    assert (await collect(alpaca, ["ZZZZ"], *DAY)).height == 0
    frame = await collect(alpaca, ["AAPL", "ZZZZ"], *DAY)
    assert frame["symbol"].unique().to_list() == ["AAPL"]


async def test_daily_bars_and_trades_and_quotes(alpaca: AlpacaProvider) -> None:
    daily = await collect(
        alpaca, ["AAPL"], parse_time("2024-03-04"), parse_time("2024-03-08", end=True), tf=Timeframe.parse("1Day")
    )
    assert daily.height == 5
    assert daily["ts"][0] == datetime(2024, 3, 4, 5, tzinfo=UTC)
    s = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
    trades = pl.concat([p.frame async for p in alpaca.iter_trades(["AAPL"], s, s + timedelta(minutes=1))])
    minute = (await collect(alpaca, ["AAPL"], s, s + timedelta(minutes=1))).row(0, named=True)
    assert trades["price"].max() == minute["high"] and trades["price"].min() == minute["low"]
    assert trades["size"].sum() == minute["volume"]
    quotes = pl.concat([p.frame async for p in alpaca.iter_quotes(["AAPL", "MSFT"], s, s + timedelta(minutes=1))])
    assert quotes.height > 0 and (quotes["bid_price"] < quotes["ask_price"]).all()


async def test_latest_and_snapshots(alpaca: AlpacaProvider) -> None:
    trades = await alpaca.latest_trades(["AAPL", "MSFT", "ZZZZ"])
    assert set(trades) == {"AAPL", "MSFT"}
    assert trades["AAPL"].price > 0 and trades["AAPL"].source == "sim:alpaca"
    quotes = await alpaca.latest_quotes(["AAPL"])
    assert quotes["AAPL"].bid_price < quotes["AAPL"].ask_price
    assert quotes["AAPL"].spread and quotes["AAPL"].mid
    assert (await alpaca.latest_quote("AAPL")) is not None
    assert (await alpaca.latest_trade("MSFT")) is not None
    bars = await alpaca.latest_bars(["AAPL"])
    assert bars["AAPL"].timeframe == "1Min"
    snaps = await alpaca.snapshots(["AAPL", "MSFT"])
    snap = snaps["AAPL"]
    assert snap.latest_trade and snap.latest_quote and snap.minute_bar and snap.daily_bar and snap.prev_daily_bar
    assert snap.prev_daily_bar.ts < snap.daily_bar.ts


# --- errors ------------------------------------------------------------------------------------


async def test_wrong_keys_are_auth_failed_and_never_echoed(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(
        provider_config(sim.url), env={"ALPACA_API_KEY": "NOPE", "ALPACA_SECRET_KEY": "WRONGSECRET"}
    )
    try:
        with pytest.raises(AuthFailed) as info:
            await collect(p, ["AAPL"], *DAY)
        assert "WRONGSECRET" not in str(info.value) and "WRONGSECRET" not in str(info.value.details)
    finally:
        await p.aclose()


def test_missing_keys() -> None:
    with pytest.raises(MissingCredentials):
        AlpacaProvider.from_config(AlpacaConfig(), env={})


async def test_invalid_arguments_never_reach_the_wire(alpaca: AlpacaProvider) -> None:
    with pytest.raises(InvalidArgument):
        await collect(alpaca, ["AAPL"], *DAY, feed="nasdaq")
    with pytest.raises(InvalidArgument):
        await collect(alpaca, ["AAPL"], DAY[1], DAY[0])
    with pytest.raises(InvalidArgument):
        await collect(alpaca, ["AAPL"], *DAY, adjustment="magic")
    assert alpaca.requests == 0


async def test_vendor_rejection_keeps_vendor_message(alpaca: AlpacaProvider) -> None:
    # 7Month is valid grammar for nobody; we bypass our own parser to see the vendor's answer
    from marketpipe.core.timeframe import Unit

    with pytest.raises((ProviderBadRequest, InvalidArgument)) as info:
        await collect(alpaca, ["AAPL"], *DAY, tf=Timeframe(7, Unit.MONTH))
    assert "timeframe" in str(info.value).lower()


async def test_free_plan_clamps_recent_sip(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(
        provider_config(sim.url, plan="free"), env={"ALPACA_API_KEY": "FREEKEY", "ALPACA_SECRET_KEY": "FREESECRET"}
    )
    now = datetime.now(UTC)
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], TF, now - timedelta(days=7), now)]
        assert pages[-1].feed == "sip"
        assert pages[-1].end <= now - timedelta(minutes=15) + timedelta(seconds=5)
    finally:
        await p.aclose()


async def test_plan_misconfigured_as_unlimited_recovers_from_403(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(
        provider_config(sim.url, plan="unlimited"), env={"ALPACA_API_KEY": "FREEKEY", "ALPACA_SECRET_KEY": "FREESECRET"}
    )
    now = datetime.now(UTC)
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"], TF, now - timedelta(days=3), now)]
        assert pages[-1].end <= now - timedelta(minutes=15) + timedelta(seconds=5)
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
    ],
)
async def test_persistent_faults_give_typed_errors_after_retries(sim, kind: str, error: type) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    sim.faults.set([FaultRule(kind=kind)])
    try:
        with pytest.raises(error):
            await collect(p, ["AAPL"], *DAY)
        assert p.requests + 0 >= 0
        assert p.resilience.retries == 2  # attempts=3
    finally:
        await p.aclose()


@pytest.mark.parametrize("kind", ["http_500", "http_503", "reset", "truncated_json", "html_200"])
async def test_transient_faults_are_retried_transparently(sim, kind: str) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    sim.faults.set([FaultRule(kind=kind, times=1)])
    try:
        frame = await collect(p, ["AAPL", "MSFT"], *DAY, limit=300)
        assert frame.height == 780
        assert p.resilience.retries == 1
    finally:
        await p.aclose()


def errors_counted(code: str) -> float:
    return REGISTRY.get_sample_value("marketpipe_provider_errors_total", {"provider": "alpaca", "code": code}) or 0.0


@pytest.mark.parametrize("kind", ["empty_json", "null_page"])
@pytest.mark.parametrize(
    ("symbols", "endpoint", "missing"),
    [
        (["AAPL"], "bars_single", "symbol, next_page_token"),
        (["AAPL", "MSFT"], "bars", "next_page_token"),
    ],
)
async def test_a_page_without_the_envelope_is_malformed_never_empty(  # type: ignore[no-untyped-def]
    sim, kind: str, symbols: list[str], endpoint: str, missing: str
) -> None:
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    sim.faults.set([FaultRule(kind=kind)])  # type: ignore[arg-type]
    before = errors_counted("MALFORMED_RESPONSE")
    try:
        with pytest.raises(MalformedResponse) as info:
            await collect(p, symbols, *DAY)
        assert info.value.code == "MALFORMED_RESPONSE" and type(info.value) is MalformedResponse
        assert f"alpaca {endpoint}:" in info.value.message and missing in info.value.message
        assert info.value.details["endpoint"] == endpoint
        assert p.resilience.retries == 2 and p.requests == 3  # retried like a truncated body, then raised
        assert errors_counted("MALFORMED_RESPONSE") - before == 3  # every malformed answer is counted
    finally:
        await p.aclose()


@pytest.mark.parametrize("kind", ["empty_json", "null_page"])
async def test_a_single_empty_answer_is_retried_transparently(sim, kind: str) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    sim.faults.set([FaultRule(kind=kind, times=1, after=1)])  # type: ignore[arg-type]
    try:
        frame = await collect(p, ["AAPL", "MSFT"], *DAY, limit=300)  # the second page comes back as {}
        assert frame.height == 780 and p.resilience.retries == 1
    finally:
        await p.aclose()


async def test_null_trades_page_is_malformed(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url, retry=RetryPolicy(attempts=1)), env=SIM_ENV)
    sim.faults.set([FaultRule(kind="null_page")])
    try:
        with pytest.raises(MalformedResponse, match=r"alpaca trades_single: .*symbol, next_page_token"):
            async for _ in p.iter_trades(["AAPL"], DAY[0], DAY[0] + timedelta(hours=15)):
                pass
    finally:
        await p.aclose()


@pytest.mark.parametrize(
    ("single", "body", "missing"),
    [
        (False, b"{}", ["bars", "next_page_token"]),
        (False, b'{"bars": null}', ["next_page_token"]),
        (False, b'{"bars": {"AAPL": []}}', ["next_page_token"]),
        (False, b'{"next_page_token": null}', ["bars"]),
        (False, b"[]", ["bars", "next_page_token"]),
        (False, b"null", ["bars", "next_page_token"]),
        (False, b'"bars"', ["bars", "next_page_token"]),
        (True, b'{"bars": [], "next_page_token": null}', ["symbol"]),
        (True, b'{"bars": null}', ["symbol", "next_page_token"]),
        (True, b"[]", ["bars", "symbol", "next_page_token"]),
    ],
)
async def test_bodies_without_the_vendor_keys(single: bool, body: bytes, missing: list[str]) -> None:
    # Shapes the simulator has no fault for ([], a bare string): a stand-in transport plays them.
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    cfg = AlpacaConfig(priority=1, base_url="http://alpaca.invalid", retry=RetryPolicy(attempts=1))
    p = AlpacaProvider("KEY-8f3a91aa", "SECRET-8f3a91aa", config=cfg, transport=transport)
    try:
        with pytest.raises(MalformedResponse) as info:
            await collect(p, ["AAPL"] if single else ["AAPL", "MSFT"], *DAY)
        assert info.value.details["missing"] == missing
        assert ("bars_single" if single else "bars:") in info.value.message
    finally:
        await p.aclose()


@pytest.mark.parametrize(
    ("single", "body"),
    [
        (False, b'{"bars": {}, "next_page_token": null}'),
        (False, b'{"bars": null, "next_page_token": null, "currency": "USD"}'),
        (True, b'{"bars": null, "symbol": "AAPL", "next_page_token": null}'),
    ],
)
async def test_the_documented_empty_pages_stay_empty(single: bool, body: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    cfg = AlpacaConfig(priority=1, base_url="http://alpaca.invalid", retry=RetryPolicy(attempts=1))
    p = AlpacaProvider("KEY-8f3a91aa", "SECRET-8f3a91aa", config=cfg, transport=transport)
    try:
        pages = [pg async for pg in p.iter_bars(["AAPL"] if single else ["AAPL", "MSFT"], TF, *DAY)]
        assert len(pages) == 1 and pages[0].last_page and pages[0].frame.height == 0
    finally:
        await p.aclose()


@pytest.mark.parametrize("symbols", [["AAPL"], ["AAPL", "MSFT"]])
@pytest.mark.parametrize("limit", [300, 10_000])
async def test_token_loop_ends_with_pagination_loop(sim, symbols: list[str], limit: int) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    sim.faults.set([FaultRule(kind="token_loop")])
    before = errors_counted("PAGINATION_LOOP")
    pages = []
    try:
        with pytest.raises(PaginationLoop) as info:
            async for page in p.iter_bars(symbols, TF, *DAY, limit=limit):
                pages.append(page)
        exc = info.value
        assert isinstance(exc, MalformedResponse) and exc.code == "PAGINATION_LOOP" and not exc.retryable
        endpoint = "bars_single" if len(symbols) == 1 else "bars"
        assert exc.details == {"provider": "alpaca", "endpoint": endpoint, "page": 2}
        assert f"alpaca {endpoint}: page 2 repeats" in exc.message
        assert p.requests == 2 and len(pages) == 1  # the repeating page is not handed on
        assert errors_counted("PAGINATION_LOOP") - before == 1
    finally:
        await p.aclose()


async def test_a_page_token_given_by_the_caller_that_comes_back_is_a_loop(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    pages = [pg async for pg in p.iter_bars(["AAPL"], TF, *DAY, limit=100)]
    first = pages[0]
    sim.faults.set([FaultRule(kind="token_loop")])
    try:
        with pytest.raises(PaginationLoop, match="page 1 repeats"):
            async for _ in p.iter_bars(["AAPL"], TF, *DAY, limit=100, page_token=first.next_page_token):
                pass
    finally:
        await p.aclose()


async def test_latest_values_need_their_key_but_snapshots_may_be_empty(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url, retry=RetryPolicy(attempts=1)), env=SIM_ENV)
    try:
        assert (await p.latest_trades(["AAPL"]))["AAPL"].price > 0
        sim.faults.set([FaultRule(kind="empty_json")])
        for call, endpoint in (
            (p.latest_trades(["AAPL"]), "latest_trades"),
            (p.latest_quotes(["AAPL"]), "latest_quotes"),
            (p.latest_bars(["AAPL"]), "latest_bars"),
            (p.latest_trade("AAPL"), "latest_trade_single"),
            (p.latest_quote("AAPL"), "latest_quote_single"),
        ):
            with pytest.raises(MalformedResponse) as info:
                await call
            assert info.value.details["endpoint"] == endpoint and f"alpaca {endpoint}:" in info.value.message
        assert await p.snapshots(["AAPL"]) == {}  # no wrapper key: {} is "nothing known", as the vendor says
    finally:
        await p.aclose()


async def test_hang_times_out(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(
        provider_config(sim.url, read_timeout=0.3, connect_timeout=0.3, retry=RetryPolicy(attempts=1)), env=SIM_ENV
    )
    sim.faults.set([FaultRule(kind="hang", hang_seconds=5)])
    try:
        t0 = datetime.now(UTC)
        with pytest.raises(ProviderTimeout):
            await collect(p, ["AAPL"], *DAY)
        assert (datetime.now(UTC) - t0).total_seconds() < 2
    finally:
        await p.aclose()


async def test_rate_limit_429_is_retried_after_reset(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url, retry=RetryPolicy(attempts=2)), env=SIM_ENV)
    sim.faults.set([FaultRule(kind="rate_limit", times=1)])
    try:
        frame = await collect(p, ["AAPL"], *DAY)
        assert frame.height == 390
    finally:
        await p.aclose()


async def test_rate_limit_storm_surfaces_rate_limited(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(
        provider_config(sim.url, retry=RetryPolicy(attempts=2, max_retry_after_seconds=0.0)), env=SIM_ENV
    )
    sim.faults.set([FaultRule(kind="rate_limit")])
    try:
        with pytest.raises(RateLimited) as info:
            await collect(p, ["AAPL"], *DAY)
        assert info.value.code == "RATE_LIMITED"
    finally:
        await p.aclose()


async def test_invalid_rows_arrive_as_data_for_the_checks(sim) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    sim.faults.set([FaultRule(kind="invalid_rows", row_kinds=["high_lt_low", "negative_volume"], row_ratio=0.1)])
    try:
        frame = await collect(p, ["AAPL"], *DAY)
        assert (frame["high"] < frame["low"]).any() or (frame["volume"] < 0).any()
    finally:
        await p.aclose()


async def test_quote_sizes_are_shares_on_both_sides_of_the_2025_11_03_change(alpaca: AlpacaProvider, sim) -> None:  # type: ignore[no-untyped-def]
    import httpx

    def wire(day: str) -> list[int]:
        r = httpx.get(
            sim.url + "/v2/stocks/AAPL/quotes",
            params={"start": f"{day}T15:00:00Z", "end": f"{day}T15:01:00Z", "limit": 5},
            headers={"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"},
        )
        return [q["bs"] for q in r.json()["quotes"]]

    for day, factor in (("2025-10-31", 100), ("2025-11-03", 1)):
        start = parse_time(f"{day}T15:00:00Z")
        frame = pl.concat(
            [p.frame async for p in alpaca.iter_quotes(["AAPL"], start, start + timedelta(minutes=1), limit=5)]
        )
        assert frame["bid_size"].head(5).to_list() == [b * factor for b in wire(day)]
