"""Alpaca Market Data v2 (stocks) on the gateway, so ``alpaca-py`` and other Alpaca clients work
unchanged with ``url_override`` pointed here — now with caching, checks, failover and attribution.

Paths, parameters, JSON keys and key order, timestamps and error bodies are the vendor's
(shared/reference/market-data-apis.md §1), with the simulator's documented choices where the
reference leaves one open:

* ``YYYY-MM-DD`` as ``start``/``end`` is 00:00 UTC that date; for 1Day and longer bars a date-only
  ``end`` includes the bar stamped on that date (New York midnight). ``start`` and ``end`` are both
  inclusive. Default ``start`` is 00:00 New York today, default ``end`` now.
* Unknown-but-valid symbols give empty shapes with 200; latest and snapshot answers leave them out
  of multi answers and carry ``null`` in single ones.
* Bars come from the store (missing ranges fetched first through the provider router); their
  ``next_page_token`` is the gateway's own. Historical trades and quotes are passed through page
  by page, with the upstream vendor's token.

``adjustment`` is validated as the vendor does since 2026-11-02 (one value, a comma list of
``raw|split|dividend|spin-off|all``; unknown, empty or repeated values are a 400) and served by
adjusting the stored raw bars on read (``service/actions``); the header ``X-Marketpipe-Adjustment``
names every action applied (a spin-off whose new line has no raw close on its ex-date is left out,
never priced by guess, and listed in ``X-Marketpipe-Adjustment-Skipped``). What marketpipe does not do
is refused rather than faked: currencies other than ``USD``.
Every success carries ``X-Marketpipe-Source``,
``X-Marketpipe-Fetched-At`` and ``X-Marketpipe-Data-Age``; a stale answer is flagged by the
``X-Marketpipe-Stale`` header only — never by a key in the body, which a vendor client would read
as a symbol. Bodies are sent as ``application/json; charset=utf-8``, as the vendor sends them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal, TypeVar, cast

import orjson
import polars as pl
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from marketpipe.api.answer import Loaded, answer
from marketpipe.api.state import AppState, StateDep
from marketpipe.cache import make_key, ttl_for
from marketpipe.core.errors import InvalidArgument, ProviderBadRequest
from marketpipe.core.schema import Bar, Quote, Snapshot, Trade
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import NY, utcnow
from marketpipe.core.validation import (
    validate_enum,
    validate_limit,
    validate_range,
    validate_sort,
    validate_symbol,
    validate_symbols,
    validate_timeframe,
)
from marketpipe.service.actions import parse_adjustment
from marketpipe.service.data import equities_only
from marketpipe.service.gateway import BarsPage, Meta, decode_token
from marketpipe.wire.alpaca_rest import (
    ADJUSTMENTS,
    HISTORICAL_FEEDS,
    LATEST_FEEDS,
    MAX_LIMIT,
    bar_obj,
    page_json,
    quote_obj,
    snapshot_obj,
    trade_obj,
)

V = TypeVar("V")
JSON = "application/json; charset=utf-8"
DEFAULT_LIMIT = 1000
ONE_US = timedelta(microseconds=1)

_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+\- ]\d{2}:?\d{2}))?$",
    re.ASCII,
)  # a space before the offset is a "+" that arrived unencoded in a query string
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$", re.ASCII)

Q = Annotated[str | None, Query()]
Sym = Annotated[str, Path(description="e.g. AAPL, BRK.B")]
Symbols = Annotated[str | None, Query(description="comma-separated, e.g. AAPL,MSFT (required)")]
TF = Annotated[str | None, Query(description="1Min, 5T, 1Hour, 4H, 1Day, 1Week, 1Month, … (required)")]
Start = Annotated[str | None, Query(description="RFC-3339 or YYYY-MM-DD, inclusive")]
End = Annotated[str | None, Query(description="RFC-3339 or YYYY-MM-DD, inclusive")]
Limit = Annotated[str | None, Query(description="1..10000 data points per page across symbols (default 1000)")]
Adj = Annotated[str | None, Query(description="raw (default), split, dividend, spin-off or all, comma-combinable")]
Cur = Annotated[str | None, Query(description="USD only")]


# --- parameters -----------------------------------------------------------------------------------


def parse_wire_time(text: str, name: str) -> tuple[datetime, bool]:
    """RFC-3339 (up to 9 fractional digits, ``Z`` or an offset) or ``YYYY-MM-DD`` (00:00 UTC) ->
    (UTC datetime floored to the microsecond, date_only); 400 ``invalid start``/``invalid end``."""
    m = _TIME.match(text.strip())
    if not m:
        raise InvalidArgument(f"invalid {name}", details={"parameter": name})
    y, mo, d, hh, mi, ss = (int(g or 0) for g in m.groups()[:6])
    frac, off = m.group(7), m.group(8)
    try:
        ts = datetime(y, mo, d, hh, mi, ss, int((frac or "0").ljust(6, "0")[:6]), tzinfo=UTC)
        if off and off not in "Zz":
            digits = off[1:].replace(":", "")
            if int(digits[:2]) > 23 or int(digits[2:]) > 59:
                raise ValueError(f"offset out of range: {off}")
            shift = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            ts = ts - shift if off[0] != "-" else ts + shift
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"invalid {name}", details={"parameter": name}) from exc
    return ts, m.group(4) is None


def _symbol(raw: str) -> str:
    return validate_symbol(raw, message="invalid symbol: {value}")


def _symbols(raw: str | None) -> list[str]:
    return validate_symbols(raw, message="missing symbols", symbol_message="invalid symbol: {value}")


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    return validate_limit(raw, 1, MAX_LIMIT, message="invalid limit")


def _sort(raw: str | None) -> str:
    return validate_sort(raw or "asc", message="invalid sort")


def _feed(raw: str | None, allowed: tuple[str, ...]) -> str | None:
    if raw is None or raw == "":
        return None
    return validate_enum(raw, allowed, "feed", message="invalid feed")


def _asof(raw: str | None) -> str:
    if raw is None or raw in ("", "-"):
        return raw or ""
    try:
        if not _DATE.match(raw):
            raise ValueError(raw)
        date.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidArgument("invalid asof", details={"parameter": "asof"}) from exc
    return raw


def _currency(raw: str | None) -> bool:
    """True when the answer should carry ``"currency": "USD"``."""
    if raw is None or raw == "":
        return False
    validate_enum(
        raw,
        ("USD",),
        "currency",
        casefold=True,
        message="unsupported currency: {value}; marketpipe serves prices in USD only, as the vendor sent them",
    )
    return True


def _adjustment(raw: str | None) -> str:
    """The vendor's rule (trap 4): absent is ``raw``; unknown, empty or repeated values are a 400 with
    the vendor's message. Returns the normalized value."""
    if raw is None:
        return "raw"
    parts = [p.strip() for p in raw.split(",")]
    if not all(parts) or len(set(parts)) != len(parts):
        raise InvalidArgument("invalid adjustment", details={"parameter": "adjustment", "value": raw})
    for p in parts:
        validate_enum(p, ADJUSTMENTS, "adjustment", message="invalid adjustment")
    value = ",".join(parts)
    parse_adjustment(value)  # raw combined with others is refused here
    return value


