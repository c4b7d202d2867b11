"""Alpaca crypto market data (``/v1beta3/crypto/{loc}/...``, REST and stream): the wire format, once.

What the adapter (:mod:`marketpipe.providers.alpaca_crypto`), the simulator's crypto face
(:mod:`marketpipe.sim.crypto`) and the gateway's compatible routes (:mod:`marketpipe.api.crypto`)
share: locations, paths, channels, field letters, the decoders from the vendor's rows to canonical
frames and the encoders back, and the order-book rule. Depends on :mod:`marketpipe.core` only.

The format (shared/reference/next-capabilities.md §3, alpaca-py ``CryptoHistoricalDataClient`` /
``CryptoDataStream``):

* REST needs no authentication. Symbols are ``BASE/QUOTE`` (``BTC/USD``), URL-encoded as
  ``BTC%2FUSD`` by alpaca-py; both forms are the same symbol. An unknown pair is not an error: its
  key is left out (``{"bars": {}, "next_page_token": null}``).
* Sizes and volumes are JSON floats (fractions of a coin); they stay ``Float64`` end to end, so the
  value a client reads back is the one the vendor sent, digit for digit.
* Trades carry ``tks`` (taker side ``B``/``S``) and no exchange; ``x`` may still come on the stream
  and is read and ignored.
* Order books: ``{t, b: [{p, s}], a: [{p, s}]}``; on the stream ``r: true`` replaces the local book,
  otherwise each level replaces the size at its price and ``s: 0`` removes it (:class:`LocalBook`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import polars as pl

from marketpipe.core.errors import InvalidSymbol, OrderbookNotReset
from marketpipe.core.schema import (
    CRYPTO_BAR_SCHEMA,
    CRYPTO_QUOTE_SCHEMA,
    CRYPTO_TRADE_SCHEMA,
    ORDERBOOK_SCHEMA,
    UTC_US,
    Bar,
    OrderBook,
    Quote,
    StreamRecord,
    Trade,
    crypto_pair_hint,
    is_crypto,
    normalize_symbol,
)
from marketpipe.core.timeutil import ns_text, ns_to_dt
from marketpipe.core.validation import validate_enum
from marketpipe.wire.alpaca_rest import one_ts_ns, parse_ts, quote_path

BASE = "/v1beta3/crypto"
# Alpaca's locations: us (Alpaca), us-1 (Kraken US), us-2, eu-1 (Kraken EU), bs-1
LOCATIONS = ("us", "us-1", "us-2", "eu-1", "bs-1")
DEFAULT_LOCATION = "us"
MAX_LIMIT = 10_000
SORTS = ("asc", "desc")
Kind = Literal["bars", "trades", "quotes"]
KINDS: tuple[Kind, ...] = ("bars", "trades", "quotes")
LatestKind = Literal["bars", "trades", "quotes", "orderbooks"]
LATEST_KINDS: tuple[LatestKind, ...] = ("bars", "trades", "quotes", "orderbooks")
# stream channels, and the message type letter of each
CHANNELS = ("trades", "quotes", "bars", "updatedBars", "dailyBars", "orderbooks")
CHANNEL_OF_TYPE = {"t": "trades", "q": "quotes", "b": "bars", "u": "updatedBars", "d": "dailyBars", "o": "orderbooks"}
TYPE_OF_CHANNEL = {v: k for k, v in CHANNEL_OF_TYPE.items()}
TAKER_SIDES = ("B", "S")


# --- locations, paths and symbols ---------------------------------------------------------------


def validate_location(loc: str, param: str = "loc") -> str:
    """One of :data:`LOCATIONS` (INVALID_ARGUMENT naming ``param`` otherwise)."""
    return validate_enum(loc, LOCATIONS, param, message="unknown crypto location {value!r}; one of {allowed}")


def historical_path(loc: str, kind: str) -> str:
    return f"{BASE}/{loc}/{kind}"


def latest_path(loc: str, kind: str) -> str:
    return f"{BASE}/{loc}/latest/{kind}"


def snapshots_path(loc: str) -> str:
    return f"{BASE}/{loc}/snapshots"


def stream_path(loc: str) -> str:
    return f"{BASE}/{loc}"


def crypto_symbol(raw: str, param: str = "symbols") -> str:
    """A crypto pair in canonical form (``btc-usd`` -> ``BTC/USD``). ``BTCUSD`` (no separator) and
    equity tickers are INVALID_SYMBOL, with the pair suggested where one is recognisable."""
    try:
        sym = normalize_symbol(raw)
    except InvalidSymbol:
        sym = None
    if sym is not None and is_crypto(sym):
        return sym
    hint = crypto_pair_hint(raw) if isinstance(raw, str) else None
    tail = f"; did you mean {hint!r}?" if hint else ""
    raise InvalidSymbol(
        f"invalid crypto symbol {raw!r}: crypto pairs are BASE/QUOTE, e.g. BTC/USD{tail}",
        details={"symbol": raw, "param": param, **({"suggestion": hint} if hint else {})},
    )


def crypto_symbols(raw: str | Iterable[str], param: str = "symbols") -> list[str]:
    """Comma-separated (or listed) pairs, each :func:`crypto_symbol`, duplicates dropped in order."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    out = [crypto_symbol(s.strip(), param) for s in items if isinstance(s, str) and s.strip()]
    if not out:
        raise InvalidSymbol("no symbols given", details={"param": param})
    return list(dict.fromkeys(out))


