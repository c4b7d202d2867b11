"""Cache tiers for the gateway: L1 in-process memory, optional L2 Redis, tiered with single-flight.

Values are opaque ``bytes`` (callers serialize); keys come from :func:`make_key`.
"""

from __future__ import annotations

from marketpipe.cache.base import CacheEntry, CacheHit, kind_of, make_key, split_key
from marketpipe.cache.memory import MemoryCache
from marketpipe.cache.policy import CacheConfig, ttl_for
from marketpipe.cache.redis import RedisCache
from marketpipe.cache.tiered import TieredCache


def build_cache(config: CacheConfig) -> TieredCache:
    """The gateway's cache from its config: L1 always, L2 when ``redis_url`` is set."""
    l2 = (
        RedisCache(
            config.redis_url,
            config.redis_prefix,
            connect_timeout=config.redis_connect_timeout,
            socket_timeout=config.redis_socket_timeout,
            backoff_initial=config.redis_backoff_initial,
            backoff_max=config.redis_backoff_max,
        )
        if config.redis_url
        else None
    )
    return TieredCache(MemoryCache(config.memory_max_bytes), l2, stale_for=config.stale_for)


__all__ = [
    "CacheConfig",
    "CacheEntry",
    "CacheHit",
    "MemoryCache",
    "RedisCache",
    "TieredCache",
    "build_cache",
    "kind_of",
    "make_key",
    "split_key",
    "ttl_for",
]
