"""Alpaca Market Data API v2 (stocks), REST: the wire format, once (shared/reference/market-data-apis.md §1).

What the adapter (:mod:`marketpipe.providers.alpaca`), the simulator's Alpaca face
(:mod:`marketpipe.sim.alpaca`) and the gateway's Alpaca-compatible routes (:mod:`marketpipe.api.alpaca`)
all know about the vendor's REST format: paths, feeds and parameter vocabularies, the row structs with
their field letters, the page and latest envelopes, the decoders from the vendor's rows to canonical
frames and records and the encoders back, and the code tables. Depends on :mod:`marketpipe.core` only.

The bulk path stays columnar: a page's per-symbol arrays are left as :class:`msgspec.Raw` and parsed by
polars' JSON reader (no per-row Python).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import orjson
import polars as pl

from marketpipe.core.errors import MalformedResponse
from marketpipe.core.schema import BAR_SCHEMA, QUOTE_SCHEMA, TRADE_SCHEMA, UTC_US, Bar, Quote, Snapshot, Trade
from marketpipe.core.timeutil import ns_text, ns_to_dt, record_ns

DEFAULT_BASE_URL = "https://data.alpaca.markets"
MAX_LIMIT = 10_000
SIP_DELAY = timedelta(minutes=15)  # the free plan's SIP stops this far behind now
HISTORICAL_FEEDS = ("sip", "iex", "otc", "boats")
LATEST_FEEDS = ("sip", "iex", "delayed_sip", "otc", "boats", "overnight")
ADJUSTMENTS = ("raw", "split", "dividend", "spin-off", "all")
SORTS = ("asc", "desc")
Kind = Literal["bars", "trades", "quotes"]
KINDS: tuple[Kind, ...] = ("bars", "trades", "quotes")
# the 403 text of a free plan asking for recent SIP data (the adapter reads it as NOT_ENTITLED)
RECENT_SIP_MARK = "subscription does not permit"
RECENT_SIP = f"{RECENT_SIP_MARK} querying recent SIP data"
# Alpaca's SIP quote sizes were round lots until 2025-11-03 and are shares since; canonical quotes
# are always in shares (a round lot was 100 shares for every symbol before that date).
QUOTE_SHARES_FROM = datetime(2025, 11, 3, 5, tzinfo=UTC)  # midnight New York
ROUND_LOT = 100


# --- paths ------------------------------------------------------------------------------------------


def quote_path(symbol: str) -> str:
    """A symbol as one path segment (``BRK/B`` would otherwise split it)."""
    from urllib.parse import quote

    return quote(symbol, safe="")


def historical_path(kind: str, symbol: str | None = None) -> str:
    """``/v2/stocks/{kind}`` (multi-symbol) or ``/v2/stocks/{symbol}/{kind}``."""
    return f"/v2/stocks/{quote_path(symbol)}/{kind}" if symbol is not None else f"/v2/stocks/{kind}"


def latest_path(kind: str, symbol: str | None = None) -> str:
    """``/v2/stocks/{kind}/latest`` or ``/v2/stocks/{symbol}/{kind}/latest`` (kind plural: trades, ...)."""
    return f"{historical_path(kind, symbol)}/latest"


SNAPSHOTS_PATH = "/v2/stocks/snapshots"


def snapshot_path(symbol: str) -> str:
    return f"/v2/stocks/{quote_path(symbol)}/snapshot"


EXCHANGES_PATH = "/v2/stocks/meta/exchanges"
CONDITIONS_PATH = "/v2/stocks/meta/conditions/{ticktype}"

# --- wire structs (gc=False: decoded objects hold no cycles, which makes decoding much faster) ----


class WBar(msgspec.Struct, gc=False):
    t: str
    o: float | None = None
    h: float | None = None
    l: float | None = None  # noqa: E741 - the vendor's key
    c: float | None = None
    v: int | float | None = None
    n: int | None = None
    vw: float | None = None


class WTrade(msgspec.Struct, gc=False):
    t: str
    p: float | None = None
    s: int | float | None = None
    x: str | None = None
    i: int | None = None
    c: list[str] | None = None
    z: str | None = None
    u: str | None = None


class WQuote(msgspec.Struct, gc=False, rename={"as_": "as"}):
    t: str
    bp: float | None = None
    bs: int | float | None = None
    bx: str | None = None
    ap: float | None = None
    as_: int | float | None = None
    ax: str | None = None
    c: list[str] | None = None
    z: str | None = None


def page_structs(key: str, row: type) -> tuple[type, type]:
    """The multi-symbol (``{key: {sym: [...]}, "next_page_token"}``) and single-symbol (``{key: [...]
    or null, "symbol", "next_page_token"}``) page shapes. With ``row=msgspec.Raw`` each symbol's
    array stays undecoded bytes.

    Every key of the vendor's envelope is required (a token's value may be null): a ``{}`` from a
    proxy, or a bare ``{"bars": null}``, is a malformed answer — never an empty last page, which
    would let the ledger claim a range that was never delivered."""
    token = ("next_page_token", str | None)
    raw = row is msgspec.Raw
    rows: Any = row if raw else list[row]  # type: ignore[valid-type]
    maybe_rows: Any = rows if raw else rows | None  # Raw already captures a JSON null
    multi = msgspec.defstruct(f"_Multi_{key}", [(key, dict[str, rows] | None), token], gc=False)
    single = msgspec.defstruct(f"_Single_{key}", [(key, maybe_rows), ("symbol", str), token], gc=False)
    return multi, single


def page_keys(kind: str, single: bool) -> tuple[str, ...]:
    return (kind, "symbol", "next_page_token") if single else (kind, "next_page_token")


PAGES: dict[str, tuple[type, type]] = {kind: page_structs(kind, msgspec.Raw) for kind in KINDS}
# Pages are the bulk path: the envelope is decoded with each symbol's array left as raw bytes, and
# polars' JSON reader (Rust, without the GIL, so pages decode in parallel threads) parses them.
RAW_BAR_SCHEMA = {
    "t": pl.String(),
    "o": pl.Float64(),
    "h": pl.Float64(),
    "l": pl.Float64(),
    "c": pl.Float64(),
    "v": pl.Float64(),
    "n": pl.Float64(),
    "vw": pl.Float64(),
}
RAW_TRADE_SCHEMA = {
    "t": pl.String(),
    "p": pl.Float64(),
    "s": pl.Float64(),
    "x": pl.String(),
    "i": pl.UInt64(),
    "c": pl.List(pl.String()),
    "z": pl.String(),
    "u": pl.String(),
}
RAW_QUOTE_SCHEMA = {
    "t": pl.String(),
    "bp": pl.Float64(),
    "bs": pl.Float64(),
    "bx": pl.String(),
    "ap": pl.Float64(),
    "as": pl.Float64(),
    "ax": pl.String(),
    "c": pl.List(pl.String()),
    "z": pl.String(),
}


# Latest values: the wrapper key is required (its value may be null: an unknown symbol). Only the
# multi-snapshot has no wrapper, so there an empty object is a legitimate "nothing known".


class LatestTrade(msgspec.Struct):
    trade: WTrade | None


class LatestQuote(msgspec.Struct):
    quote: WQuote | None


class LatestTrades(msgspec.Struct):
    trades: dict[str, WTrade] | None


class LatestQuotes(msgspec.Struct):
    quotes: dict[str, WQuote] | None


class LatestBars(msgspec.Struct):
    bars: dict[str, WBar] | None


class WSnapshot(msgspec.Struct):
    latestTrade: WTrade | None = None
    latestQuote: WQuote | None = None
    minuteBar: WBar | None = None
    dailyBar: WBar | None = None
    prevDailyBar: WBar | None = None


LATEST: dict[str, type] = {"trades": LatestTrades, "quotes": LatestQuotes, "bars": LatestBars}
LATEST_ONE: dict[str, type] = {"trade": LatestTrade, "quote": LatestQuote}


# --- columnar conversion -----------------------------------------------------------------------

_FAST_TS = "%Y-%m-%dT%H:%M:%SZ"


def parse_ts(col: pl.Series, unit: str) -> pl.Series:
    """RFC-3339 strings to UTC datetimes; the fixed whole-second form is parsed on the fast path,
    anything else (fractions, offsets) by the general parser; unparsable stays null (and is then
    quarantined by the checks, never dropped)."""
    fast = col.str.to_datetime(_FAST_TS, time_unit=unit, time_zone="UTC", strict=False)  # type: ignore[arg-type]
    missing = fast.is_null() & col.is_not_null()
    if not missing.any():
        return fast
    slow = (
        col.str.replace(r"Z$", "+00:00")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit=unit, strict=False)  # type: ignore[arg-type]
        .dt.convert_time_zone("UTC")
    )
    return fast.fill_null(slow)


def _read_groups(groups: list[tuple[str, msgspec.Raw | None]], schema: dict[str, pl.DataType]) -> pl.DataFrame | None:
    """Each symbol's raw JSON array through polars' reader, with the symbol added; None if empty."""
    parts = []
    for sym, raw in groups:
        if raw is None:
            continue
        data = memoryview(raw)
        if data.nbytes == 4 and data.tobytes() == b"null":
            continue
        part = pl.read_json(io.BytesIO(data), schema=schema)
        if part.height:
            parts.append(part.with_columns(symbol=pl.lit(sym, pl.String)))
    if not parts:
        return None
    return pl.concat(parts) if len(parts) > 1 else parts[0]


def _stamped(source: str, feed: str, fetched_at: datetime) -> list[pl.Expr]:
    return [
        pl.lit(source, pl.String).alias("source"),
        pl.lit(feed, pl.String).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
    ]


def bars_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], timeframe: str, source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    """Raw per-symbol JSON arrays of Alpaca bars to one canonical frame."""
    raw_frame = _read_groups(groups, RAW_BAR_SCHEMA)
    if raw_frame is None:
        return pl.DataFrame(schema=BAR_SCHEMA)
    t = raw_frame.get_column("t")
    return raw_frame.select(
        pl.col("symbol"),
        pl.lit(timeframe, pl.String).alias("timeframe"),
        parse_ts(t, "us").alias("ts"),
        pl.col("o").alias("open"),
        pl.col("h").alias("high"),
        pl.col("l").alias("low"),
        pl.col("c").alias("close"),
        pl.col("v").cast(pl.Int64, strict=False).alias("volume"),
        pl.col("n").cast(pl.Int64, strict=False).alias("trade_count"),
        pl.col("vw").alias("vwap"),
        *_stamped(source, feed, fetched_at),
        t.alias("raw_ts"),
    )


def trades_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    raw = _read_groups(groups, RAW_TRADE_SCHEMA)
    if raw is None:
        return pl.DataFrame(schema=TRADE_SCHEMA)
    return raw.select(
        pl.col("symbol"),
        parse_ts(raw.get_column("t"), "ns").alias("ts"),
        pl.col("p").alias("price"),
        pl.col("s").cast(pl.Int64, strict=False).alias("size"),
        pl.col("x").alias("exchange"),
        pl.col("i").alias("trade_id"),
        pl.col("c").alias("conditions"),
        pl.col("z").alias("tape"),
        pl.col("u").alias("update"),
        *_stamped(source, feed, fetched_at),
    )


def quotes_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    raw = _read_groups(groups, RAW_QUOTE_SCHEMA)
    if raw is None:
        return pl.DataFrame(schema=QUOTE_SCHEMA)
    return shares_from_lots(
        raw.select(
            pl.col("symbol"),
            parse_ts(raw.get_column("t"), "ns").alias("ts"),
            pl.col("bp").alias("bid_price"),
            pl.col("bs").cast(pl.Int64, strict=False).alias("bid_size"),
            pl.col("bx").alias("bid_exchange"),
            pl.col("ap").alias("ask_price"),
            pl.col("as").cast(pl.Int64, strict=False).alias("ask_size"),
            pl.col("ax").alias("ask_exchange"),
            pl.col("c").alias("conditions"),
            pl.col("z").alias("tape"),
            *_stamped(source, feed, fetched_at),
        )
    )


def shares_from_lots(frame: pl.DataFrame) -> pl.DataFrame:
    before = pl.col("ts") < pl.lit(QUOTE_SHARES_FROM)
    return frame.with_columns(
        [pl.when(before).then(pl.col(c) * ROUND_LOT).otherwise(pl.col(c)).alias(c) for c in ("bid_size", "ask_size")]
    )


def one_ts(text: str) -> datetime:
    s = parse_ts(pl.Series([text], dtype=pl.String), "ns")[0]
    if s is None:
        raise MalformedResponse(f"unparsable timestamp {text!r}", provider="alpaca")
    return s  # type: ignore[no-any-return]


def one_ts_ns(text: str) -> int:
    """An RFC-3339 timestamp as exact Unix nanoseconds (a datetime would keep microseconds only)."""
    s = parse_ts(pl.Series([text], dtype=pl.String), "ns").dt.epoch("ns")[0]
    if s is None:
        raise MalformedResponse(f"unparsable timestamp {text!r}", provider="alpaca")
    return int(s)


def trade_record(sym: str, w: WTrade, source: str, feed: str, fetched: datetime) -> Trade:
    if w.p is None or w.s is None:
        raise MalformedResponse(f"trade for {sym} lacks price or size", provider="alpaca")
    ns = one_ts_ns(w.t)
    return Trade(
        symbol=sym,
        ts=ns_to_dt(ns),
        ts_ns=ns,
        price=w.p,
        size=int(w.s),
        exchange=w.x,
        trade_id=w.i,
        conditions=tuple(w.c or ()),
        tape=w.z,
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


def quote_record(sym: str, w: WQuote, source: str, feed: str, fetched: datetime) -> Quote:
    ns = one_ts_ns(w.t)
    ts = ns_to_dt(ns)
    lot = ROUND_LOT if ts < QUOTE_SHARES_FROM else 1
    return Quote(
        symbol=sym,
        ts=ts,
        ts_ns=ns,
        bid_price=w.bp or 0.0,
        bid_size=int(w.bs or 0) * lot,
        ask_price=w.ap or 0.0,
        ask_size=int(w.as_ or 0) * lot,
        bid_exchange=w.bx,
        ask_exchange=w.ax,
        conditions=tuple(w.c or ()),
        tape=w.z,
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


def bar_record_tf(tf: str, sym: str, w: WBar, source: str, feed: str, fetched: datetime) -> Bar:
    return bar_record(sym, tf, w, source, feed, fetched)


def bar_record(sym: str, tf: str, w: WBar, source: str, feed: str, fetched: datetime) -> Bar:
    o, h, lo, c, v = w.o, w.h, w.l, w.c, w.v
    if o is None or h is None or lo is None or c is None or v is None:
        raise MalformedResponse(f"bar for {sym} lacks a price or the volume", provider="alpaca")
    return Bar(
        symbol=sym,
        timeframe=tf,
        ts=one_ts(w.t),
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=int(v),
        trade_count=w.n,
        vwap=w.vw,
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


# --- encoding (canonical -> the vendor's keys, in the vendor's order) ---------------------------


def ts_text(ts: datetime) -> str:
    """RFC-3339 with the fraction's trailing zeros trimmed (Go's RFC3339Nano, as the vendor sends)."""
    text = ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def bar_ts_text(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _nano_text(col: str) -> pl.Expr:
    return pl.col(col).dt.strftime("%Y-%m-%dT%H:%M:%S%.9f").str.strip_chars_end("0").str.strip_chars_end(".") + "Z"


def _lots(col: str) -> pl.Expr:
    before = pl.col("ts") < pl.lit(QUOTE_SHARES_FROM)
    return pl.when(before).then(pl.col(col) // ROUND_LOT).otherwise(pl.col(col))


def wire_rows(kind: str, frame: pl.DataFrame) -> pl.DataFrame:
    """Canonical columns to the vendor's keys, in the vendor's order (symbol kept first for grouping)."""
    if kind == "bars":
        return frame.select(
            "symbol",
            pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("t"),
            pl.col("open").alias("o"),
            pl.col("high").alias("h"),
            pl.col("low").alias("l"),
            pl.col("close").alias("c"),
            pl.col("volume").alias("v"),
            pl.col("trade_count").alias("n"),
            pl.col("vwap").alias("vw"),
        )
    if kind == "trades":
        cols = [
            "symbol",
            _nano_text("ts").alias("t"),
            pl.col("exchange").alias("x"),
            pl.col("price").alias("p"),
            pl.col("size").alias("s"),
            pl.col("conditions").alias("c"),
            pl.col("trade_id").alias("i"),
            pl.col("tape").alias("z"),
        ]
        if "update" in frame.columns and frame["update"].null_count() < frame.height:
            cols.append(pl.col("update").alias("u"))
        return frame.select(cols)
    return frame.select(
        "symbol",
        _nano_text("ts").alias("t"),
        pl.col("ask_exchange").alias("ax"),
        pl.col("ask_price").alias("ap"),
        _lots("ask_size").alias("as"),
        pl.col("bid_exchange").alias("bx"),
        pl.col("bid_price").alias("bp"),
        _lots("bid_size").alias("bs"),
        pl.col("conditions").alias("c"),
        pl.col("tape").alias("z"),
    )


def _rows_json(rows: pl.DataFrame) -> bytes:
    if "u" in rows.columns:  # amended trades only carry "u": leave it out of the others
        return orjson.dumps(
            [{k: v for k, v in r.items() if k != "u" or v is not None} for r in rows.iter_rows(named=True)]
        )
    buf = io.BytesIO()
    rows.write_json(buf)
    return buf.getvalue()


def page_json(kind: str, frame: pl.DataFrame, single: str | None, next_token: str | None, currency: bool) -> bytes:
    """A historical page: ``{kind: {SYM: [...]}, "next_page_token"}`` or, for one symbol,
    ``{kind: [...] | null, "symbol", "next_page_token"}``; ``"currency"`` last when asked for."""
    rows = wire_rows(kind, frame) if frame.height else None
    doc: dict[str, Any]
    if single is not None:
        body = orjson.Fragment(_rows_json(rows.drop("symbol"))) if rows is not None else None
        doc = {kind: body, "symbol": single, "next_page_token": next_token}
    else:
        parts: dict[str, Any] = {}
        if rows is not None:
            for (sym,), part in rows.partition_by("symbol", as_dict=True, maintain_order=True).items():
                parts[str(sym)] = orjson.Fragment(_rows_json(part.drop("symbol")))
        doc = {kind: parts, "next_page_token": next_token}
    if currency:
        doc["currency"] = "USD"
    return orjson.dumps(doc)


def trade_obj(t: Trade) -> dict[str, Any]:
    return {
        "t": ns_text(record_ns(t.ts, t.ts_ns)),  # the vendor's nanoseconds
        "x": t.exchange,
        "p": t.price,
        "s": t.size,
        "c": list(t.conditions),
        "i": t.trade_id,
        "z": t.tape,
    }


def quote_obj(q: Quote) -> dict[str, Any]:
    lot = ROUND_LOT if q.ts < QUOTE_SHARES_FROM else 1
    return {
        "t": ns_text(record_ns(q.ts, q.ts_ns)),
        "ax": q.ask_exchange,
        "ap": q.ask_price,
        "as": q.ask_size // lot,
        "bx": q.bid_exchange,
        "bp": q.bid_price,
        "bs": q.bid_size // lot,
        "c": list(q.conditions),
        "z": q.tape,
    }


def bar_obj(b: Bar) -> dict[str, Any]:
    return {
        "t": bar_ts_text(b.ts),
        "o": b.open,
        "h": b.high,
        "l": b.low,
        "c": b.close,
        "v": b.volume,
        "n": b.trade_count,
        "vw": b.vwap,
    }


def snapshot_obj(s: Snapshot) -> dict[str, Any]:
    """The five members, each left out when there is none (as the vendor does)."""
    members: dict[str, Any] = {}
    if s.latest_trade is not None:
        members["latestTrade"] = trade_obj(s.latest_trade)
    if s.latest_quote is not None:
        members["latestQuote"] = quote_obj(s.latest_quote)
    if s.minute_bar is not None:
        members["minuteBar"] = bar_obj(s.minute_bar)
    if s.daily_bar is not None:
        members["dailyBar"] = bar_obj(s.daily_bar)
    if s.prev_daily_bar is not None:
        members["prevDailyBar"] = bar_obj(s.prev_daily_bar)
    return members


# --- code tables (/v2/stocks/meta/...) ----------------------------------------------------------------

EXCHANGES = {
    "A": "NYSE American (AMEX)",
    "B": "NASDAQ OMX BX",
    "C": "National Stock Exchange",
    "D": "FINRA ADF",
    "E": "Market Independent",
    "H": "MIAX",
    "I": "International Securities Exchange",
    "J": "Cboe EDGA",
    "K": "Cboe EDGX",
    "L": "Long Term Stock Exchange",
    "M": "Chicago Stock Exchange",
    "N": "New York Stock Exchange",
    "P": "NYSE Arca",
    "Q": "NASDAQ OMX",
    "S": "NASDAQ Small Cap",
    "T": "NASDAQ Int",
    "U": "Members Exchange",
    "V": "IEX",
    "W": "CBOE",
    "X": "NASDAQ OMX PSX",
    "Y": "Cboe BYX",
    "Z": "Cboe BZX",
}
CONDITIONS = {
    "trade": {
        "@": "Regular Sale",
        "I": "Odd Lot Trade",
        "T": "Form T",
        "F": "Intermarket Sweep",
        "O": "Opening Prints",
        "6": "Closing Prints",
        "Q": "Market Center Official Open",
        "M": "Market Center Official Close",
    },
    "quote": {"R": "Regular, Two-Sided Open"},
}
