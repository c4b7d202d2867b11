"""Alpaca corporate actions, ``GET /v1/corporate-actions`` (next-capabilities §1.1, the reference §3.3):
the path, the 15 types and their plural response keys, the limits, and the conversion of a vendor
record into the canonical action row (``core.schema.ACTION_SCHEMA``) and back. The adapter, the
simulator's face and the Alpaca-compatible API all use this module.

The response is ``{"corporate_actions": {<plural>: [record, ...], ...}, "next_page_token": ...}``.
Every plural key is optional; a key this module does not know is kept (its records become actions of
type ``<key>`` with the trailing ``s`` removed, ``raw`` holding the record as received), never dropped —
alpaca-py silently drops ``partial_calls`` and ``reorganizations`` (trap 3), we do not.
``start``/``end`` filter on ``process_date``, which for cash dividends can fall weeks after the
ex-date (trap 2): :data:`PROCESS_LAG` is how far past a window's end a query must reach.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import orjson

from marketpipe.core.schema import ACTION_TYPES

PATH = "/v1/corporate-actions"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
PROCESS_LAG = timedelta(days=90)  # process_date can trail ex_date by weeks (payable date); query this far past
SORTS = ("asc", "desc")

PLURAL: dict[str, str] = {t: f"{t}s" for t in ACTION_TYPES}
SINGULAR: dict[str, str] = {v: k for k, v in PLURAL.items()}

# The per-share cash, the other rate, and the share ratio (old, new) of each type, by vendor field.
_CASH = {
    "cash_dividend": "rate",
    "cash_merger": "rate",
    "redemption": "rate",
    "stock_and_cash_merger": "cash_rate",
    "reorganization": "cash_rate",
    "partial_call": "price",
}
_RATE = {"stock_dividend": "rate", "rights_distribution": "rate"}
_RATIO = {
    "forward_split": ("old_rate", "new_rate"),
    "reverse_split": ("old_rate", "new_rate"),
    "unit_split": ("old_rate", "new_rate"),
    "spin_off": ("source_rate", "new_rate"),
    "stock_merger": ("acquiree_rate", "acquirer_rate"),
    "stock_and_cash_merger": ("acquiree_rate", "acquirer_rate"),
}
_SYMBOL_KEYS = ("symbol", "source_symbol", "acquiree_symbol", "old_symbol")
_DATES = ("ex_date", "record_date", "payable_date", "process_date", "effective_date")


def type_of(plural: str) -> str:
    """The singular type of a plural response key (an unknown key loses its trailing ``s``)."""
    return SINGULAR.get(plural) or plural.removesuffix("s")


def plural_of(action_type: str) -> str:
    return PLURAL.get(action_type) or f"{action_type}s"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def to_action(plural: str, rec: dict[str, Any], *, source: str, fetched_at: datetime) -> dict[str, Any]:
    """One vendor record (as received) -> one canonical action row."""
    t = type_of(plural)
    old_key, new_key = _RATIO.get(t, ("", ""))
    vendor_id = str(rec.get("id") or "")
    return {
        "action_id": f"alpaca:{vendor_id}",
        "provider": "alpaca",
        "source": source,
        "vendor_id": vendor_id,
        "type": t,
        "symbol": next((rec[k] for k in _SYMBOL_KEYS if rec.get(k)), None),
        **{d: rec.get(d) for d in _DATES},
        "declaration_date": None,
        "old_rate": _num(rec.get(old_key)),
        "new_rate": _num(rec.get(new_key)),
        "cash_amount": _num(rec.get(_CASH[t])) if t in _CASH else None,
        "rate": _num(rec.get(_RATE[t])) if t in _RATE else None,
        "currency": "USD" if t in _CASH else None,
        "old_symbol": rec.get("old_symbol") or rec.get("acquiree_symbol"),
        "new_symbol": rec.get("new_symbol") or rec.get("acquirer_symbol"),
        "fetched_at": fetched_at,
        "raw": orjson.dumps(rec).decode(),
    }


def parse_page(body: bytes) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
    """``(corporate_actions, next_page_token)``. Raises ValueError (with what is wrong) for a body
    without the envelope. Corporate actions are few (hundreds a page), so plain dicts are fine here."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict) or "corporate_actions" not in doc:
        raise ValueError("the answer lacks the required key corporate_actions")
    groups = doc["corporate_actions"] or {}
    if not isinstance(groups, dict) or not all(isinstance(v, list | type(None)) for v in groups.values()):
        raise ValueError("corporate_actions is not an object of arrays")
    token = doc.get("next_page_token")
    return {k: list(v or []) for k, v in groups.items()}, (str(token) if token else None)


def _iso(d: Any) -> str | None:
    return d.isoformat() if isinstance(d, date) else d


def to_record(action: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A canonical action row -> (plural key, Alpaca record). An action Alpaca sent comes back as it
    was received (``raw``); one from another vendor is written in Alpaca's fields."""
    t = action["type"]
    if action.get("provider") == "alpaca" and action.get("raw"):
        return plural_of(t), orjson.loads(action["raw"])
    rec: dict[str, Any] = {"id": action["action_id"], "symbol": action["symbol"], "cusip": None}
    old_key, new_key = _RATIO.get(t, ("old_rate", "new_rate"))
    if t in _RATIO:
        rec[old_key], rec[new_key] = action.get("old_rate"), action.get("new_rate")
    if t in _CASH:
        rec[_CASH[t]] = action.get("cash_amount")
    if t in _RATE:
        rec[_RATE[t]] = action.get("rate")
    if t == "cash_dividend":
        rec.update(special=False, foreign=False)
    for d in _DATES:
        if action.get(d) is not None:
            rec[d] = _iso(action[d])
    rec.setdefault("process_date", _iso(action.get("ex_date") or action.get("effective_date")))
    return plural_of(t), rec


def page_body(groups: dict[str, list[dict[str, Any]]], next_token: str | None) -> bytes:
    return orjson.dumps({"corporate_actions": groups, "next_page_token": next_token})