def _timeframe(raw: str | None) -> Timeframe:
    return validate_timeframe(raw, message="invalid timeframe")


def _range(start: str | None, end: str | None, tf: Timeframe | None) -> tuple[datetime, datetime]:
    """The vendor's inclusive ``[start, end]`` as the gateway's half-open ``[start, end)``."""
    now = utcnow()
    if start:
        s, _ = parse_wire_time(start, "start")
    else:
        s = datetime.combine(now.astimezone(NY).date(), time(0), NY).astimezone(UTC)
    if end:
        e, date_only = parse_wire_time(end, "end")
        if date_only and tf is not None and not tf.is_intraday:
            e = datetime.combine(e.date(), time(0), NY).astimezone(UTC)
    else:
        e = now
    validate_range(s, e, "end", message="end should not be before start", allow_empty=True)
    try:
        return s, e + ONE_US
    except OverflowError as exc:
        raise InvalidArgument("invalid end", details={"parameter": "end"}) from exc


@dataclass(frozen=True)
class Historical:
    """The validated parameters of one historical request (bars, trades or quotes)."""

    symbols: list[str]
    single: str | None
    start: datetime
    end: datetime  # exclusive
    feed: str | None
    limit: int
    sort: str
    page_token: str | None
    currency: bool
    key_parts: tuple[str, ...]


@dataclass(frozen=True)
class HistoricalQuery:
    """The query parameters every historical route takes, as sent (checked by :func:`_historical`)."""

    start: str | None
    end: str | None
    limit: str | None
    page_token: str | None
    sort: str | None
    feed: str | None
    asof: str | None
    currency: str | None


def historical_query(
    start: Start = None,
    end: End = None,
    limit: Limit = None,
    page_token: Q = None,
    sort: Q = None,
    feed: Q = None,
    asof: Q = None,
    currency: Cur = None,
) -> HistoricalQuery:
    return HistoricalQuery(start, end, limit, page_token, sort, feed, asof, currency)


