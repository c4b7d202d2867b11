"""The canonical schema. Adapters convert vendor payloads into these; nothing downstream knows
vendor field letters.

Bulk data (bars, historical trades and quotes) moves as polars frames with the column sets below.
Single records (latest trade, latest quote, snapshot) are msgspec structs (a trade's or quote's
``ts`` is a datetime, which holds microseconds only; ``ts_ns``, when the vendor sent more, is the
same instant in exact Unix nanoseconds, and the encoders write the vendor's nanoseconds from it),
and so is every record of the live stream: trades, quotes and bars as above, the stream's events
(trading status, LULD bands, imbalances, trade corrections, cancel/errors) and the ``raw`` record of
a message the stream could not read, as the tagged union :data:`StreamEvent` (tag field ``type``).
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

import msgspec
import polars as pl

from marketpipe.core.errors import InvalidSymbol

UTC_US = pl.Datetime("us", "UTC")
UTC_NS = pl.Datetime("ns", "UTC")

# Bars: the key is (symbol, timeframe, ts, source). ``feed`` says which vendor feed (sip, iex, ...)
# and ``fetched_at`` when marketpipe received the page.
BAR_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "ts": UTC_US,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Int64(),
    "trade_count": pl.Int64(),
    "vwap": pl.Float64(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}
BAR_COLUMNS = list(BAR_SCHEMA)
# Inside (store tables, records) the time column is ``ts``; every user-facing frame, answer and file
# (``mp.bars``, the CLI's output, REST, the Parquet cold tier) calls it this.
TIME_COLUMN = "timestamp"
BAR_KEY = ["symbol", "timeframe", "ts", "source"]
PRICE_COLUMNS = ["open", "high", "low", "close"]

TRADE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": UTC_NS,
    "price": pl.Float64(),
    "size": pl.Int64(),
    "exchange": pl.String(),
    "trade_id": pl.UInt64(),
    "conditions": pl.List(pl.String()),
    "tape": pl.String(),
    "update": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}

QUOTE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": UTC_NS,
    "bid_price": pl.Float64(),
    "bid_size": pl.Int64(),
    "bid_exchange": pl.String(),
    "ask_price": pl.Float64(),
    "ask_size": pl.Int64(),
    "ask_exchange": pl.String(),
    "conditions": pl.List(pl.String()),
    "tape": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}


# Corporate actions: one canonical record kind for every vendor's splits, dividends, mergers,
# spin-offs, name changes, ... (``wire/`` converts each vendor's records into it). ``type`` uses
# Alpaca's singular names (the widest vocabulary, :data:`ACTION_TYPES`); a type a vendor sends that is
# not among them is kept under the vendor's own name, never dropped. ``raw`` is the vendor's record
# as received (JSON, every key, unknown ones too). Ratios: ``old_rate`` -> ``new_rate`` shares (a 4:1
# forward split is old 1, new 4); ``cash_amount`` is the raw per-share cash (a dividend's amount as
# paid, before any later split); ``rate`` any other rate (a stock dividend's 0.05 = 5 %).
# ``action_id`` is ``<provider>:<vendor id>`` (a vendor without ids gets one derived from symbol,
# type and date, so that a corrected ratio is a new version of the same action).
ACTION_TYPES: tuple[str, ...] = (
    "forward_split",
    "reverse_split",
    "unit_split",
    "stock_dividend",
    "cash_dividend",
    "spin_off",
    "cash_merger",
    "stock_merger",
    "stock_and_cash_merger",
    "redemption",
    "name_change",
    "worthless_removal",
    "rights_distribution",
    "partial_call",
    "reorganization",
)
SPLIT_TYPES = ("forward_split", "reverse_split")
ACTION_SCHEMA: dict[str, pl.DataType] = {
    "action_id": pl.String(),
    "provider": pl.String(),
    "source": pl.String(),
    "vendor_id": pl.String(),
    "type": pl.String(),
    "symbol": pl.String(),
    "ex_date": pl.Date(),
    "record_date": pl.Date(),
    "payable_date": pl.Date(),
    "process_date": pl.Date(),
    "effective_date": pl.Date(),
    "declaration_date": pl.Date(),
    "old_rate": pl.Float64(),
    "new_rate": pl.Float64(),
    "cash_amount": pl.Float64(),
    "rate": pl.Float64(),
    "currency": pl.String(),
    "old_symbol": pl.String(),
    "new_symbol": pl.String(),
    "fetched_at": UTC_US,
    "raw": pl.String(),
}
ACTION_COLUMNS = list(ACTION_SCHEMA)
# A withdrawn action: a vendor listed it, then no longer did for a window it was asked again. It is stored
# as a new version of the action (never an edit) whose ``raw`` is marketpipe's note, not a vendor record:
# {"marketpipe_withdrawn": {"window": [start, end], "request_ids": [...], "previous_version": n}}.
WITHDRAWN_KEY = "marketpipe_withdrawn"
WITHDRAWN_PREFIX = '{"' + WITHDRAWN_KEY + '"'
# Values of ``adjustment`` (Alpaca's; comma-combinable there). marketpipe adjusts for splits (and
# stock dividends, which act as splits), cash dividends and spin-offs (with the new line's raw close on
# the ex-date, read like any bars; without one the spin-off is skipped, never priced by guess); ``all``
# is the three of them.
ADJUSTMENTS = ("raw", "split", "dividend", "spin-off", "all")


def actions_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Canonical action rows (dicts with any subset of :data:`ACTION_SCHEMA`'s keys; dates as
    ``datetime.date`` or ``YYYY-MM-DD``) as a frame with every column, in order."""
    if not rows:
        return empty_frame(ACTION_SCHEMA)
    cols: dict[str, list[Any]] = {c: [r.get(c) for r in rows] for c in ACTION_COLUMNS}
    dates = [c for c, t in ACTION_SCHEMA.items() if t == pl.Date()]
    frame = pl.DataFrame(
        {c: pl.Series(c, [_iso_day(x) for x in v] if c in dates else v, strict=False) for c, v in cols.items()}
    )
    return frame.with_columns([pl.col(c).cast(pl.String).str.to_date("%Y-%m-%d", strict=False) for c in dates]).cast(
        ACTION_SCHEMA  # type: ignore[arg-type]
    )


