"""L1: an in-process LRU + TTL cache bounded by bytes.

Expired entries are not dropped at once: they are kept ``stale_for`` seconds past expiry (or until
the byte budget pushes them out) so that they can be served, labelled stale, when every upstream
fails. Operations never await; a lock makes them safe from worker threads as well.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from marketpipe.cache.base import TIER_MEMORY, CacheEntry, key_matches, normalize_filter
from marketpipe.core import metrics

Clock = Callable[[], float]


def entry_size(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value)


class MemoryCache:
    """LRU cache of ``bytes`` values holding at most ``max_bytes`` (key + value sizes)."""

    tier = TIER_MEMORY

    def __init__(self, max_bytes: int, *, clock: Clock = time.time) -> None:
        if max_bytes <= 0:
            raise ValueError(f"MemoryCache max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._publish()

    # --- reads -------------------------------------------------------------------------------

    def get(self, key: str, *, allow_stale: bool = False) -> CacheEntry | None:
        """The entry for ``key`` if fresh (or, with ``allow_stale``, still retained); else None.

        A fresh hit counts as a use for LRU purposes; a stale one does not.
        """
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.is_fresh(now):
                self._entries.move_to_end(key)
                return entry
            if not entry.is_retained(now):
                self._remove(key, entry)
                metrics.CACHE_EVICTIONS.labels(tier=self.tier, reason="expired").inc()
                self._publish()
                return None
            return entry if allow_stale else None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def keys(self) -> list[str]:
        """Keys held, least recently used first (fresh and stale)."""
        with self._lock:
            return list(self._entries)

    # --- writes ------------------------------------------------------------------------------

    def set(self, key: str, value: bytes, ttl: float, *, stale_for: float = 0.0) -> bool:
        """Store ``value`` fresh for ``ttl`` seconds, then retained ``stale_for`` more.

        Returns False (and drops any older copy of ``key``) when the value alone exceeds the budget.
        """
        if ttl < 0 or stale_for < 0:
            raise ValueError(f"ttl and stale_for must be >= 0, got ttl={ttl} stale_for={stale_for}")
        now = self.clock()
        return self.put(key, CacheEntry(bytes(value), now, now + ttl, now + ttl + stale_for))

    def put(self, key: str, entry: CacheEntry) -> bool:
        """Store an entry as is (keeps its timing; used to promote an L2 hit with its remaining TTL)."""
        size = entry_size(key, entry.value)
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._remove(key, old)
            if size > self.max_bytes:
                metrics.CACHE_EVICTIONS.labels(tier=self.tier, reason="oversize").inc()
                self._publish()
                return False
            self._entries[key] = entry
            self._bytes += size
            self._evict_to_budget()
            self._publish()
        return True

    def delete(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._remove(key, entry)
            self._publish()
            return True

    def invalidate(self, *, kind: str | None = None, symbol: str | None = None) -> list[str]:
        """Drop every entry of ``kind`` and/or ``symbol`` (both None: everything); returns the keys dropped."""
        kind, symbol = normalize_filter(kind, symbol)
        with self._lock:
            doomed = [k for k in self._entries if key_matches(k, kind, symbol)]
            for k in doomed:
                self._remove(k, self._entries[k])
            self._publish()
        return doomed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._publish()

    def purge_expired(self) -> int:
        """Drop entries past their stale window; returns how many. Cheap enough to call periodically."""
        now = self.clock()
        with self._lock:
            doomed = [k for k, e in self._entries.items() if not e.is_retained(now)]
            for k in doomed:
                self._remove(k, self._entries[k])
            if doomed:
                metrics.CACHE_EVICTIONS.labels(tier=self.tier, reason="expired").inc(len(doomed))
            self._publish()
        return len(doomed)

    # --- internals (lock held) ---------------------------------------------------------------

    def _remove(self, key: str, entry: CacheEntry) -> None:
        del self._entries[key]
        self._bytes -= entry_size(key, entry.value)

    def _evict_to_budget(self) -> None:
        evicted = 0
        while self._bytes > self.max_bytes and self._entries:
            key, entry = self._entries.popitem(last=False)
            self._bytes -= entry_size(key, entry.value)
            evicted += 1
        if evicted:
            metrics.CACHE_EVICTIONS.labels(tier=self.tier, reason="lru").inc(evicted)

    def _publish(self) -> None:
        metrics.CACHE_BYTES.labels(tier=self.tier).set(self._bytes)
        metrics.CACHE_ENTRIES.labels(tier=self.tier).set(len(self._entries))
