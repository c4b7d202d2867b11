"""Alpaca crypto market data (``/v1beta3/crypto/{loc}/...``) on the gateway, so alpaca-py's
``CryptoHistoricalDataClient(url_override=GATEWAY)`` works unchanged — with caching, row checks on
bars and attribution headers. Wire format: :mod:`marketpipe.wire.alpaca_crypto`.

As the simulator plays the vendor (:mod:`marketpipe.sim.crypto`): ``symbols`` are pairs
(``BTC/USD``, or ``BTC%2FUSD`` as alpaca-py sends them); ``BTCUSD`` is 400 with ``BTC/USD``
suggested; a pair the vendor does not list is left out of the answer. ``start``/``end`` are RFC-3339
or ``YYYY-MM-DD`` (00:00 UTC), both inclusive; default ``start`` is 00:00 UTC today, ``end`` now.
A location other than ``us``, ``us-1``, ``us-2``, ``eu-1``, ``bs-1`` is 400 INVALID_ARGUMENT
(the vendor's 404 would read as a missing route); one the upstream account lacks is 403. Pages
carry the upstream vendor's ``next_page_token``. Errors are the vendor's shape (``{"message"}``).
Crypto never closes, so latest values and snapshots use the market-open TTLs around the clock; a
range that has ended gets the history TTL.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any

import orjson
import polars as pl
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from marketpipe.api.alpaca import JSON, attribution, parse_wire_time
from marketpipe.api.answer import Loaded, answer
from marketpipe.api.state import AppState, StateDep
from marketpipe.cache import make_key, ttl_for
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.core.validation import validate_limit, validate_range, validate_sort, validate_timeframe
from marketpipe.wire.alpaca_crypto import (
    BASE,
    MAX_LIMIT,
    crypto_symbols,
    orderbooks_rows,
    rows_by_symbol,
    validate_location,
)

DEFAULT_LIMIT = 1000
ONE_US = timedelta(microseconds=1)
Q = Annotated[str | None, Query()]
Loc = Annotated[str, Path(description="us, us-1, us-2, eu-1 or bs-1")]
Symbols = Annotated[str | None, Query(description="comma-separated pairs, e.g. BTC/USD,ETH/USD (required)")]
LATEST_CACHE_KIND = {
    "bars": "latest_bar",
    "trades": "latest_trade",
    "quotes": "latest_quote",
    "orderbooks": "latest_quote",
}


def _pairs(raw: str | None) -> list[str]:
    return crypto_symbols(raw or "")


def _range(start: str | None, end: str | None, now: datetime) -> tuple[datetime, datetime]:
    s = parse_wire_time(start, "start")[0] if start else datetime.combine(now.date(), time(0), UTC)
    e = parse_wire_time(end, "end")[0] if end else now
    validate_range(s, e, "end", message="end should not be before start", allow_empty=True)
    return s, e + ONE_US


def _headers(frames: Iterable[pl.DataFrame], now: datetime) -> dict[str, str]:
    fs = [f for f in frames if f.height]
    return attribution(
        [s for f in fs for s in f["source"].unique().to_list()],
        [f["fetched_at"].max() for f in fs],  # type: ignore[misc]
        [f["ts"].max() for f in fs],  # type: ignore[misc]
        now,
    )


def crypto_router() -> APIRouter:
    r = APIRouter(prefix=BASE, tags=["alpaca-compatible crypto"])

    async def historical(
        request: Request,
        st: AppState,
        kind: str,
        loc: str,
        symbols: str | None,
        q: dict[str, str | None],
    ) -> Response:
        location = validate_location(loc)
        syms = sorted(_pairs(symbols))  # the vendor orders a page by symbol, then time
        tf: Timeframe | None = (
            validate_timeframe(q["timeframe"], message="invalid timeframe") if kind == "bars" else None
        )
        limit = validate_limit(q["limit"], 1, MAX_LIMIT, message="invalid limit") if q["limit"] else DEFAULT_LIMIT
        sort = validate_sort(q["sort"] or "asc", message="invalid sort")
        now = utcnow()
        s, e = _range(q["start"], q["end"], now)
        token = q["page_token"] or None
        parts = (
            location,
            ",".join(syms),
            str(tf or ""),
            s.isoformat(),
            (q["end"] or ""),
            str(limit),
            sort,
            token or "",
        )
        key = make_key(f"crypto_{kind}", *parts)

        async def load() -> Loaded:
            page = await st.data.crypto.page(
                kind, syms, s, e, timeframe=tf, location=location, limit=limit, sort=sort, page_token=token
            )
            at = utcnow()
            body = orjson.dumps({kind: rows_by_symbol(kind, page.frame), "next_page_token": page.next_page_token})
            closed = e <= at - timedelta(minutes=1)
            ttl = ttl_for(kind, market_open=True, range_closed=closed, config=st.config.cache)
            return body, JSON, _headers([page.frame], at), ttl

        return await answer(request, st, key, kind, load)

    def _hist_route(kind: str) -> None:
        async def route(
            request: Request,
            st: StateDep,
            loc: Loc,
            symbols: Symbols = None,
            timeframe: Q = None,
            start: Q = None,
            end: Q = None,
            limit: Q = None,
            page_token: Q = None,
            sort: Q = None,
        ) -> Response:
            q = {
                "timeframe": timeframe,
                "start": start,
                "end": end,
                "limit": limit,
                "page_token": page_token,
                "sort": sort,
            }
            return await historical(request, st, kind, loc, symbols, q)

        r.add_api_route(f"/{{loc}}/{kind}", route, methods=["GET"], summary=f"Historical crypto {kind}")

    def _latest_route(kind: str) -> None:
        cache_kind = LATEST_CACHE_KIND[kind]

        async def route(request: Request, st: StateDep, loc: Loc, symbols: Symbols = None) -> Response:
            location = validate_location(loc)
            syms = _pairs(symbols)
            key = make_key(f"crypto_latest_{kind}", location, ",".join(syms))

            async def load() -> Loaded:
                frame = await st.data.crypto.latest(kind, syms, location=location)
                at = utcnow()
                if kind == "orderbooks":
                    rows: dict[str, Any] = orderbooks_rows(frame)
                else:
                    rows = {sym: v[-1] for sym, v in rows_by_symbol(kind, frame).items()}
                body = orjson.dumps({kind: rows})
                return body, JSON, _headers([frame], at), ttl_for(cache_kind, market_open=True, range_closed=False)

            return await answer(request, st, key, cache_kind, load)

        r.add_api_route(f"/{{loc}}/latest/{kind}", route, methods=["GET"], summary=f"Latest crypto {kind}")

    for kind in ("bars", "trades", "quotes"):
        _hist_route(kind)
    for kind in ("bars", "trades", "quotes", "orderbooks"):
        _latest_route(kind)

    @r.get("/{loc}/snapshots", summary="Crypto snapshots: latest trade and quote, minute, daily and previous daily bar")
    async def snapshots(request: Request, st: StateDep, loc: Loc, symbols: Symbols = None) -> Response:
        location = validate_location(loc)
        syms = _pairs(symbols)
        key = make_key("crypto_snapshots", location, ",".join(syms))

        async def load() -> Loaded:
            parts = await st.data.crypto.snapshots(syms, location=location)
            at = utcnow()
            wire = {
                "latestTrade": rows_by_symbol("trades", parts["latest_trade"]),
                "latestQuote": rows_by_symbol("quotes", parts["latest_quote"]),
                "minuteBar": rows_by_symbol("bars", parts["minute_bar"]),
                "dailyBar": rows_by_symbol("bars", parts["daily_bar"]),
                "prevDailyBar": rows_by_symbol("bars", parts["prev_daily_bar"]),
            }
            found = [s for s in syms if any(s in v for v in wire.values())]
            doc = {s: {k: (v[s][-1] if s in v else None) for k, v in wire.items()} for s in found}
            body = orjson.dumps({"snapshots": doc})
            return body, JSON, _headers(parts.values(), at), ttl_for("snapshot", market_open=True, range_closed=False)

        return await answer(request, st, key, "snapshot", load)

    return r