def _iso_day(value: Any) -> str | None:
    """A date (or a ``YYYY-MM-DD...`` string) as ``YYYY-MM-DD``; anything else is None."""
    if isinstance(value, date):
        return value.isoformat()[:10]
    return value[:10] if isinstance(value, str) else None


# Crypto: sizes and volumes are fractions of a coin, kept as the vendor's floats (never rounded);
# ``feed`` holds the vendor's location (us, us-1, eu-1, ...). Trades carry the taker side (B/S).
CRYPTO_BAR_SCHEMA: dict[str, pl.DataType] = {**BAR_SCHEMA, "volume": pl.Float64()}
CRYPTO_TRADE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": UTC_NS,
    "price": pl.Float64(),
    "size": pl.Float64(),
    "trade_id": pl.Int64(),
    "taker_side": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}
CRYPTO_QUOTE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": UTC_NS,
    "bid_price": pl.Float64(),
    "bid_size": pl.Float64(),
    "ask_price": pl.Float64(),
    "ask_size": pl.Float64(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}
# One row per price level of a book: side "bid" (best first) or "ask" (best first).
ORDERBOOK_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": UTC_NS,
    "side": pl.String(),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def empty_bars() -> pl.DataFrame:
    return empty_frame(BAR_SCHEMA)


# --- records -----------------------------------------------------------------------------------


