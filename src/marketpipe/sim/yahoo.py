"""Yahoo Finance chart endpoint look-alike (``GET /v8/finance/chart/{symbol}``), on aiohttp.

Speaks the wire format of shared/reference/market-data-apis.md §5 from the same :class:`SimMarket`
series the Alpaca face serves, so a symbol looks the same through both (same o/h/l/c to the cent,
same volume) unless a deliberate disagreement is switched on.

What it does, where the reference leaves a choice open:

* Intervals ``1m 2m 5m 15m 30m 60m 90m 1h 1d 1wk 1mo 3mo``; ``5d`` (and anything else) is a 400
  listing these. 1m-30m are SimMarket's own bars (its clock alignment equals Yahoo's session
  alignment for a 09:30 open); ``60m``/``1h``/``90m`` buckets start at the session open (09:30,
  10:30, ...) as Yahoo's do, aggregated from SimMarket's minute bars.
* ``period1``/``period2`` (Unix seconds, end exclusive) win over ``range``; without either the
  window is ``range=1d`` (the current or last session). ``Nd`` ranges count sessions, ``Nwk``/``Nmo``
  /``Ny`` calendar time back from now, ``ytd`` and ``max`` as named.
* Intraday lookback limits give 422: 1m only within the last 30 days and at most 7 days per
  request; 2m-30m and 90m within 60 days; 60m/1h within 730 days.
* Daily bars are stamped at the session's 09:30 New York open; weekly and monthly bars at the open
  of the first session in the week (Monday-based) or month bucket, aggregated from the daily bars.
  A daily-or-longer bar is in the answer when that stamp is in ``[period1, period2)``.
* Prices go out as float32 widened to double (``414.9200134277344``), as Yahoo's do; rounded to
  cents they are SimMarket's prices — divided by the splits after them. As the real Yahoo's, o/h/l/c
  (and vwap's notional) are **split-adjusted** with the Yahoo view of the market's actions
  (``sim/actions.py``): a bar of a day before a split is SimMarket's raw bar times old/new, its volume
  times new/old (rounded to whole shares), before any aggregation into weeks or months; ``adjclose``
  (daily and longer) is that close adjusted for dividends as well. With ``events=div,split`` (``|``
  also separates) the window's ``events.splits`` / ``events.dividends`` come along. The ``unlisted_split``
  fault has Yahoo apply a split it does not list (yfinance #2076).
* ``includePrePost`` is accepted; the simulator has regular-session data only.
* Unknown symbols (and symbols SimMarket cannot hold, e.g. ``^GSPC``) are a 404 chart error.
  No authentication: keys are ignored. ``BRK-B`` is SimMarket's ``BRK.B``.
* While a session runs, every answer with bars ends with Yahoo's "current price" point (stamped at
  ``meta.regularMarketTime``, o=h=l=c the market price, volume 0), whatever window was asked for.
* Every response carries ``X-Marketpipe-Sim: 1``.

Faults: the shared :class:`Faults` applies as on the Alpaca face; a rule's ``paths`` regex is
matched against the chart URL (e.g. ``"/chart/AAPL$"``). ``http_500``
answers with a chart error body, 502/503 with nginx HTML, ``html_200`` with Yahoo's "Will be right
back" page, ``rate_limit`` (and the ``rate_limit_per_min`` override) with 429 ``Too Many
Requests`` as plain text.

Deliberate disagreement (``make_face`` keyword arguments, also settable on the face while it runs):
``price_shift_pct`` moves every price, ``volume_ratio`` scales every volume, ``missing_days`` drops
whole sessions (NY dates), ``null_rows`` turns bars stamped at those Unix seconds into all-null
rows (in intraday answers it also inserts one where no bar exists, as Yahoo pads halts),
``partial_rows`` nulls ``high`` and ``low`` of bars stamped at those seconds (a half-printed row
that checks must quarantine).
"""

from __future__ import annotations

import calendar as pycal
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.timeutil import NY
from marketpipe.sim.admin import Handler, Stats
from marketpipe.sim.alpaca import SIM_HEADER
from marketpipe.sim.data import NS_PER_SEC, BarArrays, SimMarket, aggregate, ny_midnight_ns, parse_rfc3339_ns
from marketpipe.sim.faults import FaultRule, Faults, RunLookup, apply_defect, corrupt_bars, first_bars
from marketpipe.sim.vendor import ROW_FAULTS, Face, VendorBodies, apply_faults, truncate_if_asked
from marketpipe.wire.yahoo import CHART_PREFIX, LOOKBACK_DAYS, MAX_SPAN_DAYS, error_envelope

