from __future__ import annotations

import asyncio

import pytest

from marketpipe.cache import CacheHit, MemoryCache, RedisCache, TieredCache, make_key
from tests.cache.conftest import FakeClock
from tests.cache.helpers import sample


@pytest.fixture
def mem_only(clock: FakeClock) -> TieredCache:
    return TieredCache(MemoryCache(1_000_000, clock=clock), None, stale_for=60.0)


class HeldLoader:
    """A loader that blocks until released, counting its calls."""

    def __init__(self, value: bytes = b"loaded", ttl: float = 30.0, error: BaseException | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.value, self.ttl, self.error = value, ttl, error

    async def __call__(self) -> tuple[bytes, float]:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value, self.ttl


async def wait_for_waiters(cache: TieredCache, key: str) -> None:
    for _ in range(100):
        await asyncio.sleep(0)
        if key in cache._inflight:
            return
    raise AssertionError("no load in flight")


async def test_get_and_set_memory_only(mem_only: TieredCache, clock: FakeClock) -> None:
    key = make_key("bars", "AAPL", "1Min")
    assert await mem_only.get(key) is None
    await mem_only.set(key, b"v", ttl=5)
    clock.advance(2)
    assert await mem_only.get(key) == CacheHit(b"v", "memory", 2.0, stale=False)
    clock.advance(4)  # expired, inside the 60 s stale window
    assert await mem_only.get(key) is None
    assert await mem_only.get(key, allow_stale=True) == CacheHit(b"v", "memory", 6.0, stale=True)
    clock.advance(60)
    assert await mem_only.get(key, allow_stale=True) is None


async def test_single_flight_one_loader_call_for_100_waiters(mem_only: TieredCache) -> None:
    key = make_key("bars", "AAPL", "1Min", "today")
    loader = HeldLoader()
    tasks = [asyncio.create_task(mem_only.get_or_load(key, loader, kind="bars")) for _ in range(100)]
    await wait_for_waiters(mem_only, key)
    await asyncio.sleep(0.01)
    assert loader.calls == 1
    loader.release.set()
    hits = await asyncio.gather(*tasks)
    assert loader.calls == 1
    assert all(h is hits[0] for h in hits)
    assert hits[0] == CacheHit(b"loaded", "origin", 0.0, stale=False)
    assert not mem_only._inflight
    again = await mem_only.get_or_load(key, loader, kind="bars")
    assert again.tier == "memory" and again.value == b"loaded" and loader.calls == 1


async def test_single_flight_error_reaches_every_waiter_and_is_not_cached(mem_only: TieredCache) -> None:
    key = make_key("latest_quote", "MSFT")
    boom = RuntimeError("vendor down")
    loader = HeldLoader(error=boom)
    errors_before = sample("marketpipe_cache_loads_total", kind="latest_quote", result="error")
    tasks = [asyncio.create_task(mem_only.get_or_load(key, loader, kind="latest_quote")) for _ in range(50)]
    await wait_for_waiters(mem_only, key)
    loader.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert loader.calls == 1
    assert all(r is boom for r in results)
    assert sample("marketpipe_cache_loads_total", kind="latest_quote", result="error") == errors_before + 1
    assert await mem_only.get(key) is None and not mem_only._inflight
    # the next call tries again
    ok = HeldLoader(value=b"q")
    ok.release.set()
    hit = await mem_only.get_or_load(key, ok, kind="latest_quote")
    assert hit.value == b"q" and hit.tier == "origin" and ok.calls == 1


async def test_cancelled_waiter_does_not_cancel_the_load(mem_only: TieredCache) -> None:
    key = make_key("snapshot", "AAPL")
    loader = HeldLoader()
    first = asyncio.create_task(mem_only.get_or_load(key, loader))
    second = asyncio.create_task(mem_only.get_or_load(key, loader))
    await wait_for_waiters(mem_only, key)
    first.cancel()
    await asyncio.sleep(0)
    loader.release.set()
    assert (await second).value == b"loaded"
    assert first.cancelled() and loader.calls == 1
    assert (await mem_only.get(key)) is not None


async def test_zero_ttl_is_returned_but_not_cached(mem_only: TieredCache) -> None:
    key = make_key("latest_trade", "AAPL")
    loader = HeldLoader(ttl=0)
    loader.release.set()
    assert (await mem_only.get_or_load(key, loader)).value == b"loaded"
    assert await mem_only.get(key, allow_stale=True) is None


async def test_invalidation_during_a_load(mem_only: TieredCache) -> None:
    key = make_key("bars", "AAPL", "x")
    loader = HeldLoader(value=b"old")
    waiting = asyncio.create_task(mem_only.get_or_load(key, loader))
    await wait_for_waiters(mem_only, key)
    assert await mem_only.invalidate(symbol="AAPL") == 0
    # a caller after the invalidation does not join the outdated load
    fresh = HeldLoader(value=b"new")
    fresh.release.set()
    assert (await mem_only.get_or_load(key, fresh)).value == b"new"
    loader.release.set()
    assert (await waiting).value == b"old"  # its waiters still get an answer …
    hit = await mem_only.get(key)
    assert hit is not None and hit.value == b"new"  # … but it was not stored over the newer value


async def test_get_or_load_with_redis_single_flight(tiered: TieredCache, redis_cache: RedisCache) -> None:
    key = make_key("bars", "MSFT", "1Day")
    loader = HeldLoader(value=b"bars")
    tasks = [asyncio.create_task(tiered.get_or_load(key, loader, kind="bars")) for _ in range(100)]
    await wait_for_waiters(tiered, key)
    loader.release.set()
    hits = await asyncio.gather(*tasks)
    assert loader.calls == 1 and {h.tier for h in hits} == {"origin"}
    entry = await redis_cache.get(key)
    assert entry is not None and entry.value == b"bars"
    # a second gateway (empty L1) finds it in L2 without calling its loader
    other = TieredCache(MemoryCache(10_000, clock=tiered.l1.clock), redis_cache)
    never = HeldLoader()
    hit = await other.get_or_load(key, never, kind="bars")
    assert hit.tier == "redis" and hit.value == b"bars" and never.calls == 0


async def test_invalidate_both_tiers_counts_distinct_keys(tiered: TieredCache) -> None:
    for sym in ("AAPL", "MSFT"):
        for kind in ("bars", "latest_quote"):
            await tiered.set(make_key(kind, sym), b"v", ttl=60)
    assert await tiered.invalidate(kind="bars", symbol="AAPL") == 1
    assert await tiered.invalidate(symbol="MSFT") == 2
    assert await tiered.invalidate(kind="latest_quote") == 1
    assert await tiered.get(make_key("latest_quote", "AAPL")) is None
    assert len(tiered.l1) == 0


async def test_request_metrics(tiered: TieredCache, clock: FakeClock) -> None:
    key = make_key("snapshot", "NVDA")

    def s(tier: str, result: str) -> float:
        return sample("marketpipe_cache_requests_total", tier=tier, kind="snapshot", result=result)

    before = {(t, r): s(t, r) for t in ("memory", "redis") for r in ("hit", "miss", "stale")}
    loads_ok = sample("marketpipe_cache_loads_total", kind="snapshot", result="ok")

    def delta(tier: str, result: str) -> float:
        return s(tier, result) - before[(tier, result)]

    assert await tiered.get(key) is None  # memory miss, redis miss
    assert (delta("memory", "miss"), delta("redis", "miss")) == (1, 1)
    await tiered.set(key, b"v", ttl=2)
    await tiered.get(key)  # memory hit
    assert delta("memory", "hit") == 1 and delta("redis", "hit") == 0
    tiered.l1.clear()
    await tiered.get(key)  # memory miss, redis hit (promoted)
    assert (delta("memory", "miss"), delta("redis", "hit")) == (2, 1)
    clock.advance(3)
    assert await tiered.get(key, allow_stale=True) is not None  # stale in both
    assert (delta("memory", "stale"), delta("redis", "stale")) == (1, 1)
    loader = HeldLoader(value=b"v2", ttl=2)
    loader.release.set()
    await tiered.get_or_load(key, loader)
    assert sample("marketpipe_cache_loads_total", kind="snapshot", result="ok") == loads_ok + 1
    assert sample("marketpipe_cache_bytes", tier="memory") == tiered.l1.bytes_used > 0
    assert sample("marketpipe_cache_entries", tier="memory") == len(tiered.l1) == 1
