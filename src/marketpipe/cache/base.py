"""Shared pieces of the cache tiers: entries, hits, and the key scheme.

Keys look like ``"{kind}:{SYMBOL}:{digest}"``: ``kind`` names what is cached (``bars``,
``latest_quote``, ``snapshot``, ``reference``, …), ``SYMBOL`` is the upper-cased instrument, and
``digest`` is a short hash of every other request parameter (timeframe, range, feed, …). Kind and
symbol stay readable so that invalidation by kind, by symbol, or by both is a prefix/pattern match
in every tier; the digest keeps keys short and free of separators whatever the parameters hold.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final, Literal

Tier = Literal["memory", "redis", "origin"]

TIER_MEMORY: Final = "memory"
TIER_REDIS: Final = "redis"
TIER_ORIGIN: Final = "origin"

SEPARATOR = ":"
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DIGEST_BYTES = 8  # 16 hex chars: collisions are irrelevant at cache sizes


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A stored value and its timing, as a tier holds it (wall-clock seconds since the epoch)."""

    value: bytes
    stored_at: float
    fresh_until: float
    keep_until: float  # the entry may be served labelled stale until then

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def is_retained(self, now: float) -> bool:
        return now < self.keep_until

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    @property
    def ttl(self) -> float:
        return self.fresh_until - self.stored_at

    @property
    def stale_for(self) -> float:
        return self.keep_until - self.fresh_until


@dataclass(frozen=True, slots=True)
class CacheHit:
    """What :class:`~marketpipe.cache.tiered.TieredCache` hands back.

    ``tier`` says where the value came from (``"origin"`` when the loader was just called), and
    ``stale`` is True only when the caller asked for stale data and nothing fresh was held.
    """

    value: bytes
    tier: Tier
    age_seconds: float
    stale: bool


def normalize_symbol(symbol: str) -> str:
    sym = symbol.strip().upper()
    if not sym or SEPARATOR in sym or any(c.isspace() for c in sym):
        raise ValueError(f"invalid cache symbol {symbol!r}: must be non-empty, without ':' or whitespace")
    return sym


def check_kind(kind: str) -> str:
    if not _KIND_RE.match(kind):
        raise ValueError(f"invalid cache kind {kind!r}: use lowercase letters, digits and '_' (e.g. 'latest_quote')")
    return kind


def make_key(kind: str, symbol: str, *parts: str) -> str:
    """Build a cache key ``"{kind}:{SYMBOL}:{digest}"``; ``parts`` are the other request parameters.

    Parts are hashed in order, so ``("1Min", "2024-01-02")`` and ``("2024-01-02", "1Min")`` differ;
    callers should pass them in a fixed order (and canonical form: ISO UTC timestamps, etc.).
    """
    check_kind(kind)
    sym = normalize_symbol(symbol)
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for part in parts:
        data = str(part).encode()
        # length-prefixed, so ("ab", "c") and ("a", "bc") hash differently
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return f"{kind}{SEPARATOR}{sym}{SEPARATOR}{h.hexdigest()}"


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(kind, symbol, digest)`` of a key made by :func:`make_key`, or None for any other key."""
    parts = key.split(SEPARATOR)
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def kind_of(key: str) -> str:
    """The metrics label for a key: the part before the first ``":"`` (``"other"`` if there is none)."""
    kind, sep, _ = key.partition(SEPARATOR)
    return kind if sep and _KIND_RE.match(kind) else "other"


def key_matches(key: str, kind: str | None, symbol: str | None) -> bool:
    """Whether ``key`` falls under an invalidation by ``kind`` and/or ``symbol`` (None = any)."""
    if kind is None and symbol is None:
        return True
    parsed = split_key(key)
    if parsed is None:
        return False
    k, s, _ = parsed
    return (kind is None or k == kind) and (symbol is None or s == symbol)


def normalize_filter(kind: str | None, symbol: str | None) -> tuple[str | None, str | None]:
    return (check_kind(kind) if kind is not None else None, normalize_symbol(symbol) if symbol is not None else None)
