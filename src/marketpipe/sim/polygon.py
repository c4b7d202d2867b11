"""Polygon.io (now Massive) stocks REST look-alike, on aiohttp. Wire format: shared/reference/market-data-apis.md §4.

Endpoints: aggregates ``/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}``, previous
close ``/v2/aggs/ticker/{ticker}/prev``, last trade ``/v2/last/trade/{ticker}``, last NBBO
``/v2/last/nbbo/{ticker}``, snapshots ``/v2/snapshot/locale/us/markets/stocks/tickers[/{ticker}]``.
Data comes from the shared :class:`SimMarket` (SIP feed), so a minute bar here is the very bar
Alpaca's face serves for the same symbol — unless a deliberate disagreement is switched on.

Where the reference leaves a choice open, the simulator does this (documented so clients can rely
on it):

* ``from``/``to`` as ``YYYY-MM-DD`` are New York days (``to`` takes in the whole day); as Unix ms
  they are inclusive and snapped outward: every bucket that overlaps ``[from, to]`` is served.
* ``limit`` counts base aggregates (minute bars under minute/hour timespans, daily bars under
  day and longer), as the vendor documents; a page holds at least one bar; above 50000 counts as
  50000. ``queryCount`` is the number of base aggregates behind the page's bars.
* Timespans ``minute hour day week month quarter year`` with the multipliers marketpipe's timeframe
  grammar has (1-59 minute, 1-23 hour, 1 day, 1 week, 1/2/3/4/6/12 month, 1 quarter, 1 year);
  ``second`` and other multipliers get 400. Weekly bars are stamped Sunday 00:00 ET (the vendor's
  week) and hold that week's sessions.
* ``next_url`` is absolute, on the host the request came to, has the next bar's start as ``from``
  (ascending) or ``to`` (descending), and ``cursor`` = unpadded base64url of
  ``adjusted=..&limit=..&sort=..``. It never carries the API key. (The ``token_loop`` fault makes it
  point back at the request's own cursor: see sim/faults.py.)
* Plans (``keys`` maps API key -> plan): ``unlimited`` real time, status ``OK``; ``delayed`` data up
  to 15 minutes ago, status ``DELAYED``; ``free`` 5 requests/minute, aggregates through the previous
  New York day only, status ``DELAYED``, and 403 ``NOT_AUTHORIZED`` on last trade, NBBO and snapshots.
* Unknown tickers (tickers are case-sensitive, so ``aapl`` is unknown): aggregates and prev answer
  status ``OK``, ``resultsCount`` 0 and no ``results`` key; last trade/NBBO and the single snapshot
  404 ``NOT_FOUND``; the multi snapshot leaves them out. The multi snapshot needs ``tickers=``
  (the simulator has no ticker universe).
* Faults as in :class:`~marketpipe.sim.alpaca.AlpacaFace`, with Polygon's bodies: ``http_500`` the
  JSON ``ERROR`` body; a 429 from the plan quota the reference's JSON body, the ``rate_limit``
  fault the empty body the vendor sometimes sends. No rate-limit headers (Polygon documents none).
* Deliberate disagreement with the other faces (constructor options, also settable at runtime):
  ``price_shift_pct`` scales every price served, ``volume_ratio`` scales bar volume and trade count
  (an IEX-like partial tape), ``missing_days`` drops those New York sessions from aggregates and
  previous close.
* Exchange ids, tapes and condition ids are Polygon's numeric codes (``/v3/reference/exchanges``).
* Every response carries ``X-Marketpipe-Sim: 1``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np
import orjson
from aiohttp import web

from marketpipe.core.errors import InvalidTimeframe
from marketpipe.core.timeframe import DAY1, MIN1, Timeframe, Unit
from marketpipe.core.timeutil import NY
from marketpipe.sim import polygon_actions
from marketpipe.sim.admin import Handler, Stats
from marketpipe.sim.alpaca import DEFAULT_KEYS as ALPACA_DEFAULT_KEYS
from marketpipe.sim.alpaca import MAINTENANCE_200, SIM_HEADER, json_response
from marketpipe.sim.data import (
    NS_PER_DAY,
    NS_PER_SEC,
    BarArrays,
    SimMarket,
    aggregate,
    ny_midnight_ns,
    parse_rfc3339_ns,
)
from marketpipe.sim.faults import FaultRule, Faults, RunLookup, apply_defect, corrupt_bars, first_bars, utc_stamp
from marketpipe.sim.vendor import TOKEN_LOOP, Face, VendorBodies, apply_faults, rows_to_corrupt, truncate_if_asked
from marketpipe.wire.alpaca_rest import QUOTE_SHARES_FROM as ALPACA_SHARES_FROM
from marketpipe.wire.alpaca_rest import ROUND_LOT as ALPACA_ROUND_LOT
from marketpipe.wire.polygon import (
    AGGS_ROUTE,
    DELAY,
    DELAYED,
    LAST_NBBO_ROUTE,
    LAST_TRADE_ROUTE,
    MAX_LIMIT,
    OK,
    PREV_ROUTE,
    SNAPSHOT_ROUTE,
    SNAPSHOTS_PATH,
    aggs_path,
    error_body,
    inverse,
    quote_lot,
)
from marketpipe.wire.polygon import EXCHANGES as POLYGON_EXCHANGES
from marketpipe.wire.polygon import QUOTE_CONDITIONS as POLYGON_QUOTE_CONDITIONS
from marketpipe.wire.polygon import TAPES as POLYGON_TAPES
from marketpipe.wire.polygon import TRADE_CONDITIONS as POLYGON_TRADE_CONDITIONS

PLANS = ("unlimited", "delayed", "free")
DEFAULT_KEYS: dict[str, str] = {"POLYKEY": "unlimited", "POLYDELAYED": "delayed", "POLYFREE": "free"}
FREE_PER_MIN = 5
DELAY_NS = int(DELAY.total_seconds()) * NS_PER_SEC
DEFAULT_LIMIT = 5_000
NS_PER_MS = 1_000_000

MISSING_KEY = "API Key was not provided"
UNKNOWN_KEY = "Unknown API Key"
TOO_MANY = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your subscription to continue. "
    "https://polygon.io/pricing"
)
NOT_ENTITLED = "You are not entitled to this data. Please upgrade your plan at https://polygon.io/pricing"
BAD_TIME = "Could not parse the time parameter: '{}'. Use YYYY-MM-DD or Unix MS Timestamps"

# Letters to Polygon's ids; Nasdaq International ("T") reports as Nasdaq (12) there.
EXCHANGE_IDS = {**inverse(POLYGON_EXCHANGES), "T": 12}
TAPE_IDS = inverse(POLYGON_TAPES)
TRADE_CONDITION_IDS = inverse(POLYGON_TRADE_CONDITIONS)
QUOTE_CONDITION_IDS = inverse(POLYGON_QUOTE_CONDITIONS)
ALPACA_SHARES_FROM_NS = int(ALPACA_SHARES_FROM.timestamp()) * NS_PER_SEC

TIMESPANS = ("second", "minute", "hour", "day", "week", "month", "quarter", "year")
_SPAN_UNITS = {"minute": (Unit.MINUTE, 1), "hour": (Unit.HOUR, 1), "day": (Unit.DAY, 1), "week": (Unit.WEEK, 1),
               "month": (Unit.MONTH, 1), "quarter": (Unit.MONTH, 3), "year": (Unit.MONTH, 12)}  # fmt: skip
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MS = re.compile(r"^\d{1,15}$")
_CURSOR_KEYS = frozenset({"adjusted", "limit", "sort"})
_BAR_KEYS = ("v", "vw", "o", "c", "h", "l", "t", "n")


class PolygonError(Exception):
    """A request the vendor answers with an error body: ``ERROR`` bodies say ``error``, the others
    (``NOT_AUTHORIZED``, ``NOT_FOUND``) say ``message`` — the vendor's own inconsistency."""

    def __init__(self, status: int, text: str, kind: str = "ERROR") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.kind = kind


