"""Alpaca Market Data API v2 (stocks) look-alike, on aiohttp.

Speaks the wire format of shared/reference/market-data-apis.md §1 closely enough that the official
``alpaca-py`` ``StockHistoricalDataClient(url_override=...)`` works unchanged: paths, parameters,
JSON keys and shapes, RFC-3339 timestamps, pagination tokens, error bodies and status codes,
rate-limit headers and the free plan's 15-minute SIP rule.

Where the reference leaves a choice open, the simulator does this (documented so clients can rely
on it):

* ``YYYY-MM-DD`` as ``start``/``end`` means 00:00 UTC that date. For 1Day and longer timeframes a
  date-only ``end`` includes the bar stamped on that date (NY midnight), as the reference's
  ``start=2024-03-04&end=2024-03-05`` example returns both days.
* Default ``start`` is 00:00 New York today; default ``end`` is now (now-15 min for a free key on
  ``sip``).
* ``next_page_token`` is base64 of ``SYMBOL|ts_ns`` of the last row delivered, and is null exactly
  when nothing is left (unless the ``token_loop`` fault is on: see sim/faults.py).
* Unknown-but-valid symbols: empty shapes with 200. Latest endpoints for them: the symbol is left
  out of multi answers; single answers carry ``null`` (``{"symbol": "ZZZZ", "trade": null}``).
* Every response carries ``X-Marketpipe-Sim: 1`` so clients can label the data ``source="sim"``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
from aiohttp import web

from marketpipe.core.errors import InvalidTimeframe
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import NY
from marketpipe.sim import alpaca_actions as corporate_actions
from marketpipe.sim.admin import SIM_HEADER, Handler, Stats
from marketpipe.sim.crypto import CryptoFace, CryptoMarket
from marketpipe.sim.data import NS_PER_SEC, Kind, Page, SimMarket, ny_midnight_ns, parse_rfc3339_ns, valid_symbol
from marketpipe.sim.faults import (
    BAR_PATHS,
    OPTION_SNAPSHOT_PATHS,
    FaultRule,
    Faults,
    RunLookup,
    apply_defect,
    corrupt_bars,
    corrupt_option_quotes,
)
from marketpipe.sim.vendor import (
    TOKEN_LOOP,
    Face,
    VendorBodies,
    apply_faults,
    rows_to_corrupt,
    truncate_if_asked,
)
from marketpipe.wire.alpaca_actions import PATH as ACTIONS_PATH
from marketpipe.wire.alpaca_crypto import BASE as CRYPTO_BASE
from marketpipe.wire.alpaca_rest import (
    ADJUSTMENTS,
    CONDITIONS,
    CONDITIONS_PATH,
    EXCHANGES,
    EXCHANGES_PATH,
    HISTORICAL_FEEDS,
    KINDS,
    LATEST_FEEDS,
    MAX_LIMIT,
    RECENT_SIP,
    SIP_DELAY,
    SNAPSHOTS_PATH,
    SORTS,
)

PLAN_LIMITS = {"unlimited": 10_000, "free": 200}
DEFAULT_KEYS: dict[str, tuple[str, str]] = {"SIMKEY": ("SIMSECRET", "unlimited"), "FREEKEY": ("FREESECRET", "free")}
SIP_DELAY_NS = int(SIP_DELAY.total_seconds()) * NS_PER_SEC

MAINTENANCE_200 = (
    b"<!DOCTYPE html>\n<html><head><title>Scheduled maintenance</title></head>\n<body><h1>We'll be"
    b" back soon</h1><p>The service is undergoing maintenance.</p></body></html>\n"
)

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class BadRequest(Exception):
    def __init__(self, message: str, *, status: int = 400, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return raw_json(orjson.dumps(data), status, headers)


def raw_json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, headers=headers, content_type="application/json", charset="utf-8")


def error(message: str, status: int, code: int | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if code is not None:
        body["code"] = code
    return json_response(body, status, headers)


def _route_error(exc: web.HTTPException) -> web.Response:
    return error("not found" if exc.status == 404 else exc.reason.lower(), exc.status)


# --- parameters ------------------------------------------------------------------------------------


def parse_time_ns(text: str, name: str) -> tuple[int, bool]:
    """``start``/``end`` -> (ns, date_only), or 400 ``invalid start``/``invalid end``."""
    try:
        return parse_rfc3339_ns(text)
    except ValueError as exc:
        raise BadRequest(f"invalid {name}") from exc


def parse_symbols(query: Any) -> list[str]:
    raw = query.get("symbols", "")
    symbols = [s.strip() for s in raw.split(",") if s.strip()]
    if not symbols:
        raise BadRequest("missing symbols")
    for s in symbols:
        check_symbol(s)
    return list(dict.fromkeys(symbols))


def check_symbol(symbol: str) -> None:
    if not valid_symbol(symbol):
        raise BadRequest(f"invalid symbol: {symbol}")


def parse_limit(query: Any) -> int:
    raw = query.get("limit", "")
    if raw == "":
        return 1000
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest("invalid limit")
    return int(raw)


def page_body(key: bytes, page: Page, single: str | None, nxt: bytes, currency: bytes) -> bytes:
    """The JSON of a historical page, joined in one copy from the cached row runs."""
    pieces: list[bytes | memoryview] = []
    if single is not None:
        if page.parts:
            pieces.append(b'{"' + key + b'":[')
            _runs(pieces, page.parts[0][1])
            pieces.append(b"]")
        else:
            pieces.append(b'{"' + key + b'":null')
        pieces.append(b',"symbol":' + orjson.dumps(single))
    else:
        pieces.append(b'{"' + key + b'":{')
        for n, (sym, runs) in enumerate(page.parts):
            pieces.append(b'"' + sym.encode() + b'":[' if n == 0 else b'],"' + sym.encode() + b'":[')
            _runs(pieces, runs)
        pieces.append(b"]}" if page.parts else b"}")
    pieces += [b',"next_page_token":', nxt, currency, b"}"]
    return b"".join(pieces)


def _runs(pieces: list[bytes | memoryview], runs: list[memoryview]) -> None:
    for k, run in enumerate(runs):
        if k:
            pieces.append(b",")
        pieces.append(run)


def encode_token(symbol: str, ts_ns: int) -> str:
    return base64.b64encode(f"{symbol}|{ts_ns}".encode()).decode()


def decode_token(token: str, symbols: list[str]) -> tuple[str, int]:
    try:
        sym, ts = base64.b64decode(token, validate=True).decode().split("|")
        if sym not in symbols or not ts.lstrip("-").isdigit():
            raise ValueError(token)
        return sym, int(ts)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("invalid page token") from exc


def _check_asof(query: Any) -> None:
    asof = query.get("asof", "")
    if asof in ("", "-"):
        return
    try:
        if not _DATE.match(asof):
            raise ValueError(asof)
        date.fromisoformat(asof)
    except ValueError as exc:
        raise BadRequest("invalid asof") from exc


def _adjustment(query: Any) -> str:
    """The bars ``adjustment``, validated as Alpaca does since 2026-11-02 (trap 4): one value, a
    comma list of ``raw|split|dividend|spin-off|all``; unknown, empty or repeated values are a 400.
    Absent means ``raw``."""
    values = query.getall("adjustment", [])
    if not values:
        return "raw"
    parts = [p.strip() for p in values[0].split(",")]
    if len(values) > 1 or not all(parts) or len(set(parts)) != len(parts) or not set(parts) <= set(ADJUSTMENTS):
        raise BadRequest("invalid adjustment")
    return ",".join(parts)


def _currency(query: Any) -> bytes:
    cur = query.get("currency")
    if cur is None or cur == "":
        return b""
    if cur.upper() != "USD":
        raise BadRequest(f"unsupported currency: {cur}; the simulator quotes USD only")
    return b',"currency":"USD"'


# --- the face --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Client:
    key: str
    plan: str


CLIENT = web.RequestKey("client", Client)


class AlpacaFace(Face):
    """Routes and middleware for the Alpaca v2 stock endpoints."""

    def __init__(
        self,
        market: SimMarket,
        faults: Faults,
        keys: dict[str, tuple[str, str]],
        stats: Stats,
        *,
        clock: Callable[[], float] = time.time,
        crypto: CryptoMarket | None = None,
    ) -> None:
        for key, (_, plan) in keys.items():
            if plan not in PLAN_LIMITS:
                raise ValueError(f"key {key!r}: plan must be one of {sorted(PLAN_LIMITS)}")
        super().__init__(market, faults, stats, clock)
        self.keys = dict(keys)
        # crypto (/v1beta3/crypto/...): its own around-the-clock market, same faults and limits
        self.crypto = CryptoFace(crypto if crypto is not None else CryptoMarket(), self.now_ns)

    # --- app ---------------------------------------------------------------------------------------
    def _routes(self, r: web.UrlDispatcher) -> None:
        kinds: tuple[Kind, ...] = KINDS
        for kind in kinds:
            r.add_get(f"/v2/stocks/{kind}", self._historical(kind, single=False))
            r.add_get(f"/v2/stocks/{kind}/latest", self._latest(kind, single=False))
        r.add_get(SNAPSHOTS_PATH, self._snapshots)
        r.add_get(EXCHANGES_PATH, self._exchanges)
        r.add_get(CONDITIONS_PATH, self._conditions)
        for kind in kinds:
            r.add_get(f"/v2/stocks/{{symbol}}/{kind}", self._historical(kind, single=True))
            r.add_get(f"/v2/stocks/{{symbol}}/{kind}/latest", self._latest(kind, single=True))
        r.add_get("/v2/stocks/{symbol}/snapshot", self._snapshot_single)
        r.add_get(ACTIONS_PATH, self._corporate_actions)
        self.crypto.add_routes(r)

    async def _serve(self, request: web.Request, handler: Handler) -> tuple[web.StreamResponse, str]:
        unmatched = request.match_info.http_exception
        if unmatched is not None and not request.path.startswith(("/v2/", CRYPTO_BASE)):
            # outside the API's URL space: no authentication or rate limit applies
            resp: web.StreamResponse = _route_error(unmatched)
            resp.headers[SIM_HEADER] = "1"
            return resp, str(resp.status)
        return await self._data(request, handler)

    def _authenticate(self, request: web.Request) -> Client | web.Response:
        h = request.headers
        key, secret = h.get("APCA-API-KEY-ID"), h.get("APCA-API-SECRET-KEY")
        auth = h.get("Authorization", "")
        if key is None and secret is None and auth:
            scheme, _, value = auth.partition(" ")
            value = value.strip()
            if scheme.lower() == "bearer" and value:
                # OAuth: the simulator accepts a configured key id as the token
                return Client(value, self.keys[value][1]) if value in self.keys else error("forbidden.", 403)
            if scheme.lower() == "basic" and value:
                try:
                    key, _, secret = base64.b64decode(value, validate=True).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    return error("unauthorized.", 401)
            else:
                return error("unauthorized.", 401)
        if not key or not secret:
            return error("unauthorized.", 401)
        known = self.keys.get(key)
        if known is None or known[0] != secret:
            return error("forbidden.", 403)
        return Client(key, known[1])

    async def _data(self, request: web.Request, handler: Handler) -> tuple[web.StreamResponse, str]:
        client = self._authenticate(request)
        if isinstance(client, Client):
            override = self.faults.rate_limit_per_min
            quota = self.limits.hit(client.key, override if override is not None else PLAN_LIMITS[client.plan])
        else:
            # unauthenticated callers share a per-address bucket at the free plan's rate
            quota = self.limits.hit(f"anon:{request.remote}", PLAN_LIMITS["free"])
        headers = {SIM_HEADER: "1", "X-Request-ID": uuid.uuid4().hex, **quota.headers()}

        if not isinstance(client, Client):
            if not (client.status == 401 and request.path.startswith(CRYPTO_BASE)):
                return self._finish(client, headers), str(client.status)
            # crypto market data needs no keys (sent ones are still checked)
        else:
            request[CLIENT] = client
        if not quota.allowed:
            return self._finish(error("too many requests.", 429), headers), "429"

        fault, early = await apply_faults(self.faults, request, self._bodies(headers))
        if early is not None:
            return early

        try:
            resp = await handler(request)
        except BadRequest as exc:
            resp = error(exc.message, exc.status, exc.code)
        except web.HTTPException as exc:  # unknown /v2 route or method, after auth like the vendor
            resp = _route_error(exc)

        resp = truncate_if_asked(fault, resp)
        body = rows_to_corrupt(fault, resp)
        if fault is not None and body is not None and BAR_PATHS.match(request.path):
            doc = orjson.loads(body)
            if fault.kind == "invalid_rows":
                corrupt_bars(doc, fault, self.faults.seed)
            else:
                apply_defect(doc, fault, self.faults.seed, self._run_lookup(request))
                if isinstance(doc.get("bars"), list) and not doc["bars"]:
                    doc["bars"] = None  # a single-symbol page without bars, as the vendor sends it
            resp = raw_json(orjson.dumps(doc))
        elif fault is not None and body is not None and OPTION_SNAPSHOT_PATHS.match(request.path):
            doc = orjson.loads(body)  # invalid_rows (the one row fault that matches these paths)
            corrupt_option_quotes(doc, fault, self.faults.seed)
            resp = raw_json(orjson.dumps(doc))
        return self._finish(resp, headers), str(resp.status)

    def _run_lookup(self, request: web.Request) -> RunLookup:
        """``bad_data`` ``frozen`` runs in the request's timeframe and feed (the handler has
        accepted both, as the answer is a 200)."""
        tf = Timeframe.parse(request.query.get("timeframe", ""), strict=True)
        feed = request.query.get("feed", "") or "sip"
        now = self.now_ns()

        def lookup(symbol: str, start_ns: int, n: int) -> list[dict[str, Any]]:
            page = self.market.page("bars", [symbol], start_ns, now, timeframe=tf, feed=feed, limit=n, now_ns=now)
            if not page.parts:
                return []
            rows: list[dict[str, Any]] = orjson.loads(b"[" + b",".join(bytes(r) for r in page.parts[0][1]) + b"]")
            return rows

        return lookup

    def _bodies(self, headers: dict[str, str]) -> VendorBodies:
        def too_many(fault: FaultRule) -> web.StreamResponse:
            reset = math.ceil(self.clock() + fault.reset_seconds)
            headers.update({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
            return error("too many requests.", 429)

        return VendorBodies(
            server_error=lambda: error("internal server error", 500),
            too_many=too_many,
            outage_200=MAINTENANCE_200,
            finish=lambda r: self._finish(r, headers),
            page_key=lambda request: request.path.rsplit("/", 1)[-1],  # bars, trades or quotes
        )

    @staticmethod
    def _finish(resp: web.StreamResponse, headers: dict[str, str]) -> web.StreamResponse:
        resp.headers.update(headers)
        return resp

    # --- shared parameter handling -------------------------------------------------------------------
    @staticmethod
    def _client(request: web.Request) -> Client:
        client: Client = request[CLIENT]  # set by the middleware, which lets only known keys through
        return client

    def _latest_feed(self, request: web.Request, client: Client) -> tuple[str, int]:
        """(data feed, as-of ns) for latest and snapshot endpoints."""
        feed = request.query.get("feed", "") or ("iex" if client.plan == "free" else "sip")
        if feed not in LATEST_FEEDS:
            raise BadRequest("invalid feed")
        now = self.now_ns()
        if feed == "delayed_sip":
            return "sip", now - SIP_DELAY_NS
        if feed == "sip" and client.plan == "free":
            raise BadRequest(RECENT_SIP, status=403)
        return feed, now

    # --- historical ------------------------------------------------------------------------------------
    def _historical(self, kind: Kind, *, single: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        key = kind.encode()

        async def handler(request: web.Request) -> web.Response:
            q = request.query
            client = self._client(request)
            if single:
                symbols = [request.match_info["symbol"]]
                check_symbol(symbols[0])
            else:
                symbols = parse_symbols(q)
            tf: Timeframe | None = None
            adjustment = "raw"
            if kind == "bars":
                try:
                    tf = Timeframe.parse(q.get("timeframe", ""), strict=True)
                except InvalidTimeframe as exc:
                    raise BadRequest("invalid timeframe", code=42210000) from exc
                adjustment = _adjustment(q)
            feed = q.get("feed", "") or "sip"
            if feed not in HISTORICAL_FEEDS:
                raise BadRequest("invalid feed")
            limit = parse_limit(q)
            sort = q.get("sort", "") or "asc"
            if sort not in SORTS:
                raise BadRequest("invalid sort")
            _check_asof(q)
            currency = _currency(q)
            start_ns, end_ns = self._range(q, tf, feed, client)
            token = q.get("page_token", "")
            cursor = decode_token(token, symbols) if token else None

            page = self.market.page(
                kind,
                symbols,
                start_ns,
                end_ns,
                timeframe=tf,
                feed=feed,
                limit=limit,
                desc=sort == "desc",
                cursor=cursor,
                now_ns=self.now_ns(),
                adjustment=adjustment,
                vendor="alpaca",
            )
            next_token = encode_token(*page.next_cursor) if page.next_cursor else None
            if request.get(TOKEN_LOOP):
                # The token the request carried, else the first one issued: the real next token, or
                # on a last page one that starts the query again (before the first row of the first symbol).
                restart = encode_token(min(symbols), end_ns + 1 if sort == "desc" else start_ns - 1)
                next_token = token or next_token or restart
            nxt = b'"' + next_token.encode() + b'"' if next_token else b"null"
            return raw_json(page_body(key, page, symbols[0] if single else None, nxt, currency))

        return handler

    def _range(self, q: Any, tf: Timeframe | None, feed: str, client: Client) -> tuple[int, int]:
        now = self.now_ns()
        delayed = client.plan == "free" and feed == "sip"
        raw_start, raw_end = q.get("start", ""), q.get("end", "")
        if raw_start:
            start, _ = parse_time_ns(raw_start, "start")
        else:
            today = datetime.fromtimestamp(now / NS_PER_SEC, NY).date()
            start = ny_midnight_ns(today)
            if delayed:
                start = min(start, now - SIP_DELAY_NS)
        if raw_end:
            end, date_only = parse_time_ns(raw_end, "end")
            if date_only and tf is not None and not tf.is_intraday:
                end = ny_midnight_ns(date.fromisoformat(raw_end.strip()))
            if delayed and end > now - SIP_DELAY_NS:
                raise BadRequest(RECENT_SIP, status=403)
        else:
            end = now - SIP_DELAY_NS if delayed else now
        if end < start:
            raise BadRequest("end should not be before start")
        return start, end

    # --- latest and snapshots ----------------------------------------------------------------------------
    def _latest(self, kind: Kind, *, single: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        one = kind[:-1]  # "bars" -> "bar"
        fetch = {
            "bars": self.market.latest_bar,
            "trades": self.market.latest_trade,
            "quotes": self.market.latest_quote,
        }[kind]

        async def handler(request: web.Request) -> web.Response:
            client = self._client(request)
            if single:
                symbols = [request.match_info["symbol"]]
                check_symbol(symbols[0])
            else:
                symbols = parse_symbols(request.query)
            feed, as_of = self._latest_feed(request, client)
            currency = _currency(request.query)
            found = {s: fetch(s, feed, as_of) for s in symbols} if feed in ("sip", "iex") else {}
            if single:
                body: dict[str, Any] = {"symbol": symbols[0], one: found.get(symbols[0])}
            else:
                body = {kind: {s: item for s, item in found.items() if item is not None}}
            if currency:
                body["currency"] = "USD"
            return json_response(body)

        return handler

    def _snapshot_of(self, request: web.Request, symbols: list[str]) -> dict[str, dict[str, Any]]:
        client = self._client(request)
        feed, as_of = self._latest_feed(request, client)
        _currency(request.query)
        if feed not in ("sip", "iex"):
            return {}
        snaps = {s: self.market.snapshot(s, feed, as_of) for s in symbols}
        return {s: snap for s, snap in snaps.items() if snap is not None}

    async def _snapshots(self, request: web.Request) -> web.Response:
        # No wrapper key, and no "currency" key either: it would read as a symbol.
        return json_response(self._snapshot_of(request, parse_symbols(request.query)))

    async def _snapshot_single(self, request: web.Request) -> web.Response:
        symbol = request.match_info["symbol"]
        check_symbol(symbol)
        body: dict[str, Any] = {"symbol": symbol, **self._snapshot_of(request, [symbol]).get(symbol, {})}
        if _currency(request.query):
            body["currency"] = "USD"
        return json_response(body)

    # --- meta ---------------------------------------------------------------------------------------------
    async def _corporate_actions(self, request: web.Request) -> web.Response:
        today = datetime.fromtimestamp(self.now_ns() / NS_PER_SEC, NY).date()
        try:
            return raw_json(corporate_actions.answer(self.market, request.query, today))
        except corporate_actions.ActionsBadRequest as exc:
            raise BadRequest(str(exc)) from exc

    async def _exchanges(self, request: web.Request) -> web.Response:
        return json_response(EXCHANGES)

    async def _conditions(self, request: web.Request) -> web.Response:
        ticktype = request.match_info["ticktype"]
        if ticktype not in CONDITIONS:
            raise BadRequest("invalid ticktype")
        if request.query.get("tape", "") not in ("A", "B", "C"):
            raise BadRequest("invalid tape")
        return json_response(CONDITIONS[ticktype])
