"""Alpaca's real-time stock stream: the wire protocol, once (shared/reference/market-data-apis.md §2).

What the client (:mod:`marketpipe.providers.alpaca_stream`), the simulator's stream
(:mod:`marketpipe.sim.stream`) and the gateway's Alpaca-compatible stream (:mod:`marketpipe.api.alpaca_stream`)
all speak: the stream URL, the feeds, the channels and their message types, the error codes and their
messages, the server side of subscribe/unsubscribe, the control messages (``success``, ``error``,
``subscription``) and the data messages as tagged msgspec structs (tag field ``T``), the decoders from
vendor letters to canonical records and the encoders back, for JSON text frames and msgpack binary
frames (timestamps as msgpack Timestamp ext -1). Trades and quotes carry the vendor's nanoseconds both
ways: decoded into ``ts_ns``, and written back from it (:class:`StreamTime`) as the vendor writes them.
A msgpack frame of trades, quotes and bars is decoded straight into records (:func:`decode_data_frame`,
the client's hot path); anything else goes through :func:`decode_frame` and :data:`DECODERS`.
Depends on :mod:`marketpipe.core` only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import msgpack
import msgspec
import orjson

from marketpipe.core.schema import (
    Bar,
    CancelError,
    Correction,
    Imbalance,
    Luld,
    Quote,
    RawMessage,
    StreamRecord,
    Trade,
    TradingStatus,
)
from marketpipe.core.timeutil import ns_text, record_ns
from marketpipe.wire.alpaca_rest import one_ts_ns

DEFAULT_STREAM_URL = "wss://stream.data.alpaca.markets"
OFFICIAL_DATA_URL = "https://data.alpaca.markets"
STREAM_FEEDS = ("iex", "sip", "delayed_sip", "test")  # feeds a client may ask for
SERVED_FEEDS = ("iex", "sip", "test")  # the paths /v2/{feed} the simulator and the gateway serve
T = TypeVar("T", bound=tuple[Any, ...])
MSGPACK_CONTENT_TYPE = "application/msgpack"  # on the upgrade: binary msgpack frames instead of JSON text
# subscribe()/unsubscribe() keyword (and hub channel) -> wire channel key (§2.4)
CHANNELS: dict[str, str] = {
    "trades": "trades",
    "quotes": "quotes",
    "bars": "bars",
    "updated_bars": "updatedBars",
    "daily_bars": "dailyBars",
    "statuses": "statuses",
    "lulds": "lulds",
    "imbalances": "imbalances",
}
CHANNEL_NAMES: dict[str, str] = {wire: name for name, wire in CHANNELS.items()}  # updatedBars -> updated_bars
# wire key of a subscription reply -> channel name (corrections/cancelErrors follow trades)
REPLY_CHANNELS: dict[str, str] = {**CHANNEL_NAMES, "cancelErrors": "cancel_errors"}
# data message type (T) -> the channel it is delivered on (§2.8)
MESSAGE_CHANNELS: dict[str, str] = {
    "t": "trades",
    "q": "quotes",
    "b": "bars",
    "u": "updated_bars",
    "d": "daily_bars",
    "s": "statuses",
    "l": "lulds",
    "i": "imbalances",
    "c": "corrections",
    "x": "cancel_errors",
}
FOLLOWS_TRADES = ("corrections", "cancel_errors")  # channels that ride on the trades subscription
# keys a subscribe request may carry besides the channels: derived from trades (never set directly), and
# channels of Alpaca's other streams (refused with 410 on the stock stream)
DERIVED_CHANNELS = frozenset({"corrections", "cancelErrors"})
OTHER_STREAM_CHANNELS = frozenset({"orderbooks", "news", "pricing"})
# the error messages of the stream protocol (§2.6), by code
ERROR_MESSAGES: dict[int, str] = {
    400: "invalid syntax",
    401: "not authenticated",
    402: "auth failed",
    403: "already authenticated",
    404: "auth timeout",
    405: "symbol limit exceeded",
    406: "connection limit exceeded",
    407: "slow client",
    408: "v2 not enabled",
    409: "insufficient subscription",
    410: "invalid subscribe action for this feed",
    411: "insufficient scope",
    500: "internal error",
}
RAW = "raw"  # the channel of a message this side does not know (or could not decode)
MESSAGE_CHANNEL_NAMES = frozenset({*MESSAGE_CHANNELS.values(), RAW})
CONTROL_TYPES = frozenset({"success", "error", "subscription"})
# the event records (core/schema.py) and their messages
EventRecord = TradingStatus | Luld | Imbalance | Correction | CancelError
# event message type -> (canonical record class, ((wire key, record field), ...)) in §2.8 order
EVENTS: dict[str, tuple[type[EventRecord], tuple[tuple[str, str], ...]]] = {
    "s": (
        TradingStatus,
        (("sc", "status_code"), ("sm", "status_message"), ("rc", "reason_code"), ("rm", "reason_message")),
    ),
    "l": (Luld, (("u", "limit_up"), ("d", "limit_down"), ("i", "indicator"))),
    "i": (Imbalance, (("p", "price"),)),
    "c": (
        Correction,
        (
            ("x", "exchange"),
            ("oi", "original_id"),
            ("op", "original_price"),
            ("os", "original_size"),
            ("oc", "original_conditions"),
            ("ci", "corrected_id"),
            ("cp", "corrected_price"),
            ("cs", "corrected_size"),
            ("cc", "corrected_conditions"),
        ),
    ),
    "x": (CancelError, (("i", "trade_id"), ("x", "exchange"), ("p", "price"), ("s", "size"), ("a", "action"))),
}
# events carry t and z after their fields, except corrections and cancel/errors (z before t), as in §2.8
Z_FIRST = frozenset({"c", "x"})
# what a malformed frame raises while it is decoded (JSON or msgpack)
FRAME_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    msgpack.ExtraData,
    msgpack.FormatError,
    msgpack.StackError,
)


# --- the stream URL -----------------------------------------------------------------------------------


def stream_base_url(data_url: str | None) -> str:
    """The stream host that goes with an Alpaca data URL: Alpaca's stream for the official data API
    (or none given), else the same host with ``ws://``/``wss://`` for ``http://``/``https://``
    (marketpipe's simulator and gateway serve both on one port)."""
    if not data_url or data_url.rstrip("/") == OFFICIAL_DATA_URL:
        return DEFAULT_STREAM_URL
    return ws_scheme(data_url)


def ws_scheme(url: str) -> str:
    """``http(s)://`` -> ``ws(s)://`` (other URLs as given), without a trailing slash."""
    url = url.rstrip("/")
    if url.startswith("http://"):
        return "ws://" + url[7:]
    if url.startswith("https://"):
        return "wss://" + url[8:]
    return url


def stream_url(base_url: str, feed: str) -> str:
    """The socket of one feed: ``{base_url}/v2/{feed}`` (``base_url`` a stream host, e.g.
    :data:`DEFAULT_STREAM_URL`, or a data URL, mapped by :func:`stream_base_url`)."""
    return f"{stream_base_url(base_url)}/v2/{feed}"


def feed_of_path(path: str) -> str | None:
    """The served feed a request path names (``/v2/iex`` -> ``iex``), else None."""
    if path.startswith("/v2/") and path[4:] in SERVED_FEEDS:
        return path[4:]
    return None


# --- control messages ---------------------------------------------------------------------------------


class Success(msgspec.Struct, tag_field="T", tag="success", gc=False):
    """``{"T":"success","msg":"connected"|"authenticated"}``."""

    msg: str


CONNECTED = Success("connected")
AUTHENTICATED = Success("authenticated")


class Error(msgspec.Struct, tag_field="T", tag="error", gc=False):
    """``{"T":"error","code":N,"msg":...}``; :meth:`of` takes the message from :data:`ERROR_MESSAGES`."""

    code: int
    msg: str

    @classmethod
    def of(cls, code: int) -> Error:
        return cls(code, ERROR_MESSAGES[code])


class Subscription(msgspec.Struct, tag_field="T", tag="subscription", gc=False):
    """The complete subscription state, all eight channels plus ``corrections`` and ``cancelErrors``
    (both mirror ``trades``), symbols in the order first subscribed."""

    trades: list[str]
    quotes: list[str]
    bars: list[str]
    updatedBars: list[str]
    dailyBars: list[str]
    statuses: list[str]
    lulds: list[str]
    imbalances: list[str]
    corrections: list[str]
    cancelErrors: list[str]

    @classmethod
    def of(cls, state: Mapping[str, Iterable[str]]) -> Subscription:
        """From the symbols per channel *name* (``updated_bars``, ...); missing channels are empty."""
        lists = {CHANNELS[name]: list(state.get(name, ())) for name in CHANNELS}
        return cls(**lists, corrections=list(lists["trades"]), cancelErrors=list(lists["trades"]))

    @staticmethod
    def parse(obj: Mapping[str, Any]) -> dict[str, list[str]]:
        """A received reply as symbols per channel name (``cancelErrors`` -> ``cancel_errors``)."""
        return {
            REPLY_CHANNELS.get(k, k): [s for s in v if isinstance(s, str)]
            for k, v in obj.items()
            if k != "T" and isinstance(v, list)
        }


# --- data messages --------------------------------------------------------------------------------------


class StreamTime:
    """An instant in Unix nanoseconds, as the vendor's stream writes ``t`` for trades and quotes: in JSON
    RFC 3339 UTC with every digit it has (Go's RFC3339Nano, e.g. ``2024-03-05T15:02:11.308411571Z``), in
    msgpack the Timestamp extension (type -1) whose nanoseconds field holds them. A ``datetime`` (what
    msgspec would write otherwise) holds microseconds only. Encoded by :func:`encode` and friends."""

    __slots__ = ("ns",)

    def __init__(self, ns: int) -> None:
        self.ns = ns

    @classmethod
    def of(cls, ts: datetime, ts_ns: int | None) -> StreamTime:
        """A record's instant: its ``ts_ns`` when the vendor sent more than ``ts`` holds."""
        return cls(record_ns(_aware(ts), ts_ns))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StreamTime) and other.ns == self.ns

    def __hash__(self) -> int:
        return hash(self.ns)

    def __repr__(self) -> str:
        return f"StreamTime({ns_text(self.ns)})"


