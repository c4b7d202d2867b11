"""The gateway with a real Redis as L2: shared between gateway instances, and Redis going away
mid-run (answers keep coming from L1 and the store, the outage is counted, Redis is used again
once it is back)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from marketpipe.api.app import create_app
from marketpipe.core.metrics import REGISTRY
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config
from tests.cache.redis_server import RedisServer, find_redis_server

pytestmark = pytest.mark.skipif(
    find_redis_server() is None, reason="redis-server is not installed (./dev test installs it)"
)
DAY = {"start": "2024-03-05", "end": "2024-03-05"}


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


def gateway(vendor: SimServer, store: Path, redis_url: str) -> FastAPI:
    cfg = gateway_config(
        vendor.url, store, cache={"redis_url": redis_url, "redis_backoff_initial": 0.2, "redis_backoff_max": 0.5}
    )
    return create_app(cfg, env=ENV)


async def close(app: FastAPI) -> None:
    await app.state.mp.cache.aclose()
    await app.state.mp.data.aclose()


async def test_a_second_gateway_is_served_from_redis(vendor: SimServer, tmp_path: Path, redis_srv: RedisServer) -> None:
    a, b = gateway(vendor, tmp_path / "a.duckdb", redis_srv.url), gateway(vendor, tmp_path / "b.duckdb", redis_srv.url)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://a") as ca,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://b") as cb,
    ):
        first = await ca.get("/v1/bars/AAPL", params=DAY)
        assert first.headers["x-marketpipe-cache"] == "origin"
        other = await cb.get("/v1/bars/AAPL", params=DAY)
        assert other.headers["x-marketpipe-cache"] == "redis" and other.content == first.content
        assert b.state.mp.data.store.counts()["bars"] == 0  # b never needed its own store or the vendor
        again = await cb.get("/v1/bars/AAPL", params=DAY)
        assert again.headers["x-marketpipe-cache"] == "memory"  # promoted to b's L1
        ready = (await cb.get("/health/ready")).json()
        assert ready["checks"]["cache"]["redis"] == "up"
    await close(a)
    await close(b)


async def test_redis_going_away_mid_run_and_coming_back(
    vendor: SimServer, tmp_path: Path, redis_srv: RedisServer
) -> None:
    app = gateway(vendor, tmp_path / "g.duckdb", redis_srv.url)
    errors = REGISTRY.get_sample_value("marketpipe_cache_errors_total", {"tier": "redis"}) or 0.0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert (await c.get("/v1/bars/AAPL", params=DAY)).status_code == 200
        redis_srv.stop()
        # Nothing breaks: held answers from memory, new ones from the store and the vendor.
        held = await c.get("/v1/bars/AAPL", params=DAY)
        assert held.status_code == 200 and held.headers["x-marketpipe-cache"] == "memory"
        fresh = await c.get("/v1/bars/MSFT", params=DAY)
        assert fresh.status_code == 200 and len(fresh.json()["bars"]) == 390
        assert (REGISTRY.get_sample_value("marketpipe_cache_errors_total", {"tier": "redis"}) or 0.0) > errors
        # still answering (above), but not ready: a load balancer should prefer a gateway whose shared cache works
        not_ready = await c.get("/health/ready")
        down = not_ready.json()
        assert not_ready.status_code == 503 and down["ready"] is False
        assert down["checks"]["cache"]["redis"].startswith("down") and down["checks"]["store"] == "ok"
        redis_srv.restart()
        await asyncio.sleep(0.6)  # past the backoff
        back = await c.get("/v1/bars/SPY", params=DAY)
        assert back.status_code == 200
        for _ in range(20):
            if (await c.get("/health/ready")).json()["checks"]["cache"]["redis"] == "up":
                break
            await asyncio.sleep(0.1)
        assert (await c.get("/health/ready")).status_code == 200  # ready again with Redis back
        client = aioredis.from_url(redis_srv.url)
        keys = [k async for k in client.scan_iter(match="marketpipe:bars:SPY:*")]
        await client.aclose()
        assert keys, "after recovery, new answers are written to Redis again"
    await close(app)
