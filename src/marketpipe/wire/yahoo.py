"""Yahoo Finance chart endpoint: what the adapter (:mod:`marketpipe.providers.yahoo`) and the
simulator's Yahoo face (:mod:`marketpipe.sim.yahoo`) both know about the format
(shared/reference/market-data-apis.md §5): the path, the intervals' lookback and span limits, and the
error envelope. Depends on :mod:`marketpipe.core` only."""

from __future__ import annotations

from typing import Any

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
