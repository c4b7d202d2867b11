"""Redis going away mid-run: the gateway keeps serving from L1 and picks Redis up again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis
from structlog.testing import capture_logs

from marketpipe.cache import MemoryCache, RedisCache, TieredCache, make_key
from marketpipe.cache.tiered import Loader
from tests.cache.helpers import sample
from tests.cache.redis_server import RedisServer, free_port

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 0.2


def in_redis(server: RedisServer, prefix: str, key: str) -> bool:
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    try:
        return bool(client.exists(prefix + key))
    finally:
        client.close()


@pytest.fixture
async def cache(private_redis_server: RedisServer) -> AsyncIterator[TieredCache]:
    l2 = RedisCache(private_redis_server.url, "mp:", backoff_initial=BACKOFF_INITIAL, backoff_max=BACKOFF_MAX)
    tiered = TieredCache(MemoryCache(1_000_000), l2)
    yield tiered
    await tiered.aclose()


def loader_of(value: bytes) -> Loader:
    async def load() -> tuple[bytes, float]:
        return value, 60.0

    return load


async def test_redis_going_away_and_coming_back(private_redis_server: RedisServer, cache: TieredCache) -> None:
    server, l2 = private_redis_server, cache.l2
    assert l2 is not None
    k1, k2, k3 = (make_key("bars", sym) for sym in ("AAPL", "MSFT", "NVDA"))
    await cache.set(k1, b"one", ttl=60)
    assert in_redis(server, "mp:", k1)

    server.stop()
    errors_before = sample("marketpipe_cache_errors_total", tier="redis")
    with capture_logs() as logs:
        started = time.monotonic()
        await cache.set(k2, b"two", ttl=60)  # never raises
        hit1, hit2 = await cache.get(k1), await cache.get(k2)
        for i in range(20):  # more traffic during the same outage: no more warnings
            await cache.set(make_key("latest_quote", f"S{i}"), b"q", ttl=60)
            await cache.get(make_key("latest_quote", f"X{i}"))
        loaded = await cache.get_or_load(k3, loader_of(b"three"))
        elapsed = time.monotonic() - started
    assert hit1 is not None and hit1.value == b"one" and hit1.tier == "memory"
    assert hit2 is not None and hit2.value == b"two" and hit2.tier == "memory"
    assert loaded.value == b"three" and loaded.tier == "origin"
    assert elapsed < 1.0  # refused connections fail fast and the tier is then skipped
    assert l2.is_down and not l2.available
    assert sample("marketpipe_cache_errors_total", tier="redis") >= errors_before + 1
    assert sample("marketpipe_cache_tier_up", tier="redis") == 0
    down = [e for e in logs if e["event"] == "cache_tier_down"]
    assert len(down) == 1, logs
    assert down[0]["log_level"] == "warning" and down[0]["tier"] == "redis"

    server.start()  # same port, empty (no persistence)
    await asyncio.sleep(BACKOFF_MAX + 0.05)
    assert l2.available
    await cache.set(k2, b"two again", ttl=60)
    assert in_redis(server, "mp:", k2)  # the first write after the backoff lands in Redis
    assert not l2.is_down
    assert sample("marketpipe_cache_tier_up", tier="redis") == 1
    cache.l1.clear()
    hit = await cache.get(k2)
    assert hit is not None and hit.tier == "redis" and hit.value == b"two again"


async def test_probe_failures_back_off_longer(private_redis_server: RedisServer, cache: TieredCache) -> None:
    l2 = cache.l2
    assert l2 is not None
    private_redis_server.stop()
    await cache.set(make_key("bars", "AAPL"), b"v", ttl=60)
    assert l2._backoff == BACKOFF_INITIAL
    await asyncio.sleep(BACKOFF_INITIAL + 0.02)
    await cache.set(make_key("bars", "AAPL"), b"v", ttl=60)  # probe fails
    assert l2._backoff == BACKOFF_MAX
    assert not l2.available


async def test_hung_redis_times_out_and_missed_invalidation_is_replayed(
    private_redis_server: RedisServer, cache: TieredCache
) -> None:
    server, l2 = private_redis_server, cache.l2
    assert l2 is not None
    aapl, msft = make_key("bars", "AAPL"), make_key("bars", "MSFT")
    await cache.set(aapl, b"a", ttl=60)
    await cache.set(msft, b"m", ttl=60)
    server.pause()  # accepts nothing, answers nothing: only the socket timeout saves us
    try:
        started = time.monotonic()
        assert await cache.invalidate(symbol="AAPL") == 1  # L1 done; L2 times out and is remembered
        assert time.monotonic() - started < 1.0
        assert l2.is_down
        assert (await cache.get(msft)) is not None  # served from L1 meanwhile
    finally:
        server.resume()
    assert in_redis(server, "mp:", aapl)  # Redis still has the copy invalidated during the outage
    await asyncio.sleep(BACKOFF_MAX + 0.05)
    cache.l1.clear()
    assert await cache.get(aapl) is None  # replayed before L2 was read again
    assert not in_redis(server, "mp:", aapl)
    hit = await cache.get(msft)
    assert hit is not None and hit.tier == "redis"


async def test_redis_never_reachable() -> None:
    l2 = RedisCache(f"redis://127.0.0.1:{free_port()}/0", backoff_initial=0.05, backoff_max=0.1)
    cache = TieredCache(MemoryCache(10_000), l2)
    try:
        key = make_key("reference", "AAPL")
        await cache.set(key, b"r", ttl=60)
        hit = await cache.get(key)
        assert hit is not None and hit.tier == "memory"
        assert await cache.invalidate() == 1
        assert not await l2.ping()
    finally:
        await cache.aclose()
