"""What every provider adapter offers. Adapters turn requests into vendor calls and vendor
responses into canonical frames and records; they never touch storage, caches or each other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Final, Literal, Protocol

import orjson
import polars as pl

from marketpipe.core.errors import MalformedResponse, PaginationLoop
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import PROVIDER_ERRORS
from marketpipe.core.resilience import Resilience
from marketpipe.core.schema import Bar, Quote, Snapshot, Trade
from marketpipe.core.timeframe import Timeframe

SIM_HEADER = "x-marketpipe-sim"


def sim_source(headers: Mapping[str, str], provider: str) -> str:
    """The ``source`` label for a response: the provider's name, or ``sim:<provider>`` when the
    response came from marketpipe's simulator (it announces itself with a header). Simulator data
    is thereby never mistaken for real data, yet says which vendor face served it."""
    return f"sim:{provider}" if headers.get(SIM_HEADER) else provider


def is_sim(source: str) -> bool:
    return source == "sim" or source.startswith("sim:")


log = get_logger("marketpipe.providers")
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def envelope_error(
    body: bytes, *, provider: str, endpoint: str, required: tuple[str, ...], cause: BaseException
) -> MalformedResponse:
    """The error for a 200 whose JSON lacks the vendor's envelope (``{}`` from a proxy, a bare
    ``{"bars": null}``, an array): names the endpoint and the keys that are missing (``"a|b"`` in
    ``required``: either key will do). Only called
    once the typed decoder has failed, so parsing the body again costs nothing on the bulk path.
    Raised inside the retried call it is retried like a truncated body, then propagates."""
    snippet = body[:80].decode("utf-8", "replace")
    details: dict[str, object] = {"endpoint": endpoint, "bytes": len(body)}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return MalformedResponse(
            f"{provider} {endpoint}: undecodable response body ({cause}); starts with {snippet!r}",
            provider=provider,
            details=details,
        )
    if not isinstance(doc, dict):
        details["missing"] = [k.replace("|", " or ") for k in required]
        return MalformedResponse(
            f"{provider} {endpoint}: the answer is a JSON {_JSON_KINDS.get(type(doc), 'value')}, not an object "
            f"with {', '.join(k.replace('|', ' or ') for k in required)}; starts with {snippet!r}",
            provider=provider,
            details=details,
        )
    missing = [k.replace("|", " or ") for k in required if not any(a in doc for a in k.split("|"))]
    if missing:
        details["missing"] = missing
        has = ", ".join(sorted(doc)[:8]) or "none"
        return MalformedResponse(
            f"{provider} {endpoint}: the answer lacks the required key(s) {', '.join(missing)} "
            f"(keys present: {has}); starts with {snippet!r}",
            provider=provider,
            details=details,
        )
    return MalformedResponse(
        f"{provider} {endpoint}: unexpected answer shape ({cause}); starts with {snippet!r}",
        provider=provider,
        details=details,
    )


def pagination_loop(provider: str, endpoint: str, page: int, continuation: str) -> PaginationLoop:
    """The error for a continuation (token or URL, already scrubbed of secrets) that was followed
    before in the same pagination; counted and logged like the errors of the HTTP layer."""
    exc = PaginationLoop(
        f"{provider} {endpoint}: page {page} repeats a continuation already followed ({continuation[:120]}); "
        "stopping instead of looping",
        provider=provider,
        details={"endpoint": endpoint, "page": page},
    )
    PROVIDER_ERRORS.labels(provider, exc.code).inc()
    log.warning("provider_error", provider=provider, endpoint=endpoint, code=exc.code, page=page, error=exc.message)
    return exc


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


def complete_through(page: BarPage, sort: str) -> dict[str, datetime]:
    """See BarPage.complete_through. Relies on the documented order: symbol first, then time."""
    if page.last_page:
        return dict.fromkeys(page.symbols, page.end)
    if sort != "asc" or page.frame.height == 0:
        return {}
    order = page.frame.get_column("symbol")
    present = order.unique(maintain_order=True).to_list()
    out = dict.fromkeys(present[:-1], page.end)
    last = present[-1]
    ts = page.frame.filter(pl.col("symbol") == last).get_column("ts").drop_nulls()
    top = ts.max() if len(ts) else None
    if isinstance(top, datetime):
        out[last] = top + timedelta(microseconds=1)
    return out


@dataclass(slots=True)
class ActionsPage:
    """Corporate actions of ``symbols`` whose adjustment date (ex-date, else effective, else process
    date) lies in ``[start, end]`` (inclusive days), already canonical (``core.schema.ACTION_SCHEMA``;
    every vendor page of the answer concatenated). Actions outside that window that came along are
    kept too (they are real), but only the window counts as covered."""

    frame: pl.DataFrame
    symbols: list[str]
    start: date
    end: date
    source: str
    request_ids: list[str]
    fetched_at: datetime


Kind = Literal["bars", "trades", "quotes", "latest_trade", "latest_quote", "latest_bar", "snapshot", "actions"]
KINDS: Final[tuple[Kind, ...]] = (
    "bars",
    "trades",
    "quotes",
    "latest_trade",
    "latest_quote",
    "latest_bar",
    "snapshot",
    "actions",
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The static part of a provider's capability table: which request kinds (``KINDS``) it serves at
    all, and for which kinds it takes a ``feed`` argument (the feeds it accepts there). A kind not in
    ``feeds`` takes no feed: callers pass ``None`` (:func:`feed_for`), never the caller's feed.
    ``supports`` adds what depends on the request (timeframe, range, plan)."""

    kinds: frozenset[str]
    feeds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def serves(self, kind: str) -> bool:
        return kind in self.kinds

    def takes_feed(self, kind: str) -> bool:
        return bool(self.feeds.get(kind))