def msgpack_timestamp(ns: int) -> bytes:
    """The data of msgpack's Timestamp extension (type -1) for Unix nanoseconds: timestamp 32 for whole
    seconds, else timestamp 64 (30-bit nanoseconds, 34-bit seconds), else timestamp 96 — the smallest
    that holds it, as the msgpack spec asks."""
    sec, nsec = divmod(ns, 1_000_000_000)
    if 0 <= sec < 1 << 34:
        return _TS32(sec) if nsec == 0 and sec < 1 << 32 else _TS64(nsec << 34 | sec)
    return _TS96(nsec, sec)


_TS32, _TS64, _TS96 = struct.Struct(">I").pack, struct.Struct(">Q").pack, struct.Struct(">Iq").pack


class TradeMessage(msgspec.Struct, tag_field="T", tag="t", gc=False):
    S: str
    i: int | None
    x: str | None
    p: float
    s: int | float
    c: tuple[str, ...] | list[str]
    t: StreamTime
    z: str | None

    FIELDS: ClassVar[tuple[str, ...]] = ("i", "x", "p", "s", "c")  # between S and t, in wire order

    @classmethod
    def of(cls, rec: Trade) -> TradeMessage:
        return cls(
            rec.symbol,
            rec.trade_id,
            rec.exchange,
            rec.price,
            rec.size,
            rec.conditions,
            StreamTime.of(rec.ts, rec.ts_ns),
            rec.tape,
        )


