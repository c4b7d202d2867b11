"""Options, canonically: the OCC contract symbol and the record kinds of option data.

An OCC symbol is ``ROOT`` + ``YYMMDD`` + ``C|P`` + strike x 1000 as 8 zero-padded digits, without the
space padding of the root (``AAPL240419P00140000`` = AAPL, 2024-04-19, put, 140.000). A root may carry
digits after an adjustment (``AAPL1``); the underlying is then a different symbol (``AAPL``).

Greeks and implied volatility are the vendor's, or null. Nothing here (nor anywhere in the runtime)
computes them: a contract the vendor sent without them carries ``greeks_missing`` =
:data:`GREEKS_NOT_SENT` on every interface, so a null is never mistaken for a zero or for a gap we
filled.

Bulk option data moves as polars frames: :data:`OPTION_SNAPSHOT_SCHEMA` (one row per contract and
snapshot time: a chain, or a stored history of chains), :data:`OPTION_CONTRACT_SCHEMA` (the Trading
API's contract metadata with open interest and its date), :data:`OPTION_TRADE_SCHEMA`; option bars use
the stock :data:`~marketpipe.core.schema.BAR_SCHEMA` with the contract as ``symbol``.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Literal

import msgspec
import polars as pl

from marketpipe.core.errors import InvalidOptionSymbol
from marketpipe.core.schema import UTC_NS, UTC_US

OptionType = Literal["call", "put"]
OPTION_TYPES: tuple[OptionType, ...] = ("call", "put")
OPTION_STYLES = ("american", "european")
GREEKS = ("delta", "gamma", "theta", "vega", "rho")
# the one reason a greek or the IV is null: the vendor sent none for this contract (never "we computed")
GREEKS_NOT_SENT = "not_sent_by_vendor"
# latest quotes and trades come from endpoints that carry no greeks at all (a snapshot does)
GREEKS_NOT_IN_ENDPOINT = "not_in_endpoint"

_OCC = re.compile(r"^([A-Z][A-Z0-9]{0,5})(\d{2})(\d{2})(\d{2})([CP])(\d{8})$")
OCC_PATTERN = _OCC.pattern
MAX_STRIKE_MILLIS = 99_999_999  # eight digits of strike x 1000


class OccSymbol(msgspec.Struct, frozen=True, kw_only=True):
    """The four fields an OCC symbol encodes, and the symbol itself."""

    symbol: str
    root: str
    expiration: date
    type: OptionType
    strike: float


def parse_occ(raw: object, param: str = "symbol") -> OccSymbol:
    """``raw`` as an OCC symbol, or INVALID_OPTION_SYMBOL naming ``param`` (a string that is not one,
    a non-string, an impossible date, a zero strike)."""
    if not isinstance(raw, str):
        raise InvalidOptionSymbol(
            f"{param} must be an OCC option symbol string, got {type(raw).__name__}",
            details={"parameter": param},
        )
    text = raw.strip().upper()
    m = _OCC.match(text)
    if m is None:
        raise InvalidOptionSymbol(
            f"invalid option symbol {raw!r}: expected ROOT + YYMMDD + C|P + 8-digit strike x 1000,"
            " e.g. AAPL240419P00140000",
            details={"parameter": param, "symbol": raw},
        )
    root, yy, mm, dd, cp, strike = m.groups()
    try:
        expiration = date(2000 + int(yy), int(mm), int(dd))
    except ValueError:
        raise InvalidOptionSymbol(
            f"invalid option symbol {raw!r}: {yy}{mm}{dd} is not a date", details={"parameter": param, "symbol": raw}
        ) from None
    millis = int(strike)
    if millis == 0:
        raise InvalidOptionSymbol(
            f"invalid option symbol {raw!r}: the strike is zero", details={"parameter": param, "symbol": raw}
        )
    return OccSymbol(
        symbol=text, root=root, expiration=expiration, type="call" if cp == "C" else "put", strike=millis / 1000
    )


def is_option(symbol: str) -> bool:
    """Whether ``symbol`` is written as an OCC option contract (its asset class; no date check)."""
    return isinstance(symbol, str) and _OCC.match(symbol.strip().upper()) is not None


def parse_occs(raw: list[str] | tuple[str, ...] | str, param: str = "symbols") -> list[OccSymbol]:
    """Comma-separated or listed OCC symbols, each parsed, duplicates dropped, at least one."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    out: dict[str, OccSymbol] = {}
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        occ = parse_occ(item, param)
        out.setdefault(occ.symbol, occ)
    if not out:
        raise InvalidOptionSymbol(f"{param}: no option symbols given", details={"parameter": param})
    return list(out.values())


