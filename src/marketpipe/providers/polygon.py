"""Polygon.io (now branded Massive) stocks REST. Wire format: shared/reference/market-data-apis.md §4.

Bars come from the aggregates endpoint, one ticker per request (the endpoint is single-ticker),
following ``next_url`` with the auth added again. Latest trade / quote come from ``/v2/last/...``,
snapshots from the multi-ticker snapshot. Historical trades and quotes (the v3 tick endpoints) are
not implemented in this adapter; ``supports`` says so, and the router asks another provider.

Authentication goes in the ``Authorization: Bearer`` header by default, so the key never sits in a
URL; ``auth="query"`` sends ``apiKey=`` instead. Either way the key is a secret of the shared HTTP
client, which scrubs it from every error message, error detail and log line.

Symbols: Polygon writes share classes with a dot (``BRK.B``; ``BRK-B`` silently has no data), which
is marketpipe's canonical form, so symbols pass through ``normalize_symbol`` unchanged.

Time: aggregate ``t`` is the bucket start in Unix ms. Daily and longer bars are given marketpipe's
canonical stamp — New York midnight of the bucket's first day, weeks on Monday (Polygon's week
starts on Sunday) — as Alpaca stamps them; the vendor's own ``t`` is kept in ``raw_ts``. A stamp
that is neither New York nor UTC midnight is left as sent, for the checks to quarantine.
"""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import orjson
import polars as pl