class QuoteMessage(msgspec.Struct, tag_field="T", tag="q", gc=False, rename={"as_": "as"}):
    S: str
    bx: str | None
    bp: float
    bs: int | float
    ax: str | None
    ap: float
    as_: int | float
    c: tuple[str, ...] | list[str]
    t: StreamTime
    z: str | None

    FIELDS: ClassVar[tuple[str, ...]] = ("bx", "bp", "bs", "ax", "ap", "as", "c")

    @classmethod
    def of(cls, rec: Quote) -> QuoteMessage:
        return cls(
            rec.symbol,
            rec.bid_exchange,
            rec.bid_price,
            rec.bid_size,
            rec.ask_exchange,
            rec.ask_price,
            rec.ask_size,
            rec.conditions,
            StreamTime.of(rec.ts, rec.ts_ns),
            rec.tape,
        )


class _BarFields(msgspec.Struct, gc=False):
    S: str
    o: float
    h: float
    l: float  # noqa: E741 - the wire letter
    c: float
    v: int | float
    t: datetime
    n: int | None
    vw: float | None


class BarMessage(_BarFields, tag_field="T", tag="b"):
    """A minute bar (``b``)."""


class UpdatedBarMessage(_BarFields, tag_field="T", tag="u"):
    """A corrected minute bar (``u``)."""


