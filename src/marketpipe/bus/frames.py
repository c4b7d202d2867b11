"""One upstream stream frame as one NATS message (``mp.live.<feed>``), msgpack-encoded.

A frame is a list of ``[channel, kind, record]`` with ``kind`` ``t`` (trade), ``q`` (quote), ``b`` (bar) or
``e`` (a tagged stream event), because trades, quotes and bars are untagged structs that only their class
tells apart. The first element is the frame header ``[VERSION, published_ns]``: the owner's wall clock
when it published, so a gateway can measure what the bus added."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from marketpipe.core.schema import Bar, Quote, StreamEvent, StreamRecord, Trade

VERSION = 1
_KIND = {Trade: "t", Quote: "q", Bar: "b"}
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def encode_frame(msgs: list[tuple[str, StreamRecord]]) -> bytes:
    body: list[Any] = [[VERSION, time.time_ns()]]
    for channel, rec in msgs:
        body.append([channel, _KIND.get(type(rec), "e"), rec])
    return _enc.encode(body)


def decode_frame(data: bytes) -> tuple[int, list[tuple[str, StreamRecord]]]:
    """The publish time (ns) and the frame's messages; raises ``msgspec.ValidationError`` on a frame of
    another version or shape."""
    raw = _dec.decode(data)
    if not isinstance(raw, list) or not raw or raw[0][0] != VERSION:
        raise msgspec.ValidationError("not a version-1 live frame")
    out: list[tuple[str, StreamRecord]] = []
    for channel, kind, rec in raw[1:]:
        kind_type: Any = {"t": Trade, "q": Quote, "b": Bar}.get(kind, StreamEvent)
        out.append((channel, msgspec.convert(rec, kind_type)))
    return int(raw[0][1]), out
