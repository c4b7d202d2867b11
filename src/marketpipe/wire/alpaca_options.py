"""Alpaca options market data (``/v1beta1/options/...``) and the Trading API's option contracts
(``/v2/options/contracts``): the wire format, once (shared/reference/next-capabilities.md §2).

The adapter (:mod:`marketpipe.providers.alpaca_options`), the simulator's options face
(:mod:`marketpipe.sim.options`) and the gateway's compatible routes (:mod:`marketpipe.api.options`) all
use this module: paths, feeds and their default rule, limits, the chain filters, the row and page
structs with their field letters, decoders to the canonical frames of :mod:`marketpipe.core.options`
and encoders back, and the stream's two refusals (412, 413).

Differences from stocks that matter: no ``z``/``i`` on trades and quotes, ``c`` is ONE string (maybe
``" "``), exchange letters are case-sensitive, sizes are contracts; a snapshot's ``greeks`` (all five
members) and ``impliedVolatility`` are omitted when the vendor has no usable input. Option bars are the
stock bar rows (:mod:`marketpipe.wire.alpaca_rest`).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import msgspec
import orjson
import polars as pl

from marketpipe.core.errors import MalformedResponse
from marketpipe.core.options import (
    GREEKS,
    GREEKS_NOT_SENT,
    OPTION_CONTRACT_SCHEMA,
    OPTION_SNAPSHOT_SCHEMA,
    OPTION_TRADE_SCHEMA,
    occ_fields,
)
from marketpipe.core.schema import UTC_US
from marketpipe.wire.alpaca_rest import WBar, _read_groups, parse_ts

API_VERSION = "v1beta1"
OPTIONS_PREFIX = "/v1beta1/options"
BARS_PATH = f"{OPTIONS_PREFIX}/bars"
TRADES_PATH = f"{OPTIONS_PREFIX}/trades"
LATEST_TRADES_PATH = f"{OPTIONS_PREFIX}/trades/latest"
LATEST_QUOTES_PATH = f"{OPTIONS_PREFIX}/quotes/latest"
SNAPSHOTS_PATH = f"{OPTIONS_PREFIX}/snapshots"
CHAIN_PATH = f"{OPTIONS_PREFIX}/snapshots/{{underlying_symbol}}"
EXCHANGES_PATH = f"{OPTIONS_PREFIX}/meta/exchanges"
CONDITIONS_PATH = f"{OPTIONS_PREFIX}/meta/conditions/{{ticktype}}"
CONTRACTS_PATH = "/v2/options/contracts"  # Trading API host (paper-api / api.alpaca.markets)
DEFAULT_TRADING_URL = "https://paper-api.alpaca.markets"


def chain_path(underlying: str) -> str:
    return f"{SNAPSHOTS_PATH}/{underlying}"


FEEDS = ("opra", "indicative")
MAX_SYMBOLS = 100  # bars, trades, latest: at most this many contracts per request
BARS_MAX_LIMIT = 10_000
BARS_DEFAULT_LIMIT = 1000
SNAPSHOT_MAX_LIMIT = 1000
SNAPSHOT_DEFAULT_LIMIT = 100
CONTRACTS_MAX_LIMIT = 10_000
CONTRACTS_DEFAULT_LIMIT = 100
CONTRACT_STATUSES = ("active", "inactive")
HISTORY_FROM = date(2024, 2, 1)  # the vendor's option history starts in February 2024
CHAIN_FILTERS = (
    "type",
    "strike_price_gte",
    "strike_price_lte",
    "expiration_date",
    "expiration_date_gte",
    "expiration_date_lte",
    "root_symbol",
)


def default_feed(opra_entitled: bool) -> str:
    """The vendor's feed default: ``opra`` only for credentials with a real-time subscription and a
    signed OPRA agreement (2026-11-10 changelog), otherwise ``indicative`` (modified quotes, trades 15
    minutes late) — whatever the schema's ``default: opra`` says."""
    return "opra" if opra_entitled else "indicative"


# the 403 text a key without OPRA gets for feed=opra (the adapter reads it as NOT_ENTITLED)
OPRA_NOT_ENTITLED = "OPRA agreement is not signed"

# --- stream --------------------------------------------------------------------------------------

STREAM_CHANNELS = ("trades", "quotes")  # no bars on the options stream


def stream_path(feed: str) -> str:
    return f"/{API_VERSION}/{feed}"


