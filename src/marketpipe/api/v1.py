"""REST v1: bars (one or several symbols, in JSON, CSV, Arrow or Parquet), latest quote and trade,
snapshots, quality of stored bars and provider health — every answer with marketpipe's attribution
headers, served through the cache (:mod:`marketpipe.api.answer`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import polars as pl
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from starlette.responses import Response

from marketpipe.api.answer import Loaded, answer
from marketpipe.api.formats import MEDIA, bars_body, bars_json, json_body, negotiate
from marketpipe.api.state import AppState, StateDep
from marketpipe.cache import make_key, ttl_for
from marketpipe.core.schema import is_crypto, normalize_symbol, normalize_symbols
from marketpipe.core.timeutil import parse_range, utcnow
from marketpipe.core.validation import validate_timeframe
from marketpipe.service.actions import parse_adjustment, parse_as_of

Fmt = Annotated[str | None, Query(description="json, csv, arrow or parquet (else the Accept header)")]
Feed = Annotated[str | None, Query(description="sip or iex (default: each provider's configured feed)")]


@dataclass(frozen=True)
class BarsQuery:
    """The query of both bars routes (one symbol in the path, or several in ``symbols``)."""

    start: str
    end: str | None
    timeframe: str
    source: str
    feed: str | None
    adjustment: str
    as_of: str | None
    limit: int
    page_token: str | None
    sort: str
    format: str | None
    accept: str | None


def bars_query(
    start: Annotated[str, Query(description="YYYY-MM-DD (New York day) or RFC-3339")],
    end: Annotated[str | None, Query()] = None,
    timeframe: Annotated[str, Query(description="1Min, 5Min, 1Hour, 1Day, …")] = "1Min",
    source: Annotated[str, Query(description="auto or a provider name")] = "auto",
    feed: Feed = None,
    adjustment: Annotated[str, Query(description="raw, split, dividend, spin-off or all (comma-combinable)")] = "raw",
    as_of: Annotated[str | None, Query(description="adjust with the actions known by this day")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    page_token: Annotated[str | None, Query()] = None,
    sort: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
    format: Fmt = None,
    accept: Annotated[str | None, Header()] = None,
) -> BarsQuery:
    return BarsQuery(start, end, timeframe, source, feed, adjustment, as_of, limit, page_token, sort, format, accept)


BarsDep = Annotated[BarsQuery, Depends(bars_query)]


def v1_router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["v1"])

    async def bars(request: Request, st: AppState, symbols: list[str], single: str | None, q: BarsQuery) -> Response:
        timeframe, start, end, source, feed = q.timeframe, q.start, q.end, q.source, q.feed
        limit, page_token, sort = q.limit, q.page_token, q.sort
        tf = validate_timeframe(timeframe)
        s, e = parse_range(start, end)
        parts = parse_adjustment(q.adjustment)
        known = parse_as_of(q.as_of)
        st.data.pairs_checked(symbols, parts, known)  # pairs take no adjustment
        out = negotiate(q.format, q.accept)
        now = utcnow()
        closed = e <= st.gateway.last_close(now, symbols)
        key = make_key(
            "bars",
            single or "_multi",
            ",".join(symbols),
            str(tf),
            s.isoformat(),
            e.isoformat() if end else "",  # open-ended: "until now", one entry for its TTL
            source,
            feed or "",
            str(limit),
            page_token or "",
            sort,
            out,
            ",".join(sorted(parts)),
            known.isoformat() if known else "",
        )

        async def load() -> Loaded:
            page = await st.gateway.bars(
                symbols, tf, s, e, source=source, feed=feed, limit=limit, page_token=page_token, sort=sort
            )
            t = utcnow()
            meta = {sym: m.to_dict(t) for sym, m in page.meta.items()}
            headers = _meta_headers(page.meta, t)
            if page.next_page_token:
                headers["X-Marketpipe-Next-Page-Token"] = page.next_page_token
            frame, extra = page.frame, None
            if parts or known is not None:
                frame, info = await st.data.actions.adjust(frame, symbols, s, parts, q.adjustment, as_of=known)
                headers["X-Marketpipe-Adjustment"] = info.header()
                if (left_out := info.skipped_header()) is not None:
                    headers["X-Marketpipe-Adjustment-Skipped"] = left_out
                extra = {"adjustment": info.to_dict()}
            if out == "json":
                body = bars_json(
                    frame, single=single, timeframe=str(tf), next_token=page.next_page_token, meta=meta, extra=extra
                )
            else:
                body = bars_body(frame, out)
            ttl = ttl_for(
                "bars", market_open=st.gateway.is_market_hours(t, symbols), range_closed=closed, config=st.config.cache
            )
            return body, MEDIA[out], headers, 0.0 if page.partial else ttl  # never keep a partial answer

        return await answer(request, st, key, "bars", load)

    @r.get("/bars/{symbol:path}", summary="Bars for one symbol")  # path: a pair's slash (BTC/USD, BTC%2FUSD)
    async def bars_one(
        request: Request,
        st: StateDep,
        symbol: Annotated[str, Path(description="e.g. AAPL, BRK.B, BTC/USD")],
        q: BarsDep,
    ) -> Response:
        sym = normalize_symbol(symbol)
        return await bars(request, st, [sym], sym, q)

    @r.get("/bars", summary="Bars for several symbols (paged across symbols, symbol then time)")
    async def bars_multi(
        request: Request,
        st: StateDep,
        symbols: Annotated[str, Query(description="comma-separated, e.g. AAPL,MSFT")],
        q: BarsDep,
    ) -> Response:
        return await bars(request, st, normalize_symbols(symbols), None, q)

    async def latest(request: Request, st: AppState, kind: str, symbol: str, feed: str | None) -> Response:
        sym = normalize_symbol(symbol)
        key = make_key(f"latest_{kind}", sym, feed or "")

        async def load() -> Loaded:
            got = await st.gateway.latest(kind, [sym], feed=feed)  # type: ignore[arg-type]
            rec = got.get(sym)
            t = utcnow()
            if rec is None:
                view: dict[str, Any] = {"symbol": sym, kind: None, "stale": False}
            else:
                view = (st.gateway.quote_view if kind == "quote" else st.gateway.trade_view)(rec, t)
                view["stale"] = False
            headers = {
                "X-Marketpipe-Source": str(view.get("source") or ""),
                "X-Marketpipe-Fetched-At": str(view.get("fetched_at") or ""),
                "X-Marketpipe-Data-Age": str(view.get("data_age_seconds") or ""),
                "X-Marketpipe-Quality-Score": str(view.get("quality_score") or ""),
            }
            ttl = ttl_for(
                f"latest_{kind}",
                market_open=st.gateway.is_market_hours(t, [sym]),
                range_closed=False,
                config=st.config.cache,
            )
            return json_body(view), MEDIA["json"], headers, ttl

        return await answer(request, st, key, f"latest_{kind}", load)

    @r.get("/quotes/{symbol:path}/latest", summary="Latest quote with spread, mid, market hours and data age")
    async def latest_quote(request: Request, st: StateDep, symbol: str, feed: Feed = None) -> Response:
        return await latest(request, st, "quote", symbol, feed)

    @r.get("/trades/{symbol:path}/latest", summary="Latest trade")
    async def latest_trade(request: Request, st: StateDep, symbol: str, feed: Feed = None) -> Response:
        return await latest(request, st, "trade", symbol, feed)

    @r.get("/snapshots", summary="Snapshots: latest trade and quote, minute, daily and previous daily bar")
    async def snapshots(
        request: Request, st: StateDep, symbols: Annotated[str, Query(description="comma-separated")], feed: Feed = None
    ) -> Response:
        syms = normalize_symbols(symbols)
        key = make_key("snapshot", syms[0] if len(syms) == 1 else "_multi", ",".join(syms), feed or "")

        async def load() -> Loaded:
            snaps = await st.gateway.snapshots(syms, feed=feed)
            t = utcnow()
            doc = {
                "snapshots": {s: st.gateway.snapshot_view(v, t) | {"stale": False} for s, v in snaps.items()},
                "missing": [s for s in syms if s not in snaps],
            }
            ttl = ttl_for(
                "snapshot",
                market_open=st.gateway.is_market_hours(t, syms if all(map(is_crypto, syms)) else None),
                range_closed=False,
                config=st.config.cache,
            )
            return json_body(doc), MEDIA["json"], {}, ttl

        return await answer(request, st, key, "snapshot", load)

    @r.get("/quality/{symbol:path}", summary="Completeness, anomalies and quality score of stored bars")
    async def quality(
        st: StateDep,
        symbol: str,
        start: Annotated[str, Query()],
        end: Annotated[str | None, Query()] = None,
        timeframe: Annotated[str, Query()] = "1Min",
    ) -> Response:
        sym = normalize_symbol(symbol)
        (res,) = await st.data.quality([sym], start, end, timeframe=timeframe)
        doc = {
            "symbol": sym,
            "timeframe": res.timeframe,
            "start": res.start.isoformat(),
            "end": res.end.isoformat(),
            "summary": res.summary,
            "days": res.days.with_columns(res.days["day"].cast(str)).to_dicts(),
            # at most 500 of each (the counts are in the summary); expressions, so the head is what is formatted
            "missing": res.completeness.ranges.head(500)
            .with_columns(pl.col("start", "end").dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
            .to_dicts()
            if res.completeness.ranges.height
            else [],
            "anomalies": res.findings.head(500)
            .with_columns(pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
            .drop("symbol")
            .to_dicts()
            if res.findings.height
            else [],
        }
        return Response(json_body(doc), media_type=MEDIA["json"])

    @r.get("/providers", summary="Provider health: state, circuit, latency, errors, rate-limit headroom")
    async def providers(st: StateDep) -> Response:
        return Response(json_body(st.gateway.datasource()["providers"]), media_type=MEDIA["json"])

    return r


def _meta_headers(meta: dict[str, Any], now: datetime) -> dict[str, str]:
    ms = list(meta.values())
    sources = sorted({s for m in ms for s in m.sources})
    fetched = max((m.fetched_at for m in ms if m.fetched_at), default=None)
    ages = [a for a in (m.data_age(now) for m in ms) if a is not None]
    scores = [m.quality_score for m in ms if m.quality_score is not None]
    return {
        "X-Marketpipe-Source": ",".join(sources),
        "X-Marketpipe-Fetched-At": fetched.isoformat() if fetched else "",
        "X-Marketpipe-Data-Age": f"{max(ages):.3f}" if ages else "",
        "X-Marketpipe-Quality-Score": f"{min(scores):.4f}" if scores else "",
        **({"X-Marketpipe-Stale": "true"} if any(m.stale for m in ms) else {}),
    }