HistoricalDep = Annotated[HistoricalQuery, Depends(historical_query)]


def _historical(
    kind: str,
    single: str | None,
    symbols: str | None,
    q: HistoricalQuery,
    timeframe: str | None = None,
    adjustment: str | None = None,
) -> tuple[Historical, Timeframe | None]:
    """Validation in the vendor's order, with the vendor's messages."""
    # the vendor orders a multi-symbol page by symbol, then time
    syms = [_symbol(single)] if single is not None else sorted(_symbols(symbols))
    tf = None
    if kind == "bars":
        tf = _timeframe(timeframe)
        adjustment = _adjustment(adjustment)
    fd = _feed(q.feed, HISTORICAL_FEEDS)
    lim = _limit(q.limit)
    srt = _sort(q.sort)
    asof_text = _asof(q.asof)
    cur = _currency(q.currency)
    s, e = _range(q.start, q.end, tf)
    token = q.page_token or None
    if token is not None and kind == "bars":
        try:
            decode_token(token, syms)
        except InvalidArgument as exc:
            raise InvalidArgument("invalid page token", details={"parameter": "page_token"}) from exc
    parts = (
        ",".join(syms),
        str(tf) if tf else "",
        q.start or "",
        q.end or "",
        s.isoformat(),  # the default start is today's: it moves at midnight
        e.isoformat() if q.end else "",
        fd or "",
        str(lim),
        srt,
        token or "",
        adjustment or "",
        asof_text,
        "USD" if cur else "",
    )
    return Historical(syms, syms[0] if single is not None else None, s, e, fd, lim, srt, token, cur, parts), tf


def _current(
    cache_kind: str, single: str | None, symbols: str | None, feed: str | None, currency: str | None
) -> tuple[list[str], str | None, bool, str]:
    """The checked parameters of a latest or snapshot request, in the vendor's order, and its cache
    key: ``(symbols, feed, currency, key)``."""
    syms = [_symbol(single)] if single is not None else _symbols(symbols)
    fd = _feed(feed, LATEST_FEEDS)
    cur = _currency(currency)
    key = make_key(
        cache_kind, syms[0] if single is not None else "_multi", ",".join(syms), fd or "", "USD" if cur else ""
    )
    return syms, fd, cur, key


def _found(got: Mapping[str, V | None], syms: list[str]) -> dict[str, V]:
    """What the providers answered for the asked symbols, in the asked order (unknown ones left out)."""
    return {s: v for s in syms if (v := got.get(s)) is not None}


# --- encoding -------------------------------------------------------------------------------------


# --- attribution ----------------------------------------------------------------------------------


def attribution(
    sources: Iterable[str | None], fetched: Iterable[datetime | None], newest: Iterable[datetime | None], now: datetime
) -> dict[str, str]:
    """X-Marketpipe-* headers: every source, the latest fetch time, the age of the oldest newest point."""
    srcs = sorted({s for s in sources if s})
    last = max((f for f in fetched if f is not None), default=None)
    ages = [max(0.0, (now - n).total_seconds()) for n in newest if n is not None]
    return {
        "X-Marketpipe-Source": ",".join(srcs),
        "X-Marketpipe-Fetched-At": last.isoformat() if last else "",
        "X-Marketpipe-Data-Age": f"{max(ages):.3f}" if ages else "",
    }


def _bars_headers(page: BarsPage, now: datetime) -> dict[str, str]:
    ms: list[Meta] = list(page.meta.values())
    ages = [a for a in (m.data_age(now) for m in ms) if a is not None]
    scores = [m.quality_score for m in ms if m.quality_score is not None]
    fetched = max((m.fetched_at for m in ms if m.fetched_at), default=None)
    headers = {
        "X-Marketpipe-Source": ",".join(sorted({s for m in ms for s in m.sources})),
        "X-Marketpipe-Fetched-At": fetched.isoformat() if fetched else "",
        "X-Marketpipe-Data-Age": f"{max(ages):.3f}" if ages else "",
        "X-Marketpipe-Quality-Score": f"{min(scores):.4f}" if scores else "",
    }
    if any(m.stale for m in ms):
        headers["X-Marketpipe-Stale"] = "true"
    return headers


def _frame_headers(frame: pl.DataFrame, provider: str, now: datetime) -> dict[str, str]:
    if not frame.height:
        return attribution([provider], [], [], now)
    sources = frame["source"].unique().to_list() if "source" in frame.columns else [provider]
    fetched = [cast(datetime, frame["fetched_at"].max())] if "fetched_at" in frame.columns else []
    return attribution(sources, fetched, [cast(datetime, frame["ts"].max())], now)


