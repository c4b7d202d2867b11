"""Yahoo Finance chart endpoint: what the adapter (:mod:`marketpipe.providers.yahoo`) and the
simulator's Yahoo face (:mod:`marketpipe.sim.yahoo`) both know about the format
(shared/reference/market-data-apis.md §5): the path, the intervals' lookback and span limits, and the
error envelope. Depends on :mod:`marketpipe.core` only."""

from __future__ import annotations

from typing import Any

import orjson

CHART_PREFIX = "/v8/finance/chart/"
# how far back an intraday interval reaches (days before now), and the longest span one request may ask
LOOKBACK_DAYS: dict[str, int] = {"1m": 30, "2m": 60, "5m": 60, "15m": 60, "30m": 60, "60m": 730, "90m": 60, "1h": 730}
MAX_SPAN_DAYS: dict[str, int] = {"1m": 7}
ERROR_KEYS = ("chart", "finance")  # the envelope an error arrives in: the chart's own, or the router's


def chart_path(symbol: str) -> str:
    """The chart path of one symbol (already escaped as a path segment)."""
    return CHART_PREFIX + symbol


def error_envelope(code: str, description: str, *, key: str = "chart") -> dict[str, Any]:
    """``{"chart"|"finance": {"result": null, "error": {"code", "description"}}}``."""
    return {key: {"result": None, "error": {"code": code, "description": description}}}


# --- events (next-capabilities §1.4) ------------------------------------------------------------------
# ``events=div,split`` adds ``events.dividends`` / ``events.splits``: objects keyed by the ex-date's
# session-open Unix time as a string; splits hold numerator/denominator/splitRatio, dividends amount.
EVENTS = "div,split"


def derived_action_id(symbol: str, family: str, day: str, key: str) -> str:
    """Yahoo sends no ids: symbol, family, ex-date and the event's key (its timestamp) name the action,
    so a corrected ratio under the same key is a new version, and a second event the same day (a
    doubled split) a second action."""
    return f"{symbol}:{family}:{day}:{key}"


def events_to_actions(
    events: dict[str, Any] | None, symbol: str, day_of: Any, *, source: str, fetched_at: Any
) -> list[dict[str, Any]]:
    """Canonical action rows of a chart's ``events`` (``day_of``: Unix seconds -> ``YYYY-MM-DD``
    ex-date in the exchange's time zone)."""
    out: list[dict[str, Any]] = []
    for key, ev in ((events or {}).get("splits") or {}).items():
        num, den = ev.get("numerator"), ev.get("denominator")
        day = day_of(int(ev.get("date") or key))
        vid = derived_action_id(symbol, "split", day, str(key))
        reverse = isinstance(num, int | float) and isinstance(den, int | float) and num < den
        out.append({
            "action_id": f"yahoo:{vid}", "provider": "yahoo", "source": source, "vendor_id": vid,
            "type": "reverse_split" if reverse else "forward_split", "symbol": symbol, "ex_date": day,
            "old_rate": float(den) if isinstance(den, int | float) else None,
            "new_rate": float(num) if isinstance(num, int | float) else None,
            "fetched_at": fetched_at, "raw": orjson.dumps(ev).decode(),
        })  # fmt: skip
    for key, ev in ((events or {}).get("dividends") or {}).items():
        day = day_of(int(ev.get("date") or key))
        vid = derived_action_id(symbol, "dividend", day, str(key))
        amount = ev.get("amount")
        out.append({
            "action_id": f"yahoo:{vid}", "provider": "yahoo", "source": source, "vendor_id": vid,
            "type": "cash_dividend", "symbol": symbol, "ex_date": day,
            "cash_amount": float(amount) if isinstance(amount, int | float) else None,
            "currency": ev.get("currency") or "USD", "fetched_at": fetched_at, "raw": orjson.dumps(ev).decode(),
        })  # fmt: skip
    return out