JSON_REFUSED = (412, "option messages are only available in MsgPack format")
STAR_QUOTES_REFUSED = (413, "star subscription is not allowed for option quotes")

# --- wire structs -------------------------------------------------------------------------------


class OTrade(msgspec.Struct, gc=False, omit_defaults=True):
    t: str
    x: str | None = None
    p: float | None = None
    s: int | None = None
    c: str | None = None


class OQuote(msgspec.Struct, gc=False, omit_defaults=True, rename={"as_": "as"}):
    t: str
    bx: str | None = None
    bp: float | None = None
    bs: int | None = None
    ax: str | None = None
    ap: float | None = None
    as_: int | None = None
    c: str | None = None


class OGreeks(msgspec.Struct, gc=False):
    delta: float
    gamma: float
    theta: float
    vega: float
    rho: float


class OSnapshot(msgspec.Struct, gc=False, omit_defaults=True):
    latestTrade: OTrade | None = None
    latestQuote: OQuote | None = None
    minuteBar: WBar | None = None
    dailyBar: WBar | None = None
    prevDailyBar: WBar | None = None
    greeks: OGreeks | None = None
    impliedVolatility: float | None = None


class SnapshotsPage(msgspec.Struct, gc=False):
    snapshots: dict[str, OSnapshot] | None
    next_page_token: str | None = None


class LatestTrades(msgspec.Struct, gc=False):
    trades: dict[str, OTrade]


class LatestQuotes(msgspec.Struct, gc=False):
    quotes: dict[str, OQuote]


class TradesPage(msgspec.Struct, gc=False):
    trades: dict[str, msgspec.Raw] | None
    next_page_token: str | None


class WContract(msgspec.Struct, gc=False):
    id: str
    symbol: str
    name: str
    status: str
    tradable: bool
    expiration_date: str
    root_symbol: str
    underlying_symbol: str
    underlying_asset_id: str
    type: str
    style: str
    strike_price: str
    size: str
    open_interest: str | None = None
    open_interest_date: str | None = None
    close_price: str | None = None
    close_price_date: str | None = None


class ContractsPage(msgspec.Struct, gc=False):
    option_contracts: list[WContract]
    next_page_token: str | None = None


def decode(data: bytes, kind: type[Any], what: str) -> Any:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise MalformedResponse(f"malformed {what} answer: {exc}", details={"what": what}) from None


# --- decoding to canonical frames -----------------------------------------------------------------


def _col(values: list[Any], dtype: pl.DataType) -> pl.Series:
    return pl.Series(values=values, dtype=dtype)


def snapshots_to_frame(
    snaps: dict[str, OSnapshot], underlying: str | None, as_of: datetime, source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    """A page of option snapshots to :data:`OPTION_SNAPSHOT_SCHEMA`, one row per contract. Greeks and IV
    are taken as sent; a contract without them gets nulls and ``greeks_missing`` = the reason."""
    if not snaps:
        return pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA)
    names = list(snaps)
    rows = list(snaps.values())
    quotes = [s.latestQuote for s in rows]
    trades = [s.latestTrade for s in rows]
    greeks = [s.greeks for s in rows]
    f64, i64, s = pl.Float64(), pl.Int64(), pl.String()
    cols: dict[str, pl.Series] = {
        "contract": _col(names, s),
        "quote_ts": parse_ts(_col([q.t if q else None for q in quotes], s), "ns"),
        "bid_price": _col([q.bp if q else None for q in quotes], f64),
        "bid_size": _col([q.bs if q else None for q in quotes], i64),
        "bid_exchange": _col([q.bx if q else None for q in quotes], s),
        "ask_price": _col([q.ap if q else None for q in quotes], f64),
        "ask_size": _col([q.as_ if q else None for q in quotes], i64),
        "ask_exchange": _col([q.ax if q else None for q in quotes], s),
        "quote_condition": _col([q.c if q else None for q in quotes], s),
        "trade_ts": parse_ts(_col([t.t if t else None for t in trades], s), "ns"),
        "trade_price": _col([t.p if t else None for t in trades], f64),
        "trade_size": _col([t.s if t else None for t in trades], i64),
        "trade_exchange": _col([t.x if t else None for t in trades], s),
        "trade_condition": _col([t.c if t else None for t in trades], s),
    }
    for g in GREEKS:
        cols[g] = _col([getattr(x, g) if x else None for x in greeks], f64)
    cols["implied_volatility"] = _col([r.impliedVolatility for r in rows], f64)
    frame = pl.DataFrame(cols)
    missing = pl.any_horizontal(*(pl.col(g).is_null() for g in (*GREEKS, "implied_volatility")))
    frame = frame.with_columns(
        *occ_fields("contract"),
        pl.when(missing).then(pl.lit(GREEKS_NOT_SENT)).otherwise(None).alias("greeks_missing"),
        pl.lit(underlying, s).alias("underlying_given"),
        pl.lit(as_of, UTC_US).alias("as_of"),
        pl.lit(source, s).alias("source"),
        pl.lit(feed, s).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
    )
    return frame.select(
        pl.col("contract"),
        # the chain's underlying when asked by underlying; else the OCC root (digits of an adjusted root kept)
        pl.coalesce("underlying_given", "occ_root").alias("underlying"),
        pl.col("occ_root").alias("root"),
        pl.col("occ_expiration").alias("expiration"),
        pl.col("occ_type").alias("type"),
        pl.col("occ_strike").alias("strike"),
        *(pl.col(c) for c in list(OPTION_SNAPSHOT_SCHEMA)[6:]),
    ).cast(OPTION_SNAPSHOT_SCHEMA)  # type: ignore[arg-type]


