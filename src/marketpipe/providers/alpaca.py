"""Alpaca Market Data API v2 (stocks), REST. Wire format: shared/reference/market-data-apis.md §1.

Pages are decoded with msgspec into column lists and handed on as polars frames — no per-row dicts
or model objects on the bulk path. Responses from marketpipe's own simulator carry the header
``X-Marketpipe-Sim`` and are labelled ``source="sim:alpaca"``, so simulator data never mixes with real data.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import httpx
import msgspec
import polars as pl

from marketpipe.core.config import alpaca_credentials
from marketpipe.core.errors import (
    AuthFailed,
    InvalidArgument,
    MarketpipeError,
    NotEntitled,
    ProviderError,
)
from marketpipe.core.log import get_logger
from marketpipe.core.schema import (
    Bar,
    Quote,
    Snapshot,
    Trade,
    actions_frame,
)
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import rfc3339, utcnow
from marketpipe.core.validation import validate_limit, validate_sort
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.base import (
    KINDS,
    ActionsPage,
    BarPage,
    Capabilities,
    complete_through,
    envelope_error,
    pagination_loop,
)
from marketpipe.providers.http import HttpProvider, error_text, status_error
from marketpipe.wire.alpaca_actions import MAX_LIMIT as ACTIONS_MAX_LIMIT
from marketpipe.wire.alpaca_actions import PATH as ACTIONS_PATH
from marketpipe.wire.alpaca_actions import PROCESS_LAG as ACTIONS_LAG
from marketpipe.wire.alpaca_actions import parse_page, to_action
from marketpipe.wire.alpaca_rest import (
    ADJUSTMENTS,
    DEFAULT_BASE_URL,
    HISTORICAL_FEEDS,
    LATEST,
    LATEST_FEEDS,
    LATEST_ONE,
    MAX_LIMIT,
    PAGES,
    RECENT_SIP_MARK,
    SIP_DELAY,
    SNAPSHOTS_PATH,
    WSnapshot,
    bar_record,
    bar_record_tf,
    bars_to_frame,
    historical_path,
    latest_path,
    page_keys,
    quote_record,
    quotes_to_frame,
    trade_record,
    trades_to_frame,
)

ALPACA_HISTORY_START = datetime(2016, 1, 1, tzinfo=UTC)
T = TypeVar("T")
log = get_logger("marketpipe.providers.alpaca")


_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    dec = _DECODERS.get(tp)
    if dec is None:
        dec = _DECODERS[tp] = msgspec.json.Decoder(tp)
    return dec


def _decode_envelope(tp: Any, body: bytes, endpoint: str, required: tuple[str, ...]) -> Any:
    """``body`` as the envelope ``tp``; a body without the vendor's keys is MALFORMED_RESPONSE
    naming ``endpoint`` and the missing keys (retried by the HTTP layer like a truncated body)."""
    try:
        return _decoder(tp).decode(body)
    except msgspec.ValidationError as exc:
        raise envelope_error(body, provider="alpaca", endpoint=endpoint, required=required, cause=exc) from exc


# --- errors ------------------------------------------------------------------------------------


def map_http_error(status: int, body: bytes, headers: httpx.Headers, *, provider: str, url: str) -> MarketpipeError:
    msg, doc = error_text(body)
    details: dict[str, Any] = {"status": status, "vendor_message": msg, "endpoint": url}
    if doc is not None and doc.get("code") is not None:
        details["vendor_code"] = doc["code"]
    forbidden: type[ProviderError] = AuthFailed
    hint = "; check ALPACA_API_KEY/ALPACA_SECRET_KEY"
    if status == 403 and RECENT_SIP_MARK in msg:
        details["reason"] = "recent_sip"
        forbidden = NotEntitled
    return status_error(
        status, msg, provider=provider, details=details, headers=headers, forbidden=forbidden, auth_hint=hint
    )


# --- the client --------------------------------------------------------------------------------


class AlpacaProvider(HttpProvider):
    """Async Alpaca REST client. Use as ``async with AlpacaProvider.from_config(cfg) as p: ...``."""

    name = "alpaca"
    # Every stock data kind; the historical and the latest endpoints take a feed (different sets).
    capabilities = Capabilities(
        frozenset(KINDS),
        {
            **dict.fromkeys(("bars", "trades", "quotes"), HISTORICAL_FEEDS),
            **dict.fromkeys(("latest_trade", "latest_quote", "latest_bar", "snapshot"), LATEST_FEEDS),
        },
    )

    def __init__(
        self,
        key: str,
        secret: str,
        *,
        config: AlpacaConfig | None = None,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config or AlpacaConfig()
        self._connect(
            self.config,
            base_url,
            DEFAULT_BASE_URL,
            now,
            headers={"APCA-API-KEY-ID": key, "APCA-API-SECRET-KEY": secret},
            transport=transport,
            secrets=(key, secret),
            map_error=lambda status, body, headers, endpoint: map_http_error(
                status, body, headers, provider=self.name, url=endpoint
            ),
        )

    @classmethod
    def from_config(
        cls, config: AlpacaConfig | None = None, *, env: dict[str, str] | None = None, **kw: Any
    ) -> AlpacaProvider:
        import os

        key, secret = alpaca_credentials(env)
        src = os.environ if env is None else env
        base = kw.pop("base_url", None) or (config.base_url if config else None) or src.get("APCA_API_DATA_URL")
        return cls(key, secret, config=config, base_url=base, **kw)

    # --- transport ---------------------------------------------------------------------------

    async def _get(
        self,
        path: str,
        params: dict[str, Any],
        endpoint: str,
        decode: Callable[[httpx.Response], Any],
        *,
        offload: bool = False,
    ) -> tuple[Any, httpx.Response]:
        return await self._http.get(path, params, endpoint, decode, offload=offload)

    def supports(
        self, kind: str, timeframe: Timeframe | None, start: datetime | None, end: datetime | None, now: datetime
    ) -> str | None:
        """Alpaca serves every stock data kind and timeframe, with history back to 2016."""
        if not self.capabilities.serves(kind):
            return f"alpaca does not serve {kind}"
        if kind != "actions" and start is not None and start < ALPACA_HISTORY_START:
            return f"alpaca history starts {ALPACA_HISTORY_START.date()}"
        return None

    # --- feed and the 15-minute SIP rule --------------------------------------------------------

    def _plan_feed(self, feed: str | None, end: datetime, start: datetime) -> tuple[str, datetime]:
        """Apply the free plan's rule: SIP only up to 15 minutes ago (clamp ``end``, or use IEX)."""
        feed = (feed or self.config.feed).lower()
        if feed not in HISTORICAL_FEEDS:
            raise InvalidArgument(
                f"invalid feed {feed!r}; allowed: {', '.join(HISTORICAL_FEEDS)}",
                details={"parameter": "feed"},
            )
        if self.config.plan == "free" and feed == "sip":
            limit = self._now() - SIP_DELAY
            if end > limit:
                if self.config.recent_sip == "iex" or limit <= start:
                    return "iex", end
                return "sip", limit
        return feed, end

    # --- historical --------------------------------------------------------------------------

    async def iter_bars(
        self,
        symbols: list[str],
        timeframe: Timeframe,
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        adjustment: str = "raw",
        limit: int = MAX_LIMIT,
        asof: str | None = None,
        sort: str = "asc",
        page_token: str | None = None,
    ) -> AsyncIterator[BarPage]:
        """Pages of bars for ``[start, end)``, lazily: one page in memory at a time."""
        for part in adjustment.split(","):
            if part.strip() not in ADJUSTMENTS:
                raise InvalidArgument(
                    f"invalid adjustment {adjustment!r}; allowed: {', '.join(ADJUSTMENTS)} (comma-combinable)",
                    details={"parameter": "adjustment"},
                )
        params: dict[str, Any] = {"timeframe": str(timeframe), "adjustment": adjustment}
        async for page in self._paginate(
            "bars", symbols, start, end, params, feed, limit, asof, sort, page_token, timeframe
        ):
            yield page

    async def iter_trades(
        self,
        symbols: list[str],
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        limit: int = MAX_LIMIT,
        asof: str | None = None,
        sort: str = "asc",
        page_token: str | None = None,
    ) -> AsyncIterator[BarPage]:
        async for page in self._paginate("trades", symbols, start, end, {}, feed, limit, asof, sort, page_token, None):
            yield page

    async def iter_quotes(
        self,
        symbols: list[str],
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        limit: int = MAX_LIMIT,
        asof: str | None = None,
        sort: str = "asc",
        page_token: str | None = None,
    ) -> AsyncIterator[BarPage]:
        async for page in self._paginate("quotes", symbols, start, end, {}, feed, limit, asof, sort, page_token, None):
            yield page

    async def _paginate(
        self,
        kind: str,
        symbols: list[str],
        start: datetime,
        end: datetime,
        extra: dict[str, Any],
        feed: str | None,
        limit: int,
        asof: str | None,
        sort: str,
        page_token: str | None,
        timeframe: Timeframe | None,
    ) -> AsyncIterator[BarPage]:
        if not symbols:
            raise InvalidArgument("no symbols given", details={"parameter": "symbols"})
        if end <= start:
            raise InvalidArgument("end must be after start", details={"parameter": "end"})
        validate_limit(limit, 1, MAX_LIMIT)
        validate_sort(sort)
        used_feed, used_end = self._plan_feed(feed, end, start)
        single = len(symbols) == 1
        path = historical_path(kind, symbols[0] if single else None)
        endpoint = f"{kind}_single" if single else kind
        wire: dict[str, Any] = {
            "start": rfc3339(start),
            "limit": limit,
            "feed": used_feed,
            "sort": sort,
            **extra,
        }
        if not single:
            wire["symbols"] = ",".join(symbols)
        if asof:
            wire["asof"] = asof
        tf = str(timeframe) if timeframe else ""
        number = 0
        retried_entitlement = False
        token = page_token
        followed = {page_token} if page_token else set()  # tokens asked for: a repeat would loop forever
        while True:
            # Alpaca's end is inclusive; ours is exclusive.
            wire["end"] = rfc3339(used_end - timedelta(microseconds=1))
            if token:
                wire["page_token"] = token
            else:
                wire.pop("page_token", None)
            try:
                (frame, nxt, nbytes), resp = await self._get(
                    path, wire, endpoint, _page_decoder(kind, single, symbols[0], tf, used_feed, self), offload=True
                )
            except NotEntitled:
                # The plan was misconfigured as unlimited: apply the free-plan rule once and go on.
                if retried_entitlement or used_feed != "sip":
                    raise
                retried_entitlement = True
                limit_end = self._now() - SIP_DELAY
                if self.config.recent_sip == "iex" or limit_end <= start:
                    used_feed = "iex"
                else:
                    used_end = min(used_end, limit_end)
                wire["feed"] = used_feed
                log.warning("sip_recent_restricted", feed=used_feed, end=rfc3339(used_end))
                continue
            number += 1
            if nxt is not None and nxt in followed:
                # The page is not used either: a vendor that repeats itself cannot be trusted with it.
                raise pagination_loop(self.name, endpoint, number, self._http.scrub(f"next_page_token {nxt[:40]!r}"))
            fetched_at = frame["fetched_at"][0] if frame.height else self._now()
            page = BarPage(
                frame=frame,
                symbols=list(symbols),
                timeframe=timeframe,
                start=start,
                end=used_end,
                feed=used_feed,
                source=self._source(resp),
                request_id=resp.headers.get("x-request-id") or uuid.uuid4().hex[:16],
                fetched_at=fetched_at,
                next_page_token=nxt,
                page_number=number,
                last_page=not nxt,
                nbytes=nbytes,
                kind=kind,
            )
            page.complete_through = complete_through(page, sort)
            yield page
            if not nxt:
                return
            followed.add(nxt)
            token = nxt

    # --- latest and snapshots ----------------------------------------------------------------

    def _latest_feed(self, feed: str | None) -> str:
        f = (feed or ("iex" if self.config.plan == "free" else self.config.feed)).lower()
        if f not in LATEST_FEEDS:
            raise InvalidArgument(
                f"invalid feed {f!r}; allowed: {', '.join(LATEST_FEEDS)}", details={"parameter": "feed"}
            )
        return f

    async def _latest(self, kind: str, symbols: list[str], feed: str | None, record: Callable[..., T]) -> dict[str, T]:
        f = self._latest_feed(feed)
        wire = LATEST[kind]
        endpoint = f"latest_{kind}"
        doc, resp = await self._get(
            latest_path(kind),
            {"symbols": ",".join(symbols), "feed": f},
            endpoint,
            lambda r: _decode_envelope(wire, r.content, endpoint, (kind,)),
        )
        src, now = self._source(resp), self._now()
        return {s: record(s, w, src, f, now) for s, w in (getattr(doc, kind) or {}).items()}

    async def _latest_one(self, key: str, symbol: str, feed: str | None, record: Callable[..., T]) -> T | None:
        f = self._latest_feed(feed)
        endpoint = f"latest_{key}_single"
        doc, resp = await self._get(
            latest_path(f"{key}s", symbol),
            {"feed": f},
            endpoint,
            lambda r: _decode_envelope(LATEST_ONE[key], r.content, endpoint, (key,)),
        )
        w = getattr(doc, key)
        return record(symbol, w, self._source(resp), f, self._now()) if w is not None else None

    async def latest_trades(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Trade]:
        return await self._latest("trades", symbols, feed, trade_record)

    async def latest_quotes(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Quote]:
        return await self._latest("quotes", symbols, feed, quote_record)

    async def latest_bars(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Bar]:
        return await self._latest("bars", symbols, feed, functools.partial(bar_record_tf, "1Min"))

    async def latest_trade(self, symbol: str, *, feed: str | None = None) -> Trade | None:
        return await self._latest_one("trade", symbol, feed, trade_record)

    async def latest_quote(self, symbol: str, *, feed: str | None = None) -> Quote | None:
        return await self._latest_one("quote", symbol, feed, quote_record)

    async def snapshots(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Snapshot]:
        f = self._latest_feed(feed)
        # The stock multi-snapshot has no wrapper key: symbol -> snapshot at the top level.
        doc, resp = await self._get(
            SNAPSHOTS_PATH,
            {"symbols": ",".join(symbols), "feed": f},
            "snapshots",
            lambda r: _decoder(dict[str, WSnapshot | None]).decode(r.content),
        )
        src, now = self._source(resp), self._now()
        out: dict[str, Snapshot] = {}
        for sym, snap in doc.items():
            if snap is None:
                continue
            out[sym] = Snapshot(
                symbol=sym,
                latest_trade=trade_record(sym, snap.latestTrade, src, f, now) if snap.latestTrade else None,
                latest_quote=quote_record(sym, snap.latestQuote, src, f, now) if snap.latestQuote else None,
                minute_bar=bar_record(sym, "1Min", snap.minuteBar, src, f, now) if snap.minuteBar else None,
                daily_bar=bar_record(sym, "1Day", snap.dailyBar, src, f, now) if snap.dailyBar else None,
                prev_daily_bar=bar_record(sym, "1Day", snap.prevDailyBar, src, f, now) if snap.prevDailyBar else None,
                source=src,
                fetched_at=now,
            )
        return out

    async def snapshot(self, symbol: str, *, feed: str | None = None) -> Snapshot | None:
        return (await self.snapshots([symbol], feed=feed)).get(symbol)

    # --- corporate actions -------------------------------------------------------------------

    async def corporate_actions(
        self, symbols: list[str], start: date, end: date, *, types: list[str] | None = None
    ) -> ActionsPage:
        """``/v1/corporate-actions``, every page. Its ``start``/``end`` filter on ``process_date``,
        which trails a dividend's ex-date by weeks (trap 2), so the query reaches
        ``PROCESS_LAG`` past ``end`` (never past today). Unknown plural keys are kept."""
        if not symbols:
            raise InvalidArgument("no symbols given", details={"parameter": "symbols"})
        today = self._now().date()
        wire: dict[str, Any] = {
            "symbols": ",".join(symbols),
            "start": start.isoformat(),
            "end": min(end + ACTIONS_LAG, max(today, end)).isoformat(),
            "limit": ACTIONS_MAX_LIMIT,
            "sort": "asc",
        }
        if types:
            wire["types"] = ",".join(types)
        rows: list[dict[str, Any]] = []
        ids: list[str] = []
        followed: set[str] = set()
        source, number = self.name, 0
        while True:
            (groups, nxt), resp = await self._get(ACTIONS_PATH, wire, "corporate_actions", _actions_decode)
            number += 1
            source, fetched = self._source(resp), self._now()
            ids.append(resp.headers.get("x-request-id") or uuid.uuid4().hex[:16])
            rows += [to_action(k, r, source=source, fetched_at=fetched) for k, recs in groups.items() for r in recs]
            if not nxt:
                break
            if nxt in followed:
                raise pagination_loop(self.name, "corporate_actions", number, f"next_page_token {nxt[:40]!r}")
            followed.add(nxt)
            wire["page_token"] = nxt
        return ActionsPage(actions_frame(rows), list(symbols), start, end, source, ids, self._now())


