"""The Polygon face's corporate-action endpoints (wire format: ``wire/polygon.py``): the current
``/stocks/v1/splits`` and ``/stocks/v1/dividends`` and the deprecated ``/v3/reference/splits`` and
``/v3/reference/dividends``, answered from the market's action book as the Polygon vendor view has it.

Filters: ``ticker``, the date (``execution_date`` / ``ex_dividend_date``, also with ``.gt .gte .lt
.lte``), ``limit`` (v1: default 100, at most 5000; v3: default 10, at most 1000) and ``order``/``sort``
(``asc``/``desc`` by date; v1's ``sort`` may say ``execution_date.desc``). Default order: newest first.
``next_url`` carries ``cursor`` (base64 of the query and the next offset), never the API key.
``historical_adjustment_factor`` is cumulative: for a split the product of split_from/split_to over
it and every later split; for a dividend the product of (C_prev - D)/C_prev over it and every later
dividend (raw previous closes). ``declaration_date`` and ``record_date`` are not sent: the simulator
does not hold them. ``frequency`` is 4 (quarterly), ``distribution_type`` ``recurring``.
"""

from __future__ import annotations

import base64
import binascii
from datetime import date
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np
import orjson

from marketpipe.sim.actions import SimAction
from marketpipe.sim.data import SimMarket
from marketpipe.wire.polygon import (
    ACTIONS_MAX_LIMIT,
    DIVIDENDS_PATH,
    SPLITS_PATH,
    V3_ACTIONS_MAX_LIMIT,
    V3_DIVIDENDS_PATH,
    V3_SPLITS_PATH,
)

ROUTES = (SPLITS_PATH, DIVIDENDS_PATH, V3_SPLITS_PATH, V3_DIVIDENDS_PATH)


class ActionsError(ValueError):
    """A 400 with the vendor's message."""


def _split_record(a: SimAction, later: list[SimAction], current: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": a.id, "ticker": a.symbol, "execution_date": a.ex_date.isoformat(),
                           "split_from": a.old_rate, "split_to": a.new_rate}  # fmt: skip
    if current:
        hist = float(np.prod([x.old_rate / x.new_rate for x in [a, *later]]))
        rec |= {"adjustment_type": a.type, "historical_adjustment_factor": hist}
    return rec


def _dividend_record(a: SimAction, splits_after: float, hist: float, current: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": a.id, "ticker": a.symbol, "cash_amount": a.cash, "currency": "USD",
                           "ex_dividend_date": a.ex_date.isoformat(), "pay_date": a.process_date.isoformat(),
                           "frequency": 4}  # fmt: skip
    if current:
        rec |= {"split_adjusted_cash_amount": (a.cash or 0.0) * splits_after, "distribution_type": "recurring",
                "historical_adjustment_factor": hist}  # fmt: skip
    else:
        rec["dividend_type"] = "CD"
    return rec


def _date_filter(query: dict[str, str], field: str) -> list[tuple[str, date]]:
    out = []
    for op in ("", ".gt", ".gte", ".lt", ".lte"):
        text = query.get(field + op)
        if text:
            try:
                out.append((op or ".eq", date.fromisoformat(text)))
            except ValueError:
                raise ActionsError(f"invalid {field}{op}: {text}") from None
    return out


_OPS = {
    ".eq": lambda d, v: d == v,
    ".gt": lambda d, v: d > v,
    ".gte": lambda d, v: d >= v,
    ".lt": lambda d, v: d < v,
    ".lte": lambda d, v: d <= v,
}


def answer(market: SimMarket, path: str, raw_query: dict[str, str], origin: str, now_ns: int) -> dict[str, Any]:
    """The body of one request at ``now_ns`` (raises :class:`ActionsError`)."""
    today = market.ny_date(now_ns)
    offset = 0
    query = {k: v for k, v in raw_query.items() if k != "apiKey"}
    if "cursor" in query:
        try:
            inner = dict(parse_qsl(base64.urlsafe_b64decode(query["cursor"]).decode()))
            offset = int(inner.pop("_offset"))
        except (ValueError, KeyError, binascii.Error, UnicodeDecodeError):
            raise ActionsError("invalid cursor") from None
        query = inner
    current = path in (SPLITS_PATH, DIVIDENDS_PATH)
    splits = path in (SPLITS_PATH, V3_SPLITS_PATH)
    field = "execution_date" if splits else "ex_dividend_date"
    cap = ACTIONS_MAX_LIMIT if current else V3_ACTIONS_MAX_LIMIT
    raw_limit = query.get("limit") or ("100" if current else "10")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= cap:
        raise ActionsError(f"limit must be between 1 and {cap}")
    order = query.get("order") or query.get("sort", "").rpartition(".")[2] or "desc"
    if order not in ("asc", "desc"):
        raise ActionsError("order must be asc or desc")
    filters = _date_filter(query, field)
    tickers = {t for t in (query.get("ticker"), *query.get("ticker.any_of", "").split(",")) if t}
    symbols = sorted(tickers) if tickers else sorted({a.symbol for a in market.actions.actions})
    rows: list[dict[str, Any]] = []
    for sym in symbols:
        listed = [a for a in market.actions.view(sym, "polygon").listed if a.ex_date <= today]
        sp = [a for a in listed if a.is_split]
        if splits:
            for k, a in enumerate(sp):
                rows.append(_split_record(a, sp[k + 1 :], current))
            continue
        divs = [a for a in listed if a.type == "cash_dividend"]
        hist = _dividend_factors(market, sym, divs, now_ns)
        for a, h in zip(divs, hist, strict=True):
            after = float(np.prod([x.old_rate / x.new_rate for x in sp if x.ex_date > a.ex_date]))
            rows.append(_dividend_record(a, after, h, current))
    rows = [r for r in rows if all(_OPS[op](date.fromisoformat(r[field]), v) for op, v in filters)]
    rows.sort(key=lambda r: (r[field], r["ticker"]), reverse=order == "desc")
    limit = int(raw_limit)
    doc: dict[str, Any] = {"results": rows[offset : offset + limit], "status": "OK"}
    if offset + limit < len(rows):
        cursor = base64.urlsafe_b64encode(urlencode({**query, "_offset": offset + limit}).encode()).decode()
        doc["next_url"] = f"{origin}{path}?cursor={cursor}"
    return doc


def _dividend_factors(market: SimMarket, symbol: str, divs: list[SimAction], now_ns: int) -> list[float]:
    """Cumulative (C_prev - D)/C_prev of each dividend and every later one (raw closes)."""
    own = []
    for a in divs:
        k = int(np.searchsorted(market.days, np.datetime64(a.ex_date, "D"), side="left"))
        prev = market.raw_close(symbol, k - 1, now_ns)
        own.append((prev - (a.cash or 0.0)) / prev if prev and prev > (a.cash or 0.0) else 1.0)
    return [float(np.prod(own[k:])) for k in range(len(own))]


def body(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)
