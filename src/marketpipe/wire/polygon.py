"""Polygon.io (Massive) stocks REST: what the adapter (:mod:`marketpipe.providers.polygon`) and the
simulator's Polygon face (:mod:`marketpipe.sim.polygon`) both know about the vendor's format
(shared/reference/market-data-apis.md §4): paths, limits, the ``status`` vocabulary, the error-body
rule, the quote-size rule and the numeric code tables. Depends on :mod:`marketpipe.core` only.

Where the tables come from:

* ``EXCHANGES``, ``TAPES``: Polygon's ``/v3/reference/exchanges`` (participant ids) and the
  reference's §4.3 tape numbers (1 = NYSE, 2 = AMEX/regional, 3 = Nasdaq).
* ``TRADE_CONDITIONS`` / ``TRADE_CONDITIONS_BY_TAPE``: the ``sip_mapping`` of the ``sale_condition``
  and ``trade_thru_exempt`` rows of Polygon's ``/v3/reference/conditions?asset_class=stocks``
  (``data_types: ["trade"]``), CTA letters for tapes A/B and UTP letters for tape C; the common
  letters agree with the reference's §1.12 list (``@ I T F O 6 Q M``).
* ``QUOTE_CONDITIONS``: the ``quote_condition`` rows of the same listing (``data_types: ["bbo",
  "nbbo"]``); Polygon reuses ids across data types (41 is "Trade Thru Exempt" for a trade but
  "Cash Only Settlement" for a quote), so the two tables are kept apart.
* A code in neither table comes out as ``polygon:<id>`` (:func:`unknown_code`): never a bare number
  that could pass for a SIP letter or digit condition (``"4"``, ``"6"``, ``"7"`` are CTA/UTP letters).
* Quote sizes: Polygon's NBBO and snapshot quotes gave ``s``/``S`` in round lots ("the number of round
  lot orders ... normal round lot size is 100 shares") until 2025-11-03, when Polygon, following the
  SEC's Market Data Infrastructure rules, began publishing bid and ask sizes in shares (Polygon's
  announcement "Upcoming Changes to Bid and Ask Sizes in Stocks Quotes", 2025-10-27). Canonical quotes
  are in shares: :func:`quote_lot` says what one unit of a quote's size is worth at its time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

MAX_LIMIT = 50_000
DELAY = timedelta(minutes=15)  # delayed plans answer status DELAYED and stop this far behind now
# the "status" of an answer
OK = "OK"
DELAYED = "DELAYED"
ERROR_STATUSES = ("ERROR", "NOT_AUTHORIZED", "NOT_FOUND")

AGGS_PREFIX = "/v2/aggs/"
AGGS_ROUTE = "/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}"
PREV_ROUTE = "/v2/aggs/ticker/{ticker}/prev"
LAST_TRADE_ROUTE = "/v2/last/trade/{ticker}"
LAST_NBBO_ROUTE = "/v2/last/nbbo/{ticker}"
SNAPSHOTS_PATH = "/v2/snapshot/locale/us/markets/stocks/tickers"
SNAPSHOT_ROUTE = SNAPSHOTS_PATH + "/{ticker}"


def aggs_path(ticker: str, multiplier: int | str, timespan: str, lo: int | str, hi: int | str) -> str:
    """The aggregates path of one ticker (already escaped as a path segment)."""
    return f"/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{lo}/{hi}"


def last_path(kind: str, ticker: str) -> str:
    """``/v2/last/trade/{ticker}`` or ``/v2/last/nbbo/{ticker}``."""
    return f"/v2/last/{kind}/{ticker}"


def error_body(status: str, text: str, request_id: str) -> dict[str, Any]:
    """The vendor's error body: ``ERROR`` bodies say ``error``, the others (``NOT_AUTHORIZED``,
    ``NOT_FOUND``) say ``message`` — the vendor's own inconsistency, which the adapter reads both ways."""
    return {"status": status, "request_id": request_id, ("error" if status == "ERROR" else "message"): text}


# --- code tables ------------------------------------------------------------------------------------
# Polygon identifies exchanges, tapes and trade conditions by number; marketpipe's canonical records
# use the letters Alpaca and the SIPs use.

# Polygon's numeric exchange ids (/v3/reference/exchanges) -> participant letters.
EXCHANGES: dict[int, str] = {
    1: "A", 2: "B", 3: "C", 4: "D", 5: "E", 6: "I", 7: "J", 8: "K", 9: "M", 10: "N", 11: "P", 12: "Q",
    13: "S", 14: "L", 15: "V", 16: "W", 17: "X", 18: "Y", 19: "Z", 20: "H", 21: "U", 22: "G",
}  # fmt: skip
TAPES: dict[int, str] = {1: "A", 2: "B", 3: "C"}
# Polygon trade condition ids -> the CTA/UTP sale-condition letter both tapes use for it.
TRADE_CONDITIONS: dict[int, str] = {
    0: "@", 1: "A", 4: "B", 5: "G", 7: "C", 8: "6", 9: "X", 10: "4", 11: "D", 12: "T", 13: "U", 14: "F",
    15: "M", 16: "Q", 17: "O", 19: "6", 20: "N", 21: "H", 22: "P", 23: "K", 25: "O", 27: "1", 28: "5",
    29: "R", 30: "L", 33: "Z", 34: "S", 36: "Y", 37: "I", 38: "9", 53: "7",
}  # fmt: skip
# Ids whose letter differs between the CTA (tapes A, B) and the UTP (tape C) plans.
TRADE_CONDITIONS_BY_TAPE: dict[int, dict[str, str]] = {
    2: {"A": "B", "B": "B", "C": "W"},  # average price trade
    41: {"A": "1", "B": "1", "C": "X"},  # trade thru exempt
    52: {"A": "V", "B": "V", "C": "7"},  # contingent trade
}
# Polygon quote condition ids -> CTA/UTP quote-condition letters.
QUOTE_CONDITIONS: dict[int, str] = {1: "R"}  # regular two-sided open
UNKNOWN_PREFIX = "polygon:"

