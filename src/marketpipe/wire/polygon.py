"""Polygon.io (Massive) stocks REST: what the adapter (:mod:`marketpipe.providers.polygon`) and the
simulator's Polygon face (:mod:`marketpipe.sim.polygon`) both know about the vendor's format
(shared/reference/market-data-apis.md §4): paths, limits, the ``status`` vocabulary, the error-body
rule and the numeric code tables. Depends on :mod:`marketpipe.core` only."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

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
# Polygon trade condition ids -> CTA/UTP sale-condition letters.
TRADE_CONDITIONS: dict[int, str] = {0: "@", 12: "T", 14: "F", 15: "M", 16: "Q", 17: "O", 19: "6", 37: "I"}


def inverse(table: dict[int, str]) -> dict[str, int]:
    return {letter: code for code, letter in table.items()}