RAW_OPTION_TRADE_SCHEMA = {"t": pl.String(), "x": pl.String(), "p": pl.Float64(), "s": pl.Float64(), "c": pl.String()}


def trades_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    """Raw per-contract arrays of option trades to :data:`OPTION_TRADE_SCHEMA`."""
    raw = _read_groups(groups, RAW_OPTION_TRADE_SCHEMA)
    if raw is None:
        return pl.DataFrame(schema=OPTION_TRADE_SCHEMA)
    return raw.select(
        "symbol",
        parse_ts(raw.get_column("t"), "ns").alias("ts"),
        pl.col("p").alias("price"),
        pl.col("s").cast(pl.Int64, strict=False).alias("size"),
        pl.col("x").alias("exchange"),
        pl.col("c").alias("condition"),
        pl.lit(source, pl.String).alias("source"),
        pl.lit(feed, pl.String).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
    )


def _date_or_none(text: str | None) -> date | None:
    return date.fromisoformat(text) if text else None


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def contracts_to_frame(rows: list[WContract], source: str, fetched_at: datetime) -> pl.DataFrame:
    """Trading API contracts (money and counts as strings on the wire) to :data:`OPTION_CONTRACT_SCHEMA`."""
    if not rows:
        return pl.DataFrame(schema=OPTION_CONTRACT_SCHEMA)
    try:
        data = {
            "contract": [r.symbol for r in rows],
            "id": [r.id for r in rows],
            "name": [r.name for r in rows],
            "underlying": [r.underlying_symbol for r in rows],
            "underlying_asset_id": [r.underlying_asset_id for r in rows],
            "root": [r.root_symbol for r in rows],
            "expiration": [date.fromisoformat(r.expiration_date) for r in rows],
            "type": [r.type for r in rows],
            "style": [r.style for r in rows],
            "strike": [float(r.strike_price) for r in rows],
            "size": [int(r.size) for r in rows],
            "status": [r.status for r in rows],
            "tradable": [r.tradable for r in rows],
            "open_interest": [int(r.open_interest) if r.open_interest else None for r in rows],
            "open_interest_date": [_date_or_none(r.open_interest_date) for r in rows],
            "close_price": [_float_or_none(r.close_price) for r in rows],
            "close_price_date": [_date_or_none(r.close_price_date) for r in rows],
        }
    except ValueError as exc:
        raise MalformedResponse(f"malformed option contract: {exc}", details={"what": "option contracts"}) from None
    return (
        pl.DataFrame(data)
        .with_columns(pl.lit(source, pl.String).alias("source"), pl.lit(fetched_at, UTC_US).alias("fetched_at"))
        .cast(OPTION_CONTRACT_SCHEMA)  # type: ignore[arg-type]
    )


# --- encoding (canonical -> the vendor's keys) -------------------------------------------------------


def _nano_col(col: str) -> pl.Expr:
    return pl.col(col).dt.strftime("%Y-%m-%dT%H:%M:%S%.9f").str.strip_chars_end("0").str.strip_chars_end(".") + "Z"


