"""The Alpaca face's ``GET /v1/corporate-actions`` (wire format: ``wire/alpaca_actions.py``).

Answers from the market's action book as the Alpaca vendor view has it (faults included). Every one
of the 15 plural keys is sent, empty arrays included, so a client that drops some of them (alpaca-py
drops ``partial_calls`` and ``reorganizations``) shows it. ``start``/``end`` filter on
``process_date`` (the simulator's: a split's ex-date, a dividend's ex + 7 days), default today; ``ids`` excludes the
other filters; rows are ordered by process date (``sort``), then type, then id; ``page_token`` is
base64 of the offset of the next row.
"""

from __future__ import annotations

import base64
import binascii
from datetime import date
from typing import Any

from marketpipe.sim.actions import SimAction
from marketpipe.sim.data import SimMarket
from marketpipe.wire.alpaca_actions import MAX_LIMIT, PLURAL, SORTS, page_body

# Real CUSIPs of the symbols the book holds actions for.
CUSIPS = {"AAPL": "037833100", "NVDA": "67066G104", "TSLA": "88160R101", "GE": "369604301", "GEHC": "36266G107",
          "GEV": "36828A101"}  # fmt: skip


class ActionsBadRequest(ValueError):
    """A 400 with Alpaca's message."""


def record(a: SimAction) -> tuple[str, dict[str, Any]]:
    """(plural key, Alpaca record) of one simulated action."""
    common: dict[str, Any] = {"id": a.id, "symbol": a.symbol}
    dates = {"process_date": a.process_date.isoformat(), "ex_date": a.ex_date.isoformat(),
             "payable_date": a.process_date.isoformat()}  # fmt: skip
    if a.type == "cash_dividend":
        rec = {**common, "cusip": CUSIPS.get(a.symbol, ""), "rate": a.cash, "special": False, "foreign": False, **dates}
    elif a.type == "spin_off":  # Alpaca's spin_off fields: no symbol, the source's and the new line's
        rec = {"id": a.id, "source_symbol": a.symbol, "source_cusip": CUSIPS.get(a.symbol, ""),
               "source_rate": a.old_rate, "new_symbol": a.new_symbol, "new_cusip": CUSIPS.get(a.new_symbol or "", ""),
               "new_rate": a.new_rate, **dates}  # fmt: skip
    elif a.type == "reverse_split":
        cusip = CUSIPS.get(a.symbol, "")
        rec = {
            **common,
            "old_cusip": cusip,
            "new_cusip": cusip,
            "new_rate": a.new_rate,
            "old_rate": a.old_rate,
            **dates,
        }
    else:
        rec = {**common, "cusip": CUSIPS.get(a.symbol, ""), "new_rate": a.new_rate, "old_rate": a.old_rate, **dates}
    return PLURAL[a.type], rec


def _day(text: str, name: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ActionsBadRequest(f"invalid {name}") from None


def _list(query: Any, name: str) -> list[str]:
    return [s.strip() for s in query.get(name, "").split(",") if s.strip()]


def answer(market: SimMarket, query: Any, today: date) -> bytes:
    """The body of one request (raises :class:`ActionsBadRequest`)."""
    ids, symbols, types = _list(query, "ids"), _list(query, "symbols"), _list(query, "types")
    bad = [t for t in types if t not in PLURAL]
    if bad:
        raise ActionsBadRequest(f"invalid types: {','.join(bad)}")
    raw_limit = query.get("limit", "") or "100"
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ActionsBadRequest("invalid limit")
    sort = query.get("sort", "") or "asc"
    if sort not in SORTS:
        raise ActionsBadRequest("invalid sort")
    rows = [a for sym in sorted({a.symbol for a in market.actions.actions})
            for a in market.actions.view(sym, "alpaca").listed]  # fmt: skip
    if ids:
        if symbols or types or query.get("start") or query.get("end"):
            raise ActionsBadRequest("ids cannot be combined with other filters")
        rows = [a for a in rows if a.id in ids]
    else:
        start = _day(query["start"], "start") if query.get("start") else today
        end = _day(query["end"], "end") if query.get("end") else today
        if end < start:
            raise ActionsBadRequest("end should not be before start")
        rows = [a for a in rows if start <= a.process_date <= end]
        rows = [a for a in rows if (not symbols or a.symbol in symbols) and (not types or a.type in types)]
    rows.sort(key=lambda a: (a.process_date, a.type, a.id), reverse=sort == "desc")
    offset = 0
    token = query.get("page_token", "")
    if token:
        try:
            offset = int(base64.b64decode(token, validate=True).decode())
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ActionsBadRequest("invalid page token") from None
    limit = int(raw_limit)
    page = rows[offset : offset + limit]
    groups: dict[str, list[dict[str, Any]]] = {key: [] for key in PLURAL.values()}
    for a in page:
        key, rec = record(a)
        groups[key].append(rec)
    more = offset + limit < len(rows)
    return page_body(groups, base64.b64encode(str(offset + limit).encode()).decode() if more else None)
