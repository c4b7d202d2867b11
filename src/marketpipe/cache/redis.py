"""L2: a shared Redis cache (``redis.asyncio``) that never takes the caller down with it.

Each value is stored as one Redis string: a fixed header (format tag, ``stored_at``,
``fresh_until``, ``keep_until``) followed by the value bytes, with a Redis expiry of
``ttl + stale_for`` so that stale copies outlive freshness for a while.

Any Redis failure (refused, timeout, the server going away mid-run) is swallowed: the operation
reports a miss / not-written, ``marketpipe_cache_errors_total{tier="redis"}`` counts it, a single
warning is logged per outage, and the tier is skipped for a backoff (doubling from
``backoff_initial`` to ``backoff_max``). After the backoff the next operation probes Redis again,
so the tier comes back by itself when Redis does. Invalidations that could not reach Redis are
remembered and replayed before the tier is used again, so a recovered Redis never serves what was
invalidated during the outage.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from marketpipe.cache.base import TIER_REDIS, CacheEntry, key_matches, normalize_filter, split_key
from marketpipe.cache.memory import Clock
from marketpipe.core import metrics
from marketpipe.core.log import get_logger

log = get_logger("marketpipe.cache.redis")

T = TypeVar("T")

_MAGIC = b"MPC1"
_HEADER = struct.Struct(">4sddd")
_SCAN_COUNT = 500
_UNLINK_BATCH = 500
_MAX_PENDING_INVALIDATIONS = 256
# Errors that mean "Redis is not reachable right now" (as opposed to a rejected command).
_OUTAGE_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_ANY_ERROR: tuple[type[Exception], ...] = (RedisError, *_OUTAGE_ERRORS)
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\^"})


class _Skipped(Exception):
    """Internal: the tier is backing off, so the operation was not attempted."""


def glob_escape(text: str) -> str:
    """Escape ``text`` for a Redis ``MATCH`` glob pattern."""
    return text.translate(_GLOB_SPECIAL)


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def encode_entry(entry: CacheEntry) -> bytes:
    return _HEADER.pack(_MAGIC, entry.stored_at, entry.fresh_until, entry.keep_until) + entry.value


def decode_entry(data: bytes) -> CacheEntry | None:
    if len(data) < _HEADER.size:
        return None
    magic, stored_at, fresh_until, keep_until = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        return None
    return CacheEntry(bytes(data[_HEADER.size :]), stored_at, fresh_until, keep_until)


class RedisCache:
    """Redis-backed cache tier; every public method is safe to call while Redis is down."""

    tier = TIER_REDIS

    def __init__(
        self,
        url: str,
        prefix: str = "marketpipe:",
        *,
        connect_timeout: float = 0.25,
        socket_timeout: float = 0.25,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        if connect_timeout <= 0 or socket_timeout <= 0:
            raise ValueError("redis connect_timeout and socket_timeout must be > 0")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("redis backoff must satisfy 0 < backoff_initial <= backoff_max")
        self.url = url
        self.prefix = prefix
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.clock = clock
        self._monotonic = monotonic
        # No client-side retries: a failed call must come back within one timeout, and the tier's
        # own backoff decides when to try again.
        self._client: Any = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            decode_responses=False,
        )
        self._down = False
        self._down_until = 0.0
        self._backoff = backoff_initial
        self._pending: list[tuple[str | None, str | None]] = []
        self._replay_lock = asyncio.Lock()
        metrics.CACHE_TIER_UP.labels(tier=self.tier).set(1)

    # --- state -------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the tier is backing off after an error (operations are skipped)."""
        return not self._down or self._monotonic() >= self._down_until

    @property
    def is_down(self) -> bool:
        """True from the first failure of an outage until the next successful operation."""
        return self._down

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def _run(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call under the outage policy; raises :class:`_Skipped` instead of Redis errors."""
        if not self.available:
            raise _Skipped(op)
        if self._pending and not await self._replay_pending():
            raise _Skipped(op)
        try:
            result = await call()
        except _OUTAGE_ERRORS as exc:
            self._mark_down(op, exc)
            raise _Skipped(op) from exc
        except RedisError as exc:
            # Redis answered but refused (OOM, READONLY, …): count and log it, keep the tier up.
            metrics.CACHE_ERRORS.labels(tier=self.tier).inc()
            log.warning("cache_tier_error", tier=self.tier, op=op, error=f"{type(exc).__name__}: {exc}")
            raise _Skipped(op) from exc
        self._mark_up()
        return result

    def _mark_down(self, op: str, exc: BaseException) -> None:
        metrics.CACHE_ERRORS.labels(tier=self.tier).inc()
        now = self._monotonic()
        if not self._down:
            self._down = True
            self._backoff = self.backoff_initial
            self._down_until = now + self._backoff
            metrics.CACHE_TIER_UP.labels(tier=self.tier).set(0)
            log.warning(
                "cache_tier_down",
                tier=self.tier,
                url=redact_url(self.url),
                op=op,
                error=f"{type(exc).__name__}: {exc}",
                retry_in=self._backoff,
            )
        elif now >= self._down_until:
            # A probe after the backoff failed: back off longer. Concurrent failures of calls that
            # started before the window was set do not compound it.
            self._backoff = min(self._backoff * 2, self.backoff_max)
            self._down_until = now + self._backoff

    def _mark_up(self) -> None:
        if self._down:
            self._down = False
            self._backoff = self.backoff_initial
            metrics.CACHE_TIER_UP.labels(tier=self.tier).set(1)
            log.info("cache_tier_recovered", tier=self.tier, url=redact_url(self.url))

    async def _replay_pending(self) -> bool:
        """Apply invalidations that missed Redis during an outage; False if Redis is still failing."""
        async with self._replay_lock:
            while self._pending:
                kind, symbol = self._pending[0]
                try:
                    await self._delete_matching(kind, symbol)
                except _OUTAGE_ERRORS as exc:
                    self._mark_down("invalidate", exc)
                    return False
                except RedisError as exc:
                    metrics.CACHE_ERRORS.labels(tier=self.tier).inc()
                    log.warning("cache_tier_error", tier=self.tier, op="invalidate", error=str(exc))
                    return False
                self._pending.pop(0)
        return True

    def _remember_invalidation(self, kind: str | None, symbol: str | None) -> None:
        if (None, None) in self._pending:
            return
        if (kind, symbol) not in self._pending:
            self._pending.append((kind, symbol))
        if len(self._pending) > _MAX_PENDING_INVALIDATIONS:
            self._pending = [(None, None)]  # too many to track: drop the whole prefix on recovery

    # --- operations --------------------------------------------------------------------------

    async def get(self, key: str, *, allow_stale: bool = False) -> CacheEntry | None:
        """The entry if fresh (or retained, with ``allow_stale``); None on a miss or any Redis trouble."""
        try:
            data = await self._run("get", lambda: self._client.get(self._key(key)))
        except _Skipped:
            return None
        if data is None:
            return None
        entry = decode_entry(data)
        if entry is None:
            metrics.CACHE_ERRORS.labels(tier=self.tier).inc()
            log.warning("cache_entry_undecodable", tier=self.tier, key=key)
            return None
        now = self.clock()
        if entry.is_fresh(now) or (allow_stale and entry.is_retained(now)):
            return entry
        return None

    async def set(self, key: str, value: bytes, ttl: float, *, stale_for: float = 0.0) -> bool:
        """Store ``value`` fresh for ``ttl`` s, kept ``stale_for`` s more; False if it did not reach Redis."""
        if ttl < 0 or stale_for < 0:
            raise ValueError(f"ttl and stale_for must be >= 0, got ttl={ttl} stale_for={stale_for}")
        now = self.clock()
        return await self.put(key, CacheEntry(bytes(value), now, now + ttl, now + ttl + stale_for))

    async def put(self, key: str, entry: CacheEntry) -> bool:
        expire_ms = int((entry.keep_until - self.clock()) * 1000)
        if expire_ms <= 0:
            return False
        data = encode_entry(entry)
        try:
            await self._run("set", lambda: self._client.set(self._key(key), data, px=expire_ms))
        except _Skipped:
            return False
        return True

    async def delete(self, key: str) -> bool:
        try:
            n = await self._run("delete", lambda: self._client.unlink(self._key(key)))
        except _Skipped:
            return False
        return bool(n)

    async def delete_prefix(self, prefix: str) -> int:
        """UNLINK every key starting with ``prefix`` (within this cache's own prefix) via SCAN, never KEYS."""
        try:
            removed = await self._run("delete_prefix", lambda: self._scan_unlink(glob_escape(prefix) + "*", None))
        except _Skipped:
            return 0
        return len(removed)

    async def invalidate(self, *, kind: str | None = None, symbol: str | None = None) -> list[str]:
        """Drop entries of ``kind`` and/or ``symbol`` (both None: all); returns the keys dropped.

        If Redis cannot be reached the invalidation is remembered and applied before the tier is
        used again.
        """
        kind, symbol = normalize_filter(kind, symbol)
        try:
            return await self._run("invalidate", lambda: self._delete_matching(kind, symbol))
        except _Skipped:
            self._remember_invalidation(kind, symbol)
            return []

    async def ping(self) -> bool:
        """True if Redis answers now (ignores the backoff; for health checks)."""
        try:
            return bool(await self._client.ping())
        except _ANY_ERROR:
            return False

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except _ANY_ERROR as exc:
            log.debug("cache_close_failed", tier=self.tier, error=str(exc))

    # --- internals ---------------------------------------------------------------------------

    async def _delete_matching(self, kind: str | None, symbol: str | None) -> list[str]:
        if kind is not None and symbol is not None:
            pattern = f"{glob_escape(kind)}:{glob_escape(symbol)}:*"
        elif kind is not None:
            pattern = f"{glob_escape(kind)}:*"
        elif symbol is not None:
            pattern = f"*:{glob_escape(symbol)}:*"
        else:
            pattern = "*"
        # The filter re-checks each key's shape: a glob like "*:AAPL:*" could also match keys of
        # another cache whose prefix happens to extend ours ("marketpipe:" vs "marketpipe:test:").
        return await self._scan_unlink(pattern, lambda k: split_key(k) is not None and key_matches(k, kind, symbol))

    async def _scan_unlink(self, pattern: str, accept: Callable[[str], bool] | None) -> list[str]:
        """SCAN ``prefix + pattern`` and UNLINK the matches in batches; returns the unprefixed keys."""
        seen: set[bytes] = set()
        batch: list[bytes] = []
        removed: list[str] = []
        plen = len(self.prefix.encode())

        async def flush() -> None:
            if batch:
                await self._client.unlink(*batch)
                removed.extend(k[plen:].decode(errors="replace") for k in batch)
                batch.clear()

        async for raw in self._client.scan_iter(match=glob_escape(self.prefix) + pattern, count=_SCAN_COUNT):
            if raw in seen:  # SCAN may return a key more than once
                continue
            seen.add(raw)
            if accept is not None and not accept(raw[plen:].decode(errors="replace")):
                continue
            batch.append(raw)
            if len(batch) >= _UNLINK_BATCH:
                await flush()
        await flush()
        return removed