def snapshot_objs(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Canonical snapshot rows back to the vendor's objects by contract; a null member is left out
    (as the vendor omits it) — greeks and IV are never written unless the row holds the vendor's."""
    rows = frame.select(
        "contract",
        _nano_col("quote_ts").alias("quote_t"),
        _nano_col("trade_ts").alias("trade_t"),
        *[c for c in frame.columns if c not in ("contract", "quote_ts", "trade_ts")],
    ).iter_rows(named=True)
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        snap: dict[str, Any] = {}
        if r["quote_t"] is not None:
            snap["latestQuote"] = {
                "t": r["quote_t"],
                "ax": r["ask_exchange"],
                "ap": r["ask_price"],
                "as": r["ask_size"],
                "bx": r["bid_exchange"],
                "bp": r["bid_price"],
                "bs": r["bid_size"],
                "c": r["quote_condition"],
            }
        if r["trade_t"] is not None:
            snap["latestTrade"] = {
                "t": r["trade_t"],
                "x": r["trade_exchange"],
                "p": r["trade_price"],
                "s": r["trade_size"],
                "c": r["trade_condition"],
            }
        if all(r[g] is not None for g in GREEKS):
            snap["greeks"] = {g: r[g] for g in GREEKS}
        if r["implied_volatility"] is not None:
            snap["impliedVolatility"] = r["implied_volatility"]
        out[r["contract"]] = snap
    return out


def snapshots_json(frame: pl.DataFrame, next_token: str | None) -> bytes:
    return orjson.dumps({"snapshots": snapshot_objs(frame), "next_page_token": next_token})


def trade_rows(frame: pl.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Canonical option trades to ``{contract: [{t,x,p,s,c}, ...]}``."""
    wire = frame.select(
        "symbol",
        _nano_col("ts").alias("t"),
        pl.col("exchange").alias("x"),
        pl.col("price").alias("p"),
        pl.col("size").alias("s"),
        pl.col("condition").alias("c"),
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for (sym,), part in wire.partition_by("symbol", as_dict=True, maintain_order=True).items():
        out[str(sym)] = part.drop("symbol").to_dicts()
    return out


def contract_objs(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Canonical contracts back to the Trading API's objects (money and counts as strings)."""

    def text(v: Any) -> str | None:
        return None if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    out = []
    for r in frame.iter_rows(named=True):
        out.append(
            {
                "id": r["id"],
                "symbol": r["contract"],
                "name": r["name"],
                "status": r["status"],
                "tradable": r["tradable"],
                "expiration_date": r["expiration"].isoformat(),
                "root_symbol": r["root"],
                "underlying_symbol": r["underlying"],
                "underlying_asset_id": r["underlying_asset_id"],
                "type": r["type"],
                "style": r["style"],
                "strike_price": text(r["strike"]),
                "size": text(r["size"]),
                "open_interest": text(r["open_interest"]),
                "open_interest_date": r["open_interest_date"].isoformat() if r["open_interest_date"] else None,
                "close_price": text(r["close_price"]),
                "close_price_date": r["close_price_date"].isoformat() if r["close_price_date"] else None,
            }
        )
    return out


OPTION_EXCHANGES = {
    "A": "AMEX - NYSE American",
    "B": "BOX - Boston Options Exchange",
    "C": "CBOE - Cboe Options Exchange",
    "D": "EMLD - MIAX Emerald",
    "E": "EDGO - Cboe EDGX Options",
    "H": "GMNI - Nasdaq GEMX",
    "I": "ISE - Nasdaq ISE",
    "J": "MRCY - Nasdaq MRX",
    "M": "MIAX - Miami International Securities Exchange",
    "N": "ARCO - NYSE Arca Options",
    "O": "OPRA - Options Price Reporting Authority",
    "P": "MPRL - MIAX Pearl",
    "Q": "NQPO - Nasdaq Options Market",
    "S": "SPHR - MIAX Sapphire",
    "T": "NQBX - Nasdaq BX Options",
    "W": "C2 - Cboe C2 Options",
    "X": "PHLX - Nasdaq PHLX",
    "Z": "BATO - Cboe BZX Options",
}
OPTION_CONDITIONS = {
    "trade": {
        "I": "AUTO - Electronic Trade",
        "J": "CNCL - Cancelled Trade",
        "S": "ISOI - Intermarket Sweep Order",
        "a": "SLAN - Single Leg Auction Non ISO",
        "e": "SLFT - Single Leg Floor Trade",
        "g": "MLAT - Multi Leg Auction",
    },
    "quote": {" ": "Regular Trading", "A": "Auction", "F": "Fast Trading", "R": "Rotation"},
}
