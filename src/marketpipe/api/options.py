"""Options on the gateway: the Alpaca-compatible ``/v1beta1/options/...`` routes (and the Trading API's
``/v2/options/contracts``), so alpaca-py's ``OptionHistoricalDataClient`` and ``TradingClient`` work
unchanged with ``url_override`` pointed here, and marketpipe's own ``/v1/options/...``.

Everything is fetched through :class:`marketpipe.service.options.OptionsData` (checked, failing rows
quarantined) and cached by market status like stocks. The compatible routes write the vendor's shapes
(:mod:`marketpipe.wire.alpaca_options`): a contract without the vendor's greeks or IV has no ``greeks`` /
``impliedVolatility`` member, exactly as the vendor omits them. The ``/v1`` routes write every column of
the canonical frame: greeks null with ``greeks_missing`` naming why, and ``source`` and ``feed`` on every
row. The gateway pages what the service fetched with tokens of its own (opaque, base64).
"""

from __future__ import annotations

import base64
import binascii
import time
from datetime import datetime
from typing import Annotated, Any

import orjson
import polars as pl
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from marketpipe.api.alpaca import JSON, _range, attribution
from marketpipe.api.answer import Loaded, answer
from marketpipe.api.formats import MEDIA
from marketpipe.api.state import AppState, StateDep
from marketpipe.cache import make_key, ttl_for
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.options import parse_occs
from marketpipe.core.schema import normalize_symbol, normalize_symbols
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.core.validation import validate_limit, validate_timeframe
from marketpipe.wire.alpaca_options import (
    BARS_DEFAULT_LIMIT,
    BARS_MAX_LIMIT,
    CONTRACTS_DEFAULT_LIMIT,
    CONTRACTS_MAX_LIMIT,
    MAX_SYMBOLS,
    OPTION_CONDITIONS,
    OPTION_EXCHANGES,
    SNAPSHOT_DEFAULT_LIMIT,
    SNAPSHOT_MAX_LIMIT,
    contract_objs,
    snapshot_objs,
    trade_rows,
)
from marketpipe.wire.alpaca_rest import page_json

Q = Annotated[str | None, Query()]
MEMO_ENTRIES = 32


class _Memo:
    """The last fetched frames by request (without its page token), for the few seconds a client pages
    through them: a 3,000-contract chain read 1,000 at a time is fetched once, not once per page."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, pl.DataFrame]] = {}

    def get(self, key: str) -> pl.DataFrame | None:
        hit = self._items.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key: str, frame: pl.DataFrame, ttl: float) -> None:
        if len(self._items) >= MEMO_ENTRIES:
            now = time.monotonic()
            self._items = {k: v for k, v in self._items.items() if v[0] >= now}
            while len(self._items) >= MEMO_ENTRIES:
                self._items.pop(next(iter(self._items)))
        self._items[key] = (time.monotonic() + max(ttl, 1.0), frame)


def _tok(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _untok(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("invalid page token", details={"parameter": "page_token"}) from None


def _contracts(symbols: str | None) -> list[str]:
    if not symbols:
        raise InvalidArgument("missing symbols", details={"parameter": "symbols"})
    occs = parse_occs(symbols)
    if len(occs) > MAX_SYMBOLS:
        raise InvalidArgument(f"too many symbols: at most {MAX_SYMBOLS}", details={"parameter": "symbols"})
    return [o.symbol for o in occs]


def _float(raw: str | None, name: str) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(f"invalid {name}", details={"parameter": name}) from None


def _page_rows(frame: pl.DataFrame, key_col: str, limit: int, token: str | None) -> tuple[pl.DataFrame, str | None]:
    """The rows after the token's key (``frame`` sorted by ``key_col``), at most ``limit``, and the next token."""
    if token:
        frame = frame.filter(pl.col(key_col) > _untok(token))
    page = frame.head(limit)
    nxt = _tok(str(page[key_col][-1])) if frame.height > limit else None
    return page, nxt


def _headers(frame: pl.DataFrame, now: datetime) -> dict[str, str]:
    srcs = frame["source"].unique().to_list() if frame.height else []
    fetched = [frame["fetched_at"].max()] if frame.height else []
    newest: list[Any] = []
    for col in ("quote_ts", "trade_ts", "ts"):
        if col in frame.columns and frame.height:
            newest.append(frame[col].max())
    h = attribution(srcs, fetched, newest, now)  # type: ignore[arg-type]
    if "feed" in frame.columns and frame.height:
        h["X-Marketpipe-Feed"] = ",".join(sorted(str(f) for f in frame["feed"].unique().to_list() if f))
    return h


def _ttl(st: AppState, kind: str, now: datetime, range_closed: bool = False) -> float:
    return ttl_for(kind, market_open=st.gateway.is_market_hours(now), range_closed=range_closed, config=st.config.cache)