class DailyBarMessage(_BarFields, tag_field="T", tag="d"):
    """The running daily bar (``d``)."""


BAR_MESSAGES: dict[str, type[_BarFields]] = {
    "bars": BarMessage,
    "updated_bars": UpdatedBarMessage,
    "daily_bars": DailyBarMessage,
}


def bar_message(rec: Bar, channel: str | None = None) -> _BarFields:
    """The bar message for ``channel`` (``bars``/``updated_bars``/``daily_bars``; else by timeframe)."""
    cls = BAR_MESSAGES.get(channel or "") or (DailyBarMessage if rec.timeframe == "1Day" else BarMessage)
    return cls(
        rec.symbol, rec.open, rec.high, rec.low, rec.close, rec.volume, _aware(rec.ts), rec.trade_count, rec.vwap
    )


def _event_message_type(letter: str, keys: Iterable[str]) -> type[msgspec.Struct]:
    """The message struct of an event type: ``T`` (the tag), ``S``, its keys in §2.8 order, then ``t``
    (left out when the event has no time: alpaca-py converts any ``t`` it is given) and ``z``, or
    ``z`` then ``t``."""
    tail: list[tuple[str, Any] | tuple[str, Any, Any]] = (
        [("z", Any), ("t", Any, msgspec.UNSET)] if letter in Z_FIRST else [("t", Any, msgspec.UNSET), ("z", Any, None)]
    )
    return msgspec.defstruct(
        f"EventMessage_{letter}", [("S", Any), *((k, Any) for k in keys), *tail], tag_field="T", tag=letter, gc=False
    )


# event record class -> (its message struct, ((wire key, record field), ...))
EVENT_MESSAGES: dict[type[EventRecord], tuple[type[msgspec.Struct], tuple[tuple[str, str], ...]]] = {
    cls: (_event_message_type(letter, (k for k, _ in fields)), fields) for letter, (cls, fields) in EVENTS.items()
}


def event_message(rec: EventRecord, symbol: str | None = None) -> msgspec.Struct:
    """The message of an event record, ``T`` first and keys in §2.8 order (``S`` from ``symbol`` when
    the record has none)."""
    cls, fields = EVENT_MESSAGES[type(rec)]
    values: dict[str, Any] = {key: getattr(rec, name) for key, name in fields}
    ts = rec.ts
    return cls(S=rec.symbol or symbol, **values, z=rec.tape, t=msgspec.UNSET if ts is None else _aware(ts))


def message_of(rec: StreamRecord, channel: str, symbol: str | None = None) -> msgspec.Struct | None:
    """The Alpaca message of a canonical record delivered on ``channel``; None for what Alpaca's
    format cannot carry (unknown upstream messages, records of other kinds)."""
    if type(rec) is Trade:
        return TradeMessage.of(rec)
    if type(rec) is Quote:
        return QuoteMessage.of(rec)
    if type(rec) is Bar:
        return bar_message(rec, channel)
    if isinstance(rec, (TradingStatus, Luld, Imbalance, Correction, CancelError)):
        return event_message(rec, symbol)
    return None


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)  # a naive datetime is taken as UTC


# --- frames -----------------------------------------------------------------------------------------------


def _json_time(obj: Any) -> Any:
    if isinstance(obj, StreamTime):
        return ns_text(obj.ns)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _msgpack_time(obj: Any) -> Any:
    if isinstance(obj, StreamTime):
        return msgspec.msgpack.Ext(-1, msgpack_timestamp(obj.ns))
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_JSON = msgspec.json.Encoder(enc_hook=_json_time)
_MSGPACK = msgspec.msgpack.Encoder(enc_hook=_msgpack_time)


def encode(obj: Any, binary: bool) -> bytes:
    """One message or a frame (a list of messages: structs or dicts) as msgpack or JSON bytes;
    datetimes and :class:`StreamTime` as msgpack Timestamp ext -1 or RFC 3339 (UTC ``Z``)."""
    return _MSGPACK.encode(obj) if binary else _JSON.encode(obj)


