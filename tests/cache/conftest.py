"""Fixtures for the cache tests: a real redis-server (session-wide, and a private one to kill)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from marketpipe.cache import MemoryCache, RedisCache, TieredCache
from tests.cache.redis_server import RedisServer, find_redis_server

NO_REDIS = "redis-server binary not found on PATH or in /usr/bin (apt-get install redis-server)"


class FakeClock:
    """Wall clock under the test's control."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _require_redis() -> None:
    if find_redis_server() is None:
        pytest.skip(NO_REDIS)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests isolate themselves with ``redis_prefix``."""
    _require_redis()
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.running:  # a test may have stopped it
        redis_server.start()
    return redis_server.url


@pytest.fixture
def private_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to be stopped and restarted (same port)."""
    _require_redis()
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    return f"mptest:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def redis_cache(redis_url: str, redis_prefix: str, clock: FakeClock) -> AsyncIterator[RedisCache]:
    cache = RedisCache(redis_url, redis_prefix, clock=clock, backoff_initial=0.05, backoff_max=0.2)
    yield cache
    await cache.delete_prefix("")
    await cache.aclose()


@pytest.fixture
async def tiered(redis_cache: RedisCache, clock: FakeClock) -> AsyncIterator[TieredCache]:
    cache = TieredCache(MemoryCache(1_000_000, clock=clock), redis_cache, stale_for=60.0)
    yield cache