def _v1_rows(frame: pl.DataFrame) -> bytes:
    """Every column of the canonical frame, row by row (times RFC-3339 UTC, dates YYYY-MM-DD)."""
    return orjson.dumps(frame.to_dicts(), option=orjson.OPT_NAIVE_UTC)


def options_router() -> APIRouter:
    r = APIRouter(tags=["options"])
    memo = _Memo()

    async def chain_frame(st: AppState, und: str, params: dict[str, Any], feed: str | None) -> pl.DataFrame:
        key = orjson.dumps({"u": und, "f": feed, **params}).decode()
        frame = memo.get(key)
        if frame is None:
            frame = (await st.data.options.chain(und, feed=feed, **params)).sort("contract")
            memo.put(key, frame, _ttl(st, "snapshots", utcnow()))
        return frame

    def chain_params(
        type: str | None,
        strike_price_gte: str | None,
        strike_price_lte: str | None,
        expiration_date: str | None,
        expiration_date_gte: str | None,
        expiration_date_lte: str | None,
        root_symbol: str | None,
    ) -> dict[str, Any]:
        return {
            "type": type or None,
            "strike_gte": _float(strike_price_gte, "strike_price_gte"),
            "strike_lte": _float(strike_price_lte, "strike_price_lte"),
            "expiration": expiration_date or None,
            "expiration_gte": expiration_date_gte or None,
            "expiration_lte": expiration_date_lte or None,
            "root": root_symbol or None,
        }

    # --- Alpaca-compatible -------------------------------------------------------------------------------

    @r.get("/v1beta1/options/snapshots/{underlying_symbol}", summary="Option chain (Alpaca-compatible)")
    async def chain(
        request: Request,
        st: StateDep,
        underlying_symbol: Annotated[str, Path()],
        feed: Q = None,
        limit: Q = None,
        page_token: Q = None,
        type: Q = None,
        strike_price_gte: Q = None,
        strike_price_lte: Q = None,
        expiration_date: Q = None,
        expiration_date_gte: Q = None,
        expiration_date_lte: Q = None,
        root_symbol: Q = None,
        updated_since: Q = None,
    ) -> Response:
        und = normalize_symbol(underlying_symbol)
        params = chain_params(
            type,
            strike_price_gte,
            strike_price_lte,
            expiration_date,
            expiration_date_gte,
            expiration_date_lte,
            root_symbol,
        )
        if updated_since:
            params["updated_since"] = updated_since
        n = validate_limit(limit or SNAPSHOT_DEFAULT_LIMIT, 1, SNAPSHOT_MAX_LIMIT, message="invalid limit")
        key = make_key("snapshots", und, feed or "", str(n), page_token or "", orjson.dumps(params).decode())

        async def load() -> Loaded:
            frame = await chain_frame(st, und, params, feed)
            page, nxt = _page_rows(frame, "contract", n, page_token)
            now = utcnow()
            body = orjson.dumps({"snapshots": snapshot_objs(page), "next_page_token": nxt})
            return body, JSON, _headers(page, now), _ttl(st, "snapshots", now)

        return await answer(request, st, key, "snapshots", load)

    @r.get("/v1beta1/options/snapshots", summary="Option snapshots by contract (Alpaca-compatible)")
    async def snapshots(
        request: Request, st: StateDep, symbols: Q = None, feed: Q = None, limit: Q = None, page_token: Q = None
    ) -> Response:
        contracts = _contracts(symbols)
        n = validate_limit(limit or SNAPSHOT_DEFAULT_LIMIT, 1, SNAPSHOT_MAX_LIMIT, message="invalid limit")
        key = make_key("snapshots", "OPTIONS", ",".join(contracts), feed or "", str(n), page_token or "")

        async def load() -> Loaded:
            frame = (await st.data.options.snapshots(contracts, feed=feed)).sort("contract")
            page, nxt = _page_rows(frame, "contract", n, page_token)
            now = utcnow()
            body = orjson.dumps({"snapshots": snapshot_objs(page), "next_page_token": nxt})
            return body, JSON, _headers(page, now), _ttl(st, "snapshots", now)

        return await answer(request, st, key, "snapshots", load)

    def latest_route(kind: str, member: str) -> None:
        cache_kind = "latest_quote" if kind == "quotes" else "latest_trade"

        @r.get(f"/v1beta1/options/{kind}/latest", summary=f"Latest option {kind} (Alpaca-compatible)")
        async def latest(request: Request, st: StateDep, symbols: Q = None, feed: Q = None) -> Response:
            contracts = _contracts(symbols)
            key = make_key(cache_kind, "OPTIONS", ",".join(contracts), feed or "")

            async def load() -> Loaded:
                svc = st.data.options
                fetch = svc.latest_quotes if kind == "quotes" else svc.latest_trades
                frame = await fetch(contracts, feed=feed)
                objs = snapshot_objs(frame)
                now = utcnow()
                body = orjson.dumps({kind: {c: o[member] for c, o in objs.items() if member in o}})
                return body, JSON, _headers(frame, now), _ttl(st, cache_kind, now)

            return await answer(request, st, key, cache_kind, load)

    latest_route("quotes", "latestQuote")
    latest_route("trades", "latestTrade")

    def history_route(kind: str) -> None:
        @r.get(f"/v1beta1/options/{kind}", summary=f"Historical option {kind} (Alpaca-compatible)")
        async def history(
            request: Request,
            st: StateDep,
            symbols: Q = None,
            timeframe: Q = None,
            start: Q = None,
            end: Q = None,
            limit: Q = None,
            page_token: Q = None,
            sort: Q = None,
        ) -> Response:
            contracts = _contracts(symbols)
            tf: Timeframe | None = (
                validate_timeframe(timeframe, message="invalid timeframe") if kind == "bars" else None
            )
            s, e = _range(start, end, tf)
            n = validate_limit(limit or BARS_DEFAULT_LIMIT, 1, BARS_MAX_LIMIT, message="invalid limit")
            desc = (sort or "asc") == "desc"
            if sort not in (None, "", "asc", "desc"):
                raise InvalidArgument("invalid sort", details={"parameter": "sort"})
            parts = (
                ",".join(contracts),
                str(tf or ""),
                s.isoformat(),
                e.isoformat(),
                str(n),
                page_token or "",
                str(desc),
            )
            key = make_key(kind, "OPTIONS", *parts)

            async def load() -> Loaded:
                svc = st.data.options
                if kind == "bars":
                    assert tf is not None
                    frame = await svc.bars(contracts, s, e, timeframe=str(tf))
                else:
                    frame = await svc.trades(contracts, s, e)
                frame = frame.sort(["symbol", "ts"], descending=[False, desc])
                keyed = frame.with_columns(
                    (pl.col("symbol") + "|" + pl.int_range(pl.len()).cast(pl.String).str.zfill(10)).alias("_k")
                )
                page, nxt = _page_rows(keyed, "_k", n, page_token)
                page = page.drop("_k")
                now = utcnow()
                if kind == "bars":
                    body = page_json("bars", page, None, nxt, False)
                else:
                    body = orjson.dumps({"trades": trade_rows(page) if page.height else {}, "next_page_token": nxt})
                closed = e <= st.gateway.last_close(now)
                return body, JSON, _headers(page, now), _ttl(st, kind, now, closed)

            return await answer(request, st, key, kind, load)

    history_route("bars")
    history_route("trades")

    @r.get("/v1beta1/options/meta/exchanges", summary="Option exchange codes (Alpaca-compatible)")
    async def exchanges() -> Response:
        return Response(orjson.dumps(OPTION_EXCHANGES), media_type=JSON)

    @r.get("/v1beta1/options/meta/conditions/{ticktype}", summary="Option condition codes (Alpaca-compatible)")
    async def conditions(ticktype: str) -> Response:
        if ticktype not in OPTION_CONDITIONS:
            raise InvalidArgument("invalid ticktype", details={"parameter": "ticktype"})
        return Response(orjson.dumps(OPTION_CONDITIONS[ticktype]), media_type=JSON)

    @r.get("/v2/options/contracts", summary="Option contracts with open interest (Alpaca Trading API-compatible)")
    async def contracts(
        request: Request,
        st: StateDep,
        underlying_symbols: Q = None,
        status: Q = None,
        type: Q = None,
        style: Q = None,
        strike_price_gte: Q = None,
        strike_price_lte: Q = None,
        expiration_date: Q = None,
        expiration_date_gte: Q = None,
        expiration_date_lte: Q = None,
        root_symbol: Q = None,
        limit: Q = None,
        page_token: Q = None,
    ) -> Response:
        if not underlying_symbols:
            raise InvalidArgument(
                "underlying_symbols is required by this gateway", details={"parameter": "underlying_symbols"}
            )
        unds = normalize_symbols(underlying_symbols)
        n = validate_limit(limit or CONTRACTS_DEFAULT_LIMIT, 1, CONTRACTS_MAX_LIMIT, message="invalid limit")
        kw: dict[str, Any] = {
            "status": status or "active",
            "type": type or None,
            "style": style or None,
            "strike_price_gte": _float(strike_price_gte, "strike_price_gte"),
            "strike_price_lte": _float(strike_price_lte, "strike_price_lte"),
            "expiration_date": expiration_date or None,
            "expiration_date_gte": expiration_date_gte or None,
            "expiration_date_lte": expiration_date_lte or None,
            "root_symbol": root_symbol or None,
        }
        key = make_key("reference", unds[0], ",".join(unds), str(n), page_token or "", orjson.dumps(kw).decode())

        async def load() -> Loaded:
            mkey = orjson.dumps({"contracts": unds, **kw}).decode()
            frame = memo.get(mkey)
            if frame is None:
                frame = (await st.data.options.contracts(unds, **kw)).sort("contract")
                memo.put(mkey, frame, _ttl(st, "reference", utcnow()))
            page, nxt = _page_rows(frame, "contract", n, page_token)
            now = utcnow()
            body = orjson.dumps({"option_contracts": contract_objs(page), "next_page_token": nxt})
            return body, JSON, _headers(page, now), _ttl(st, "reference", now)

        return await answer(request, st, key, "reference", load)

    # --- marketpipe's own /v1 ----------------------------------------------------------------------------------

    @r.get("/v1/options/chain/{underlying}", summary="Option chain: every canonical column, greeks null with a reason")
    async def v1_chain(
        request: Request,
        st: StateDep,
        underlying: Annotated[str, Path(description="e.g. SPY")],
        feed: Q = None,
        type: Q = None,
        strike_gte: Q = None,
        strike_lte: Q = None,
        expiration: Q = None,
        expiration_gte: Q = None,
        expiration_lte: Q = None,
        root: Q = None,
    ) -> Response:
        und = normalize_symbol(underlying)
        params = chain_params(type, strike_gte, strike_lte, expiration, expiration_gte, expiration_lte, root)
        key = make_key("snapshots", und, "v1", feed or "", orjson.dumps(params).decode())

        async def load() -> Loaded:
            frame = await chain_frame(st, und, params, feed)
            now = utcnow()
            doc = b'{"underlying":' + orjson.dumps(und) + b',"contracts":' + _v1_rows(frame) + b"}"
            return doc, MEDIA["json"], _headers(frame, now), _ttl(st, "snapshots", now)

        return await answer(request, st, key, "snapshots", load)

    def v1_rows_route(path: str, kind: str) -> None:
        cache_kind = {"snapshots": "snapshots", "quotes": "latest_quote", "trades": "latest_trade"}[kind]

        @r.get(f"/v1/options/{path}", summary=f"Option {kind} by contract (canonical rows)")
        async def rows(request: Request, st: StateDep, symbols: Annotated[str, Query()], feed: Q = None) -> Response:
            contracts = _contracts(symbols)
            key = make_key(cache_kind, "OPTIONS", "v1", ",".join(contracts), feed or "")

            async def load() -> Loaded:
                svc = st.data.options
                fetch = {"snapshots": svc.snapshots, "quotes": svc.latest_quotes, "trades": svc.latest_trades}[kind]
                frame = await fetch(contracts, feed=feed)
                now = utcnow()
                return (
                    b'{"' + kind.encode() + b'":' + _v1_rows(frame) + b"}",
                    MEDIA["json"],
                    _headers(frame, now),
                    _ttl(st, cache_kind, now),
                )

            return await answer(request, st, key, cache_kind, load)

    v1_rows_route("snapshots", "snapshots")
    v1_rows_route("quotes", "quotes")
    v1_rows_route("trades/latest", "trades")

    @r.get("/v1/options/bars", summary="Option bars (the bar schema, the contract as symbol)")
    async def v1_bars(
        request: Request,
        st: StateDep,
        symbols: Annotated[str, Query()],
        start: Annotated[str, Query()],
        end: Q = None,
        timeframe: Q = None,
    ) -> Response:
        contracts = _contracts(symbols)
        tf = validate_timeframe(timeframe or "1Min")
        s, e = _range(start, end, tf)
        key = make_key("bars", "OPTIONS", "v1", ",".join(contracts), str(tf), s.isoformat(), e.isoformat())

        async def load() -> Loaded:
            frame = await st.data.options.bars(contracts, s, e, timeframe=str(tf))
            now = utcnow()
            closed = e <= st.gateway.last_close(now)
            return (
                b'{"bars":' + _v1_rows(frame) + b"}",
                MEDIA["json"],
                _headers(frame, now),
                _ttl(st, "bars", now, closed),
            )

        return await answer(request, st, key, "bars", load)

    @r.get("/v1/options/contracts", summary="Option contracts with open interest and its date")
    async def v1_contracts(request: Request, st: StateDep, underlying: Annotated[str, Query()]) -> Response:
        unds = normalize_symbols(underlying)
        key = make_key("reference", unds[0], "v1", ",".join(unds))

        async def load() -> Loaded:
            frame = await st.data.options.contracts(unds)
            now = utcnow()
            return (
                b'{"contracts":' + _v1_rows(frame) + b"}",
                MEDIA["json"],
                _headers(frame, now),
                _ttl(st, "reference", now),
            )

        return await answer(request, st, key, "reference", load)

    return r
