"""/v1/bars for crypto pairs goes through the store like stocks: the first call fetches and stores what
the ledger lacks, a second call for the held range asks the vendor nothing and returns the vendor's
fractional volumes exactly; the cache's TTLs follow the 24/7 calendar (a pair's market never closes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from marketpipe.api.app import create_app
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config
from tests.crypto.test_store import SAT, _asked


@pytest.fixture
async def gw(sim: SimServer, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # ranges reaching into the current session are never cached while the market is open
    cfg = gateway_config(sim.url, tmp_path / "gw.duckdb", cache={"bars_open_ttl": 0, "bars_closed_ttl": 3600})
    app = create_app(cfg, env=ENV)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as c:
        yield c
    await app.state.mp.cache.aclose()
    await app.state.mp.data.aclose()


async def test_a_held_pair_range_is_read_from_the_store_with_exact_fractional_volumes(
    gw: httpx.AsyncClient, sim: SimServer
) -> None:
    params = {"timeframe": "1Min", "start": SAT.isoformat(), "end": (SAT + timedelta(hours=3)).isoformat()}
    params["limit"] = "10000"
    sim.reset_stats()
    first = await gw.get("/v1/bars/BTC%2FUSD", params=params)
    assert first.status_code == 200, first.text
    assert _asked(sim) >= 1  # not held yet: fetched from the vendor and stored
    bars = first.json()["bars"]
    assert len(bars) == 180 and all(isinstance(b["volume"], float) for b in bars)
    assert any(b["volume"] != round(b["volume"]) for b in bars)  # fractions of a coin

    q = await gw.get("/v1/quality/BTC%2FUSD", params={k: params[k] for k in ("timeframe", "start", "end")})
    assert q.status_code == 200, q.text
    summary = q.json()["summary"]  # scored on the 24/7 calendar: every minute of a Saturday expected
    assert (summary["expected"], summary["present"], summary["score"]) == (180, 180, 1.0)
    sim.reset_stats()
    again = await gw.get("/v1/bars/BTC%2FUSD", params={**params, "sort": "desc"})  # another cache key
    assert again.status_code == 200 and again.headers["x-marketpipe-cache"] == "origin"
    assert _asked(sim) == 0  # held by the ledger: the store answered
    assert [b["volume"] for b in reversed(again.json()["bars"])] == [b["volume"] for b in bars]

    # the volumes are the vendor's exactly (the Alpaca-compatible pass-through asks the vendor)
    raw = await gw.get(
        "/v1beta3/crypto/us/bars",
        params={"symbols": "BTC/USD", "timeframe": "1Min", "start": params["start"], "end": params["end"]},
    )
    vendor = raw.json()["bars"]["BTC/USD"]
    assert [b["v"] for b in vendor[:180]] == [b["volume"] for b in bars]
    held = await gw.get("/v1/bars/BTC%2FUSD", params={**params, "source": "alpaca", "feed": "us", "limit": "5"})
    assert held.status_code == 200 and len(held.json()["bars"]) == 5
    refused = await gw.get("/v1/bars/BTC%2FUSD", params={**params, "source": "polygon"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_ARGUMENT"
    mars = await gw.get("/v1/bars/BTC%2FUSD", params={**params, "feed": "mars"})
    assert mars.status_code == 400 and mars.json()["error"]["code"] == "INVALID_ARGUMENT"
    split = await gw.get("/v1/bars/BTC/USD", params={**params, "adjustment": "split"})  # the slash as is, too
    assert split.status_code == 400 and "no corporate actions" in split.json()["error"]["message"]


async def test_pair_bars_cache_follows_the_24_7_calendar(gw: httpx.AsyncClient) -> None:
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    # a range ending at the last UTC midnight is closed history for a pair: kept (history TTL)
    closed = {"timeframe": "1Hour", "start": (today - timedelta(hours=6)).isoformat(), "end": today.isoformat()}
    assert (await gw.get("/v1/bars/ETH%2FUSD", params=closed)).headers["x-marketpipe-cache"] == "origin"
    assert (await gw.get("/v1/bars/ETH%2FUSD", params=closed)).headers["x-marketpipe-cache"] == "memory"
    # a range reaching now: the pair's market is open at any hour, so the open TTL (0: not kept) applies,
    # whatever the NYSE's hours (the stocks' closed TTL would keep it an hour)
    start = (now - timedelta(minutes=30)).replace(second=0, microsecond=0)
    live = {"timeframe": "1Min", "start": start.isoformat()}
    first = await gw.get("/v1/bars/ETH%2FUSD", params=live)
    assert first.status_code == 200 and first.json()["bars"]
    assert (await gw.get("/v1/bars/ETH%2FUSD", params=live)).headers["x-marketpipe-cache"] == "origin"