def format_occ(root: str, expiration: date, type: OptionType, strike: float) -> str:
    """The OCC symbol of a contract; a strike that does not fit eight digits of thousandths is refused."""
    millis = round(strike * 1000)
    if not 0 < millis <= MAX_STRIKE_MILLIS or abs(millis - strike * 1000) > 1e-6 * max(1.0, strike):
        raise InvalidOptionSymbol(
            f"strike {strike!r} has no OCC form (0 < strike <= 99999.999, in thousandths)",
            details={"parameter": "strike"},
        )
    cp = "C" if type == "call" else "P"
    return f"{root}{expiration:%y%m%d}{cp}{millis:08d}"


def occ_fields(col: str = "contract") -> list[pl.Expr]:
    """Vectorized parse of an OCC column: ``occ_root``, ``occ_expiration``, ``occ_type``, ``occ_strike``
    (nulls where the symbol does not match)."""
    parts = pl.col(col).str.extract_groups(OCC_PATTERN)
    ymd = pl.lit("20") + parts.struct.field("2") + parts.struct.field("3") + parts.struct.field("4")
    return [
        parts.struct.field("1").alias("occ_root"),
        ymd.str.strptime(pl.Date, "%Y%m%d", strict=False).alias("occ_expiration"),
        pl.when(parts.struct.field("5") == "C")
        .then(pl.lit("call"))
        .when(parts.struct.field("5") == "P")
        .then(pl.lit("put"))
        .alias("occ_type"),
        (parts.struct.field("6").cast(pl.Int64, strict=False) / 1000).alias("occ_strike"),
    ]


# --- frames ------------------------------------------------------------------------------------------

# One row per contract per snapshot: the chain as the vendor sent it, with the contract's OCC fields.
# ``as_of`` is when marketpipe asked (the key of a stored history of chains, with ``contract``): one
# instant for every page of one chain or snapshot request (its start), while ``fetched_at`` is each page's;
# ``greeks_missing`` is null when the vendor sent greeks and IV, else the reason they are null.
OPTION_SNAPSHOT_SCHEMA: dict[str, pl.DataType] = {
    "contract": pl.String(),
    "underlying": pl.String(),
    "root": pl.String(),
    "expiration": pl.Date(),
    "type": pl.String(),
    "strike": pl.Float64(),
    "as_of": UTC_US,
    "quote_ts": UTC_NS,
    "bid_price": pl.Float64(),
    "bid_size": pl.Int64(),
    "bid_exchange": pl.String(),
    "ask_price": pl.Float64(),
    "ask_size": pl.Int64(),
    "ask_exchange": pl.String(),
    "quote_condition": pl.String(),
    "trade_ts": UTC_NS,
    "trade_price": pl.Float64(),
    "trade_size": pl.Int64(),
    "trade_exchange": pl.String(),
    "trade_condition": pl.String(),
    "delta": pl.Float64(),
    "gamma": pl.Float64(),
    "theta": pl.Float64(),
    "vega": pl.Float64(),
    "rho": pl.Float64(),
    "implied_volatility": pl.Float64(),
    "greeks_missing": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}
# what makes a snapshot row the same row (the key of the stored history, ``core/tables.OPTION_SNAPSHOTS``)
OPTION_SNAPSHOT_KEY = ("contract", "as_of", "source", "feed")

OPTION_CONTRACT_SCHEMA: dict[str, pl.DataType] = {
    "contract": pl.String(),
    "id": pl.String(),
    "name": pl.String(),
    "underlying": pl.String(),
    "underlying_asset_id": pl.String(),
    "root": pl.String(),
    "expiration": pl.Date(),
    "type": pl.String(),
    "style": pl.String(),
    "strike": pl.Float64(),
    "size": pl.Int64(),
    "status": pl.String(),
    "tradable": pl.Boolean(),
    "open_interest": pl.Int64(),
    "open_interest_date": pl.Date(),
    "close_price": pl.Float64(),
    "close_price_date": pl.Date(),
    "source": pl.String(),
    "fetched_at": UTC_US,
}

OPTION_TRADE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": UTC_NS,
    "price": pl.Float64(),
    "size": pl.Int64(),
    "exchange": pl.String(),
    "condition": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "fetched_at": UTC_US,
}