# Quote sizes: round lots before this instant (midnight New York), shares from it on.
QUOTE_SHARES_FROM = datetime(2025, 11, 3, 5, tzinfo=UTC)
QUOTE_SHARES_FROM_NS = int(QUOTE_SHARES_FROM.timestamp()) * 1_000_000_000
ROUND_LOT = 100


def quote_lot(t_ns: int) -> int:
    """Shares in one unit of a Polygon quote size stamped ``t_ns`` (SIP time, Unix ns)."""
    return ROUND_LOT if t_ns < QUOTE_SHARES_FROM_NS else 1


def unknown_code(code: int) -> str:
    """The stable, marked form of a condition id neither table names."""
    return f"{UNKNOWN_PREFIX}{code}"


def trade_condition(code: int, tape: int | None) -> str | None:
    """The letter of a trade condition id on a tape (Polygon's tape number), or None if unknown."""
    by_tape = TRADE_CONDITIONS_BY_TAPE.get(code)
    if by_tape is not None:
        return by_tape.get(TAPES.get(tape, "") if tape is not None else "", by_tape["A"])
    return TRADE_CONDITIONS.get(code)


def inverse(table: dict[int, str]) -> dict[str, int]:
    """Letter -> id; where several ids share a letter, the lowest id."""
    out: dict[str, int] = {}
    for code in sorted(table):
        out.setdefault(table[code], code)
    return out


# --- corporate actions (next-capabilities §1.3) -------------------------------------------------------
# The current endpoints and the deprecated v3 ones (the official client still calls only these).
# Split semantics: 4-for-1 is split_from 1, split_to 4; reverse when split_from > split_to.
SPLITS_PATH = "/stocks/v1/splits"
DIVIDENDS_PATH = "/stocks/v1/dividends"
V3_SPLITS_PATH = "/v3/reference/splits"
V3_DIVIDENDS_PATH = "/v3/reference/dividends"
ACTIONS_MAX_LIMIT = 5000
V3_ACTIONS_MAX_LIMIT = 1000
SPLIT_TYPES = ("forward_split", "reverse_split", "stock_dividend")  # adjustment_type of /stocks/v1/splits
DISTRIBUTION_TYPES = ("recurring", "special", "supplemental", "irregular", "unknown")


def derived_action_id(symbol: str, family: str, day: Any) -> str:
    """An id for an action whose vendor sent none: symbol, family (split or dividend) and date, so a
    corrected ratio or amount is a new version of the same action rather than another action."""
    return f"{symbol}:{family}:{day}"


def split_action(rec: dict[str, Any], *, source: str, fetched_at: datetime) -> dict[str, Any]:
    """A split record of either endpoint (as received) -> a canonical action row."""
    frm, to = rec.get("split_from"), rec.get("split_to")
    kind = rec.get("adjustment_type")
    if kind not in SPLIT_TYPES:
        numbers = isinstance(frm, int | float) and isinstance(to, int | float)
        kind = "reverse_split" if numbers and frm > to else "forward_split"  # type: ignore[operator]
    if kind == "stock_dividend" and isinstance(frm, int | float) and isinstance(to, int | float) and frm:
        rate: float | None = float(to) / float(frm) - 1.0
    else:
        rate = None
    ticker, day = rec.get("ticker"), rec.get("execution_date")
    vendor_id = str(rec.get("id") or derived_action_id(str(ticker), "split", day))
    return {
        "action_id": f"polygon:{vendor_id}",
        "provider": "polygon",
        "source": source,
        "vendor_id": vendor_id,
        "type": kind,
        "symbol": ticker,
        "ex_date": day,
        "old_rate": float(frm) if isinstance(frm, int | float) else None,
        "new_rate": float(to) if isinstance(to, int | float) else None,
        "rate": rate,
        "fetched_at": fetched_at,
        "raw": orjson.dumps(rec).decode(),
    }


def dividend_action(rec: dict[str, Any], *, source: str, fetched_at: datetime) -> dict[str, Any]:
    """A dividend record of either endpoint -> a canonical cash dividend. The raw ``cash_amount`` is
    kept, never ``split_adjusted_cash_amount`` (the formula works on raw prices)."""
    ticker, day = rec.get("ticker"), rec.get("ex_dividend_date")
    vendor_id = str(rec.get("id") or derived_action_id(str(ticker), "dividend", day))
    amount = rec.get("cash_amount")
    return {
        "action_id": f"polygon:{vendor_id}",
        "provider": "polygon",
        "source": source,
        "vendor_id": vendor_id,
        "type": "cash_dividend",
        "symbol": ticker,
        "ex_date": day,
        "record_date": rec.get("record_date"),
        "payable_date": rec.get("pay_date"),
        "declaration_date": rec.get("declaration_date"),
        "cash_amount": float(amount) if isinstance(amount, int | float) else None,
        "currency": rec.get("currency"),
        "fetched_at": fetched_at,
        "raw": orjson.dumps(rec).decode(),
    }