class Trade(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    ts: datetime  # microseconds (datetime's resolution); the exact instant is ts_ns
    price: float
    size: int | float  # whole shares for equities; a fraction of a coin for crypto pairs, kept exact
    exchange: str | None = None
    trade_id: int | None = None
    conditions: tuple[str, ...] = ()
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime
    ts_ns: int | None = None  # the vendor's timestamp in Unix nanoseconds (None: ts is exact)


class Quote(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    ts: datetime
    bid_price: float
    bid_size: int | float  # fractional for crypto pairs
    ask_price: float
    ask_size: int | float
    bid_exchange: str | None = None
    ask_exchange: str | None = None
    conditions: tuple[str, ...] = ()
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime
    ts_ns: int | None = None  # the vendor's timestamp in Unix nanoseconds (None: ts is exact)

    @property
    def mid(self) -> float | None:
        if self.bid_price > 0 and self.ask_price > 0:
            return (self.bid_price + self.ask_price) / 2
        return None

    @property
    def spread(self) -> float | None:
        if self.bid_price > 0 and self.ask_price > 0:
            return self.ask_price - self.bid_price
        return None


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    timeframe: str
    ts: datetime
    open: float
    high: float
    low: float
    close: float
    volume: int | float  # whole shares for stocks; fractional for crypto pairs (stored as floats in crypto_bars)
    trade_count: int | None = None
    vwap: float | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    latest_trade: Trade | None = None
    latest_quote: Quote | None = None
    minute_bar: Bar | None = None
    daily_bar: Bar | None = None
    prev_daily_bar: Bar | None = None
    source: str
    fetched_at: datetime


# --- stream events ------------------------------------------------------------------------------
# The live stream's records besides trades, quotes and bars: rare, and told apart by their tag
# (``type``). Fields are the vendor's keys under their canonical names; a key the message did not
# carry is None. ``ts`` is the event's time (None when the message had none), ``tape`` the tape.


class TradingStatus(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="status"):
    """A trading status change (halt, resumption, ...) with its reason."""

    symbol: str
    ts: datetime | None = None
    status_code: str | None = None
    status_message: str | None = None
    reason_code: str | None = None
    reason_message: str | None = None
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime


class Luld(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="luld"):
    """Limit-up/limit-down price bands."""

    symbol: str
    ts: datetime | None = None
    limit_up: float | None = None
    limit_down: float | None = None
    indicator: str | None = None
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime


class Imbalance(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="imbalance"):
    """An order imbalance (its price)."""

    symbol: str
    ts: datetime | None = None
    price: float | None = None
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime


class Correction(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="correction"):
    """A trade corrected after the fact: the original and the corrected id/price/size/conditions."""

    symbol: str
    ts: datetime | None = None
    exchange: str | None = None
    original_id: int | None = None
    original_price: float | None = None
    original_size: int | None = None
    original_conditions: tuple[str, ...] | None = None
    corrected_id: int | None = None
    corrected_price: float | None = None
    corrected_size: int | None = None
    corrected_conditions: tuple[str, ...] | None = None
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime


class CancelError(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="cancel_error"):
    """A trade cancelled (``action`` ``C``) or marked in error (``E``)."""

    symbol: str
    ts: datetime | None = None
    trade_id: int | None = None
    exchange: str | None = None
    price: float | None = None
    size: int | None = None
    action: str | None = None
    tape: str | None = None
    source: str
    feed: str | None = None
    fetched_at: datetime


class RawMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="raw"):
    """A stream message of a type this side does not know, or of a known type that could not be decoded
    (``error`` says why): kept as received, never a crash."""

    message_type: Any = None  # the message's own type field, whatever it held
    symbol: str | None = None
    message: dict[str, Any]
    source: str
    feed: str | None = None
    fetched_at: datetime
    error: str | None = None


class OrderBook(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="orderbook"):
    """A crypto order book message as the stream sent it: ``reset`` (the vendor's ``r``) means the
    levels are the whole book and replace it; otherwise each level replaces the size at its price
    and size 0 removes it (``wire/alpaca_crypto.LocalBook``). Levels are (price, size)."""

    symbol: str
    ts: datetime | None = None
    bids: tuple[tuple[float, float], ...] = ()
    asks: tuple[tuple[float, float], ...] = ()
    reset: bool = False
    source: str
    feed: str | None = None
    fetched_at: datetime


StreamEvent = TradingStatus | Luld | Imbalance | Correction | CancelError | OrderBook | RawMessage
# every record the live stream delivers; trades, quotes and bars are untagged (their JSON elsewhere has no
# type field) and are told apart by class, the events by class or by their tag
StreamRecord = Trade | Quote | Bar | StreamEvent


# --- symbols -----------------------------------------------------------------------------------

# Canonical US-equity form is the vendor-neutral class separator '.', e.g. BRK.B (Alpaca's form).
_EQUITY = r"[A-Z][A-Z0-9]{0,9}([.][A-Z0-9]{1,3})?"
# A crypto pair is BASE/QUOTE with the slash kept (Alpaca's form, also in store keys and file names);
# the quote is one of the currencies crypto venues price in, which tells BTC/USD from a class BRK/B.
CRYPTO_QUOTES = ("USD", "USDT", "USDC", "BTC", "ETH", "EUR", "GBP", "AUD", "CAD", "CHF", "JPY", "SGD")
_CRYPTO = rf"[A-Z0-9]{{1,10}}/(?:{'|'.join(CRYPTO_QUOTES)})"
_SYMBOL = re.compile(rf"^(?:{_EQUITY}|{_CRYPTO})$")
_CRYPTO_RE = re.compile(rf"^{_CRYPTO}$")
_PAIR_SEP = re.compile(rf"^([A-Z0-9]{{1,10}})[/.\-]({'|'.join(CRYPTO_QUOTES)})$")
_GLUED_PAIR = re.compile(rf"^([A-Z0-9]{{2,10}}?)({'|'.join(CRYPTO_QUOTES)})$")


def is_crypto(symbol: str) -> bool:
    """Whether a canonical symbol is a crypto pair (``BTC/USD``): its asset class."""
    return bool(_CRYPTO_RE.match(symbol))


def crypto_pair_hint(raw: str) -> str | None:
    """``BTC/USD`` for a pair written without its slash (``BTCUSD``, ``btcusd``), else ``None``: what a
    crypto interface suggests when it refuses such a symbol."""
    m = _GLUED_PAIR.match(raw.strip().upper()) if isinstance(raw, str) else None
    return f"{m.group(1)}/{m.group(2)}" if m else None


def normalize_symbol(raw: str) -> str:
    """Upper-case, trim, map share-class separators (BRK-B, BRK/B) to the canonical BRK.B; a crypto
    pair (``BTC/USD``, ``btc-usd``) keeps the canonical slash."""
    if not isinstance(raw, str):
        raise InvalidSymbol(f"symbol must be a string, got {type(raw).__name__}")
    up = raw.strip().upper()
    pair = _PAIR_SEP.match(up) if ("/" in up or "-" in up) else None
    if pair:
        return f"{pair.group(1)}/{pair.group(2)}"
    sym = up.replace("/", ".").replace("-", ".")
    if not _SYMBOL.match(sym):
        raise InvalidSymbol(
            f"invalid symbol {raw!r}: expected letters/digits with an optional class suffix, e.g. BRK.B",
            details={"symbol": raw},
        )
    return sym


def normalize_symbols(raw: list[str] | tuple[str, ...] | str) -> list[str]:
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    out: list[str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        sym = normalize_symbol(item)
        if sym not in out:
            out.append(sym)
    if not out:
        raise InvalidSymbol("no symbols given")
    return out


def symbol_format_ok(col: str = "symbol") -> pl.Expr:
    """Vectorized form of the symbol format rule, for checks over frames."""
    return pl.col(col).str.contains(_SYMBOL.pattern)