def encode_json(msg: Any) -> bytes:
    return _JSON.encode(msg)


def encode_msgpack(msg: Any) -> bytes:
    return _MSGPACK.encode(msg)


def control_frame(msg: Any, binary: bool) -> bytes:
    """A control message alone in its frame (every frame is an array)."""
    return encode([msg], binary)


def array_header(n: int) -> bytes:
    """msgpack array header for ``n`` elements (frames joined from pre-encoded messages)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def decode_client(data: str | bytes, *, binary: bool | None = None) -> Any:
    """A client's message as builtins: msgpack from a binary frame, JSON from a text frame (``binary``
    None: bytes are binary). Raises one of :data:`FRAME_ERRORS` when malformed."""
    if binary if binary is not None else isinstance(data, bytes):
        return msgpack.unpackb(data, raw=False)
    return orjson.loads(data)


def decode_frame(raw: str | bytes) -> Any:
    """A server frame as builtins: msgpack from binary (timestamps as ``msgpack.Timestamp``, which keeps
    the vendor's nanoseconds; a datetime would not), JSON from text. Raises one of :data:`FRAME_ERRORS`
    when malformed."""
    if isinstance(raw, bytes):
        return msgpack.unpackb(raw, strict_map_key=False)
    return orjson.loads(raw)


# --- subscriptions (server side) -----------------------------------------------------------------------------


def parse_subscription(obj: Mapping[str, Any], symbol: Callable[[str], str | None]) -> dict[str, list[str]] | int:
    """The server side of a subscribe/unsubscribe request (§2.4), as the simulator and the gateway both
    answer it: the channels (wire keys, e.g. ``updatedBars``) with their symbols in request order without
    repeats, or the error code to send — 410 for another stream's channel, 400 for anything malformed (an
    unknown key, a value that is not a list of strings, a symbol ``symbol`` refuses by returning None,
    no channel at all). ``symbol`` returns the symbol as it is to be kept (e.g. normalised)."""
    changes: dict[str, list[str]] = {}
    seen = False
    for key, value in obj.items():
        if key == "action":
            continue
        if key in DERIVED_CHANNELS:
            seen = True
            continue
        if key in OTHER_STREAM_CHANNELS:
            return 410
        if key not in CHANNEL_NAMES or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return 400
        kept = [symbol(v) for v in value]
        if any(k is None for k in kept):
            return 400
        seen = True
        changes[key] = list(dict.fromkeys(k for k in kept if k is not None))
    return changes if seen else 400


# --- message decoding (vendor letters -> canonical names) ----------------------------------------------


def _ts(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        ts = datetime.fromisoformat(value)
        if ts.tzinfo is None:
            raise ValueError(f"timestamp without a zone: {value!r}")
        return ts.astimezone(UTC)
    if isinstance(value, msgpack.Timestamp):
        return value.to_datetime()
    raise TypeError(f"timestamp of type {type(value).__name__}")


def _ts_ns(value: Any) -> int | None:
    """The exact nanoseconds of a stream timestamp (RFC-3339 text or msgpack Timestamp); None for a datetime."""
    if isinstance(value, str):
        return one_ts_ns(value)
    if isinstance(value, msgpack.Timestamp):
        return int(value.to_unix_nano())
    return None


def _opt_ts(value: Any) -> datetime | None:
    return None if value is None else _ts(value)


def _sym(item: dict[str, Any]) -> str:
    sym = item["S"]
    if not isinstance(sym, str):
        raise TypeError("symbol is not a string")
    return sym


def _conds(value: Any) -> tuple[str, ...]:
    return tuple(map(str, value)) if value else ()


def _trade(m: dict[str, Any], source: str, feed: str, fetched: datetime) -> Trade:
    return Trade(
        symbol=_sym(m),
        ts=_ts(m["t"]),
        ts_ns=_ts_ns(m["t"]),
        price=float(m["p"]),
        size=int(m["s"]),
        exchange=m.get("x"),
        trade_id=m.get("i"),
        conditions=_conds(m.get("c")),
        tape=m.get("z"),
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


def _quote(m: dict[str, Any], source: str, feed: str, fetched: datetime) -> Quote:
    return Quote(
        symbol=_sym(m),
        ts=_ts(m["t"]),
        ts_ns=_ts_ns(m["t"]),
        bid_price=float(m.get("bp") or 0.0),
        bid_size=int(m.get("bs") or 0),
        ask_price=float(m.get("ap") or 0.0),
        ask_size=int(m.get("as") or 0),
        bid_exchange=m.get("bx"),
        ask_exchange=m.get("ax"),
        conditions=_conds(m.get("c")),
        tape=m.get("z"),
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


def _bar(timeframe: str) -> Callable[[dict[str, Any], str, str, datetime], Bar]:
    def decode(m: dict[str, Any], source: str, feed: str, fetched: datetime) -> Bar:
        n, vw = m.get("n"), m.get("vw")
        return Bar(
            symbol=_sym(m),
            timeframe=timeframe,
            ts=_ts(m["t"]),
            open=float(m["o"]),
            high=float(m["h"]),
            low=float(m["l"]),
            close=float(m["c"]),
            volume=int(m["v"]),
            trade_count=int(n) if n is not None else None,
            vwap=float(vw) if vw is not None else None,
            source=source,
            feed=feed,
            fetched_at=fetched,
        )

    return decode


def _event(
    cls: type[EventRecord], fields: tuple[tuple[str, str], ...]
) -> Callable[[dict[str, Any], str, str, datetime], EventRecord]:
    def decode(m: dict[str, Any], source: str, feed: str, fetched: datetime) -> EventRecord:
        rec: dict[str, Any] = {"symbol": _sym(m), "ts": _opt_ts(m.get("t"))}
        for letter, name in fields:
            rec[name] = m.get(letter)
        rec.update(tape=m.get("z"), source=source, feed=feed, fetched_at=fetched)
        return msgspec.convert(rec, cls)  # the types checked: a wrong one raises ValidationError (a ValueError)

    return decode


def raw_record(item: dict[str, Any], source: str, feed: str, fetched: datetime, error: str | None) -> RawMessage:
    """The record of a message this side does not know or could not decode, kept as received."""
    sym = item.get("S")
    return RawMessage(
        message_type=item.get("T"),
        symbol=sym if isinstance(sym, str) else None,
        message={k: v.to_datetime() if isinstance(v, msgpack.Timestamp) else v for k, v in item.items()},
        source=source,
        feed=feed,
        fetched_at=fetched,
        error=error,
    )


DECODERS: dict[str, Callable[[dict[str, Any], str, str, datetime], StreamRecord]] = {
    "t": _trade,
    "q": _quote,
    "b": _bar("1Min"),
    "u": _bar("1Min"),
    "d": _bar("1Day"),
    **{letter: _event(cls, fields) for letter, (cls, fields) in EVENTS.items()},
}


# --- the fast path: a msgpack data frame straight into records -----------------------------------------
# A frame of trades, quotes and bars (the bulk of the stream) is decoded by msgspec into typed structs and
# from them into the canonical records, with no per-message dict or msgpack Timestamp object in between.
# The structs accept exactly what the general path (decode_frame + DECODERS) decodes to the same records;
# anything else in a frame (an event or control message, a type the general path would coerce or keep
# raw, a bad timestamp) makes the whole frame go the general path, so the two never disagree.


class _TradeIn(msgspec.Struct, tag_field="T", tag="t", gc=False):
    S: str
    t: msgspec.msgpack.Ext
    p: float
    s: int
    i: int | None = None
    x: str | None = None
    c: tuple[str, ...] | None = None
    z: str | None = None


class _QuoteIn(msgspec.Struct, tag_field="T", tag="q", gc=False, rename={"as_": "as"}):
    S: str
    t: msgspec.msgpack.Ext
    bp: float = 0.0
    bs: int = 0
    ap: float = 0.0
    as_: int = 0
    bx: str | None = None
    ax: str | None = None
    c: tuple[str, ...] | None = None
    z: str | None = None


class _BarIn(msgspec.Struct, gc=False):
    S: str
    t: msgspec.msgpack.Ext
    o: float
    h: float
    l: float  # noqa: E741 - the vendor's letter
    c: float
    v: int
    n: int | None = None
    vw: float | None = None


class _MinuteBarIn(_BarIn, tag_field="T", tag="b"):
    pass


class _UpdatedBarIn(_BarIn, tag_field="T", tag="u"):
    pass


class _DailyBarIn(_BarIn, tag_field="T", tag="d"):
    pass


_DATA_FRAME = msgspec.msgpack.Decoder(list[_TradeIn | _QuoteIn | _MinuteBarIn | _UpdatedBarIn | _DailyBarIn])
_BAR_KINDS: dict[type[_BarIn], tuple[str, str]] = {
    _MinuteBarIn: ("bars", "1Min"),
    _UpdatedBarIn: ("updated_bars", "1Min"),
    _DailyBarIn: ("daily_bars", "1Day"),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_U32, _U64, _TS96_IN = struct.Struct(">I").unpack, struct.Struct(">Q").unpack, struct.Struct(">Iq").unpack


def _ext_time(ext: msgspec.msgpack.Ext) -> tuple[int, int]:
    """(seconds, nanoseconds) of a msgpack Timestamp extension, as ``msgpack.Timestamp`` reads it;
    ValueError for another extension or an impossible one (the general path then decides)."""
    data = ext.data  # bytes as msgspec decodes it (typed Buffer)
    if ext.code != -1 or type(data) is not bytes:
        raise ValueError(f"extension type {ext.code} is not a timestamp")
    n = len(data)
    if n == 8:
        (v,) = _U64(data)
        sec, nsec = v & 0x3FFFFFFFF, v >> 34
    elif n == 4:
        (sec,), nsec = _U32(data), 0
    elif n == 12:
        nsec, sec = _TS96_IN(data)
    else:
        raise ValueError("a timestamp extension holds 4, 8 or 12 bytes")
    if nsec >= 1_000_000_000:
        raise ValueError("nanoseconds out of range")
    return sec, nsec


def decode_data_frame(raw: bytes, source: str, feed: str, fetched: datetime, pack: type[T]) -> list[T] | None:
    """A msgpack frame of trades, quotes and bars as ``pack((channel, record))`` for each message, in
    frame order — ``pack`` a tuple type, e.g. a named tuple of (channel, record), made without calling its
    Python-level constructor — the records :data:`DECODERS` would make of :func:`decode_frame`'s dicts;
    None when the frame holds anything else (it then goes the general path, which also reports what is
    malformed)."""
    try:
        msgs = _DATA_FRAME.decode(raw)
    except msgspec.DecodeError:  # ValidationError included: not (only) trades, quotes and bars
        return None
    out: list[T] = []
    append = out.append
    new = tuple.__new__
    epoch = _EPOCH
    rec: StreamRecord
    try:
        for m in msgs:
            sec, nsec = _ext_time(m.t)
            ts = epoch + timedelta(seconds=sec, microseconds=nsec // 1000)
            if isinstance(m, _TradeIn):
                channel = "trades"
                rec = Trade(
                    symbol=m.S,
                    ts=ts,
                    ts_ns=sec * 1_000_000_000 + nsec,
                    price=m.p,
                    size=m.s,
                    exchange=m.x,
                    trade_id=m.i,
                    conditions=m.c or (),
                    tape=m.z,
                    source=source,
                    feed=feed,
                    fetched_at=fetched,
                )
            elif isinstance(m, _QuoteIn):
                channel = "quotes"
                rec = Quote(
                    symbol=m.S,
                    ts=ts,
                    ts_ns=sec * 1_000_000_000 + nsec,
                    bid_price=m.bp,
                    bid_size=m.bs,
                    ask_price=m.ap,
                    ask_size=m.as_,
                    bid_exchange=m.bx,
                    ask_exchange=m.ax,
                    conditions=m.c or (),
                    tape=m.z,
                    source=source,
                    feed=feed,
                    fetched_at=fetched,
                )
            else:
                channel, timeframe = _BAR_KINDS[type(m)]
                rec = Bar(
                    symbol=m.S,
                    timeframe=timeframe,
                    ts=ts,
                    open=m.o,
                    high=m.h,
                    low=m.l,
                    close=m.c,
                    volume=m.v,
                    trade_count=m.n,
                    vwap=m.vw,
                    source=source,
                    feed=feed,
                    fetched_at=fetched,
                )
            append(new(pack, (channel, rec)))
    except (ValueError, OverflowError):  # a timestamp the general path must judge
        return None
    return out