from marketpipe.core.calendar import get_calendar
from marketpipe.core.errors import (
    InvalidArgument,
    MalformedResponse,
    MarketpipeError,
    MissingCredentials,
    NotEntitled,
    NotFound,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import UNKNOWN_CODES
from marketpipe.core.schema import BAR_SCHEMA, UTC_US, Bar, Quote, Snapshot, Trade, actions_frame, normalize_symbol
from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.timeutil import NY, ns_to_dt, utcnow
from marketpipe.core.validation import validate_enum, validate_limit, validate_range, validate_required, validate_sort
from marketpipe.providers.base import ActionsPage, BarPage, Capabilities, envelope_error, pagination_loop
from marketpipe.providers.http import REDACTED, HttpProvider, error_text, status_error
from marketpipe.providers.polygon_config import PolygonConfig
from marketpipe.wire.polygon import (
    ACTIONS_MAX_LIMIT,
    AGGS_PREFIX,
    DELAY,
    DELAYED,
    DIVIDENDS_PATH,
    ERROR_STATUSES,
    MAX_LIMIT,
    SNAPSHOTS_PATH,
    SPLITS_PATH,
    V3_ACTIONS_MAX_LIMIT,
    V3_DIVIDENDS_PATH,
    V3_SPLITS_PATH,
    aggs_path,
    dividend_action,
    last_path,
    quote_lot,
    split_action,
    trade_condition,
    unknown_code,
)
from marketpipe.wire.polygon import EXCHANGES as POLYGON_EXCHANGES
from marketpipe.wire.polygon import QUOTE_CONDITIONS as POLYGON_QUOTE_CONDITIONS
from marketpipe.wire.polygon import TAPES as POLYGON_TAPES

DEFAULT_BASE_URL = "https://api.polygon.io"
MASSIVE_BASE_URL = "https://api.massive.com"  # the same API under the vendor's new name
KEY_VAR = "POLYGON_API_KEY"
FEED = "sip"  # Polygon's stock aggregates are built from the consolidated tape
ADJUSTED = {"raw": "false", "split": "true", "all": "true"}  # the vendor adjusts for splits only
KINDS = ("bars", "latest_trade", "latest_quote", "snapshot", "actions")
T = TypeVar("T")
log = get_logger("marketpipe.providers.polygon")


# --- wire structs --------------------------------------------------------------------------------


class _AggPage(msgspec.Struct, gc=False):
    """The aggregates envelope. ``status`` is required; so is one of ``results`` and
    ``resultsCount`` (the documented empty window omits ``results`` and says ``resultsCount: 0``),
    checked after decoding: a ``{}`` from a proxy is malformed, never an empty last page."""

    status: str
    request_id: str | None = None
    ticker: str | None = None
    results: msgspec.Raw = msgspec.Raw()  # left undecoded: polars parses the array columnar
    resultsCount: int | None = None
    next_url: str | None = None


AGG_KEYS = ("status", "results|resultsCount")


class _WTrade(msgspec.Struct, gc=False):
    t: int
    p: float
    s: float
    x: int | None = None
    i: str | None = None
    c: list[int] | None = None
    z: int | None = None


class _WQuote(msgspec.Struct, gc=False):
    t: int
    p: float | None = None  # bid
    s: float | None = None
    P: float | None = None  # ask
    S: float | None = None
    x: int | None = None
    X: int | None = None
    c: list[int] | None = None
    z: int | None = None


class _Last(msgspec.Struct, gc=False):
    status: str | None = None
    results: msgspec.Raw = msgspec.Raw()


class _WBar(msgspec.Struct, gc=False):
    o: float | None = None
    h: float | None = None
    l: float | None = None  # noqa: E741 - the vendor's key
    c: float | None = None
    v: float | None = None
    vw: float | None = None
    n: int | None = None
    t: int | None = None


class _WSnap(msgspec.Struct, gc=False):
    ticker: str
    day: _WBar | None = None
    prevDay: _WBar | None = None
    min: _WBar | None = None
    lastTrade: _WTrade | None = None
    lastQuote: _WQuote | None = None
    updated: int | None = None


class _Snaps(msgspec.Struct, gc=False):
    status: str | None = None
    tickers: list[_WSnap] | None = None


_RAW_AGG_SCHEMA = {
    "t": pl.Int64(),
    "o": pl.Float64(),
    "h": pl.Float64(),
    "l": pl.Float64(),
    "c": pl.Float64(),
    "v": pl.Float64(),
    "n": pl.Float64(),
    "vw": pl.Float64(),
}
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(tp: Any) -> msgspec.json.Decoder[Any]:
    dec = _DECODERS.get(tp)
    if dec is None:
        dec = _DECODERS[tp] = msgspec.json.Decoder(tp)
    return dec


def _raw_is_empty(raw: msgspec.Raw) -> bool:
    view = memoryview(raw)
    return view.nbytes == 0 or (view.nbytes == 4 and view.tobytes() == b"null")


# --- errors --------------------------------------------------------------------------------------


def map_http_error(status: int, body: bytes, headers: Mapping[str, str], endpoint: str) -> MarketpipeError:
    """Typed error for a Polygon error answer. Its text is in ``error`` for status ``ERROR`` but in
    ``message`` for ``NOT_AUTHORIZED``/``NOT_FOUND``; both are read. A 401/403 that says the plan
    does not cover the data is NOT_ENTITLED, any other is AUTH_FAILED."""
    msg, doc = error_text(body)
    vendor_status = doc.get("status") if doc else None
    if status == 429 and not body.strip():
        msg = "too many requests (empty body)"
    details: dict[str, Any] = {"status": status, "vendor_message": msg, "endpoint": endpoint}
    if vendor_status:
        details["vendor_status"] = vendor_status
    if doc and doc.get("request_id"):
        details["request_id"] = doc["request_id"]
    if status in (401, 403) and (vendor_status == "NOT_AUTHORIZED" or "not entitled" in msg.lower()):
        details["reason"] = "plan"
        return NotEntitled(f"polygon: {msg}", provider="polygon", details=details)
    return status_error(
        status, msg, provider="polygon", details=details, headers=headers, auth_hint=f"; check {KEY_VAR}"
    )


def _raise_body_error(vendor_status: str | None, body: bytes, headers: Mapping[str, str], endpoint: str) -> None:
    """A 200 whose body says it failed is mapped as the status the body implies."""
    if vendor_status not in ERROR_STATUSES:
        return
    msg, _ = error_text(body)
    if vendor_status == "NOT_AUTHORIZED":
        implied = 403
    elif vendor_status == "NOT_FOUND":
        implied = 404
    elif "api key" in msg.lower():
        implied = 401
    elif "exceeded the maximum requests" in msg.lower():
        implied = 429
    else:
        implied = 400
    exc = map_http_error(implied, body, headers, endpoint)
    exc.details["http_status"] = 200
    raise exc


# --- conversion ----------------------------------------------------------------------------------


def _canonical_stamps(ts: pl.Expr, unit: Unit) -> pl.Expr:
    """Daily and longer bars to New York midnight of the bucket's first day (weeks: Monday)."""
    local = ts.dt.convert_time_zone("America/New_York")
    ny_midnight = (local.dt.hour() == 0) & (local.dt.minute() == 0) & (local.dt.second() == 0)
    utc_midnight = ts.dt.epoch("ms") % 86_400_000 == 0
    # A UTC-midnight stamp names its UTC date; that date's New York midnight is the canonical stamp.
    as_ny = ts.dt.replace_time_zone(None).dt.replace_time_zone("America/New_York").dt.convert_time_zone("UTC")
    stamped = pl.when(ny_midnight).then(ts).when(utc_midnight).then(as_ny).otherwise(ts)
    if unit is not Unit.WEEK:
        return stamped
    sunday = stamped.dt.convert_time_zone("America/New_York")
    monday = sunday.dt.offset_by("1d").dt.convert_time_zone("UTC")
    aligned = ny_midnight | utc_midnight
    return pl.when(aligned & (sunday.dt.weekday() == 7)).then(monday).otherwise(stamped)


def aggs_to_frame(
    raw: msgspec.Raw, symbol: str, timeframe: Timeframe, source: str, fetched_at: datetime
) -> pl.DataFrame:
    """One aggregates ``results`` array (raw JSON) to canonical bars."""
    if _raw_is_empty(raw):
        return pl.DataFrame(schema={**BAR_SCHEMA, "raw_ts": pl.String()})
    part = pl.read_json(io.BytesIO(memoryview(raw)), schema=_RAW_AGG_SCHEMA)
    ts = pl.from_epoch(pl.col("t"), time_unit="ms").dt.cast_time_unit("us").dt.replace_time_zone("UTC")
    if not timeframe.is_intraday:
        ts = _canonical_stamps(ts, timeframe.unit)
    return part.select(
        pl.lit(symbol, pl.String).alias("symbol"),
        pl.lit(str(timeframe), pl.String).alias("timeframe"),
        ts.alias("ts"),
        pl.col("o").alias("open"),
        pl.col("h").alias("high"),
        pl.col("l").alias("low"),
        pl.col("c").alias("close"),
        pl.col("v").cast(pl.Int64, strict=False).alias("volume"),
        pl.col("n").cast(pl.Int64, strict=False).alias("trade_count"),
        pl.col("vw").alias("vwap"),
        pl.lit(source, pl.String).alias("source"),
        pl.lit(FEED, pl.String).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
        pl.col("t").cast(pl.String).alias("raw_ts"),
    )


_UNKNOWN_SEEN: set[tuple[str, int]] = set()  # (table, id) already logged


def _unknown(table: str, code: int) -> str:
    """A condition id no table names: counted every time, logged once per id, kept as ``polygon:<id>``."""
    UNKNOWN_CODES.labels(provider="polygon", table=table).inc()
    if (table, code) not in _UNKNOWN_SEEN:
        _UNKNOWN_SEEN.add((table, code))
        log.warning("unknown vendor code", provider="polygon", table=table, code=code, kept_as=unknown_code(code))
    return unknown_code(code)


def _trade_conditions(codes: list[int] | None, tape: int | None) -> tuple[str, ...]:
    return tuple(trade_condition(c, tape) or _unknown("trade_conditions", c) for c in codes or ())


def _quote_conditions(codes: list[int] | None) -> tuple[str, ...]:
    return tuple(POLYGON_QUOTE_CONDITIONS.get(c) or _unknown("quote_conditions", c) for c in codes or ())


def _trade_record(sym: str, w: _WTrade, source: str, fetched: datetime) -> Trade:
    return Trade(
        symbol=sym,
        ts=ns_to_dt(w.t),
        ts_ns=w.t,
        price=w.p,
        size=int(w.s),
        exchange=POLYGON_EXCHANGES.get(w.x, str(w.x)) if w.x is not None else None,
        trade_id=int(w.i) if w.i is not None and w.i.isdigit() else None,
        conditions=_trade_conditions(w.c, w.z),
        tape=POLYGON_TAPES.get(w.z) if w.z is not None else None,
        source=source,
        feed=FEED,
        fetched_at=fetched,
    )


def _quote_record(sym: str, w: _WQuote, source: str, fetched: datetime) -> Quote:
    lot = quote_lot(w.t)  # round lots before the vendor's 2025-11-03 switch to shares
    return Quote(
        symbol=sym,
        ts=ns_to_dt(w.t),
        ts_ns=w.t,
        bid_price=w.p or 0.0,
        bid_size=int(w.s or 0) * lot,
        ask_price=w.P or 0.0,
        ask_size=int(w.S or 0) * lot,
        bid_exchange=POLYGON_EXCHANGES.get(w.x, str(w.x)) if w.x is not None else None,
        ask_exchange=POLYGON_EXCHANGES.get(w.X, str(w.X)) if w.X is not None else None,
        conditions=_quote_conditions(w.c),
        tape=POLYGON_TAPES.get(w.z) if w.z is not None else None,
        source=source,
        feed=FEED,
        fetched_at=fetched,
    )


def _bar_record(sym: str, tf: str, ts: datetime, w: _WBar, source: str, fetched: datetime) -> Bar | None:
    """A snapshot member as a bar; the all-zero members the vendor sends before a session are None."""
    if w.o is None or w.h is None or w.l is None or w.c is None or w.v is None or not w.c:
        return None
    return Bar(
        symbol=sym,
        timeframe=tf,
        ts=ts,
        open=w.o,
        high=w.h,
        low=w.l,
        close=w.c,
        volume=int(w.v),
        trade_count=w.n,
        vwap=w.vw,
        source=source,
        feed=FEED,
        fetched_at=fetched,
    )


def _ny_midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), NY).astimezone(UTC)


