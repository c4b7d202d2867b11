"""L1 memory in front of optional L2 Redis, with single-flight loading and stale fallback.

Lookup order: L1 fresh → L2 fresh (promoted into L1 with its remaining TTL) → loader. A stale copy
(expired but still retained) is only returned when the caller asks for it with ``allow_stale``,
typically after every upstream has failed; the hit then says ``stale=True``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from marketpipe.cache.base import (
    TIER_MEMORY,
    TIER_ORIGIN,
    TIER_REDIS,
    CacheEntry,
    CacheHit,
    Tier,
    key_matches,
    kind_of,
    normalize_filter,
)
from marketpipe.cache.memory import MemoryCache
from marketpipe.cache.redis import RedisCache
from marketpipe.core import metrics

Loader = Callable[[], Awaitable[tuple[bytes, float]]]

DEFAULT_STALE_FOR = 3600.0


class TieredCache:
    """The gateway's cache: ``get`` / ``set`` / ``get_or_load`` / ``invalidate`` over L1 (+ L2)."""

    def __init__(self, l1: MemoryCache, l2: RedisCache | None = None, *, stale_for: float = DEFAULT_STALE_FOR) -> None:
        if stale_for < 0:
            raise ValueError(f"stale_for must be >= 0, got {stale_for}")
        self.l1 = l1
        self.l2 = l2
        self.stale_for = stale_for
        self._inflight: dict[str, asyncio.Task[CacheHit]] = {}
        self._generation = 0  # bumped by invalidate(); a load that straddles one is not stored

    def _now(self) -> float:
        return self.l1.clock()

    # --- reads -------------------------------------------------------------------------------

    def _l1_lookup(self, key: str, kind: str) -> tuple[CacheHit | None, CacheEntry | None]:
        """(fresh hit, stale entry) from L1, counting the lookup."""
        now = self._now()
        entry = self.l1.get(key, allow_stale=True)
        if entry is None:
            metrics.CACHE_REQUESTS.labels(tier=TIER_MEMORY, kind=kind, result="miss").inc()
            return None, None
        if entry.is_fresh(now):
            metrics.CACHE_REQUESTS.labels(tier=TIER_MEMORY, kind=kind, result="hit").inc()
            return CacheHit(entry.value, TIER_MEMORY, entry.age(now), stale=False), None
        metrics.CACHE_REQUESTS.labels(tier=TIER_MEMORY, kind=kind, result="stale").inc()
        return None, entry

    async def _l2_lookup(self, key: str, kind: str) -> tuple[CacheHit | None, CacheEntry | None]:
        """(fresh hit promoted into L1, stale entry) from L2, counting the lookup (not while L2 is skipped)."""
        if self.l2 is None or not self.l2.available:
            return None, None
        entry = await self.l2.get(key, allow_stale=True)
        now = self._now()
        if entry is None:
            metrics.CACHE_REQUESTS.labels(tier=TIER_REDIS, kind=kind, result="miss").inc()
            return None, None
        if entry.is_fresh(now):
            metrics.CACHE_REQUESTS.labels(tier=TIER_REDIS, kind=kind, result="hit").inc()
            self.l1.put(key, entry)
            return CacheHit(entry.value, TIER_REDIS, entry.age(now), stale=False), None
        metrics.CACHE_REQUESTS.labels(tier=TIER_REDIS, kind=kind, result="stale").inc()
        return None, entry

    async def get(self, key: str, *, allow_stale: bool = False) -> CacheHit | None:
        """A fresh hit from L1 or L2; with ``allow_stale``, else the newest retained stale copy; else None."""
        kind = kind_of(key)
        hit, stale1 = self._l1_lookup(key, kind)
        if hit is not None:
            return hit
        hit, stale2 = await self._l2_lookup(key, kind)
        if hit is not None or not allow_stale:
            return hit
        return self._stale_hit(key, stale1, stale2)

    def _stale_hit(self, key: str, stale1: CacheEntry | None, stale2: CacheEntry | None) -> CacheHit | None:
        now = self._now()
        tier: Tier
        if stale2 is not None and (stale1 is None or stale2.stored_at > stale1.stored_at):
            self.l1.put(key, stale2)
            entry, tier = stale2, TIER_REDIS
        elif stale1 is not None:
            entry, tier = stale1, TIER_MEMORY
        else:
            return None
        return CacheHit(entry.value, tier, entry.age(now), stale=True)

    # --- writes ------------------------------------------------------------------------------

    async def set(self, key: str, value: bytes, ttl: float, *, stale_for: float | None = None) -> None:
        """Write both tiers; an L2 failure is absorbed (counted and logged by the tier)."""
        keep = self.stale_for if stale_for is None else stale_for
        if ttl < 0 or keep < 0:
            raise ValueError(f"ttl and stale_for must be >= 0, got ttl={ttl} stale_for={keep}")
        now = self._now()
        entry = CacheEntry(bytes(value), now, now + ttl, now + ttl + keep)
        self.l1.put(key, entry)
        if self.l2 is not None:
            await self.l2.put(key, entry)

    async def delete(self, key: str) -> None:
        self.l1.delete(key)
        if self.l2 is not None:
            await self.l2.delete(key)

    async def invalidate(self, *, kind: str | None = None, symbol: str | None = None) -> int:
        """Drop entries by ``kind``, ``symbol`` (across kinds) or both, in both tiers.

        Both None drops everything. Returns how many distinct keys were removed. Loads already in
        flight still answer their waiters but do not store their (possibly outdated) result.
        """
        kind, symbol = normalize_filter(kind, symbol)
        self._generation += 1
        for key in [k for k in self._inflight if key_matches(k, kind, symbol)]:
            del self._inflight[key]  # later callers start a fresh load
        removed = set(self.l1.invalidate(kind=kind, symbol=symbol))
        if self.l2 is not None:
            removed.update(await self.l2.invalidate(kind=kind, symbol=symbol))
        return len(removed)

    # --- single-flight loading ---------------------------------------------------------------

    async def get_or_load(self, key: str, loader: Loader, *, kind: str | None = None) -> CacheHit:
        """A fresh cached value, or the loader's, with one loader call per burst of identical misses.

        ``loader()`` returns ``(value, ttl_seconds)``; a ttl <= 0 means "do not cache". Concurrent
        callers for the same key share one L2 lookup and one loader call and get the same result;
        if the loader raises, they all get that exception and nothing is cached, so the next call
        tries again. ``kind`` labels the load metrics (default: the key's kind).
        """
        label = kind or kind_of(key)
        hit, _ = self._l1_lookup(key, label)
        if hit is not None:
            return hit
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, loader, label, self._generation))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finish(key, t))
        # shield: one waiter being cancelled must not cancel the load the others wait for
        return await asyncio.shield(task)

    def _finish(self, key: str, task: asyncio.Task[CacheHit]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported as lost

    async def _load(self, key: str, loader: Loader, kind: str, generation: int) -> CacheHit:
        hit, _ = await self._l2_lookup(key, kind)
        if hit is not None:
            return hit
        try:
            value, ttl = await loader()
        except Exception:
            metrics.CACHE_LOADS.labels(kind=kind, result="error").inc()
            raise
        metrics.CACHE_LOADS.labels(kind=kind, result="ok").inc()
        if ttl > 0 and generation == self._generation:
            await self.set(key, value, ttl)
        return CacheHit(value, TIER_ORIGIN, 0.0, stale=False)

    async def aclose(self) -> None:
        if self.l2 is not None:
            await self.l2.aclose()
