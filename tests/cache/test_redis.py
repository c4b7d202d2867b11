from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from marketpipe.cache import MemoryCache, RedisCache, TieredCache, make_key
from marketpipe.cache.redis import decode_entry, glob_escape
from tests.cache.conftest import FakeClock
from tests.cache.helpers import sample


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


async def test_round_trip(redis_cache: RedisCache, raw: redis.Redis, redis_prefix: str) -> None:
    key = make_key("bars", "AAPL", "1Min")
    value = bytes(range(256)) * 4  # binary-safe
    assert await redis_cache.get(key) is None
    assert await redis_cache.set(key, value, ttl=10)
    entry = await redis_cache.get(key)
    assert entry is not None and entry.value == value
    assert raw.exists(redis_prefix + key)
    assert await redis_cache.delete(key)
    assert await redis_cache.get(key) is None


async def test_ttl_and_stale_metadata(
    redis_cache: RedisCache, raw: redis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    key = make_key("latest_quote", "MSFT")
    await redis_cache.set(key, b"q", ttl=10, stale_for=20)
    # Redis keeps the copy for ttl + stale_for, so stale data survives freshness
    assert 29_000 < raw.pttl(redis_prefix + key) <= 30_000
    stored = decode_entry(raw.get(redis_prefix + key))  # type: ignore[arg-type]
    assert stored is not None
    assert stored.stored_at == clock() and stored.fresh_until == clock() + 10 and stored.keep_until == clock() + 30
    clock.advance(10.5)
    assert await redis_cache.get(key) is None
    stale = await redis_cache.get(key, allow_stale=True)
    assert stale is not None and stale.value == b"q" and not stale.is_fresh(clock())
    assert stale.age(clock()) == pytest.approx(10.5)
    clock.advance(20)
    assert await redis_cache.get(key, allow_stale=True) is None


async def test_undecodable_value_is_a_miss(redis_cache: RedisCache, raw: redis.Redis, redis_prefix: str) -> None:
    key = make_key("bars", "AAPL")
    raw.set(redis_prefix + key, b"not ours")
    before = sample("marketpipe_cache_errors_total", tier="redis")
    assert await redis_cache.get(key) is None
    assert sample("marketpipe_cache_errors_total", tier="redis") == before + 1


async def test_invalidation_uses_scan_not_keys(
    redis_cache: RedisCache, redis_url: str, raw: redis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_keys(*args: object, **kwargs: object) -> None:
        raise AssertionError("KEYS must never be used")

    monkeypatch.setattr(redis_cache._client, "keys", no_keys)
    symbols = [f"S{i}" for i in range(300)]
    for sym in symbols:  # 900 keys: more than one SCAN page and UNLINK batch
        for kind in ("bars", "latest_quote", "snapshot"):
            await redis_cache.set(make_key(kind, sym, "p"), b"v", ttl=60)
    # another cache (other prefix) sharing the server is never touched
    other = RedisCache(redis_url, redis_prefix + "other:")
    try:
        await other.set(make_key("bars", "S1", "p"), b"v", ttl=60)
        removed = await redis_cache.invalidate(kind="bars", symbol="S1")
        assert removed == [make_key("bars", "S1", "p")]
        assert sorted(await redis_cache.invalidate(symbol="S2")) == sorted(
            [make_key(kind, "S2", "p") for kind in ("bars", "latest_quote", "snapshot")]
        )
        assert len(await redis_cache.invalidate(kind="bars")) == 298
        assert len(await redis_cache.invalidate(kind="latest_quote")) == 299
        assert len(await redis_cache.invalidate()) == 299  # the snapshots that remain
        # the other cache's prefix extends ours, yet none of its keys were taken
        assert await other.get(make_key("bars", "S1", "p")) is not None
        assert await other.delete_prefix("bars:") == 1
    finally:
        await other.aclose()
    assert not list(raw.scan_iter(match=glob_escape(redis_prefix) + "*"))


async def test_invalidation_escapes_glob_characters(redis_cache: RedisCache) -> None:
    star, plain = make_key("bars", "A*"), make_key("bars", "AB")
    await redis_cache.set(star, b"v", ttl=60)
    await redis_cache.set(plain, b"v", ttl=60)
    assert await redis_cache.invalidate(symbol="A*") == [star]
    assert await redis_cache.get(plain) is not None


async def test_delete_prefix(redis_cache: RedisCache) -> None:
    for sym in ("AAPL", "AMD", "MSFT"):
        await redis_cache.set(make_key("bars", sym), b"v", ttl=60)
    assert await redis_cache.delete_prefix("bars:A") == 2
    assert await redis_cache.get(make_key("bars", "MSFT")) is not None


async def test_l2_hit_is_promoted_into_l1_with_remaining_ttl(
    tiered: TieredCache, redis_cache: RedisCache, clock: FakeClock
) -> None:
    key = make_key("snapshot", "AAPL")
    await redis_cache.set(key, b"snap", ttl=10)  # written by another gateway process
    clock.advance(4)
    hit = await tiered.get(key)
    assert hit is not None and hit.tier == "redis" and hit.value == b"snap" and not hit.stale
    assert hit.age_seconds == pytest.approx(4)
    hit = await tiered.get(key)
    assert hit is not None and hit.tier == "memory" and hit.age_seconds == pytest.approx(4)
    entry = tiered.l1.get(key)
    assert entry is not None and entry.fresh_until == clock() + 6  # the remaining TTL, not a fresh 10 s
    clock.advance(6)
    assert tiered.l1.get(key) is None


async def test_two_gateways_share_l2(redis_url: str, redis_prefix: str, clock: FakeClock) -> None:
    caches = [
        TieredCache(MemoryCache(10_000, clock=clock), RedisCache(redis_url, redis_prefix, clock=clock))
        for _ in range(2)
    ]
    try:
        key = make_key("reference", "AAPL")
        await caches[0].set(key, b"asset", ttl=60)
        hit = await caches[1].get(key)
        assert hit is not None and hit.tier == "redis" and hit.value == b"asset"
        assert await caches[1].invalidate(symbol="AAPL") == 1
        assert await caches[1].get(key) is None
        assert await caches[0].l2.get(key) is None  # type: ignore[union-attr]
    finally:
        for c in caches:
            await c.aclose()


async def test_stale_from_l2_when_l1_lost_it(tiered: TieredCache, clock: FakeClock) -> None:
    key = make_key("latest_trade", "AAPL")
    await tiered.set(key, b"t", ttl=5, stale_for=100)
    tiered.l1.clear()
    clock.advance(7)
    assert await tiered.get(key) is None
    hit = await tiered.get(key, allow_stale=True)
    assert hit is not None and hit.stale and hit.tier == "redis" and hit.age_seconds == pytest.approx(7)