NS_PER_MIN = 60 * NS_PER_SEC
DAY_S = 86_400
VALID_RANGES = ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"]
_RANGE = re.compile(r"^(\d{1,4})(d|wk|mo|y)$")
_INT = re.compile(r"^-?\d{1,12}$")

TOO_MANY = b"Too Many Requests\r\n"
WILL_BE_RIGHT_BACK = (
    b'<!DOCTYPE html>\n<html lang="en-us"><head><meta http-equiv="content-type" content="text/html;'
    b' charset=UTF-8"><title>Yahoo</title></head><body><div id="message"><p>Will be right back...</p>'
    b"<p>Thank you for your patience.</p><p>Our engineers are working quickly to resolve the issue."
    b"</p></div></body></html>\n"
)


@dataclass(frozen=True, slots=True)
class Interval:
    """How one Yahoo interval is built from SimMarket and which lookback rules apply to it."""

    name: str
    tf: Timeframe | None = None  # SimMarket builds these bars itself
    session_minutes: int = 0  # else: buckets of this many minutes from the session open
    months: int = 0  # daily-or-longer: 0 day, -1 week, N month buckets
    daily: bool = False
    lookback_days: int | None = None
    max_span_days: int | None = None


INTERVALS: dict[str, Interval] = {
    iv.name: iv
    for iv in (
        Interval(
            "1m", tf=Timeframe(1, Unit.MINUTE), lookback_days=LOOKBACK_DAYS["1m"], max_span_days=MAX_SPAN_DAYS["1m"]
        ),
        Interval("2m", tf=Timeframe(2, Unit.MINUTE), lookback_days=LOOKBACK_DAYS["2m"]),
        Interval("5m", tf=Timeframe(5, Unit.MINUTE), lookback_days=LOOKBACK_DAYS["5m"]),
        Interval("15m", tf=Timeframe(15, Unit.MINUTE), lookback_days=LOOKBACK_DAYS["15m"]),
        Interval("30m", tf=Timeframe(30, Unit.MINUTE), lookback_days=LOOKBACK_DAYS["30m"]),
        Interval("60m", session_minutes=60, lookback_days=LOOKBACK_DAYS["60m"]),
        Interval("90m", session_minutes=90, lookback_days=LOOKBACK_DAYS["90m"]),
        Interval("1h", session_minutes=60, lookback_days=LOOKBACK_DAYS["1h"]),
        Interval("1d", daily=True),
        Interval("1wk", daily=True, months=-1),
        Interval("1mo", daily=True, months=1),
        Interval("3mo", daily=True, months=3),
    )
}
VALID_INTERVALS = "[" + ", ".join(INTERVALS) + "]"
_EXCHANGES = {"C": ("NMS", "NasdaqGS"), "A": ("NYQ", "NYSE"), "B": ("PCX", "NYSEArca")}