def _ny_date(ns: int) -> date:
    return datetime.fromtimestamp(ns // NS_PER_SEC, UTC).astimezone(NY).date()


def _midnight_date(ns: int) -> date:
    """The New York date of a New York midnight stamp (its UTC date 12 hours later)."""
    return datetime.fromtimestamp(ns // NS_PER_SEC + 12 * 3600, UTC).date()


def _add_months(d: date, months: int) -> date:
    m = d.month - 1 + months
    return date(d.year + m // 12, m % 12 + 1, 1)


def _next_bucket(day: date, tf: Timeframe) -> date:
    """First day of the daily-or-longer bucket after the one starting on ``day``."""
    if tf.unit is Unit.DAY:
        return day + timedelta(days=1)
    if tf.unit is Unit.WEEK:
        return day + timedelta(days=7)
    return _add_months(day, tf.amount)


def timeframe_of(multiplier: str, timespan: str) -> Timeframe:
    if not multiplier.isdigit() or int(multiplier) < 1:
        raise PolygonError(400, f"multiplier must be a positive integer, got '{multiplier}'")
    if timespan not in TIMESPANS:
        raise PolygonError(400, f"timespan must be one of {', '.join(TIMESPANS)}, got '{timespan}'")
    if timespan == "second":
        raise PolygonError(400, "the simulator has no second aggregates")
    unit, scale = _SPAN_UNITS[timespan]
    try:
        return Timeframe.parse(f"{int(multiplier) * scale}{unit.value}")
    except InvalidTimeframe as exc:
        raise PolygonError(400, f"the simulator has no {multiplier}-{timespan} aggregates") from exc


def encode_cursor(adjusted: bool, limit: int, sort: str) -> str:
    raw = urlencode({"adjusted": str(adjusted).lower(), "limit": limit, "sort": sort}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        fields = dict(parse_qsl(raw, strict_parsing=True))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise PolygonError(400, "invalid cursor") from exc
    if not fields or not set(fields) <= _CURSOR_KEYS:
        raise PolygonError(400, "invalid cursor")
    return fields


# --- the series the face serves --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Series:
    """Bars in the vendor's stamps (``t`` ns), their bucket ends, and how many base aggregates
    (minute or daily bars) each one is built from."""

    bars: dict[str, np.ndarray]
    ends: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.bars["t"])

    def take(self, sel: slice | np.ndarray) -> Series:
        return Series({k: v[sel] for k, v in self.bars.items()}, self.ends[sel], self.counts[sel])


def _empty_series() -> Series:
    return Series(BarArrays.empty().frame(), np.empty(0, np.int64), np.empty(0, np.int64))


# --- the face --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Client:
    key: str
    plan: str


CLIENT = web.RequestKey("polygon_client", Client)
REQUEST_ID = web.RequestKey("polygon_request_id", str)


class PolygonFace(Face):
    """Routes and middleware for the Polygon stock endpoints. The disagreement attributes
    (``price_shift_pct``, ``volume_ratio``, ``missing_days``) may be changed while serving."""

    def __init__(
        self,
        market: SimMarket,
        faults: Faults,
        keys: Mapping[str, str],
        stats: Stats,
        *,
        clock: Callable[[], float] = time.time,
        price_shift_pct: float = 0.0,
        volume_ratio: float = 1.0,
        missing_days: Iterable[date] = (),
    ) -> None:
        for key, plan in keys.items():
            if plan not in PLANS:
                raise ValueError(f"key {key!r}: plan must be one of {', '.join(PLANS)}")
        if volume_ratio <= 0:
            raise ValueError("volume_ratio must be > 0")
        super().__init__(market, faults, stats, clock)
        self.keys = dict(keys)
        self.price_shift_pct = price_shift_pct
        self.volume_ratio = volume_ratio
        self.missing_days: set[date] = set(missing_days)

    # --- app ---------------------------------------------------------------------------------------
    def _routes(self, r: web.UrlDispatcher) -> None:
        r.add_get(AGGS_ROUTE, self._aggs)
        r.add_get(PREV_ROUTE, self._prev)
        r.add_get(LAST_TRADE_ROUTE, self._last_trade)
        r.add_get(LAST_NBBO_ROUTE, self._last_nbbo)
        r.add_get(SNAPSHOTS_PATH, self._snapshots)
        r.add_get(SNAPSHOT_ROUTE, self._snapshot)
        for path in polygon_actions.ROUTES:
            r.add_get(path, self._actions)

    async def _serve(self, request: web.Request, handler: Handler) -> tuple[web.StreamResponse, str]:
        request_id = uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        unmatched = request.match_info.http_exception
        resp: web.StreamResponse
        if unmatched is not None and not request.path.startswith("/v2/"):
            # outside the API's URL space: no authentication or rate limit applies
            resp, label = json_response(error_body("NOT_FOUND", "Route not found", request_id), 404), "404"
        else:
            resp, label = await self._data(request, handler, request_id)
        resp.headers[SIM_HEADER] = "1"
        return resp, label

    def _authenticate(self, request: web.Request) -> Client | PolygonError:
        key = request.query.get("apiKey")
        if not key:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            key = value.strip() if scheme.lower() == "bearer" else ""
        if not key:
            return PolygonError(401, MISSING_KEY)
        plan = self.keys.get(key)
        if plan is None:
            return PolygonError(401, UNKNOWN_KEY)
        return Client(key, plan)

    async def _data(self, request: web.Request, handler: Handler, request_id: str) -> tuple[web.StreamResponse, str]:
        client = self._authenticate(request)
        if isinstance(client, PolygonError):
            return json_response(error_body(client.kind, client.text, request_id), client.status), str(client.status)
        request[CLIENT] = client
        override = self.faults.rate_limit_per_min
        limit = override if override is not None else (FREE_PER_MIN if client.plan == "free" else None)
        if limit is not None and not self.limits.hit(client.key, limit).allowed:
            return json_response(error_body("ERROR", TOO_MANY, request_id), 429), "429"

        fault, early = await apply_faults(self.faults, request, self._bodies(request_id))
        if early is not None:
            return early
        try:
            resp = await handler(request)
        except PolygonError as exc:
            resp = json_response(error_body(exc.kind, exc.text, request_id), exc.status)
        except web.HTTPException as exc:  # unknown /v2 route, after auth like the vendor
            resp = json_response(error_body("NOT_FOUND", "Route not found", request_id), exc.status)
        resp = truncate_if_asked(fault, resp)
        body = rows_to_corrupt(fault, resp)
        if fault is not None and body is not None and "multiplier" in request.match_info:
            resp = json_response(self._corrupt(orjson.loads(body), fault, request))
        return resp, str(resp.status)

    @staticmethod
    def _bodies(request_id: str) -> VendorBodies:
        return VendorBodies(
            server_error=lambda: json_response(error_body("ERROR", "Internal server error", request_id), 500),
            too_many=lambda fault: web.Response(status=429),  # Polygon's 429 sometimes has no body at all
            outage_200=MAINTENANCE_200,
            page_key=lambda request: "results",
        )

    def _corrupt(self, doc: dict[str, Any], fault: FaultRule, request: web.Request) -> dict[str, Any]:
        """``invalid_rows`` and ``bad_data`` through the shared functions, which work on Alpaca's
        RFC-3339 stamps."""
        rows = doc.get("results")
        if not isinstance(rows, list) or not rows:
            return doc
        for row in rows:
            row["t"] = utc_stamp(row["t"] * NS_PER_MS)
        alpaca = {"bars": rows, "symbol": doc.get("ticker", "")}
        if fault.kind == "invalid_rows":
            corrupt_bars(alpaca, fault, self.faults.seed)
        else:
            apply_defect(alpaca, fault, self.faults.seed, self._run_lookup(request))
            for row in rows:
                row["v"] = float(row["v"])  # the vendor's volumes are JSON floats
        for row in rows:
            row["t"] = parse_rfc3339_ns(row["t"])[0] // NS_PER_MS
        doc["resultsCount"] = doc["count"] = len(rows)
        if not rows:  # every bar dropped: the vendor's shape for a page without bars
            del doc["results"]
        return doc

    def _run_lookup(self, request: web.Request) -> RunLookup:
        """``bad_data`` ``frozen`` runs in the request's aggregate size, as this face serves them."""
        m = request.match_info
        tf = timeframe_of(m["multiplier"], m["timespan"])
        horizon = self._horizon(self._client(request).plan)

        def fetch(ticker: str, lo: int, hi: int) -> list[dict[str, Any]]:
            s = self.series(ticker, tf, lo, hi - 1, horizon)
            rows = self._bar_rows(s.take(s.bars["t"] >= lo).bars)
            for row in rows:
                row["t"] = utc_stamp(row["t"] * NS_PER_MS)
            return rows

        def lookup(ticker: str, start_ns: int, n: int) -> list[dict[str, Any]]:
            span = (n + 1) * tf.seconds * NS_PER_SEC + 4 * NS_PER_DAY  # a long weekend in between
            return first_bars(lambda lo, hi: fetch(ticker, lo, hi), start_ns, n, span, horizon)

        return lookup

    # --- plans ---------------------------------------------------------------------------------------
    @staticmethod
    def _client(request: web.Request) -> Client:
        client: Client = request[CLIENT]  # set by the middleware, which lets only known keys through
        return client

    def _horizon(self, plan: str) -> int:
        """Nothing at or after this instant exists for the plan."""
        now = self.now_ns()
        if plan == "unlimited":
            return now
        if plan == "delayed":
            return now - DELAY_NS
        return min(now - DELAY_NS, ny_midnight_ns(_ny_date(now)))

    @staticmethod
    def _status(plan: str) -> str:
        return OK if plan == "unlimited" else DELAYED

    def _entitled(self, request: web.Request) -> Client:
        client = self._client(request)
        if client.plan == "free":
            raise PolygonError(403, NOT_ENTITLED, "NOT_AUTHORIZED")
        return client

    # --- disagreement ------------------------------------------------------------------------------
    def _price(self, p: float) -> float:
        return round(p * (1 + self.price_shift_pct / 100), 4) if self.price_shift_pct else p

    def _shifted(self, bars: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(bars)
        if self.price_shift_pct:
            f = 1 + self.price_shift_pct / 100
            for k in ("o", "h", "l", "c", "vw"):
                out[k] = np.round(bars[k] * f, 4)
        if self.volume_ratio != 1.0:
            for k in ("v", "n"):
                out[k] = np.maximum(np.round(bars[k] * self.volume_ratio), 1).astype(np.int64)
        return out

    def _drop_missing(self, bars: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.missing_days or len(bars["t"]) == 0:
            return bars
        keep = np.ones(len(bars["t"]), dtype=bool)
        for d in self.missing_days:
            keep &= ~((bars["t"] >= ny_midnight_ns(d)) & (bars["t"] < ny_midnight_ns(d + timedelta(days=1))))
        return {k: v[keep] for k, v in bars.items()}

    # --- series ------------------------------------------------------------------------------------
    @staticmethod
    def _ends(t: np.ndarray, tf: Timeframe) -> np.ndarray:
        """Bucket ends of bars in the market's stamps (weeks on Mondays)."""
        if tf.is_intraday:
            return t + tf.seconds * NS_PER_SEC
        return np.array([ny_midnight_ns(_next_bucket(_midnight_date(x), tf)) for x in t.tolist()], dtype=np.int64)

    def series(
        self, ticker: str, tf: Timeframe, start_ns: int, end_ns: int, horizon: int, adjusted: bool = False
    ) -> Series:
        """Bars overlapping ``[start_ns, end_ns]`` as this face serves them (disagreements applied);
        ``adjusted``: split-adjusted, as the vendor's ``adjusted=true`` (splits only)."""
        adj = "split" if adjusted else "raw"
        if not self.market.has_data(ticker) or end_ns < start_ns:
            return _empty_series()
        # Back far enough that a bucket starting before the range but reaching into it is found
        # (tf.seconds is an upper bound on a bucket's length; a day more covers DST and Sunday weeks).
        lookback = tf.seconds * NS_PER_SEC + (0 if tf.is_intraday else NS_PER_DAY)
        lo, hi = start_ns - lookback, end_ns + (0 if tf.is_intraday else 2 * NS_PER_DAY)
        bars = self.market.bars_frame(ticker, tf, lo, hi, "sip", now=horizon, adjustment=adj, vendor="polygon")
        if len(bars["t"]) == 0:
            return _empty_series()
        ends = self._ends(bars["t"], tf)
        base_tf = MIN1 if tf.is_intraday else DAY1
        base = (
            bars
            if tf == base_tf
            else self.market.bars_frame(
                ticker, base_tf, lo, int(ends[-1]) - 1, now=horizon, adjustment=adj, vendor="polygon"
            )
        )
        if self.missing_days:
            base = self._drop_missing(base)
            rebuild = tf.unit in (Unit.WEEK, Unit.MONTH)
            bars = self._rebuild(base, bars["t"]) if rebuild else self._drop_missing(bars)
            ends = self._ends(bars["t"], tf)
        counts = np.searchsorted(base["t"], ends, "left") - np.searchsorted(base["t"], bars["t"], "left")
        t, pends = bars["t"], ends
        if tf.unit is Unit.WEEK:  # the vendor's week starts on Sunday
            t = np.array([ny_midnight_ns(_midnight_date(x) - timedelta(days=1)) for x in t.tolist()], dtype=np.int64)
            pends = np.array([ny_midnight_ns(_midnight_date(x) + timedelta(days=7)) for x in t.tolist()], np.int64)
        keep = (t <= end_ns) & (pends > start_ns)
        served = self._shifted({**bars, "t": t})
        return Series(served, pends, counts).take(keep)

    @staticmethod
    def _rebuild(daily: dict[str, np.ndarray], stamps: np.ndarray) -> dict[str, np.ndarray]:
        """Week/month bars again from the daily bars that are left, in the same buckets."""
        if len(daily["t"]) == 0:
            return daily
        keys = stamps[np.maximum(np.searchsorted(stamps, daily["t"], side="right") - 1, 0)]
        v = daily["v"].astype(np.int64)
        b = BarArrays(daily["t"], daily["o"], daily["h"], daily["l"], daily["c"], v, daily["n"], daily["vw"] * v, v)
        return aggregate(b, keys).frame()

    # --- aggregates --------------------------------------------------------------------------------
    @staticmethod
    def _edge(text: str, name: str, *, upper: bool) -> int:
        if _MS.match(text):
            return int(text) * NS_PER_MS + ((NS_PER_MS - 1) if upper else 0)
        if _DATE.match(text):
            try:
                d = date.fromisoformat(text)
            except ValueError:
                raise PolygonError(400, BAD_TIME.format(name)) from None
            return ny_midnight_ns(d + timedelta(days=1)) - 1 if upper else ny_midnight_ns(d)
        raise PolygonError(400, BAD_TIME.format(name))

    @staticmethod
    def _options(q: Mapping[str, str]) -> tuple[bool, int, str]:
        adjusted = q.get("adjusted", "true").lower()
        if adjusted not in ("true", "false"):
            raise PolygonError(400, "adjusted must be true or false")
        raw_limit = q.get("limit", "")
        if raw_limit == "":
            limit = DEFAULT_LIMIT
        elif raw_limit.isdigit() and int(raw_limit) >= 1:
            limit = min(int(raw_limit), MAX_LIMIT)
        else:
            raise PolygonError(400, "limit must be a positive integer")
        sort = q.get("sort", "") or "asc"
        if sort not in ("asc", "desc"):
            raise PolygonError(400, "sort must be asc or desc")
        return adjusted == "true", limit, sort

    async def _aggs(self, request: web.Request) -> web.Response:
        m = request.match_info
        ticker, raw_from, raw_to = m["ticker"], m["from"], m["to"]
        tf = timeframe_of(m["multiplier"], m["timespan"])
        cursor = request.query.get("cursor")
        adjusted, limit, sort = self._options(decode_cursor(cursor) if cursor else request.query)
        start_ns = self._edge(raw_from, "from", upper=False)
        end_ns = self._edge(raw_to, "to", upper=True)
        client = self._client(request)
        s = self.series(ticker, tf, start_ns, end_ns, self._horizon(client.plan), adjusted)
        if sort == "desc":
            s = s.take(slice(None, None, -1))
        # A page takes whole bars while their base aggregates fit in the limit, and at least one.
        k = max(1, int(np.searchsorted(np.cumsum(s.counts), limit, side="right"))) if len(s) else 0
        page, rest = s.take(slice(0, k)), s.take(slice(k, None))
        doc: dict[str, Any] = {
            "ticker": ticker,
            "queryCount": int(page.counts.sum()),
            "resultsCount": len(page),
            "adjusted": adjusted,
        }
        if len(page):
            doc["results"] = self._bar_rows(page.bars)
        doc |= {"status": self._status(client.plan), "request_id": request[REQUEST_ID], "count": len(page)}
        origin = f"{request.scheme}://{request.host}"
        if len(rest):
            nxt = str(int(rest.bars["t"][0]) // NS_PER_MS)
            lo, hi = (nxt, raw_to) if sort == "asc" else (raw_from, nxt)
            path = aggs_path(ticker, m["multiplier"], m["timespan"], lo, hi)
            doc["next_url"] = f"{origin}{path}?cursor={encode_cursor(adjusted, limit, sort)}"
        if request.get(TOKEN_LOOP):
            # Back at the request's own cursor; a request without one gets its real next_url, or on a
            # last page one with a cursor for this same range.
            same = f"{origin}{request.path}?cursor={cursor or encode_cursor(adjusted, limit, sort)}"
            doc["next_url"] = same if cursor else doc.get("next_url", same)
        return json_response(doc)

    @staticmethod
    def _bar_rows(bars: dict[str, np.ndarray], ticker: str | None = None) -> list[dict[str, Any]]:
        cols = [
            [float(x) for x in bars["v"].tolist()],
            bars["vw"].tolist(),
            bars["o"].tolist(),
            bars["c"].tolist(),
            bars["h"].tolist(),
            bars["l"].tolist(),
            (bars["t"] // NS_PER_MS).tolist(),
            bars["n"].tolist(),
        ]
        rows = [dict(zip(_BAR_KEYS, vals, strict=True)) for vals in zip(*cols, strict=True)]
        if ticker is not None:
            rows = [{"T": ticker, **row} for row in rows]
        return rows

    async def _actions(self, request: web.Request) -> web.Response:
        origin = f"{request.scheme}://{request.host}"
        try:
            doc = polygon_actions.answer(self.market, request.path, dict(request.query), origin, self.now_ns())
        except polygon_actions.ActionsError as exc:
            raise PolygonError(400, str(exc)) from exc
        doc["request_id"] = request[REQUEST_ID]
        return json_response(doc)

    async def _prev(self, request: web.Request) -> web.Response:
        ticker = request.match_info["ticker"]
        adjusted, _, _ = self._options(request.query)
        client = self._client(request)
        horizon = self._horizon(client.plan)
        today = ny_midnight_ns(_ny_date(self.now_ns()))
        # The previous session: the last daily bar before today (New York), within a month back.
        s = self.series(ticker, DAY1, today - 31 * NS_PER_DAY, today - 1, horizon)
        s = s.take(slice(len(s) - 1, None)) if len(s) else s
        doc: dict[str, Any] = {"ticker": ticker, "queryCount": len(s), "resultsCount": len(s), "adjusted": adjusted}
        if len(s):
            doc["results"] = self._bar_rows(s.bars, ticker)
        doc |= {"status": self._status(client.plan), "request_id": request[REQUEST_ID], "count": len(s)}
        return json_response(doc)

    # --- last trade, last NBBO, snapshots ---------------------------------------------------------
    def _trade(self, w: dict[str, Any], ticker: str | None) -> dict[str, Any]:
        t = parse_rfc3339_ns(w["t"])[0]
        seq = int(w["i"])
        out: dict[str, Any] = {"T": ticker} if ticker else {}
        out |= {
            "c": [TRADE_CONDITION_IDS[c] for c in w.get("c") or () if c in TRADE_CONDITION_IDS],
            "i": str(seq),
            "p": self._price(w["p"]),
            "s": w["s"],
            "x": EXCHANGE_IDS[w["x"]],
            "t": t,
        }
        if ticker:
            # participant time a little before the SIP's, derived so it is stable per trade
            out |= {"y": t - (seq % 997 + 1) * 1000, "q": seq, "z": TAPE_IDS[w["z"]]}
        return out

    def _quote(self, w: dict[str, Any], ticker: str | None) -> dict[str, Any]:
        t = parse_rfc3339_ns(w["t"])[0]
        # The market's sizes are Alpaca's wire units; the vendor's are round lots before its switch to shares.
        alpaca_lot = ALPACA_ROUND_LOT if t < ALPACA_SHARES_FROM_NS else 1
        bid, ask = (int(w[k]) * alpaca_lot // quote_lot(t) for k in ("bs", "as"))
        out: dict[str, Any] = {"T": ticker} if ticker else {}
        out |= {"P": self._price(w["ap"]), "S": ask, "p": self._price(w["bp"]), "s": bid, "t": t}
        codes = [QUOTE_CONDITION_IDS[c] for c in w.get("c") or () if c in QUOTE_CONDITION_IDS]
        if codes:
            out["c"] = codes
        if ticker:
            seq = t // 1000 % 1_000_000_000
            out |= {
                "X": EXCHANGE_IDS[w["ax"]],
                "x": EXCHANGE_IDS[w["bx"]],
                "y": t - 1000,
                "q": seq,
                "z": TAPE_IDS[w["z"]],
            }
        return out

    def _last(self, request: web.Request, kind: str) -> web.Response:
        ticker = request.match_info["ticker"]
        client = self._entitled(request)
        horizon = self._horizon(client.plan)
        fetch = self.market.latest_trade if kind == "trade" else self.market.latest_quote
        w = fetch(ticker, "sip", horizon) if self.market.has_data(ticker) else None
        if w is None:
            raise PolygonError(404, f"Could not find {kind} for ticker: {ticker}", "NOT_FOUND")
        results = self._trade(w, ticker) if kind == "trade" else self._quote(w, ticker)
        body = {"request_id": request[REQUEST_ID], "results": results, "status": self._status(client.plan)}
        return json_response(body)

    async def _last_trade(self, request: web.Request) -> web.Response:
        return self._last(request, "trade")

    async def _last_nbbo(self, request: web.Request) -> web.Response:
        return self._last(request, "quote")

    def _bar_obj(self, w: dict[str, Any]) -> dict[str, Any]:
        """One Alpaca-shaped bar from the market as the vendor's snapshot member (``n`` included)."""
        bar = self._shifted({k: np.array([w[k]]) for k in ("o", "h", "l", "c", "v", "n", "vw")})
        return {k: (int(bar[k][0]) if k == "n" else float(bar[k][0])) for k in ("o", "h", "l", "c", "v", "n", "vw")}

    def _snapshot_of(self, ticker: str, horizon: int) -> dict[str, Any] | None:
        snap = self.market.snapshot(ticker, "sip", horizon) if self.market.has_data(ticker) else None
        if snap is None:
            return None
        out: dict[str, Any] = {"ticker": ticker, "todaysChange": 0.0, "todaysChangePerc": 0.0, "updated": 0}
        day, prev = snap.get("dailyBar"), snap.get("prevDailyBar")
        # the vendor's day/prevDay members carry no trade count
        out["day"] = {k: v for k, v in self._bar_obj(day).items() if k != "n"} if day else {}
        out["prevDay"] = {k: v for k, v in self._bar_obj(prev).items() if k != "n"} if prev else {}
        if day and prev:
            change = out["day"]["c"] - out["prevDay"]["c"]
            out["todaysChange"] = round(change, 4)
            out["todaysChangePerc"] = round(change / out["prevDay"]["c"] * 100, 4)
        if "minuteBar" in snap:
            mb = snap["minuteBar"]
            minute = self._bar_obj(mb)
            t_ms = parse_rfc3339_ns(mb["t"])[0] // NS_PER_MS
            out["min"] = {"av": out["day"].get("v", minute["v"]), "t": t_ms, **minute}
        if "latestTrade" in snap:
            out["lastTrade"] = self._trade(snap["latestTrade"], None)
        if "latestQuote" in snap:
            out["lastQuote"] = self._quote(snap["latestQuote"], None)
        out["updated"] = max(out.get("lastTrade", {}).get("t", 0), out.get("lastQuote", {}).get("t", 0))
        return out

    async def _snapshot(self, request: web.Request) -> web.Response:
        ticker = request.match_info["ticker"]
        client = self._entitled(request)
        snap = self._snapshot_of(ticker, self._horizon(client.plan))
        if snap is None:
            raise PolygonError(404, "Ticker not found.", "NOT_FOUND")
        return json_response({"status": self._status(client.plan), "request_id": request[REQUEST_ID], "ticker": snap})

    async def _snapshots(self, request: web.Request) -> web.Response:
        client = self._entitled(request)
        tickers = [t.strip() for t in request.query.get("tickers", "").split(",") if t.strip()]
        if not tickers:
            raise PolygonError(400, "tickers is required by the simulator (it has no ticker universe)")
        horizon = self._horizon(client.plan)
        snaps = [s for s in (self._snapshot_of(t, horizon) for t in dict.fromkeys(tickers)) if s is not None]
        return json_response(
            {
                "status": self._status(client.plan),
                "request_id": request[REQUEST_ID],
                "count": len(snaps),
                "tickers": snaps,
            }
        )


def _plan_keys(keys: Mapping[str, Any]) -> dict[str, str]:
    """``{key: plan}``; Alpaca-style ``{key: (secret, plan)}`` is accepted too, and the Alpaca
    defaults (what SimServer passes when no keys are given) bring Polygon's default keys along."""
    out = dict(DEFAULT_KEYS) if dict(keys) == ALPACA_DEFAULT_KEYS else {}
    for key, value in keys.items():
        out[key] = value[1] if isinstance(value, tuple) else value
    return out


def make_face(
    market: SimMarket,
    faults: Faults,
    keys: Mapping[str, Any],
    stats: Stats,
    *,
    clock: Callable[[], float] = time.time,
    price_shift_pct: float = 0.0,
    volume_ratio: float = 1.0,
    missing_days: Iterable[date] = (),
) -> PolygonFace:
    """The face ``SimServer(vendor="polygon")`` serves."""
    return PolygonFace(
        market,
        faults,
        _plan_keys(keys),
        stats,
        clock=clock,
        price_shift_pct=price_shift_pct,
        volume_ratio=volume_ratio,
        missing_days=missing_days,
    )


__all__ = ["DEFAULT_KEYS", "EXCHANGE_IDS", "PolygonFace", "make_face"]