def _record_headers(records: Iterable[Trade | Quote | Bar | Snapshot], now: datetime) -> dict[str, str]:
    recs = list(records)
    newest: list[datetime | None] = []
    for r in recs:
        if isinstance(r, Snapshot):
            newest.append(max([x.ts for x in (r.latest_trade, r.latest_quote) if x is not None], default=None))
        elif isinstance(r, Bar):
            newest.append(r.ts + timedelta(minutes=1))  # the latest bar is a minute bar: its end
        else:
            newest.append(r.ts)
    return attribution([r.source for r in recs], [r.fetched_at for r in recs], newest, now)


def _ttl(st: AppState, kind: str, now: datetime, range_closed: bool) -> float:
    return ttl_for(kind, market_open=st.gateway.is_market_hours(now), range_closed=range_closed, config=st.config.cache)


# --- the routes ------------------------------------------------------------------------------------


def router() -> APIRouter:
    r = APIRouter(prefix="/v2/stocks", tags=["alpaca-compatible"])

    async def bars(
        request: Request,
        st: AppState,
        single: str | None,
        symbols: str | None,
        q: HistoricalQuery,
        timeframe: str | None,
        adjustment: str | None,
    ) -> Response:
        if len(request.query_params.getlist("adjustment")) > 1:
            raise InvalidArgument("invalid adjustment", details={"parameter": "adjustment", "repeated": True})
        h, tf = _historical("bars", single, symbols, q, timeframe, adjustment)
        assert tf is not None
        adj = _adjustment(adjustment)
        parts = parse_adjustment(adj)
        key = make_key("bars", h.single or "_multi", *h.key_parts)

        async def load() -> Loaded:
            # the vendor's default feed is sip: say so, or bars of another feed held for the range could answer
            page = await st.gateway.bars(
                h.symbols, tf, h.start, h.end, feed=h.feed or "sip", limit=h.limit, page_token=h.page_token, sort=h.sort
            )
            now = utcnow()
            frame = page.frame
            headers = _bars_headers(page, now)
            if parts:
                frame, info = await st.data.actions.adjust(frame, h.symbols, h.start, parts, adj)
                headers["X-Marketpipe-Adjustment"] = info.header()
                if (left_out := info.skipped_header()) is not None:
                    headers["X-Marketpipe-Adjustment-Skipped"] = left_out
            body = page_json("bars", frame, h.single, page.next_page_token, h.currency)
            closed = h.end <= st.gateway.last_close(now)
            return body, JSON, headers, 0.0 if page.partial else _ttl(st, "bars", now, closed)

        return await answer(request, st, key, "bars", load)

    async def ticks(
        request: Request,
        st: AppState,
        kind: Literal["trades", "quotes"],
        single: str | None,
        symbols: str | None,
        q: HistoricalQuery,
    ) -> Response:
        h, _ = _historical(kind, single, symbols, q)
        key = make_key(kind, h.single or "_multi", *h.key_parts)

        async def load() -> Loaded:
            try:
                frame, nxt, provider = await st.data.ticks(
                    kind, h.symbols, h.start, h.end, feed=h.feed, limit=h.limit, page_token=h.page_token, sort=h.sort
                )
            except ProviderBadRequest as exc:
                # the upstream vendor's page token is passed through, so is its verdict on it, verbatim
                message = str(exc.details.get("vendor_message") or exc.message)
                raise InvalidArgument(message, details={"upstream": exc.provider}) from exc
            now = utcnow()
            body = page_json(kind, frame, h.single, nxt, h.currency)
            closed = h.end <= st.gateway.last_close(now)
            return body, JSON, _frame_headers(frame, provider, now), _ttl(st, kind, now, closed)

        return await answer(request, st, key, kind, load)

    async def latest(
        request: Request,
        st: AppState,
        kind: Literal["trade", "quote", "bar"],
        single: str | None,
        symbols: str | None,
        feed: str | None,
        currency: str | None,
    ) -> Response:
        cache_kind = f"latest_{kind}"
        syms, fd, cur, key = _current(cache_kind, single, symbols, feed, currency)
        encoders: dict[str, Callable[[Any], dict[str, Any]]] = {"trade": trade_obj, "quote": quote_obj, "bar": bar_obj}
        encode = encoders[kind]

        async def load() -> Loaded:
            got = await st.gateway.latest(kind, equities_only(syms, f"latest {kind}s"), feed=fd)
            now = utcnow()
            found = _found(got, syms)
            doc: dict[str, Any]
            if single is not None:
                rec = found.get(syms[0])
                doc = {"symbol": syms[0], kind: encode(rec) if rec is not None else None}
            else:
                doc = {f"{kind}s": {s: encode(v) for s, v in found.items()}}
            if cur:
                doc["currency"] = "USD"
            return orjson.dumps(doc), JSON, _record_headers(found.values(), now), _ttl(st, cache_kind, now, False)

        return await answer(request, st, key, cache_kind, load)

    async def snapshots(
        request: Request, st: AppState, single: str | None, symbols: str | None, feed: str | None, currency: str | None
    ) -> Response:
        syms, fd, cur, key = _current("snapshot", single, symbols, feed, currency)

        async def load() -> Loaded:
            got = await st.gateway.snapshots(equities_only(syms, "snapshots"), feed=fd)  # stock records only
            now = utcnow()
            found = _found(got, syms)
            doc: dict[str, Any]
            if single is not None:
                snap = found.get(syms[0])
                doc = {"symbol": syms[0], **(snapshot_obj(snap) if snap is not None else {})}
                if cur:
                    doc["currency"] = "USD"
            else:
                # no wrapper key, and no "currency" key either: it would read as a symbol
                doc = {s: snapshot_obj(v) for s, v in found.items()}
            return orjson.dumps(doc), JSON, _record_headers(found.values(), now), _ttl(st, "snapshot", now, False)

        return await answer(request, st, key, "snapshot", load)

    # --- historical bars ---------------------------------------------------------------------------

    @r.get("/bars", summary="Historical bars, several symbols (paged across symbols, symbol then time)")
    async def bars_multi(
        request: Request,
        st: StateDep,
        q: HistoricalDep,
        symbols: Symbols = None,
        timeframe: TF = None,
        adjustment: Adj = None,
    ) -> Response:
        return await bars(request, st, None, symbols, q, timeframe, adjustment)

    @r.get("/{symbol}/bars", summary="Historical bars, one symbol")
    async def bars_single(
        request: Request, st: StateDep, symbol: Sym, q: HistoricalDep, timeframe: TF = None, adjustment: Adj = None
    ) -> Response:
        return await bars(request, st, symbol, None, q, timeframe, adjustment)

    # --- historical trades and quotes ----------------------------------------------------------------

    def tick_routes(kind: Literal["trades", "quotes"]) -> None:
        async def multi(request: Request, st: StateDep, q: HistoricalDep, symbols: Symbols = None) -> Response:
            return await ticks(request, st, kind, None, symbols, q)

        async def one(request: Request, st: StateDep, symbol: Sym, q: HistoricalDep) -> Response:
            return await ticks(request, st, kind, symbol, None, q)

        r.add_api_route(f"/{kind}", multi, methods=["GET"], summary=f"Historical {kind}, several symbols")
        r.add_api_route(f"/{{symbol}}/{kind}", one, methods=["GET"], summary=f"Historical {kind}, one symbol")

    # --- latest ------------------------------------------------------------------------------------------

    def latest_routes(kind: Literal["trade", "quote", "bar"]) -> None:
        what = "minute bar" if kind == "bar" else kind

        async def multi(
            request: Request, st: StateDep, symbols: Symbols = None, feed: Q = None, currency: Cur = None
        ) -> Response:
            return await latest(request, st, kind, None, symbols, feed, currency)

        async def one(request: Request, st: StateDep, symbol: Sym, feed: Q = None, currency: Cur = None) -> Response:
            return await latest(request, st, kind, symbol, None, feed, currency)

        r.add_api_route(f"/{kind}s/latest", multi, methods=["GET"], summary=f"Latest {what}, several symbols")
        r.add_api_route(f"/{{symbol}}/{kind}s/latest", one, methods=["GET"], summary=f"Latest {what}, one symbol")

    for k in ("trade", "quote", "bar"):
        latest_routes(k)  # type: ignore[arg-type]
    for t in ("trades", "quotes"):
        tick_routes(t)  # type: ignore[arg-type]

    # --- snapshots -------------------------------------------------------------------------------------

    @r.get("/snapshots", summary="Snapshots, several symbols (symbol -> snapshot, no wrapper key)")
    async def snapshots_multi(
        request: Request, st: StateDep, symbols: Symbols = None, feed: Q = None, currency: Cur = None
    ) -> Response:
        return await snapshots(request, st, None, symbols, feed, currency)

    @r.get("/{symbol}/snapshot", summary="Snapshot, one symbol (the five members inline with symbol)")
    async def snapshot_single(
        request: Request, st: StateDep, symbol: Sym, feed: Q = None, currency: Cur = None
    ) -> Response:
        return await snapshots(request, st, symbol, None, feed, currency)

    return r
