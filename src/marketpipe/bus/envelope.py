"""Versioned event envelopes (msgspec, JSON on the wire). ``v`` is the envelope version: a consumer
refuses a version it does not know instead of guessing. ``id`` is the de-duplication key sent as
``Nats-Msg-Id``; it is deterministic (the same fact published twice gets the same id)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from marketpipe.core.timeutil import utcnow

VERSION = 1
Kind = Literal["raw", "bars", "quality", "corpact", "health", "work", "progress", "dead"]


class Envelope(msgspec.Struct, forbid_unknown_fields=False):  # every field on the wire, v included
    kind: Kind
    id: str
    v: int = VERSION
    at: datetime = msgspec.field(default_factory=utcnow)
    source: str | None = None
    symbol: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class WorkItem(msgspec.Struct, forbid_unknown_fields=True):
    """One distributed backfill item: symbols × window, fetched by one worker."""

    symbols: list[str]
    timeframe: str
    start: datetime
    end: datetime
    feed: str | None = None
    run: str = ""
    v: int = VERSION

    @property
    def msg_id(self) -> str:
        """Deterministic: two coordinators planning the same range publish the same ids."""
        return (
            f"backfill:{','.join(self.symbols)}:{self.timeframe}:{self.feed or '-'}:"
            f"{self.start.isoformat()}:{self.end.isoformat()}"
        )


_enc = msgspec.json.Encoder()
_env_dec = msgspec.json.Decoder(Envelope)
_work_dec = msgspec.json.Decoder(WorkItem)


def encode(obj: Envelope | WorkItem) -> bytes:
    return _enc.encode(obj)


def decode(data: bytes) -> Envelope:
    env = _env_dec.decode(data)
    if env.v != VERSION:
        raise msgspec.ValidationError(f"unknown envelope version {env.v} (this build reads {VERSION})")
    return env


def decode_work(data: bytes) -> WorkItem:
    item = _work_dec.decode(data)
    if item.v != VERSION:
        raise msgspec.ValidationError(f"unknown work item version {item.v} (this build reads {VERSION})")
    return item