class ChartError(Exception):
    """An answer in Yahoo's error shape: ``{"chart": {"result": null, "error": {code, description}}}``."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description

    def response(self) -> web.Response:
        return chart_error(self.status, self.code, self.description)


def chart_error(status: int, code: str, description: str, *, key: str = "chart") -> web.Response:
    body = error_envelope(code, description, key=key)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def bad_request(description: str) -> ChartError:
    return ChartError(400, "Bad Request", description)


@dataclass(slots=True)
class Rows:
    """Chart rows as columns; NaN marks a JSON null (volume is float so that it can hold one, and so
    that a corrupted negative volume stays a number)."""

    t: np.ndarray  # int64 Unix seconds
    o: np.ndarray
    h: np.ndarray
    lo: np.ndarray
    c: np.ndarray
    v: np.ndarray  # float64, whole numbers

    @staticmethod
    def of(bars: BarArrays, stamps: np.ndarray) -> Rows:
        return Rows(stamps, bars.o, bars.h, bars.l, bars.c, bars.v.astype(np.float64))

    def take(self, sel: np.ndarray) -> Rows:
        return Rows(self.t[sel], self.o[sel], self.h[sel], self.lo[sel], self.c[sel], self.v[sel])

    def __len__(self) -> int:
        return len(self.t)


FAULT = web.RequestKey("yahoo_fault", FaultRule)


class YahooFace(Face):
    """Routes and middleware for the chart endpoint. The disagreement options are plain attributes,
    read on every request, so a test may change them while the server runs."""

    def __init__(
        self,
        market: SimMarket,
        faults: Faults,
        stats: Stats,
        *,
        clock: Callable[[], float] = time.time,
        price_shift_pct: float = 0.0,
        volume_ratio: float = 1.0,
        missing_days: Iterable[date] = (),
        null_rows: Iterable[int] = (),
        partial_rows: Iterable[int] = (),
    ) -> None:
        super().__init__(market, faults, stats, clock)
        self.price_shift_pct = price_shift_pct
        self.volume_ratio = volume_ratio
        self.missing_days: set[date] = set(missing_days)
        self.null_rows: set[int] = set(null_rows)
        self.partial_rows: set[int] = set(partial_rows)

    # --- app ---------------------------------------------------------------------------------------
    def _routes(self, r: web.UrlDispatcher) -> None:
        r.add_get(CHART_PREFIX + "{symbol}", self._chart)

    async def _serve(self, request: web.Request, handler: Handler) -> tuple[web.StreamResponse, str]:
        unmatched = request.match_info.http_exception
        symbol = request.match_info.get("symbol")
        if unmatched is not None or symbol is None:
            # Yahoo answers paths outside its API in its generic "finance" error shape
            status, reason = (unmatched.status, unmatched.reason) if unmatched is not None else (404, "Not Found")
            return _sim(chart_error(status, reason, f"HTTP {status} {reason}", key="finance")), str(status)
        override = self.faults.rate_limit_per_min
        if override is not None and not self.limits.hit(f"anon:{request.remote}", override).allowed:
            return _sim(_too_many()), "429"

        fault, early = await apply_faults(self.faults, request, _BODIES)
        if early is not None:
            return early
        if fault is not None and fault.kind in ROW_FAULTS:
            request[FAULT] = fault
        resp: web.StreamResponse
        try:
            resp = await handler(request)
        except ChartError as exc:
            resp = exc.response()
        return _sim(truncate_if_asked(fault, resp)), str(resp.status)

    # --- the chart endpoint ----------------------------------------------------------------------------
    async def _chart(self, request: web.Request) -> web.Response:
        q = request.query
        ysym = request.match_info["symbol"].upper()
        msym = ysym.replace("-", ".")  # Yahoo's share-class separator is SimMarket's "."
        name = q.get("interval", "") or "1d"
        iv = INTERVALS.get(name)
        if iv is None:
            raise bad_request(f"Invalid input - interval={name} is not supported. Valid intervals: {VALID_INTERVALS}")
        now_ns = self.now_ns()
        now_s = now_ns // NS_PER_SEC
        p1, p2, range_text = self._window(q, now_ns)
        if not self.market.has_data(msym):
            raise ChartError(404, "Not Found", "No data found, symbol may be delisted")
        self._check_limits(iv, p1, p2, now_s)

        rows = self._rows(msym, iv, p1, p2, now_ns) if p2 > p1 else None
        fault = request.get(FAULT)
        if rows is not None and fault is not None:
            if fault.kind == "bad_data":
                rows = self._defect(rows, msym, fault, iv, now_ns)
            else:
                rows = self._corrupt(rows, msym, fault)
        meta = self._meta(ysym, msym, iv, p1, range_text, now_ns)
        if not iv.daily:  # Yahoo sends the sessions' hours with intraday answers; yfinance reads them
            meta["tradingPeriods"] = self._trading_periods(p1, p2, now_ns, q.get("includePrePost") == "true")
        result: dict[str, Any] = {"meta": meta}
        if rows is not None and len(rows):
            result["timestamp"] = rows.t.tolist()
            quote = {
                "open": _prices(rows.o),
                "high": _prices(rows.h),
                "low": _prices(rows.lo),
                "close": _prices(rows.c),
                "volume": [None if v != v else int(v) for v in rows.v.tolist()],  # v != v: NaN
            }
            self._append_live_point(result["timestamp"], quote, meta, now_ns)
            indicators: dict[str, Any] = {"quote": [quote]}
            if iv.daily:
                indicators["adjclose"] = [{"adjclose": self._adjclose(msym, rows, iv, now_ns)}]
        else:
            # Yahoo's shape for a window without bars: no "timestamp" and an empty quote object
            indicators = {"quote": [{}]}
            if iv.daily:
                indicators["adjclose"] = [{}]
        result["indicators"] = indicators
        wanted = {e for e in re.split(r"[,|]", q.get("events", "")) if e}
        events = self._events(msym, wanted, p1, p2, now_ns)
        if events:
            result["events"] = events
        body = orjson.dumps({"chart": {"result": [result], "error": None}})
        return web.Response(body=body, content_type="application/json")

    def _append_live_point(self, stamps: list[int], quote: dict[str, Any], meta: dict[str, Any], now_ns: int) -> None:
        """While a session runs, Yahoo ends every chart with a "current price" point: stamped at
        ``regularMarketTime`` (not on the bar grid, and whatever window was asked for), o=h=l=c the
        market price, volume 0. It is not a bar; the adapter must drop it."""
        m = self.market
        cur = int(np.searchsorted(m.midnights, now_ns, side="right")) - 1
        live = 0 <= cur < len(m.opens) and int(m.opens[cur]) <= now_ns < int(m.closes[cur])
        price, t = meta.get("regularMarketPrice"), meta["regularMarketTime"]
        if not live or price is None or t in stamps:
            return
        stamps.append(t)
        for key in ("open", "high", "low", "close"):
            quote[key].append(price)
        quote["volume"].append(0)

    def _window(self, q: Any, now_ns: int) -> tuple[int, int, str]:
        """(period1, period2, meta.range) in Unix seconds, end exclusive."""
        now_s = now_ns // NS_PER_SEC
        raw1, raw2 = q.get("period1", ""), q.get("period2", "")
        if raw1 or raw2:
            for key, raw in (("period1", raw1), ("period2", raw2)):
                if raw and not _INT.match(raw):
                    raise bad_request(f"Invalid input - {key}={raw} is not a valid Unix timestamp")
            p1 = int(raw1) if raw1 else 0
            p2 = int(raw2) if raw2 else now_s
            if p1 > p2:
                raise bad_request(f"Invalid input - period1={p1} must not be after period2={p2}")
            return p1, p2, ""
        text = q.get("range", "") or "1d"
        return self._range_start(text, now_ns), now_s, text

    def _range_start(self, text: str, now_ns: int) -> int:
        m = self.market
        today = datetime.fromtimestamp(now_ns / NS_PER_SEC, NY).date()
        if text == "max":
            return int(m.opens[0] // NS_PER_SEC)
        if text == "ytd":
            return ny_midnight_ns(date(today.year, 1, 1)) // NS_PER_SEC
        rm = _RANGE.match(text)
        if rm is None:
            raise bad_request(
                f"Invalid input - range={text} is not supported. Valid ranges: [{', '.join(VALID_RANGES)}]"
            )
        n, unit = int(rm.group(1)), rm.group(2)
        if unit == "d":
            # the last n sessions that have begun (their whole NY day, so pre-open stamps count)
            last = int(np.searchsorted(m.midnights, now_ns, side="right")) - 1
            return int(m.midnights[max(0, last - max(n, 1) + 1)] // NS_PER_SEC)
        if unit == "wk":
            return now_ns // NS_PER_SEC - n * 7 * DAY_S
        months = n * (12 if unit == "y" else 1)
        y, mo = divmod(today.year * 12 + today.month - 1 - months, 12)
        day = date(y, mo + 1, min(today.day, pycal.monthrange(y, mo + 1)[1]))
        return ny_midnight_ns(day) // NS_PER_SEC

    @staticmethod
    def _check_limits(iv: Interval, p1: int, p2: int, now_s: int) -> None:
        head = f"{iv.name} data not available for startTime={p1} and endTime={p2}."
        if iv.max_span_days is not None and p2 - p1 > iv.max_span_days * DAY_S:
            raise ChartError(
                422,
                "Unprocessable Entity",
                f"{head} Only {iv.max_span_days} days worth of {iv.name} granularity data are allowed to be "
                "fetched per request.",
            )
        if iv.lookback_days is not None and p1 < now_s - iv.lookback_days * DAY_S:
            raise ChartError(
                422,
                "Unprocessable Entity",
                f"{head} The requested range must be within the last {iv.lookback_days} days.",
            )

    # --- rows ----------------------------------------------------------------------------------------
    def _adjclose(self, msym: str, rows: Rows, iv: Interval, now_ns: int) -> list[float | None]:
        """Closes adjusted for splits and dividends as this vendor's view of the actions has them:
        the factor of the session the close is from (a week's or month's: its last session so far).
        The closes are split-adjusted already (``_frame``): only the dividend part is left to apply."""
        m = self.market
        fp, _ = m.factors(msym, "dividend", "yahoo", now_ns)
        session = np.maximum(np.searchsorted(m.opens, rows.t * NS_PER_SEC, side="right") - 1, 0)
        if iv.months:
            current = max(int(np.searchsorted(m.opens, now_ns, side="right")) - 1, 0)
            ids = _bucket_ids(m.days[: current + 1], iv.months)
            session = np.searchsorted(ids, ids[np.minimum(session, current)], side="right") - 1
        return _prices(rows.c * fp[session])

    def _events(self, msym: str, wanted: set[str], p1: int, p2: int, now_ns: int) -> dict[str, Any]:
        """``events.splits`` / ``events.dividends`` of the window, keyed by the ex-date's session open
        (Unix seconds, as a string); a doubled split's copy is one second later (the keys must differ)."""
        m = self.market
        out: dict[str, dict[str, Any]] = {}
        today = m.ny_date(now_ns)
        for a in m.actions.view(msym, "yahoo").listed:
            k = int(np.searchsorted(m.days, np.datetime64(a.ex_date, "D"), side="left"))
            if a.ex_date > today or k >= len(m.days):
                continue
            ts = int(m.opens[k] // NS_PER_SEC) + (1 if a.tag else 0)
            if not p1 <= ts < p2:
                continue
            if a.is_split and wanted & {"split", "splits"}:
                num, den = a.new_rate, a.old_rate
                ratio = f"{num:g}:{den:g}"
                out.setdefault("splits", {})[str(ts)] = {
                    "date": ts, "numerator": num, "denominator": den, "splitRatio": ratio,
                }  # fmt: skip
            elif a.type == "cash_dividend" and "div" in wanted:
                out.setdefault("dividends", {})[str(ts)] = {"amount": a.cash, "date": ts}
        return out

    def _rows(self, msym: str, iv: Interval, p1: int, p2: int, now_ns: int) -> Rows:
        # Nothing exists before 1970 or after now: clamping keeps absurd periods inside int64 ns.
        lo = max(p1, 0) * NS_PER_SEC
        hi = min(p2, now_ns // NS_PER_SEC + DAY_S) * NS_PER_SEC
        if iv.daily:
            rows = self._daily_rows(msym, iv, lo, hi, now_ns)
        else:
            rows = self._intraday_rows(msym, iv, lo, hi, now_ns)
            rows = self._pad(rows, p1, min(p2, now_ns // NS_PER_SEC + 1))
        return self._disagree(rows)

    def _frame(self, msym: str, tf: str | Timeframe, lo: int, hi: int, now_ns: int) -> BarArrays:
        """SimMarket's bars split-adjusted as Yahoo's are: prices times the split price factor of their
        New York day (this vendor's view, splits up to now), volume times the volume factor."""
        m = self.market
        f = m.bars_frame(msym, tf, lo, hi, now=now_ns)
        fp, fv = m.factors(msym, "split", "yahoo", now_ns)
        di = np.maximum(np.searchsorted(m.midnights, f["t"], side="right") - 1, 0)
        kp, kv = fp[di], fv[di]
        v = np.rint(f["v"] * kv).astype(np.int64)
        vw = f["vw"] * kp
        return BarArrays(f["t"], f["o"] * kp, f["h"] * kp, f["l"] * kp, f["c"] * kp, v, f["n"], vw * v, v)

    def _drop_missing(self, bars: BarArrays, session: np.ndarray) -> BarArrays:
        if not self.missing_days or not len(bars):
            return bars
        days = self.market.days[session].astype(date)
        keep = np.array([d not in self.missing_days for d in days.tolist()], dtype=bool)
        return bars.take(keep)

    def _intraday_rows(self, msym: str, iv: Interval, lo: int, hi: int, now_ns: int) -> Rows:
        m = self.market
        if iv.tf is not None:
            bars = self._frame(msym, iv.tf, lo, hi - 1, now_ns)
        else:
            width = iv.session_minutes * NS_PER_MIN
            # whole buckets: minutes from one bucket before the window to one after it
            mins = self._frame(msym, "1Min", lo - width, hi - 1 + width, now_ns)
            opens = m.opens[np.searchsorted(m.opens, mins.t, side="right") - 1]
            bars = aggregate(mins, opens + (mins.t - opens) // width * width)
            bars = bars.take((bars.t >= lo) & (bars.t < hi))
        bars = self._drop_missing(bars, np.searchsorted(m.opens, bars.t, side="right") - 1)
        return Rows.of(bars, bars.t // NS_PER_SEC)

    def _daily_rows(self, msym: str, iv: Interval, lo: int, hi: int, now_ns: int) -> Rows:
        m = self.market
        first_day = datetime.fromtimestamp(lo / NS_PER_SEC, NY).date()
        if iv.months:
            first_day = _bucket_floor(first_day, iv.months)  # whole buckets, so none is cut short
        # Daily bars are found by their NY-midnight stamps; a bucket may end up to 3 months later.
        reach = 95 * DAY_S * NS_PER_SEC if iv.months else 0
        daily = self._frame(msym, "1Day", ny_midnight_ns(first_day), hi + reach, now_ns)
        session = np.searchsorted(m.midnights, daily.t, side="left")
        daily = self._drop_missing(daily, session)
        session = np.searchsorted(m.midnights, daily.t, side="left")
        stamps = m.opens[session]
        if iv.months and len(daily):
            days = m.days[session]
            ids = _bucket_ids(days, iv.months)
            first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            daily = aggregate(daily, ids)
            stamps = stamps[first]
        sel = (stamps >= lo) & (stamps < hi)
        return Rows.of(daily.take(sel), stamps[sel] // NS_PER_SEC)

    def _pad(self, rows: Rows, lo_s: int, hi_s: int) -> Rows:
        """Insert the ``null_rows`` stamps that have no bar (``_disagree`` nulls those that do)."""
        pads = sorted(s for s in self.null_rows if lo_s <= s < hi_s)
        if not pads:
            return rows
        missing = np.setdiff1d(np.array(pads, dtype=np.int64), rows.t)
        if len(missing):
            t = np.concatenate([rows.t, missing])
            order = np.argsort(t, kind="stable")
            nan = np.full(len(missing), np.nan)
            rows = Rows(
                t[order], *(np.concatenate([col, nan])[order] for col in (rows.o, rows.h, rows.lo, rows.c, rows.v))
            )
        return rows

    def _disagree(self, rows: Rows) -> Rows:
        if not len(rows):
            return rows
        o, h, lo, c, v = rows.o, rows.h, rows.lo, rows.c, rows.v
        if self.price_shift_pct:
            k = 1.0 + self.price_shift_pct / 100.0
            o, h, lo, c = (np.round(a * k, 2) for a in (o, h, lo, c))
        if self.volume_ratio != 1.0:
            v = np.rint(v * self.volume_ratio)
        if self.null_rows:
            hit = np.isin(rows.t, np.fromiter(self.null_rows, np.int64))
            o, h, lo, c, v = (np.where(hit, np.nan, a) for a in (o, h, lo, c, v))
        if self.partial_rows:
            hit = np.isin(rows.t, np.fromiter(self.partial_rows, np.int64))
            h, lo = (np.where(hit, np.nan, a) for a in (h, lo))
        return Rows(rows.t, o, h, lo, c, v)

    @staticmethod
    def _priced(rows: Rows) -> np.ndarray:
        """Positions of the rows with all four prices (not null rows, not partial rows)."""
        return np.flatnonzero(~np.isnan(rows.c) & ~np.isnan(rows.h) & ~np.isnan(rows.lo) & ~np.isnan(rows.o))

    @staticmethod
    def _alpaca_rows(rows: Rows, priced: np.ndarray) -> list[dict[str, Any]]:
        iso = np.datetime_as_string(rows.t[priced].astype("datetime64[s]"), unit="s").tolist()
        return [
            {"t": t + "Z", "o": o, "h": h, "l": lo, "c": c, "v": v}
            for t, o, h, lo, c, v in zip(
                iso,
                rows.o[priced].tolist(),
                rows.h[priced].tolist(),
                rows.lo[priced].tolist(),
                rows.c[priced].tolist(),
                rows.v[priced].tolist(),
                strict=True,
            )
        ]

    def _defect(self, rows: Rows, msym: str, fault: FaultRule, iv: Interval, now_ns: int) -> Rows:
        """``bad_data`` with the shared function, via Alpaca-shaped rows (no ``vw``/``n``: Yahoo has
        none). Only priced rows are candidates: null and partial rows stay as they are."""
        priced = self._priced(rows)
        if not len(priced):
            return rows
        alpaca = self._alpaca_rows(rows, priced)
        for pos, row in zip(priced.tolist(), alpaca, strict=True):
            row["_pos"] = pos
        apply_defect({"bars": alpaca, "symbol": msym}, fault, self.faults.seed, self._run_lookup(iv, now_ns))
        keep = np.ones(len(rows), dtype=bool)
        keep[priced] = False
        o, h, lo, c, v = (a.copy() for a in (rows.o, rows.h, rows.lo, rows.c, rows.v))
        for row in alpaca:
            i = row["_pos"]
            keep[i] = True
            o[i], h[i], lo[i], c[i], v[i] = row["o"], row["h"], row["l"], row["c"], row["v"]
        return Rows(rows.t, o, h, lo, c, v).take(keep)

    def _run_lookup(self, iv: Interval, now_ns: int) -> RunLookup:
        """``bad_data`` ``frozen`` runs in the request's interval, as this face serves them."""
        if iv.tf is not None:
            bar_s = iv.tf.seconds
        elif iv.session_minutes:
            bar_s = iv.session_minutes * 60
        else:
            bar_s = DAY_S * (7 if iv.months < 0 else 31 * iv.months if iv.months else 1)

        def fetch(msym: str, lo: int, hi: int) -> list[dict[str, Any]]:
            rows = self._rows(msym, iv, -(-lo // NS_PER_SEC), hi // NS_PER_SEC, now_ns)
            return self._alpaca_rows(rows, self._priced(rows))

        def lookup(msym: str, start_ns: int, n: int) -> list[dict[str, Any]]:
            span = ((n + 1) * bar_s + 4 * DAY_S) * NS_PER_SEC  # a long weekend in between
            return first_bars(lambda lo, hi: fetch(msym, lo, hi), start_ns, n, span, now_ns + DAY_S * NS_PER_SEC)

        return lookup

    def _corrupt(self, rows: Rows, msym: str, fault: FaultRule) -> Rows:
        """``invalid_rows``: corrupt the priced rows with the shared corrupter, via Alpaca-shaped rows."""
        priced = self._priced(rows)
        if not len(priced):
            return rows
        alpaca = self._alpaca_rows(rows, priced)
        corrupt_bars({"bars": alpaca, "symbol": msym}, fault, self.faults.seed)
        # positions: corrupted rows keep theirs; a duplicate appended by the corrupter follows its row
        pos = [float(p) for p in priced.tolist()] + [float(priced[-1]) + 0.5] * (len(alpaca) - len(priced))
        out = [(p, r) for p, r in zip(pos, alpaca, strict=True)]
        nulls = np.setdiff1d(np.arange(len(rows)), priced)
        out += [
            (float(i), {"t": int(rows.t[i]), "o": None, "h": None, "l": None, "c": None, "v": float(rows.v[i])})
            for i in nulls.tolist()
        ]
        out.sort(key=lambda pr: pr[0])
        t = np.array([_seconds(r["t"]) for _, r in out], dtype=np.int64)

        def col(key: str) -> np.ndarray:
            return np.array([np.nan if r[key] is None else float(r[key]) for _, r in out], dtype=np.float64)

        return Rows(t, col("o"), col("h"), col("l"), col("c"), col("v"))

    # --- meta --------------------------------------------------------------------------------------
    def _meta(self, ysym: str, msym: str, iv: Interval, p1: int, range_text: str, now_ns: int) -> dict[str, Any]:
        m = self.market
        cur = max(0, int(np.searchsorted(m.midnights, now_ns, side="right")) - 1)
        open_s, close_s = int(m.opens[cur] // NS_PER_SEC), int(m.closes[cur] // NS_PER_SEC)
        exch, full = _EXCHANGES.get(m.tape(msym), _EXCHANGES["A"])
        local = datetime.fromtimestamp(open_s, NY)
        tz, offset = local.tzname() or "EST", int((local.utcoffset() or timedelta(0)).total_seconds())

        def period(start: int, end: int) -> dict[str, Any]:
            return {"timezone": tz, "start": start, "end": end, "gmtoffset": offset}

        meta: dict[str, Any] = {
            "currency": "USD",
            "symbol": ysym,
            "exchangeName": exch,
            "fullExchangeName": full,
            "instrumentType": "EQUITY",
            "firstTradeDate": int(m.opens[0] // NS_PER_SEC),
            "regularMarketTime": min(now_ns // NS_PER_SEC, close_s),
            "hasPrePostMarketData": True,
            "gmtoffset": offset,
            "timezone": tz,
            "exchangeTimezoneName": "America/New_York",
        }
        # before today's first bar the market price is the last session's
        day = self._session_bar(msym, cur, now_ns) or self._session_bar(msym, cur - 1, now_ns)
        if day is not None:
            meta.update(
                regularMarketPrice=day[3],
                regularMarketDayHigh=day[1],
                regularMarketDayLow=day[2],
                regularMarketVolume=day[4],
            )
        meta.update(longName=f"{msym} Simulated Corporation", shortName=f"{msym} Simulated Corp.")
        prev = int(np.searchsorted(m.opens, max(p1, 0) * NS_PER_SEC, side="left")) - 1
        before = self._session_bar(msym, prev, now_ns) if prev >= 0 else None
        if before is not None:
            meta["chartPreviousClose"] = before[3]
        meta.update(
            priceHint=2,
            currentTradingPeriod={
                "pre": period(open_s - 5 * 3600 - 1800, open_s),  # 04:00 to the open
                "regular": period(open_s, close_s),
                "post": period(close_s, close_s + 4 * 3600),  # the close to 20:00 (16:00 + 4 h)
            },
            dataGranularity=iv.name,
            range=range_text,
            validRanges=list(VALID_RANGES),
        )
        return meta

    def _trading_periods(self, p1: int, p2: int, now_ns: int, prepost: bool) -> Any:
        """``meta.tradingPeriods`` of an intraday chart: one array per session day the window touches (up to
        today), each holding that day's regular hours ``{timezone, start, end, gmtoffset}``; with
        ``includePrePost=true`` the object ``{pre, regular, post}`` of such arrays (04:00 to the open, the
        close to 4 h after it). The vendor's own shape (reference section 5.2), as yfinance parses it."""
        m = self.market
        lo = int(np.searchsorted(m.midnights, (max(p1, 0) - DAY_S) * NS_PER_SEC, side="right"))
        hi = int(np.searchsorted(m.midnights, min(p2 * NS_PER_SEC, now_ns), side="left"))
        pre: list[list[dict[str, Any]]] = []
        regular: list[list[dict[str, Any]]] = []
        post: list[list[dict[str, Any]]] = []
        for di in range(lo, hi):
            open_s, close_s = int(m.opens[di] // NS_PER_SEC), int(m.closes[di] // NS_PER_SEC)
            if close_s <= p1 - 4 * 3600 or open_s - 5 * 3600 - 1800 >= p2:
                continue  # the window holds nothing of this day, not even its extended hours
            local = datetime.fromtimestamp(open_s, NY)
            tz, offset = local.tzname() or "EST", int((local.utcoffset() or timedelta(0)).total_seconds())

            def period(start: int, end: int, tz: str = tz, offset: int = offset) -> list[dict[str, Any]]:
                return [{"timezone": tz, "start": start, "end": end, "gmtoffset": offset}]

            pre.append(period(open_s - 5 * 3600 - 1800, open_s))
            regular.append(period(open_s, close_s))
            post.append(period(close_s, close_s + 4 * 3600))
        return {"pre": pre, "regular": regular, "post": post} if prepost else regular

    def _session_bar(self, msym: str, di: int, now_ns: int) -> tuple[float, float, float, float, int] | None:
        """(o, h, l, c, v) of session ``di`` as this face serves it (partial while it runs)."""
        if not 0 <= di < len(self.market.days) or self.market.days[di].astype(date) in self.missing_days:
            return None
        t = int(self.market.midnights[di])
        bars = self._frame(msym, "1Day", t, t, now_ns)
        if not len(bars):
            return None
        rows = self._disagree(Rows.of(bars, bars.t // NS_PER_SEC))
        if np.isnan(rows.c[0]) or np.isnan(rows.v[0]):
            return None  # a null_rows stamp hit the daily bar: no market price to report
        return (
            _price(rows.o[0]),
            _price(rows.h[0]),
            _price(rows.lo[0]),
            _price(rows.c[0]),
            int(rows.v[0]),
        )


# --- helpers ---------------------------------------------------------------------------------------


def _sim(resp: web.StreamResponse) -> web.StreamResponse:
    resp.headers[SIM_HEADER] = "1"
    return resp


def _too_many() -> web.Response:
    return web.Response(body=TOO_MANY, status=429, content_type="text/plain")


_BODIES = VendorBodies(
    server_error=lambda: chart_error(500, "Internal Server Error", "Internal Server Error"),
    too_many=lambda fault: _too_many(),
    outage_200=WILL_BE_RIGHT_BACK,
    finish=_sim,
    page_key=lambda request: "chart",
)


def _price(x: float) -> float:
    return float(np.float32(x))


def _prices(a: np.ndarray) -> list[float | None]:
    """Float32 widened to double, as Yahoo sends prices; NaN is null."""
    wide = a.astype(np.float32).astype(np.float64)
    out: list[float | None] = wide.tolist()
    if np.isnan(wide).any():
        out = [None if x != x else x for x in out]  # x != x only for NaN
    return out


def _seconds(t: int | str) -> int:
    return t if isinstance(t, int) else parse_rfc3339_ns(t)[0] // NS_PER_SEC


def _bucket_floor(day: date, months: int) -> date:
    if months < 0:
        return day - timedelta(days=day.weekday())
    m0 = (day.month - 1) // months * months
    return date(day.year, m0 + 1, 1)


def _bucket_ids(days: np.ndarray, months: int) -> np.ndarray:
    """Per session date: its week (Monday-based) or its N-month bucket, aligned to January."""
    d = days.astype("datetime64[D]").astype(np.int64)
    if months < 0:
        return (d + 3) // 7  # 1970-01-01 was a Thursday: +3 makes Monday the first day of a week
    return days.astype("datetime64[M]").astype(np.int64) // months


def make_face(
    market: SimMarket,
    faults: Faults,
    keys: dict[str, tuple[str, str]],
    stats: Stats,
    *,
    clock: Callable[[], float] = time.time,
    price_shift_pct: float = 0.0,
    volume_ratio: float = 1.0,
    missing_days: Iterable[date] = (),
    null_rows: Iterable[int] = (),
    partial_rows: Iterable[int] = (),
) -> YahooFace:
    """The Yahoo face for :class:`~marketpipe.sim.server.SimServer` (``keys`` are ignored: the chart
    endpoint needs no authentication)."""
    return YahooFace(
        market,
        faults,
        stats,
        clock=clock,
        price_shift_pct=price_shift_pct,
        volume_ratio=volume_ratio,
        missing_days=missing_days,
        null_rows=null_rows,
        partial_rows=partial_rows,
    )


__all__ = ["INTERVALS", "VALID_INTERVALS", "YahooFace", "make_face"]
