"""REST v1 against the gateway app in-process, the vendor played by the simulator over real HTTP."""

from __future__ import annotations

import asyncio
import io
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest

from marketpipe.api.app import create_app
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.timeutil import ns_to_dt
from marketpipe.service.quality import analyze
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.wire.alpaca_rest import one_ts_ns
from tests.api.conftest import ENV, gateway_config

DAY = {"start": "2024-03-05", "end": "2024-03-05"}


async def test_bars_json_with_attribution_then_served_from_memory(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/bars/aapl", params=DAY)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["symbol"] == "AAPL" and doc["timeframe"] == "1Min" and doc["next_page_token"] is None
    assert len(doc["bars"]) == 390
    first = doc["bars"][0]
    assert first["timestamp"] == "2024-03-05T14:30:00Z" and first["source"] == "sim:alpaca"
    assert set(first) >= {"open", "high", "low", "close", "volume", "trade_count", "vwap", "feed", "fetched_at"}
    meta = doc["meta"]
    assert meta["source"] == "sim:alpaca" and meta["stale"] is False and meta["data_age_seconds"] > 0
    assert meta["quality_score"] == 1.0 and r.headers["x-marketpipe-quality-score"] == "1.0000"
    assert r.headers["x-marketpipe-source"] == "sim:alpaca" and r.headers["x-marketpipe-cache"] == "origin"
    assert r.headers["x-request-id"]
    again = await client.get("/v1/bars/AAPL", params=DAY)
    assert again.headers["x-marketpipe-cache"] == "memory" and again.json()["bars"] == doc["bars"]


async def test_a_cold_miss_is_scored_on_the_page_as_the_store_would_score_it(
    app, client: httpx.AsyncClient, vendor: SimServer
) -> None:  # type: ignore[no-untyped-def]
    """The gateway scores a page it just fetched on the bars it read for the answer (no second store
    read) and does not look up day scores stored before the fetch: the score must still be exactly
    what an analysis of the store gives, and be stored."""
    vendor.faults.set(
        [
            FaultRule(kind="bad_data", defect="drop", row_ratio=0.05, symbols=["IBM"]),
            FaultRule(kind="bad_data", defect="spike", at=["2024-03-05T15:00:00Z"], symbols=["IBM"]),
        ]
    )
    r = await client.get("/v1/bars/IBM", params=DAY)
    assert r.status_code == 200, r.text
    doc = r.json()
    score = doc["meta"]["quality_score"]
    assert 0 < score < 1 and 300 < len(doc["bars"]) < 390
    data = app.state.mp.data
    first, last = doc["bars"][0]["timestamp"], doc["bars"][-1]["timestamp"]
    lo, hi = datetime.fromisoformat(first), datetime.fromisoformat(last)
    (fresh,) = analyze(
        data.store, data.calendar, ["IBM"], "1Min", lo, hi + timedelta(minutes=1), data.config.quality, save=False
    )
    assert score == round(fresh.summary["score"], 4)
    stored = data.store.scores("IBM", "1Min")
    assert stored.height == 1 and stored["score"][0] == pytest.approx(fresh.summary["score"])


@pytest.mark.parametrize(
    ("how", "media"),
    [
        ({"format": "csv"}, "text/csv"),
        ({"format": "arrow"}, "application/vnd.apache.arrow.stream"),
        ({"format": "parquet"}, "application/vnd.apache.parquet"),
        ({"accept": "application/vnd.apache.arrow.stream"}, "application/vnd.apache.arrow.stream"),
        ({"accept": "text/csv"}, "text/csv"),
    ],
)
async def test_bars_formats(client: httpx.AsyncClient, how: dict[str, str], media: str) -> None:
    headers = {"Accept": how["accept"]} if "accept" in how else {}
    params = {**DAY, **({"format": how["format"]} if "format" in how else {})}
    r = await client.get("/v1/bars/MSFT", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(media)
    if media == "text/csv":
        frame = pl.read_csv(io.BytesIO(r.content))
    elif "arrow" in media:
        frame = pl.read_ipc_stream(io.BytesIO(r.content))
    else:
        frame = pl.read_parquet(io.BytesIO(r.content))
    assert frame.height == 390 and frame["symbol"].unique().to_list() == ["MSFT"]
    assert frame["source"].unique().to_list() == ["sim:alpaca"]
    assert r.headers["x-marketpipe-source"] == "sim:alpaca"


async def test_timeframe_aliases_name_the_canonical_timeframe(client: httpx.AsyncClient) -> None:
    """Issue 13 item 10: ``1m``/``5m``/``1h``/``1d`` were INVALID_TIMEFRAME; they are the canonical timeframes."""
    for alias, canonical, count in (("1m", "1Min", 390), ("5m", "5Min", 78), ("1h", "1Hour", 7), ("1d", "1Day", 1)):
        r = await client.get("/v1/bars/AAPL", params={**DAY, "timeframe": alias})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["timeframe"] == canonical and len(doc["bars"]) == count, (alias, doc["timeframe"], len(doc["bars"]))


async def test_multi_symbol_pages_cover_everything_once(client: httpx.AsyncClient) -> None:
    full = (await client.get("/v1/bars", params={"symbols": "AAPL,MSFT,SPY", **DAY})).json()
    assert [len(v) for v in full["bars"].values()] == [390, 390, 390]
    got: dict[str, list[dict[str, object]]] = {}
    token, pages = None, 0
    while True:
        params = {"symbols": "AAPL,MSFT,SPY", **DAY, "limit": 500, **({"page_token": token} if token else {})}
        doc = (await client.get("/v1/bars", params=params)).json()
        pages += 1
        for sym, rows in doc["bars"].items():
            got.setdefault(sym, []).extend(rows)
        token = doc["next_page_token"]
        if token is None:
            break
    assert pages == 3 and got == full["bars"]


async def test_concurrent_identical_misses_make_one_upstream_call(app, client: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    rs = await asyncio.gather(*(client.get("/v1/bars/SPY", params=DAY) for _ in range(20)))
    assert {r.status_code for r in rs} == {200}
    assert len({r.content for r in rs}) == 1  # every waiter got the one load's answer
    assert app.state.mp.data.store.ingest_log().height == 1  # one vendor page for all twenty


async def test_latest_quote_view(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/quotes/AAPL/latest")
    assert r.status_code == 200, r.text
    q = r.json()
    assert q["symbol"] == "AAPL" and q["ask"] > q["bid"] > 0
    assert q["spread"] == pytest.approx(q["ask"] - q["bid"]) and q["mid"] == pytest.approx((q["ask"] + q["bid"]) / 2)
    assert isinstance(q["is_market_hours"], bool) and q["data_age_seconds"] >= 0
    assert q["source"] == "sim:alpaca" and 0 <= q["quality_score"] <= 1 and q["stale"] is False
    t = (await client.get("/v1/trades/AAPL/latest")).json()
    assert t["price"] > 0 and t["size"] > 0 and t["source"] == "sim:alpaca"
    snaps = (await client.get("/v1/snapshots", params={"symbols": "AAPL,MSFT"})).json()
    assert set(snaps["snapshots"]) == {"AAPL", "MSFT"} and snaps["missing"] == []
    assert snaps["snapshots"]["AAPL"]["daily_bar"]["close"] > 0


@pytest.mark.parametrize(
    ("url", "params", "code", "param"),
    [
        ("/v1/bars/AAPL", {**DAY, "timeframe": "7Day"}, "INVALID_TIMEFRAME", None),
        ("/v1/bars/AAPL", {"start": "2024-03-06", "end": "2024-03-05"}, "INVALID_RANGE", None),
        ("/v1/bars/AAPL", {"start": "yesterday-ish"}, "INVALID_ARGUMENT", None),
        ("/v1/bars/AAPL", {**DAY, "limit": 0}, "INVALID_ARGUMENT", "limit"),
        ("/v1/bars/AAPL", {**DAY, "format": "xml"}, "INVALID_ARGUMENT", "format"),
        ("/v1/bars/AAPL", {**DAY, "source": "bloomberg"}, "INVALID_ARGUMENT", "source"),
        ("/v1/bars/AAPL", {**DAY, "adjustment": "both"}, "INVALID_ARGUMENT", "adjustment"),
        ("/v1/bars/AAPL", {**DAY, "page_token": "!!!"}, "INVALID_ARGUMENT", "page_token"),
        ("/v1/bars/$$$", DAY, "INVALID_SYMBOL", None),
        ("/v1/bars", {"symbols": ",", **DAY}, "INVALID_SYMBOL", None),
        ("/v1/bars/AAPL", {}, "INVALID_ARGUMENT", "start"),
    ],
)
async def test_bad_input_is_a_structured_400(
    client: httpx.AsyncClient, url: str, params: dict[str, object], code: str, param: str | None
) -> None:
    r = await client.get(url, params=params)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["request_id"] == r.headers["x-request-id"]
    if param:
        assert err["details"]["parameter"] == param


async def test_unknown_route_is_a_structured_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


async def test_upstream_down_503_with_retry_after_or_stale_when_cached(vendor: SimServer, tmp_path: Path) -> None:
    cfg = gateway_config(vendor.url, tmp_path / "s.duckdb", cache={"latest_open_ttl": 0.2, "latest_closed_ttl": 0.2})
    app = create_app(cfg, env=ENV)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        vendor.faults.set([FaultRule(kind="http_503")])
        r = await c.get("/v1/quotes/MSFT/latest")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "ALL_PROVIDERS_FAILED"
        vendor.faults.clear()
        ok = await c.get("/v1/quotes/MSFT/latest")
        assert ok.status_code == 200 and "x-marketpipe-stale" not in ok.headers
        await asyncio.sleep(0.3)  # past the TTL: the next answer must come from upstream, which is down
        vendor.faults.set([FaultRule(kind="http_503")])
        stale = await c.get("/v1/quotes/MSFT/latest")
        assert stale.status_code == 200 and stale.headers["x-marketpipe-stale"] == "true"
        assert stale.json()["stale"] is True and stale.json()["bid"] == ok.json()["bid"]
        assert float(stale.headers["x-marketpipe-data-age"]) >= float(ok.headers["x-marketpipe-data-age"])
    await app.state.mp.cache.aclose()
    await app.state.mp.data.aclose()


async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json()["status"] == "ok"
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["store"] == "ok"
    ds = (await client.get("/health/datasource")).json()
    assert ds["active"] == "alpaca" and ds["order"] == ["alpaca"] and ds["pinned"] is None
    assert (await client.get("/health/providers")).status_code == 200
    stocks = (await client.get("/health/stocks")).json()
    assert stocks["ready"] is True and "datasource" in stocks and isinstance(stocks["market_open"], bool)


async def test_admin_needs_the_bearer_token(client: httpx.AsyncClient) -> None:
    assert (await client.post("/admin/reconnect")).status_code == 401
    wrong = await client.post("/admin/reconnect", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "FORBIDDEN"
    auth = {"Authorization": "Bearer admintoken"}
    assert (await client.post("/admin/reconnect", headers=auth)).status_code == 200
    pinned = await client.post("/admin/failover", headers=auth, json={"provider": "alpaca"})
    assert pinned.json()["pinned"] == "alpaca"
    bad = await client.post("/admin/failover", headers=auth, json={"provider": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["parameter"] == "provider"
    await client.get("/v1/bars/AAPL", params=DAY)
    inv = await client.post("/admin/cache/invalidate", headers=auth, json={"symbol": "aapl", "kind": "bars"})
    assert inv.status_code == 200 and inv.json()["invalidated"] >= 1
    after = await client.get("/v1/bars/AAPL", params=DAY)
    assert after.headers["x-marketpipe-cache"] == "origin"  # from the store again, not the cache


async def test_metrics_endpoint(client: httpx.AsyncClient) -> None:
    await client.get("/v1/bars/AAPL", params=DAY)
    text = (await client.get("/metrics")).text
    for name in (
        "marketpipe_http_requests_total",
        "marketpipe_http_request_seconds_bucket",
        "marketpipe_provider_requests_total",
        "marketpipe_cache_requests_total",
    ):
        assert name in text
    assert REGISTRY.get_sample_value(
        "marketpipe_http_requests_total", {"method": "GET", "route": "/v1/bars/{symbol:path}", "status": "200"}
    )


async def test_quality_endpoint(client: httpx.AsyncClient) -> None:
    await client.get("/v1/bars/AAPL", params=DAY)
    q = (await client.get("/v1/quality/AAPL", params=DAY)).json()
    assert q["summary"]["completeness"] == 1.0 and q["summary"]["score"] == 1.0 and q["missing"] == []
    bars = await client.get("/v1/bars/AAPL", params={**DAY, "format": "csv"})
    # The score now stored is reported with later answers (the CSV was cached before? then origin again)
    assert bars.status_code == 200


async def test_client_keys_and_per_key_rate_limits(vendor: SimServer, tmp_path: Path) -> None:
    cfg = gateway_config(vendor.url, tmp_path / "k.duckdb", server={"client_rate_limit_per_min": 3})
    app = create_app(cfg, env={**ENV, "MARKETPIPE_API_KEYS": "alice:s3cret,bob:hunter2"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert (await c.get("/v1/quotes/AAPL/latest")).status_code == 401
        assert (await c.get("/v1/quotes/AAPL/latest", headers={"X-API-Key": "wrong"})).status_code == 403
        ok = [await c.get("/v1/quotes/AAPL/latest", headers={"Authorization": "Bearer s3cret"}) for _ in range(3)]
        assert [r.status_code for r in ok] == [200, 200, 200]
        assert ok[-1].headers["x-ratelimit-limit"] == "3" and ok[-1].headers["x-ratelimit-remaining"] == "0"
        limited = await c.get("/v1/quotes/AAPL/latest", headers={"Authorization": "Bearer s3cret"})
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "RATE_LIMITED"
        assert int(limited.headers["retry-after"]) >= 1 and limited.headers["x-ratelimit-remaining"] == "0"
        other = await c.get("/v1/quotes/AAPL/latest", headers={"X-API-Key": "hunter2"})
        assert other.status_code == 200  # each key has its own bucket
        assert (await c.get("/health")).status_code == 200  # health needs no key
    await app.state.mp.cache.aclose()
    await app.state.mp.data.aclose()


async def test_latest_views_carry_the_vendors_nanoseconds(client: httpx.AsyncClient, vendor: SimServer) -> None:
    """``timestamp`` stays as it was; ``timestamp_ns`` is the vendor's instant to the nanosecond."""
    auth = {"APCA-API-KEY-ID": ENV["ALPACA_API_KEY"], "APCA-API-SECRET-KEY": ENV["ALPACA_SECRET_KEY"]}
    async with httpx.AsyncClient(base_url=vendor.url, headers=auth) as sim:
        for kind in ("trades", "quotes"):
            before = (await sim.get(f"/v2/stocks/AAPL/{kind}/latest")).json()[kind[:-1]]
            view = (await client.get(f"/v1/{kind}/AAPL/latest")).json()
            after = (await sim.get(f"/v2/stocks/AAPL/{kind}/latest")).json()[kind[:-1]]
            assert datetime.fromisoformat(view["timestamp"]) == ns_to_dt(view["timestamp_ns"])
            if before == after:  # the market did not move meanwhile
                assert view["timestamp_ns"] == one_ts_ns(before["t"]), kind