def _complete_through(page: BarPage, sort: str) -> dict[str, datetime]:
    """See BarPage.complete_through; a page holds one ticker, in time order."""
    if page.last_page:
        return dict.fromkeys(page.symbols, page.end)
    if sort != "asc" or page.frame.height == 0:
        return {}
    last = page.frame.get_column("ts").drop_nulls().max()
    return {page.symbols[0]: last + timedelta(microseconds=1)} if isinstance(last, datetime) else {}


# --- the client ----------------------------------------------------------------------------------


class PolygonProvider(HttpProvider):
    """Async Polygon/Massive REST client. Use as ``async with PolygonProvider.from_config(cfg) as p: ...``.

    ``config.plan``: ``free`` (the Basic tier: end-of-day data through the previous session, no
    last trade/quote or snapshots, 5 requests a minute) or ``unlimited`` (a paid plan). Answers
    with status ``DELAYED`` are taken to stop 15 minutes before now, whatever the plan says.
    """

    name = "polygon"
    # The aggregates take the one feed Polygon has (anything else is refused); the latest values and
    # snapshots take none.
    capabilities = Capabilities(frozenset(KINDS), {"bars": (FEED,)})

    def __init__(
        self,
        api_key: str,
        *,
        config: PolygonConfig | None = None,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], datetime] = utcnow,
        auth: str = "header",
    ) -> None:
        if not api_key:
            raise MissingCredentials(f"Polygon API key missing: set {KEY_VAR}", details={"env": [KEY_VAR]})
        validate_enum(auth, ("header", "query"), "auth", message="auth must be 'header' or 'query'")
        # Without a config, the vendor's free tier: 5 requests a minute, previous-session data.
        self.config = config or PolygonConfig()
        self._connect(
            self.config,
            base_url,
            DEFAULT_BASE_URL,
            now,
            headers={"Authorization": f"Bearer {api_key}"} if auth == "header" else None,
            params={"apiKey": api_key} if auth == "query" else None,
            transport=transport,
            secrets=(api_key,),
            map_error=map_http_error,
        )

    @classmethod
    def from_config(
        cls, config: PolygonConfig | None = None, *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> PolygonProvider:
        src = os.environ if env is None else env
        key = src.get(KEY_VAR)
        if not key:
            raise MissingCredentials(f"Polygon API key missing: set {KEY_VAR}", details={"env": [KEY_VAR]})
        return cls(key, config=config, **kw)

    # --- capabilities ------------------------------------------------------------------------

    def _horizon(self, now: datetime) -> datetime:
        """Latest instant the configured plan can serve: now, or (free) today's New York midnight."""
        if self.config.plan == "free":
            return min(now - DELAY, _ny_midnight(now.astimezone(NY).date()))
        return now

    def supports(
        self, kind: str, timeframe: Timeframe | None, start: datetime | None, end: datetime | None, now: datetime
    ) -> str | None:
        """Bars at every timeframe, latest trade and quote, snapshots. No historical trades or
        quotes here (Polygon has them under /v3, which this adapter does not implement)."""
        if kind in ("trades", "quotes"):
            return f"the polygon adapter serves no historical {kind} (the v3 tick endpoints are not implemented)"
        if not self.capabilities.serves(kind):
            return f"polygon does not serve {kind}"
        if self.config.plan == "free":
            if kind == "actions":
                return None  # the reference endpoints are on every plan
            if kind != "bars":
                return f"the polygon free plan does not include {kind.replace('_', ' ')}"
            if start is not None and start >= self._horizon(now):
                return "the polygon free plan serves data through the previous session only"
        return None

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
    ) -> AsyncIterator[BarPage]:
        """Pages of bars for ``[start, end)``, one ticker after the other, one page in memory at a time."""
        validate_required(symbols, "symbols", message="no symbols given")
        validate_range(start, end)
        if feed is not None:
            validate_enum(feed, (FEED,), "feed", message=f"polygon serves the {FEED} feed only, not {{value!r}}")
        validate_enum(
            adjustment,
            ADJUSTED,
            "adjustment",
            message="invalid adjustment {value!r}: polygon adjusts for splits only; allowed: {allowed}",
        )
        if asof is not None:
            raise InvalidArgument("polygon has no as-of symbol mapping", details={"parameter": "asof"})
        validate_limit(limit, 1, MAX_LIMIT)
        validate_sort(sort)
        tickers = [normalize_symbol(s) for s in symbols]
        used_end = min(end, self._horizon(self._now()))
        if used_end <= start:
            raise NotEntitled(
                "the polygon free plan serves data through the previous session only",
                provider=self.name,
                details={"reason": "plan", "start": start.isoformat()},
            )
        for ticker in dict.fromkeys(tickers):
            async for page in self._ticker_pages(ticker, timeframe, start, used_end, adjustment, limit, sort):
                yield page

    async def corporate_actions(
        self, symbols: list[str], start: date, end: date, *, types: list[str] | None = None
    ) -> ActionsPage:
        """Splits and cash dividends per ticker, from ``/stocks/v1/splits`` and ``/stocks/v1/dividends``
        (or the deprecated ``/v3/reference/...`` with ``actions_api = "v3"``), every page. Polygon
        has no other action types: a ``types`` list without splits or dividends asks for nothing."""
        validate_required(symbols, "symbols", message="no symbols given")
        v1 = self.config.actions_api == "v1"
        wanted = set(types or ("forward_split", "reverse_split", "stock_dividend", "cash_dividend"))
        rows: list[dict[str, Any]] = []
        ids: list[str] = []
        source = self.name
        for ticker in dict.fromkeys(normalize_symbol(s) for s in symbols):
            calls = []
            if wanted & {"forward_split", "reverse_split", "stock_dividend"}:
                calls.append((SPLITS_PATH if v1 else V3_SPLITS_PATH, "execution_date", split_action))
            if "cash_dividend" in wanted:
                calls.append((DIVIDENDS_PATH if v1 else V3_DIVIDENDS_PATH, "ex_dividend_date", dividend_action))
            for path, field, convert in calls:
                params: dict[str, Any] = {
                    "ticker": ticker,
                    f"{field}.gte": start.isoformat(),
                    f"{field}.lte": end.isoformat(),
                    "limit": ACTIONS_MAX_LIMIT if v1 else V3_ACTIONS_MAX_LIMIT,
                    "order": "asc",
                }
                url: str | None = path
                seen: set[str] = set()
                number = 0
                while url is not None:
                    doc, resp = await self._http.get(url, params, "actions", _actions_decode)
                    number += 1
                    source, fetched = self._source(resp), self._now()
                    ids.append(str(doc.get("request_id") or uuid.uuid4().hex[:16]))
                    rows += [convert(r, source=source, fetched_at=fetched) for r in doc.get("results") or []]
                    url, params = self._next_action(doc.get("next_url"), path, seen, number), {}
        frame = actions_frame(rows)
        if types:
            frame = frame.filter(pl.col("type").is_in(types))
        return ActionsPage(frame, list(symbols), start, end, source, ids, self._now())

    def _next_action(self, next_url: Any, path: str, seen: set[str], page: int) -> str | None:
        """Like :meth:`_next`, for the corporate-action endpoints: a link on our base URL, same path."""
        if not next_url:
            return None
        parts = urlsplit(str(next_url))
        if parts.path != path:
            raise MalformedResponse(
                f"polygon: next_url leaves {path} ({self._http.scrub(parts.path)})", provider=self.name
            )
        rel = parts.path + (f"?{parts.query}" if parts.query else "")
        if rel in seen:
            raise pagination_loop(self.name, "actions", page, f"next_url {self._http.scrub(rel)}")
        seen.add(rel)
        return rel

    async def _ticker_pages(
        self, ticker: str, tf: Timeframe, start: datetime, end: datetime, adjustment: str, limit: int, sort: str
    ) -> AsyncIterator[BarPage]:
        multiplier, timespan = _span(tf)
        # The vendor's bounds are inclusive (and snapped outward to whole buckets); ours is [start, end).
        lo, hi = int(start.timestamp() * 1000), int((end - timedelta(milliseconds=1)).timestamp() * 1000)
        url = aggs_path(quote(ticker, safe="."), multiplier, timespan, lo, hi)
        params: dict[str, Any] = {"adjusted": ADJUSTED[adjustment], "sort": sort, "limit": limit}
        number = 0
        seen: set[str] = set()  # next_urls followed: one coming back would loop forever
        while True:
            (doc, frame, nbytes), resp = await self._http.get(
                url, params, "aggs", self._agg_decoder(ticker, tf), offload=True
            )
            number += 1
            nxt = self._next(doc.next_url, seen, number)
            page_end = end
            if doc.status == DELAYED:
                page_end = min(page_end, self._now() - DELAY)
            # Buckets that merely overlap `start` lie before the range asked for (outward snapping).
            if frame.height:
                frame = frame.filter(pl.col("ts").is_null() | (pl.col("ts") >= start))
            page = BarPage(
                frame=frame,
                symbols=[ticker],
                timeframe=tf,
                start=start,
                end=max(start, page_end),
                feed=FEED,
                source=self._source(resp),
                request_id=doc.request_id or uuid.uuid4().hex[:16],
                fetched_at=frame["fetched_at"][0] if frame.height else self._now(),
                next_page_token=self._http.scrub(nxt) if nxt else None,
                page_number=number,
                last_page=nxt is None,
                nbytes=nbytes,
                kind="bars",
            )
            page.complete_through = _complete_through(page, sort)
            yield page
            if nxt is None:
                return
            # next_url carries cursor (limit, sort, adjusted) itself: nothing else is sent with it.
            url, params = nxt, {}

    def _next(self, next_url: str | None, seen: set[str], page: int) -> str | None:
        """The path and query of ``next_url``, on our configured base URL: the auth header must
        never follow a link to another host, and api.polygon.io / api.massive.com are one API.
        A ``next_url`` already followed in this pagination raises PAGINATION_LOOP (before the
        page that carries it is used: a vendor repeating itself cannot be trusted with it)."""
        if not next_url:
            return None
        parts = urlsplit(next_url)
        if not parts.path.startswith(AGGS_PREFIX):
            raise MalformedResponse(
                f"polygon: next_url points outside the aggregates API ({self._http.scrub(parts.path)})",
                provider=self.name,
            )
        rel = parts.path + (f"?{parts.query}" if parts.query else "")
        if rel in seen:
            raise pagination_loop(self.name, "aggs", page, f"next_url {self._http.scrub(rel)}")
        seen.add(rel)
        return rel

    def _agg_decoder(
        self, ticker: str, tf: Timeframe
    ) -> Callable[[httpx.Response], tuple[_AggPage, pl.DataFrame, int]]:
        def decode(resp: httpx.Response) -> tuple[_AggPage, pl.DataFrame, int]:
            body = resp.content
            try:
                doc = _decoder(_AggPage).decode(body)
            except msgspec.ValidationError as exc:
                raise envelope_error(body, provider=self.name, endpoint="aggs", required=AGG_KEYS, cause=exc) from exc
            _raise_body_error(doc.status, body, resp.headers, "aggs")
            no_rows = _raw_is_empty(doc.results)
            if no_rows and doc.resultsCount is None:
                raise envelope_error(
                    body,
                    provider=self.name,
                    endpoint="aggs",
                    required=AGG_KEYS,
                    cause=ValueError("neither results nor resultsCount"),
                )
            if no_rows and doc.resultsCount:
                raise MalformedResponse(
                    f"polygon aggs: resultsCount is {doc.resultsCount} but the answer has no results",
                    provider=self.name,
                    details={"endpoint": "aggs", "bytes": len(body), "missing": ["results"]},
                )
            frame = aggs_to_frame(doc.results, ticker, tf, self._source(resp), self._now())
            return doc, frame, len(body)

        return decode

    # --- latest and snapshots ----------------------------------------------------------------

    def _check_entitled(self, what: str) -> None:
        if self.config.plan == "free":
            raise NotEntitled(
                f"the polygon free plan does not include {what}", provider=self.name, details={"reason": "plan"}
            )

    async def _last(self, kind: str, symbols: list[str], record: Callable[..., T]) -> dict[str, T]:
        self._check_entitled(f"last {kind}s")
        wire = _WTrade if kind == "trade" else _WQuote
        path = "trade" if kind == "trade" else "nbbo"

        def decode(resp: httpx.Response) -> Any:
            doc = _decoder(_Last).decode(resp.content)
            _raise_body_error(doc.status, resp.content, resp.headers, f"last_{path}")
            return None if _raw_is_empty(doc.results) else _decoder(wire).decode(doc.results)

        async def one(sym: str) -> tuple[str, T | None]:
            try:
                w, resp = await self._http.get(last_path(path, quote(sym, safe=".")), {}, f"last_{path}", decode)
            except NotFound:
                return sym, None  # an unknown ticker is left out, as Alpaca's multi answers do
            return sym, (record(sym, w, self._source(resp), self._now()) if w is not None else None)

        async with asyncio.TaskGroup() as group:  # one failure cancels the rest
            tasks = [group.create_task(one(s)) for s in dict.fromkeys(normalize_symbol(s) for s in symbols)]
        return {sym: rec for sym, rec in (t.result() for t in tasks) if rec is not None}

    async def latest_trades(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Trade]:
        """Last trade per symbol (one request each: the vendor has no multi-symbol last trade)."""
        return await self._last("trade", symbols, _trade_record)

    async def latest_quotes(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Quote]:
        """Last NBBO per symbol (one request each)."""
        return await self._last("quote", symbols, _quote_record)

    async def snapshots(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Snapshot]:
        self._check_entitled("snapshots")
        tickers = list(dict.fromkeys(normalize_symbol(s) for s in symbols))

        def decode(resp: httpx.Response) -> _Snaps:
            doc = _decoder(_Snaps).decode(resp.content)
            _raise_body_error(doc.status, resp.content, resp.headers, "snapshots")
            return doc

        doc, resp = await self._http.get(SNAPSHOTS_PATH, {"tickers": ",".join(tickers)}, "snapshots", decode)
        src, now = self._source(resp), self._now()
        wanted = set(tickers)
        return {s.ticker: self._snapshot(s, src, now) for s in doc.tickers or () if s.ticker in wanted}

    async def snapshot(self, symbol: str, *, feed: str | None = None) -> Snapshot | None:
        return (await self.snapshots([symbol])).get(normalize_symbol(symbol))

    @staticmethod
    def _snapshot(s: _WSnap, src: str, now: datetime) -> Snapshot:
        sym = s.ticker
        minute = None
        if s.min is not None and s.min.t:
            minute = _bar_record(sym, "1Min", ns_to_dt(s.min.t * 1_000_000), s.min, src, now)
        # `day`/`prevDay` carry no time: they are the session of the latest activity and the one before.
        latest_ns = max(s.min.t * 1_000_000 if s.min and s.min.t else 0, s.updated or 0)
        day_bar = prev_bar = None
        if latest_ns:
            today = ns_to_dt(latest_ns).astimezone(NY).date()
            days = get_calendar("XNYS").session_days(today - timedelta(days=14), today)
            if len(days):
                d0 = days[-1].astype(date)
                if s.day is not None:
                    day_bar = _bar_record(sym, "1Day", _ny_midnight(d0), s.day, src, now)
                if s.prevDay is not None and len(days) > 1:
                    prev_bar = _bar_record(sym, "1Day", _ny_midnight(days[-2].astype(date)), s.prevDay, src, now)
        return Snapshot(
            symbol=sym,
            latest_trade=_trade_record(sym, s.lastTrade, src, now) if s.lastTrade else None,
            latest_quote=_quote_record(sym, s.lastQuote, src, now) if s.lastQuote else None,
            minute_bar=minute,
            daily_bar=day_bar,
            prev_daily_bar=prev_bar,
            source=src,
            fetched_at=now,
        )


def _actions_decode(resp: httpx.Response) -> dict[str, Any]:
    """A corporate-action page: ``{"results": [...], "next_url"?, "status", "request_id"}``."""
    try:
        doc = orjson.loads(resp.content)
    except orjson.JSONDecodeError as exc:
        raise envelope_error(
            resp.content, provider="polygon", endpoint="actions", required=("results",), cause=exc
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("results", []), list):
        raise envelope_error(
            resp.content, provider="polygon", endpoint="actions", required=("results",), cause=ValueError("shape")
        )
    _raise_body_error(doc.get("status"), resp.content, resp.headers, "actions")
    return doc


def _span(tf: Timeframe) -> tuple[int, str]:
    """A marketpipe timeframe as Polygon's (multiplier, timespan)."""
    return tf.amount, {
        Unit.MINUTE: "minute",
        Unit.HOUR: "hour",
        Unit.DAY: "day",
        Unit.WEEK: "week",
        Unit.MONTH: "month",
    }[tf.unit]


__all__ = [
    "DEFAULT_BASE_URL",
    "KEY_VAR",
    "MASSIVE_BASE_URL",
    "REDACTED",
    "PolygonProvider",
    "aggs_to_frame",
    "map_http_error",
]