def symbols_param(symbols: list[str]) -> str:
    """The ``symbols`` query value (the slash kept; the HTTP client encodes it)."""
    return ",".join(symbols)


def path_symbol(symbol: str) -> str:
    return quote_path(symbol)


# --- decoding: the vendor's rows to canonical frames --------------------------------------------


def _frame(rows: Mapping[str, list[dict[str, Any]] | dict[str, Any] | None]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for sym, value in rows.items():
        if value is None:
            continue
        for row in value if isinstance(value, list) else [value]:
            out.append((sym, row))
    return out


def _f(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _i(row: dict[str, Any], key: str) -> int | None:
    v = row.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _s(row: dict[str, Any], key: str) -> str | None:
    v = row.get(key)
    return v if isinstance(v, str) else None


def _stamp(frame: pl.DataFrame, source: str, loc: str, fetched_at: datetime) -> pl.DataFrame:
    return frame.with_columns(
        pl.lit(source, pl.String).alias("source"),
        pl.lit(loc, pl.String).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
    )


Getter = Callable[[dict[str, Any], str], Any]
F64, I64, STR = pl.Float64(), pl.Int64(), pl.String()
# canonical column <- vendor key, how it is read, its type
_BAR_COLUMNS: list[tuple[str, str, Getter, pl.DataType]] = [
    ("open", "o", _f, F64),
    ("high", "h", _f, F64),
    ("low", "l", _f, F64),
    ("close", "c", _f, F64),
    ("volume", "v", _f, F64),
    ("trade_count", "n", _i, I64),
    ("vwap", "vw", _f, F64),
]
_TRADE_COLUMNS: list[tuple[str, str, Getter, pl.DataType]] = [
    ("price", "p", _f, F64),
    ("size", "s", _f, F64),
    ("trade_id", "i", _i, I64),
    ("taker_side", "tks", _s, STR),
]
_QUOTE_COLUMNS: list[tuple[str, str, Getter, pl.DataType]] = [
    ("bid_price", "bp", _f, F64),
    ("bid_size", "bs", _f, F64),
    ("ask_price", "ap", _f, F64),
    ("ask_size", "as", _f, F64),
]


def _table(
    rows: Mapping[str, Any], unit: str, columns: list[tuple[str, str, Getter, pl.DataType]]
) -> tuple[pl.DataFrame, pl.Series]:
    """The vendor's ``{symbol: rows}`` as (symbol, ts, columns...) and the raw ``t`` texts."""
    items = _frame(rows)
    t = pl.Series("t", [_s(r, "t") for _, r in items], pl.String)
    frame = pl.DataFrame(
        {
            "symbol": pl.Series([s for s, _ in items], dtype=pl.String),
            "ts": parse_ts(t, unit),
            **{name: pl.Series([get(r, key) for _, r in items], dtype=dt) for name, key, get, dt in columns},
        }
    )
    return frame, t


def bars_frame(
    rows: Mapping[str, Any], timeframe: str, source: str, loc: str, fetched_at: datetime, *, raw_ts: bool = False
) -> pl.DataFrame:
    """``{"BTC/USD": [{t,o,h,l,c,v,n,vw}, ...]}`` (or one bar per symbol, as latest/bars gives) to a
    canonical frame (:data:`CRYPTO_BAR_SCHEMA`; ``raw_ts`` adds the text stamp for the checks).
    Unparsable values stay null, for the checks to quarantine."""
    frame, t = _table(rows, "us", _BAR_COLUMNS)
    frame = frame.with_columns(pl.lit(timeframe, pl.String).alias("timeframe"))
    out = _stamp(frame, source, loc, fetched_at).select(list(CRYPTO_BAR_SCHEMA))
    return out.with_columns(t.alias("raw_ts")) if raw_ts else out


def trades_frame(rows: Mapping[str, Any], source: str, loc: str, fetched_at: datetime) -> pl.DataFrame:
    frame, _ = _table(rows, "ns", _TRADE_COLUMNS)
    return _stamp(frame, source, loc, fetched_at).select(list(CRYPTO_TRADE_SCHEMA))


def quotes_frame(rows: Mapping[str, Any], source: str, loc: str, fetched_at: datetime) -> pl.DataFrame:
    frame, _ = _table(rows, "ns", _QUOTE_COLUMNS)
    return _stamp(frame, source, loc, fetched_at).select(list(CRYPTO_QUOTE_SCHEMA))


def orderbooks_frame(rows: Mapping[str, Any], source: str, loc: str, fetched_at: datetime) -> pl.DataFrame:
    """``{"BTC/USD": {t, b: [{p, s}], a: [{p, s}]}}`` to one row per level (:data:`ORDERBOOK_SCHEMA`),
    bids first (best first), then asks; levels with size 0 are kept as sent."""
    syms: list[str] = []
    stamps: list[str | None] = []
    sides: list[str] = []
    prices: list[float | None] = []
    sizes: list[float | None] = []
    for sym, book in rows.items():
        if not isinstance(book, dict):
            continue
        for side, key in (("bid", "b"), ("ask", "a")):
            for level in book.get(key) or ():
                syms.append(sym)
                stamps.append(_s(book, "t"))
                sides.append(side)
                prices.append(_f(level, "p") if isinstance(level, dict) else None)
                sizes.append(_f(level, "s") if isinstance(level, dict) else None)
    frame = pl.DataFrame(
        {
            "symbol": pl.Series(syms, dtype=pl.String),
            "ts": parse_ts(pl.Series("t", stamps, pl.String), "ns"),
            "side": pl.Series(sides, dtype=pl.String),
            "price": pl.Series(prices, dtype=pl.Float64),
            "size": pl.Series(sizes, dtype=pl.Float64),
        }
    )
    return _stamp(frame, source, loc, fetched_at).select(list(ORDERBOOK_SCHEMA))


# --- encoding: canonical frames back to the vendor's rows (the compatible API) ------------------


def _ts_text(ts: datetime) -> str:
    return ns_text(int(ts.timestamp()) * 1_000_000_000 + ts.microsecond * 1000)


def _ns_text(ts: datetime, ns: int | None = None) -> str:
    return ns_text(ns) if ns is not None else _ts_text(ts)


def bar_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "t": _ts_text(r["ts"]),
        "o": r["open"],
        "h": r["high"],
        "l": r["low"],
        "c": r["close"],
        "v": r["volume"],
        "n": r["trade_count"],
        "vw": r["vwap"],
    }


def trade_row(r: Mapping[str, Any], ts_ns: int | None = None) -> dict[str, Any]:
    return {"t": _ns_text(r["ts"], ts_ns), "p": r["price"], "s": r["size"], "i": r["trade_id"], "tks": r["taker_side"]}


def quote_row(r: Mapping[str, Any], ts_ns: int | None = None) -> dict[str, Any]:
    return {
        "t": _ns_text(r["ts"], ts_ns),
        "bp": r["bid_price"],
        "bs": r["bid_size"],
        "ap": r["ask_price"],
        "as": r["ask_size"],
    }


def ts_ns_column(frame: pl.DataFrame) -> list[int]:
    """The ``ts`` column as Unix nanoseconds (trades and quotes keep nanoseconds)."""
    return frame.get_column("ts").dt.epoch("ns").to_list() if frame.height else []


def rows_by_symbol(kind: str, frame: pl.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """A canonical frame as the vendor's ``{symbol: [row, ...]}`` (frame order kept)."""
    out: dict[str, list[dict[str, Any]]] = {}
    ns = ts_ns_column(frame) if kind != "bars" else []
    for i, r in enumerate(frame.iter_rows(named=True)):
        row = bar_row(r) if kind == "bars" else trade_row(r, ns[i]) if kind == "trades" else quote_row(r, ns[i])
        out.setdefault(r["symbol"], []).append(row)
    return out


def orderbooks_rows(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    ns = ts_ns_column(frame)
    for i, r in enumerate(frame.iter_rows(named=True)):
        book = out.setdefault(r["symbol"], {"t": ns_text(ns[i]), "b": [], "a": []})
        book["b" if r["side"] == "bid" else "a"].append({"p": r["price"], "s": r["size"]})
    return out


# --- canonical records (the live hub's and the latest-value answers') ------------------------------


def trade_records(frame: pl.DataFrame) -> dict[str, Trade]:
    """The last trade per pair of a :data:`CRYPTO_TRADE_SCHEMA` frame, as records (sizes kept as floats)."""
    ns = ts_ns_column(frame)
    return {
        r["symbol"]: Trade(
            symbol=r["symbol"],
            ts=r["ts"],
            price=r["price"],
            size=r["size"],
            trade_id=r["trade_id"],
            source=r["source"],
            feed=r["feed"],
            fetched_at=r["fetched_at"],
            ts_ns=ns[i],
        )
        for i, r in enumerate(frame.iter_rows(named=True))
    }


def quote_records(frame: pl.DataFrame) -> dict[str, Quote]:
    ns = ts_ns_column(frame)
    return {
        r["symbol"]: Quote(
            symbol=r["symbol"],
            ts=r["ts"],
            bid_price=r["bid_price"],
            bid_size=r["bid_size"],
            ask_price=r["ask_price"],
            ask_size=r["ask_size"],
            source=r["source"],
            feed=r["feed"],
            fetched_at=r["fetched_at"],
            ts_ns=ns[i],
        )
        for i, r in enumerate(frame.iter_rows(named=True))
    }


def bar_records(frame: pl.DataFrame) -> dict[str, Bar]:
    return {
        r["symbol"]: Bar(
            symbol=r["symbol"],
            timeframe=r["timeframe"],
            ts=r["ts"],
            open=r["open"],
            high=r["high"],
            low=r["low"],
            close=r["close"],
            volume=r["volume"],
            trade_count=r["trade_count"],
            vwap=r["vwap"],
            source=r["source"],
            feed=r["feed"],
            fetched_at=r["fetched_at"],
        )
        for r in frame.iter_rows(named=True)
    }


_BAR_TIMEFRAME = {"b": "1Min", "u": "1Min", "d": "1Day"}
_OHLCV = ("o", "h", "l", "c", "v")
_NEEDS: dict[str, tuple[str, ...]] = {
    "t": ("p", "s"),
    "q": ("bp", "bs", "ap", "as"),
    "o": (),
    **dict.fromkeys(_BAR_TIMEFRAME, _OHLCV),
}


def stream_record(msg: Mapping[str, Any], source: str, loc: str, fetched_at: datetime) -> StreamRecord | None:
    """One stream message (``T`` in :data:`CHANNEL_OF_TYPE`) as a canonical record; None for a
    message that lacks its pair, its time or a value its kind needs (nothing is made up for it:
    the caller counts and logs it). An unparsable time raises MALFORMED_RESPONSE."""
    sym, t, kind = msg.get("S"), msg.get("t"), msg.get("T")
    if not isinstance(sym, str) or not isinstance(t, str):
        return None
    row = dict(msg)
    needs = _NEEDS.get(kind) if isinstance(kind, str) else None
    if needs is None or any(_f(row, k) is None for k in needs):
        return None
    ns = one_ts_ns(t)
    ts = ns_to_dt(ns)
    if kind == "t":
        return Trade(
            symbol=sym,
            ts=ts,
            price=float(row["p"]),
            size=float(row["s"]),
            trade_id=_i(row, "i"),
            source=source,
            feed=loc,
            fetched_at=fetched_at,
            ts_ns=ns,
        )
    if kind == "q":
        return Quote(
            symbol=sym,
            ts=ts,
            bid_price=float(row["bp"]),
            bid_size=float(row["bs"]),
            ask_price=float(row["ap"]),
            ask_size=float(row["as"]),
            source=source,
            feed=loc,
            fetched_at=fetched_at,
            ts_ns=ns,
        )
    if kind in _BAR_TIMEFRAME:
        return Bar(
            symbol=sym,
            timeframe=_BAR_TIMEFRAME[kind],
            ts=ts,
            open=float(row["o"]),
            high=float(row["h"]),
            low=float(row["l"]),
            close=float(row["c"]),
            volume=float(row["v"]),
            trade_count=_i(row, "n"),
            vwap=_f(row, "vw"),
            source=source,
            feed=loc,
            fetched_at=fetched_at,
        )
    if kind == "o":
        levels = {
            key: tuple((float(lv["p"]), float(lv["s"])) for lv in row.get(key) or () if isinstance(lv, dict))
            for key in ("b", "a")
        }
        return OrderBook(
            symbol=sym,
            ts=ts,
            bids=levels["b"],
            asks=levels["a"],
            reset=row.get("r") is True,
            source=source,
            feed=loc,
            fetched_at=fetched_at,
        )
    return None


# --- the order book on the stream ------------------------------------------------------------------


@dataclass
class LocalBook:
    """One symbol's book as the stream builds it: ``r: true`` replaces it; otherwise a level replaces
    the size at its price and ``s: 0`` removes it. An update before any reset (the book is unknown)
    raises ORDERBOOK_NOT_RESET and changes nothing: the caller keeps the message and waits for a reset."""

    symbol: str
    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    reset_seen: bool = False
    updated: str | None = None

    def apply(self, msg: Mapping[str, Any]) -> None:
        if msg.get("r") is True:
            self.bids.clear()
            self.asks.clear()
            self.reset_seen = True
        elif not self.reset_seen:
            raise OrderbookNotReset(
                f"order-book update for {self.symbol} before a full book (r: true): the book is unknown",
                details={"symbol": self.symbol},
            )
        for key, side in (("b", self.bids), ("a", self.asks)):
            for level in msg.get(key) or ():
                price, size = float(level["p"]), float(level["s"])
                if size == 0:
                    side.pop(price, None)
                else:
                    side[price] = size
        self.updated = msg.get("t") if isinstance(msg.get("t"), str) else self.updated

    def best(self) -> tuple[float | None, float | None]:
        """Best bid and best ask (None when that side is empty)."""
        return (max(self.bids) if self.bids else None, min(self.asks) if self.asks else None)

    def levels(self) -> dict[str, list[tuple[float, float]]]:
        return {
            "b": sorted(self.bids.items(), key=lambda kv: -kv[0]),
            "a": sorted(self.asks.items(), key=lambda kv: kv[0]),
        }
