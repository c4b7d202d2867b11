"""What every provider adapter offers. Adapters turn requests into vendor calls and vendor
responses into canonical frames and records; they never touch storage, caches or each other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import polars as pl

from marketpipe.core.resilience import Resilience
from marketpipe.core.schema import Quote, Snapshot, Trade
from marketpipe.core.timeframe import Timeframe

SIM_HEADER = "x-marketpipe-sim"


def sim_source(headers: Mapping[str, str], provider: str) -> str:
    """The ``source`` label for a response: the provider's name, or ``sim:<provider>`` when the
    response came from marketpipe's simulator (it announces itself with a header). Simulator data
    is thereby never mistaken for real data, yet says which vendor face served it."""
    return f"sim:{provider}" if headers.get(SIM_HEADER) else provider


def is_sim(source: str) -> bool:
    return source == "sim" or source.startswith("sim:")


@dataclass(slots=True)
class BarPage:
    """One vendor page (bars, trades or quotes by ``kind``), already in the canonical schema.

    ``complete_through`` says how far each requested symbol is known to be complete once this page
    is in: symbols finished inside the page map to the request's end; the symbol the page stops in
    the middle of maps to its last timestamp (inclusive). Symbols not mentioned are not yet known.
    """

    frame: pl.DataFrame
    symbols: list[str]
    timeframe: Timeframe | None
    start: datetime
    end: datetime  # the end actually requested (after any 15-minute SIP clamp), exclusive
    feed: str
    source: str
    request_id: str
    fetched_at: datetime
    next_page_token: str | None
    page_number: int
    complete_through: dict[str, datetime] = field(default_factory=dict)
    last_page: bool = False
    nbytes: int = 0
    kind: str = "bars"


class BarsProvider(Protocol):
    """A market-data vendor behind marketpipe's canonical interface.

    ``supports`` is the capability table the router consults before trying a provider: ``None``
    when the provider can serve ``kind`` ("bars", "trades", "quotes", "latest_trade",
    "latest_quote", "snapshot") for that timeframe and range, else the reason it cannot.
    ``resilience`` holds the provider's retry policy, rate limiter and circuit breaker.
    """

    name: str
    resilience: Resilience

    def supports(
        self, kind: str, timeframe: Timeframe | None, start: datetime | None, end: datetime | None, now: datetime
    ) -> str | None: ...

    def iter_bars(
        self,
        symbols: list[str],
        timeframe: Timeframe,
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        adjustment: str = "raw",
        limit: int = 10_000,
        asof: str | None = None,
    ) -> AsyncIterator[BarPage]: ...

    async def latest_trades(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Trade]: ...

    async def latest_quotes(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Quote]: ...

    async def snapshots(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Snapshot]: ...

    async def aclose(self) -> None: ...