def _actions_decode(resp: httpx.Response) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
    try:
        return parse_page(resp.content)
    except ValueError as exc:
        raise envelope_error(
            resp.content, provider="alpaca", endpoint="corporate_actions", required=("corporate_actions",), cause=exc
        ) from exc


def _page_decoder(
    kind: str, single: bool, symbol: str, tf: str, feed: str, provider: AlpacaProvider
) -> Callable[[httpx.Response], tuple[pl.DataFrame, str | None, int]]:
    multi_t, single_t = PAGES[kind]
    endpoint, required = (f"{kind}_single" if single else kind), page_keys(kind, single)

    def decode(resp: httpx.Response) -> tuple[pl.DataFrame, str | None, int]:
        body = resp.content
        doc = _decode_envelope(single_t if single else multi_t, body, endpoint, required)
        rows = getattr(doc, kind)
        groups = [(symbol, rows)] if single else list((rows or {}).items())
        source, fetched = provider._source(resp), provider._now()
        if kind == "bars":
            frame = bars_to_frame(groups, tf, source, feed, fetched)
        elif kind == "trades":
            frame = trades_to_frame(groups, source, feed, fetched)
        else:
            frame = quotes_to_frame(groups, source, feed, fetched)
        return frame, doc.next_page_token or None, len(body)

    return decode


__all__ = ["AlpacaProvider", "map_http_error"]