def feed_for(provider: BarsProvider, kind: str, feed: str | None) -> str | None:
    """The ``feed`` argument to give ``provider`` for a ``kind`` request: the caller's feed where the
    provider's capabilities say it takes one for that kind, else ``None`` (its own single feed)."""
    return feed if provider.capabilities.takes_feed(kind) else None


class BarsProvider(Protocol):
    """A market-data vendor behind marketpipe's canonical interface.

    ``supports`` is the capability table the router consults before trying a provider: ``None``
    when the provider can serve ``kind`` (one of ``KINDS``) for that timeframe and range, else the
    reason it cannot. It answers for every kind, so that nobody asks ``hasattr`` whether a method
    exists: a kind it serves has its method (``iter_bars``, ``iter_trades``, ``iter_quotes``,
    ``latest_trades``, ``latest_quotes``, ``latest_bars``, ``snapshots``, ``corporate_actions``); the method of a
    kind it
    does not serve need not exist, and is only called once ``supports`` has said yes. ``capabilities`` is the
    static part of that table (kinds served, kinds that take a feed). ``resilience`` holds the
    provider's retry policy, rate limiter and circuit breaker.
    """

    name: str
    resilience: Resilience
    capabilities: Capabilities

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

    def iter_trades(
        self,
        symbols: list[str],
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        limit: int = 10_000,
        asof: str | None = None,
        sort: str = "asc",
        page_token: str | None = None,
    ) -> AsyncIterator[BarPage]: ...

    def iter_quotes(
        self,
        symbols: list[str],
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        limit: int = 10_000,
        asof: str | None = None,
        sort: str = "asc",
        page_token: str | None = None,
    ) -> AsyncIterator[BarPage]: ...

    async def latest_trades(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Trade]: ...

    async def latest_quotes(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Quote]: ...

    async def latest_bars(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Bar]: ...

    async def snapshots(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Snapshot]: ...

    async def corporate_actions(
        self, symbols: list[str], start: date, end: date, *, types: list[str] | None = None
    ) -> ActionsPage:
        """Every corporate action of ``symbols`` with its adjustment date in ``[start, end]``
        (following the vendor's paging); ``types`` (canonical names) narrows where the vendor can."""
        ...

    async def aclose(self) -> None: ...
