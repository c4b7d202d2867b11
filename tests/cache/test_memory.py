from __future__ import annotations

import pytest

from marketpipe.cache import MemoryCache, make_key
from marketpipe.cache.base import CacheEntry
from marketpipe.cache.memory import entry_size
from tests.cache.conftest import FakeClock
from tests.cache.helpers import sample


def test_lru_eviction_by_bytes(clock: FakeClock) -> None:
    cache = MemoryCache(100, clock=clock)
    for k in ("k1", "k2", "k3"):
        assert cache.set(k, b"x" * 30, ttl=60)  # 32 bytes each with the key
    assert cache.bytes_used == 96 and len(cache) == 3
    assert cache.get("k1") is not None  # k1 is now the most recently used
    lru_before = sample("marketpipe_cache_evictions_total", tier="memory", reason="lru")
    cache.set("k4", b"y" * 30, ttl=60)
    assert cache.keys() == ["k3", "k1", "k4"]  # k2, least recently used, went
    assert cache.bytes_used == 96
    assert sample("marketpipe_cache_evictions_total", tier="memory", reason="lru") == lru_before + 1
    cache.set("big", b"z" * 90, ttl=60)  # needs almost the whole budget
    assert cache.keys() == ["big"] and cache.bytes_used == 93


def test_replacing_a_key_accounts_bytes(clock: FakeClock) -> None:
    cache = MemoryCache(1000, clock=clock)
    cache.set("k", b"a" * 100, ttl=1)
    cache.set("k", b"b" * 10, ttl=1)
    assert cache.bytes_used == entry_size("k", b"b" * 10) == 11
    assert cache.delete("k") and not cache.delete("k")
    assert cache.bytes_used == 0


def test_ttl_expiry_and_stale_retention(clock: FakeClock) -> None:
    cache = MemoryCache(1000, clock=clock)
    cache.set("k", b"v", ttl=10, stale_for=20)
    clock.advance(9.9)
    entry = cache.get("k")
    assert entry is not None and entry.value == b"v" and entry.age(clock()) == pytest.approx(9.9)
    clock.advance(0.2)  # 10.1 s: expired
    assert cache.get("k") is None
    stale = cache.get("k", allow_stale=True)
    assert stale is not None and stale.value == b"v" and not stale.is_fresh(clock())
    assert "k" in cache  # kept for the stale window
    clock.advance(20)  # 30.1 s: past the stale window
    assert cache.get("k", allow_stale=True) is None
    assert "k" not in cache and cache.bytes_used == 0


def test_zero_stale_window_drops_on_expiry(clock: FakeClock) -> None:
    cache = MemoryCache(1000, clock=clock)
    cache.set("k", b"v", ttl=1)
    clock.advance(1)
    assert cache.get("k", allow_stale=True) is None


def test_purge_expired(clock: FakeClock) -> None:
    cache = MemoryCache(1000, clock=clock)
    cache.set("short", b"v", ttl=1, stale_for=1)
    cache.set("long", b"v", ttl=100)
    clock.advance(5)
    assert cache.purge_expired() == 1
    assert cache.keys() == ["long"]


def test_stale_entries_still_fall_to_lru(clock: FakeClock) -> None:
    cache = MemoryCache(70, clock=clock)
    cache.set("old", b"x" * 30, ttl=1, stale_for=3600)
    clock.advance(2)
    cache.set("new1", b"x" * 30, ttl=60)
    cache.set("new2", b"x" * 30, ttl=60)
    assert cache.get("old", allow_stale=True) is None


def test_oversize_value_is_not_cached(clock: FakeClock) -> None:
    cache = MemoryCache(50, clock=clock)
    assert cache.set("k", b"small", ttl=60)
    assert not cache.set("k", b"x" * 100, ttl=60)
    # the older copy is gone too: it no longer matches what the caller last stored
    assert cache.get("k") is None and len(cache) == 0 and cache.bytes_used == 0


def test_invalidate_by_kind_symbol_and_both(clock: FakeClock) -> None:
    cache = MemoryCache(10_000, clock=clock)
    keys = {
        "bars_aapl": make_key("bars", "AAPL", "1Min", "d1"),
        "bars_aapl2": make_key("bars", "AAPL", "1Day", "d1"),
        "bars_msft": make_key("bars", "MSFT", "1Min", "d1"),
        "quote_aapl": make_key("latest_quote", "AAPL"),
        "snap_brk": make_key("snapshot", "BRK.B"),
    }
    for k in keys.values():
        cache.set(k, b"v", ttl=60)
    assert sorted(cache.invalidate(kind="bars", symbol="aapl")) == sorted([keys["bars_aapl"], keys["bars_aapl2"]])
    assert cache.invalidate(symbol="AAPL") == [keys["quote_aapl"]]
    assert cache.invalidate(kind="bars") == [keys["bars_msft"]]
    assert cache.invalidate(kind="bars") == []
    assert cache.keys() == [keys["snap_brk"]]
    assert cache.invalidate() == [keys["snap_brk"]]
    assert len(cache) == 0


def test_put_keeps_the_entry_timing(clock: FakeClock) -> None:
    cache = MemoryCache(1000, clock=clock)
    cache.put("k", CacheEntry(b"v", clock() - 8, clock() + 2, clock() + 12))
    entry = cache.get("k")
    assert entry is not None and entry.age(clock()) == 8
    clock.advance(2)
    assert cache.get("k") is None and cache.get("k", allow_stale=True) is not None


def test_gauges_follow_the_cache(clock: FakeClock) -> None:
    cache = MemoryCache(1000, clock=clock)
    cache.set("a", b"12345", ttl=60)
    cache.set("b", b"123", ttl=60)
    assert sample("marketpipe_cache_bytes", tier="memory") == cache.bytes_used == 10
    assert sample("marketpipe_cache_entries", tier="memory") == 2
    cache.clear()
    assert sample("marketpipe_cache_bytes", tier="memory") == 0
    assert sample("marketpipe_cache_entries", tier="memory") == 0


def test_bad_arguments(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        MemoryCache(0)
    cache = MemoryCache(10, clock=clock)
    with pytest.raises(ValueError):
        cache.set("k", b"v", ttl=-1)
    with pytest.raises(ValueError):
        cache.set("k", b"v", ttl=1, stale_for=-1)
