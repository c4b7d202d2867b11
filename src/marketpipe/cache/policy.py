"""How long each kind of data stays fresh, and the cache's configuration.

Closed history does not change, so it is kept for a week; anything touching the current session
lives seconds while the market is open and a little longer once it is closed.
"""

from __future__ import annotations

from marketpipe.core.config import (
    KNOWN_KINDS,
    LATEST_KINDS,
    RANGE_KINDS,
    REFERENCE_KINDS,
    SNAPSHOT_KINDS,
    CacheConfig,
)

__all__ = ["KNOWN_KINDS", "LATEST_KINDS", "RANGE_KINDS", "REFERENCE_KINDS", "SNAPSHOT_KINDS", "CacheConfig", "ttl_for"]

DEFAULT_CONFIG = CacheConfig()


def ttl_for(kind: str, *, market_open: bool, range_closed: bool, config: CacheConfig | None = None) -> float:
    """Freshness in seconds for ``kind`` under ``config`` (default: :class:`CacheConfig` defaults)."""
    return (config or DEFAULT_CONFIG).ttl_for(kind, market_open=market_open, range_closed=range_closed)
