"""Yahoo Finance chart endpoint (unofficial), bars only. Wire format:
shared/reference/market-data-apis.md §5 (``GET /v8/finance/chart/{symbol}``).

A fallback vendor: no key, no SLA, limits learnt from observation. What the adapter does with
Yahoo's quirks:

* One symbol per request (the endpoint takes one), one page per request. 1m history is asked for in
  windows of at most 7 days, the most Yahoo serves per 1m request.
* Intervals: 1Min, 2Min, 5Min, 15Min, 30Min (bucket starts coincide with the canonical clock-aligned
  ones for a 09:30 open), 1Day, 1Week, 1Month, 3Month. Not 1Hour: Yahoo's hourly buckets start at
  the half hour (09:30, 10:30, ...), so they are different bars from the canonical clock hour.
* Lookback: 1m only within the last 30 days, 2m-30m within 60 days. ``supports`` reports a request
  outside those windows (with a margin for the time between routing and sending), so a router
  skips Yahoo instead of collecting a 422.
* Daily and longer bars, stamped by Yahoo at the session open (09:30 New York), are re-stamped to
  the canonical stamp: 00:00 New York of the day, of the week's Monday, of the month (bucket), in
  UTC — ``T05:00:00Z`` in winter, ``T04:00:00Z`` in summer, like Alpaca's. The wire window is
  widened to whole buckets so that exactly the bars whose canonical stamp is in ``[start, end)``
  come back. ``raw_ts`` keeps Yahoo's Unix seconds as sent.
* Rows whose o/h/l/c are all null (and volume null or 0) are Yahoo's padding for minutes without
  trades or halts: not data, so they are dropped — never filled. A row with only some fields null
  is kept, with its nulls, for the checks to quarantine.
* Prices arrive as float32 widened to double (``414.9200134277344``). A value that is exactly a
  float32 is taken as the decimal that float32 stands for (``414.92``): the same number at the
  vendor's precision, so that it compares equal with other vendors' cents. Other values pass as
  sent.
* Yahoo has no trade count or VWAP (null) and one consolidated feed (``feed="yahoo"`` whatever feed is
  asked for). Its OHLC and volume are **split-adjusted** (for every split up to now), not
  dividend-adjusted. ``adjustment="split"`` passes them as sent. ``adjustment="raw"`` (what the store
  keeps, like Alpaca's raw and Polygon's ``adjusted=false``) un-adjusts them with Yahoo's own split
  events: one ``interval=3mo&events=split`` request per symbol from the window's start to now (a
  bars response lists only the splits inside its own window, and later splits are in its prices
  too), together with the ``events=split`` of each bars response. A bar of day d gets prices times,
  and volume divided by, the product of numerator/denominator over the splits with ex-date after d,
  rounded back to ``meta.priceHint`` decimals (Yahoo's raw prices were cents before it divided them)
  and whole shares. A week or month bar that contains a split stays on the post-split scale (its
  raw form mixed two scales). A split event without a usable ratio is MALFORMED_RESPONSE: never a
  silently mis-scaled series. A split Yahoo applies but does not list cannot be seen in its answer;
  the quality check ``split_unseen`` finds it against the stored actions of the other vendors.
* Errors: 404 chart error (unknown symbol) -> NOT_FOUND, so a router moves on; 422 (lookback) and
  400 -> PROVIDER_BAD_REQUEST with Yahoo's description; 429 (plain text) -> RATE_LIMITED; 5xx ->
  PROVIDER_UNAVAILABLE; an HTML page with status 200 or a cut-off body -> MALFORMED_RESPONSE
  (retried). Responses from marketpipe's simulator are labelled ``source="sim:yahoo"``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import msgspec
import orjson
import polars as pl

from marketpipe.core.errors import (
    MalformedResponse,
    MarketpipeError,
    NotFound,
    ProviderBadRequest,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import VENDOR_POINTS_DROPPED
from marketpipe.core.schema import BAR_SCHEMA, UTC_US, actions_frame
from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.timeutil import NY, utcnow
from marketpipe.core.validation import validate_enum, validate_range, validate_required, validate_timeframe
from marketpipe.providers.base import ActionsPage, BarPage, Capabilities, envelope_error, sim_source
from marketpipe.providers.http import HttpProvider, error_text, status_error
from marketpipe.providers.yahoo_config import YahooConfig
from marketpipe.wire.yahoo import ERROR_KEYS, EVENTS, LOOKBACK_DAYS, MAX_SPAN_DAYS, chart_path, events_to_actions

DEFAULT_BASE_URL = "https://query2.finance.yahoo.com"
# Yahoo throttles clients that do not look like a browser (reference §5.4).
BROWSER_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
FEED = "yahoo"
MAX_LIMIT = 10_000
ADJUSTMENTS = ("raw", "split")
ENDPOINT = "chart"

INTERVALS: dict[Timeframe, str] = {
    Timeframe(1, Unit.MINUTE): "1m",
    Timeframe(2, Unit.MINUTE): "2m",
    Timeframe(5, Unit.MINUTE): "5m",
    Timeframe(15, Unit.MINUTE): "15m",
    Timeframe(30, Unit.MINUTE): "30m",
    Timeframe(1, Unit.DAY): "1d",
    Timeframe(1, Unit.WEEK): "1wk",
    Timeframe(1, Unit.MONTH): "1mo",
    Timeframe(3, Unit.MONTH): "3mo",
}
LOOKBACK: dict[str, timedelta] = {
    iv: timedelta(days=days) for iv, days in LOOKBACK_DAYS.items() if iv in INTERVALS.values()
}
MAX_SPAN: dict[str, timedelta] = {iv: timedelta(days=days) for iv, days in MAX_SPAN_DAYS.items()}
# The router asks supports() a little before the request leaves; keep clear of the lookback edge.
LOOKBACK_MARGIN = timedelta(hours=1)
PRICES = ("open", "high", "low", "close")

log = get_logger("marketpipe.providers.yahoo")


# --- wire structs (gc=False: decoded objects hold no cycles) ------------------------------------


class _Quote(msgspec.Struct, gc=False):
    open: list[float | None] | None = None
    high: list[float | None] | None = None
    low: list[float | None] | None = None
    close: list[float | None] | None = None
    volume: list[float | None] | None = None


class _Indicators(msgspec.Struct, gc=False):
    quote: list[_Quote] | None = None


class _Meta(msgspec.Struct, gc=False):
    exchangeTimezoneName: str | None = None
    regularMarketTime: int | None = None
    priceHint: int | None = None


class _Split(msgspec.Struct, gc=False):
    date: int | None = None
    numerator: float | None = None
    denominator: float | None = None


class _Events(msgspec.Struct, gc=False):
    splits: dict[str, _Split] | None = None


class _Result(msgspec.Struct, gc=False):
    meta: _Meta | None = None
    timestamp: list[int] | None = None
    indicators: _Indicators | None = None
    events: _Events | None = None


class _Error(msgspec.Struct, gc=False):
    code: str | None = None
    description: str | None = None


class _Chart(msgspec.Struct, gc=False):
    result: list[_Result] | None = None
    error: _Error | None = None


class _Doc(msgspec.Struct, gc=False):
    chart: _Chart  # required: a body without the envelope ({} from a proxy) is malformed, never empty


_DECODER = msgspec.json.Decoder(_Doc)


# --- symbols and windows -----------------------------------------------------------------------


def to_yahoo(symbol: str) -> str:
    """Canonical ``BRK.B`` -> Yahoo ``BRK-B``."""
    return symbol.replace(".", "-")


def from_yahoo(symbol: str) -> str:
    """Yahoo ``BRK-B`` -> canonical ``BRK.B``."""
    return symbol.replace("-", ".")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def _ceil_seconds(ts: datetime) -> int:
    """Unix seconds rounded up, in exact timedelta arithmetic (float timestamps can be off by one)."""
    whole, rest = divmod(ts - _EPOCH, _SECOND)
    return int(whole) + (1 if rest else 0)


def _bucket_start(day: date, tf: Timeframe) -> date:
    if tf.unit is Unit.WEEK:
        return day - timedelta(days=day.weekday())
    if tf.unit is Unit.MONTH:
        return date(day.year, (day.month - 1) // tf.amount * tf.amount + 1, 1)
    return day


def _next_bucket(day: date, tf: Timeframe) -> date:
    if tf.unit is Unit.WEEK:
        return day + timedelta(days=7)
    if tf.unit is Unit.MONTH:
        y, m = divmod(day.year * 12 + day.month - 1 + tf.amount, 12)
        return date(y, m + 1, 1)
    return day + timedelta(days=1)


def _ny_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), NY).astimezone(UTC)


def _ceil_bucket(ts: datetime, tf: Timeframe) -> datetime:
    """The first canonical daily/weekly/monthly stamp (NY midnight) at or after ``ts``."""
    start = _bucket_start(ts.astimezone(NY).date(), tf)
    stamp = _ny_midnight(start)
    return stamp if stamp >= ts else _ny_midnight(_next_bucket(start, tf))


def wire_windows(tf: Timeframe, start: datetime, end: datetime) -> list[tuple[int, int, datetime]]:
    """``(period1, period2, covered_through)`` per request for canonical ``[start, end)``.

    Intraday: Unix seconds rounded up (bars start on whole seconds, so ``t >= start`` is
    ``t >= ceil(start)``), 1m split into windows Yahoo accepts. Daily and longer: widened to the
    NY-midnight bucket stamps, so Yahoo's session-open stamps select the same bars.
    """
    name = INTERVALS[tf]
    if not tf.is_intraday:
        return [(int(_ceil_bucket(start, tf).timestamp()), int(_ceil_bucket(end, tf).timestamp()), end)]
    span = MAX_SPAN.get(name)
    if span is None:
        return [(_ceil_seconds(start), _ceil_seconds(end), end)]
    out: list[tuple[int, int, datetime]] = []
    lo = start
    while lo < end:
        hi = min(lo + span, end)
        out.append((_ceil_seconds(lo), _ceil_seconds(hi), hi))
        lo = hi
    return out


# --- columnar conversion -----------------------------------------------------------------------


def _unwiden(col: str) -> pl.Expr:
    """A float32 widened to double -> the decimal the float32 stands for (see the module docstring)."""
    x = pl.col(col)
    f32 = x.cast(pl.Float32)
    return pl.when(f32.cast(pl.Float64) == x).then(f32.cast(pl.String).cast(pl.Float64)).otherwise(x).alias(col)


def _canonical_ts(tf: Timeframe, tz: str) -> pl.Expr:
    """Yahoo's Unix seconds -> the canonical bar stamp (UTC, microseconds)."""
    utc = pl.from_epoch(pl.col("t"), time_unit="s").dt.replace_time_zone("UTC").cast(UTC_US)
    if tf.is_intraday:
        return utc
    day = utc.dt.convert_time_zone(tz).dt.date()
    if tf.unit is Unit.WEEK:
        day = day.dt.truncate("1w")  # Monday
    elif tf.unit is Unit.MONTH:
        day = day.dt.truncate(f"{tf.amount}mo")  # month buckets aligned to January
    return day.cast(pl.Datetime("us")).dt.replace_time_zone("America/New_York").dt.convert_time_zone("UTC")


def chart_to_frame(
    result: _Result, symbol: str, tf: Timeframe, source: str, fetched_at: datetime
) -> tuple[pl.DataFrame, int]:
    """One chart result to a canonical frame, and how many all-null padding rows were dropped."""
    stamps = result.timestamp or []
    if not stamps:
        return pl.DataFrame(schema={**BAR_SCHEMA, "raw_ts": pl.String()}), 0
    quotes = result.indicators.quote if result.indicators is not None else None
    q = quotes[0] if quotes else _Quote()
    n = len(stamps)
    columns: dict[str, pl.Series] = {"t": pl.Series("t", stamps, dtype=pl.Int64)}
    for name in (*PRICES, "volume"):
        values = getattr(q, name)
        if values is None or len(values) != n:
            got = "missing" if values is None else f"{len(values)} values"
            raise MalformedResponse(
                f"yahoo: {symbol} chart has {n} timestamps but {name} is {got}",
                provider="yahoo",
                details={"symbol": symbol, "field": name},
            )
        columns[name] = pl.Series(name, values, dtype=pl.Float64, strict=False)
    raw = pl.DataFrame(columns)
    no_price = pl.all_horizontal([pl.col(c).is_null() for c in PRICES])
    padding = no_price & (pl.col("volume").is_null() | (pl.col("volume") == 0))
    kept = raw.filter(~padding)
    tz = (result.meta.exchangeTimezoneName if result.meta else None) or "America/New_York"
    frame = kept.select(
        pl.lit(symbol, pl.String).alias("symbol"),
        pl.lit(str(tf), pl.String).alias("timeframe"),
        _canonical_ts(tf, tz).alias("ts"),
        *(_unwiden(c) for c in PRICES),
        pl.col("volume").cast(pl.Int64, strict=False),
        pl.lit(None, pl.Int64).alias("trade_count"),
        pl.lit(None, pl.Float64).alias("vwap"),
        pl.lit(source, pl.String).alias("source"),
        pl.lit(FEED, pl.String).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
        pl.col("t").cast(pl.String).alias("raw_ts"),
    )
    return frame, raw.height - kept.height


Splits = dict[str, tuple[date, float]]  # Yahoo's event key -> (ex-date, numerator / denominator)


def splits_of(result: _Result, symbol: str) -> Splits:
    """The ``events.splits`` of one chart result, keyed as Yahoo keys them (the same split listed by two
    responses is one). A split without a positive finite ratio cannot be undone: MALFORMED_RESPONSE."""
    got = result.events.splits if result.events is not None else None
    if not got:
        return {}
    tz = ZoneInfo((result.meta.exchangeTimezoneName if result.meta else None) or "America/New_York")
    out: Splits = {}
    for key, ev in got.items():
        num, den = ev.numerator, ev.denominator
        if num is None or den is None or not (math.isfinite(num) and math.isfinite(den) and num > 0 and den > 0):
            raise MalformedResponse(
                f"yahoo: the {symbol} split event {key} has no usable ratio ({num}:{den}); its split-adjusted "
                "prices cannot be turned back into raw ones",
                provider="yahoo",
                details={"symbol": symbol, "event": key, "numerator": num, "denominator": den},
            )
        try:
            sec = ev.date if ev.date is not None else int(key)
        except ValueError as exc:
            raise MalformedResponse(
                f"yahoo: the {symbol} split event {key!r} has no date", provider="yahoo", details={"symbol": symbol}
            ) from exc
        out[key] = (datetime.fromtimestamp(sec, tz).date(), num / den)
    return out


def unadjust_splits(frame: pl.DataFrame, tf: Timeframe, splits: Splits, tz: str, decimals: int) -> pl.DataFrame:
    """Yahoo's split-adjusted bars back to raw: a bar of New York day d (a week or month bar: its last
    day) gets o/h/l/c times, and volume divided by, the product of the ratios of the splits with
    ex-date after d; scaled values are rounded to ``decimals`` and whole shares. One expression per
    split (a symbol has a handful), no per-row Python."""
    if not splits or not frame.height:
        return frame
    day = pl.col("ts").dt.convert_time_zone(tz).dt.date()
    if tf.unit is Unit.WEEK:
        day = day + pl.duration(days=6)
    elif tf.unit is Unit.MONTH:
        day = day.dt.offset_by(f"{tf.amount}mo") - pl.duration(days=1)
    by_day: dict[date, float] = {}
    for ex, ratio in splits.values():
        by_day[ex] = by_day.get(ex, 1.0) * ratio
    mult = pl.lit(1.0)
    for ex, ratio in by_day.items():
        mult = mult * pl.when(day < pl.lit(ex)).then(pl.lit(ratio)).otherwise(pl.lit(1.0))
    f = frame.with_columns(mult.alias("_m"))
    scaled = pl.col("_m") != 1.0
    return f.with_columns(
        *(pl.when(scaled).then((pl.col(c) * pl.col("_m")).round(decimals)).otherwise(c).alias(c) for c in PRICES),
        pl.when(scaled)
        .then((pl.col("volume") / pl.col("_m")).round(0).cast(pl.Int64))
        .otherwise(pl.col("volume"))
        .alias("volume"),
    ).drop("_m")


def non_bar_points(frame: pl.DataFrame, tf: Timeframe, start: datetime, end: datetime, market_time: int | None
                   ) -> pl.Series:  # fmt: skip
    """Which rows of a canonical chart frame are not bars of ``[start, end)`` at ``tf``: stamped
    outside the range, off the timeframe's grid (intraday buckets start on whole minutes from the
    09:30 open, so on multiples of gcd(bucket, 30 min)), or — daily and longer, whose stamps are
    canonicalized to a date — Yahoo's "current price" point (stamped at ``meta.regularMarketTime``,
    volume 0) beside a real bar of the same date. Nothing is made up: a non-bar is only left out."""
    t = pl.col("raw_ts").cast(pl.Int64)
    outside = (pl.col("ts") < start) | (pl.col("ts") >= end)
    if tf.is_intraday:
        step = math.gcd(tf.seconds, 1800)
        off_grid = t % step != 0
    elif market_time is not None:
        off_grid = (t == market_time) & (pl.col("volume") == 0) & pl.col("ts").is_duplicated()
    else:
        off_grid = pl.lit(False)
    return frame.select((outside | off_grid).fill_null(True).alias("drop")).to_series()


def drop_non_bars(frame: pl.DataFrame, tf: Timeframe, start: datetime, end: datetime, market_time: int | None
                  ) -> tuple[pl.DataFrame, int]:  # fmt: skip
    """The frame without :func:`non_bar_points`, and how many were dropped."""
    if not frame.height:
        return frame, 0
    drop = non_bar_points(frame, tf, start, end, market_time)
    kept = frame.filter(~drop)
    return kept, frame.height - kept.height


# --- errors ------------------------------------------------------------------------------------


def _vendor_error(body: bytes) -> tuple[str, str | None]:
    """Yahoo's ``description``/``code`` from ``{"chart"|"finance": {"error": {...}}}``, else the text."""
    msg, doc = error_text(body)
    if doc is not None:
        for key in ERROR_KEYS:
            err = (doc.get(key) or {}).get("error") if isinstance(doc.get(key), dict) else None
            if isinstance(err, dict):
                return str(err.get("description") or err.get("code") or msg), err.get("code")
    return msg, None


def map_http_error(status: int, body: bytes, headers: httpx.Headers, endpoint: str) -> MarketpipeError:
    msg, code = _vendor_error(body)
    details: dict[str, Any] = {"status": status, "vendor_message": msg, "endpoint": endpoint}
    if code is not None:
        details["vendor_code"] = code
    return status_error(
        status,
        msg,
        provider="yahoo",
        details=details,
        headers=headers,
        auth_hint="; Yahoo may now want a session cookie and crumb for the chart endpoint",
    )


def _error_in_200(err: _Error, symbol: str) -> MarketpipeError:
    """A chart error inside a 200 answer, typed as its HTTP twin would be."""
    text = err.description or err.code or "chart error"
    details = {"status": 200, "vendor_message": text, "vendor_code": err.code, "symbol": symbol}
    if (err.code or "").lower() == "not found":
        return NotFound(f"yahoo: not found ({text})", provider="yahoo", details=details)
    return ProviderBadRequest(f"yahoo rejected the request: {text}", provider="yahoo", details=details)


# --- the client --------------------------------------------------------------------------------


class YahooProvider(HttpProvider):
    """Async client for Yahoo's chart endpoint. ``async with YahooProvider() as p: ...``"""

    name = "yahoo"
    capabilities = Capabilities(frozenset({"bars", "actions"}))  # one consolidated feed: takes no feed argument

    def __init__(
        self,
        *,
        config: YahooConfig | None = None,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config or YahooConfig()
        self._connect(
            self.config,
            base_url,
            DEFAULT_BASE_URL,
            now,
            headers={"User-Agent": BROWSER_USER_AGENT, "Accept": "application/json,text/plain,*/*"},
            transport=transport,
            map_error=map_http_error,
        )
        self.padding_rows_dropped = 0
        self.non_bar_points_dropped = 0  # "current price" points and others outside the range or grid
        self._last_source = self.name

    @classmethod
    def from_config(
        cls, config: YahooConfig | None = None, *, env: dict[str, str] | None = None, **kw: Any
    ) -> YahooProvider:
        """No credentials exist for this endpoint; ``env`` is accepted for a uniform factory call."""
        return cls(config=config, **kw)

    # --- capabilities --------------------------------------------------------------------------

    def supports(
        self, kind: str, timeframe: Timeframe | None, start: datetime | None, end: datetime | None, now: datetime
    ) -> str | None:
        """Bars only, at the intervals Yahoo has, inside its intraday lookback windows."""
        if not self.capabilities.serves(kind):
            return f"yahoo serves bars and corporate actions only, not {kind}"
        if kind == "actions":
            return None
        if timeframe is None:
            return "yahoo needs a bar timeframe"
        name = INTERVALS.get(timeframe)
        if name is None:
            if timeframe.unit is Unit.HOUR:
                return f"yahoo has no {timeframe} bars (its hourly buckets start at the half hour)"
            return f"yahoo has no {timeframe} bars; it serves {', '.join(str(t) for t in INTERVALS)}"
        lookback = LOOKBACK.get(name)
        if lookback is not None and start is not None and start < now - lookback + LOOKBACK_MARGIN:
            return f"yahoo keeps {timeframe} bars for the last {lookback.days} days only"
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
    ) -> AsyncIterator[BarPage]:
        """Pages of bars for ``[start, end)``, one symbol at a time, one page per Yahoo request.

        ``feed`` is ignored (Yahoo has one feed), as are ``limit`` (Yahoo answers a window whole)
        and ``asof`` (no symbol history). A symbol Yahoo does not know raises NOT_FOUND after the
        pages of the symbols before it.
        """
        validate_required(symbols, "symbols", message="no symbols given")
        validate_range(start, end)
        validate_enum(
            adjustment,
            ADJUSTMENTS,
            "adjustment",
            message=f"yahoo serves adjustment {' or '.join(ADJUSTMENTS)} only (its OHLC are split-adjusted), "
            "not {value!r}",
        )
        validate_timeframe(timeframe, allowed=INTERVALS, message="yahoo has no {value} bars; it serves {allowed}")
        interval = INTERVALS[timeframe]
        windows = wire_windows(timeframe, start, end)
        asked = [w for w in windows if w[1] > w[0]]
        number = 0
        for si, sym in enumerate(symbols):
            path = chart_path(quote(to_yahoo(sym), safe=""))
            # raw: every split from the window's start to now is in Yahoo's prices; list them first
            splits = await self._split_history(path, sym, asked[0][0]) if adjustment == "raw" and asked else None
            for wi, (p1, p2, through) in enumerate(windows):
                last_window = wi == len(windows) - 1
                frame, source, request_id, nbytes = await self._fetch(
                    path, sym, timeframe, interval, p1, p2, (start, end), splits
                )
                number += 1
                page = BarPage(
                    frame=frame,
                    symbols=list(symbols),
                    timeframe=timeframe,
                    start=start,
                    end=end,
                    feed=FEED,
                    source=source,
                    request_id=request_id,
                    fetched_at=frame["fetched_at"][0] if frame.height else self._now(),
                    next_page_token=None,
                    page_number=number,
                    complete_through={sym: end if last_window else through},
                    last_page=last_window and si == len(symbols) - 1,
                    nbytes=nbytes,
                    kind="bars",
                )
                yield page

    async def corporate_actions(
        self, symbols: list[str], start: date, end: date, *, types: list[str] | None = None
    ) -> ActionsPage:
        """Splits and dividends from the daily chart's ``events=div,split`` over ``[start, end]``, one
        request per symbol. Yahoo sends no ids (derived from symbol, kind, ex-date and event key) and only
        these two kinds. A cross-check source (next-capabilities §1.4): its dividend amounts have
        been split-adjusted at times."""
        validate_required(symbols, "symbols", message="no symbols given")
        tz = NY
        rows: list[dict[str, Any]] = []
        ids: list[str] = []
        source = self._last_source
        p1 = int(datetime.combine(start, time(0), NY).timestamp())
        p2 = int(datetime.combine(end + timedelta(days=1), time(0), NY).timestamp())
        for sym in dict.fromkeys(symbols):
            params = {"interval": "1d", "period1": p1, "period2": p2, "events": EVENTS}

            def decode(resp: httpx.Response, sym: str = sym) -> Any:
                try:
                    doc = orjson.loads(resp.content)
                    chart = doc["chart"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    raise envelope_error(
                        resp.content, provider=self.name, endpoint=ENDPOINT, required=("chart",), cause=exc
                    ) from exc
                if not chart.get("result"):
                    err = chart.get("error") or {}
                    raise _error_in_200(_Error(code=err.get("code"), description=err.get("description")), sym)
                return chart["result"][0].get("events")

            events, resp = await self._http.get(chart_path(to_yahoo(sym)), params, ENDPOINT, decode)
            source = sim_source(resp.headers, self.name)
            ids.append(resp.headers.get("x-request-id") or uuid.uuid4().hex[:16])
            rows += events_to_actions(
                events,
                sym,
                lambda sec: datetime.fromtimestamp(sec, tz).date().isoformat(),
                source=source,
                fetched_at=self._now(),
            )
        frame = actions_frame(rows)
        if types:
            frame = frame.filter(pl.col("type").is_in(types))
        return ActionsPage(frame, list(symbols), start, end, source, ids, self._now())

    def _result_of(self, resp: httpx.Response, symbol: str) -> _Result:
        """The one chart result of a response; a chart error, or neither a result nor an error, raised."""
        try:
            doc = _DECODER.decode(resp.content)
        except msgspec.ValidationError as exc:
            raise envelope_error(
                resp.content, provider=self.name, endpoint=ENDPOINT, required=("chart",), cause=exc
            ) from exc
        chart = doc.chart
        if not chart.result:
            if chart.error is not None:
                raise _error_in_200(chart.error, symbol)
            raise MalformedResponse(
                f"yahoo {ENDPOINT}: the answer for {symbol} has neither a result nor an error",
                provider=self.name,
                details={"symbol": symbol, "endpoint": ENDPOINT, "missing": ["chart.result", "chart.error"]},
            )
        return chart.result[0]

    async def _split_history(self, path: str, symbol: str, p1: int) -> Splits:
        """Yahoo's splits of ``symbol`` from ``p1`` (Unix seconds) to now: one quarterly chart request
        with ``events=split`` (a few rows whatever the span)."""
        p2 = int(self._now().timestamp()) + 86_400
        params = {"interval": "3mo", "period1": p1, "period2": max(p2, p1 + 1), "events": "split"}

        def decode(resp: httpx.Response) -> Splits:
            return splits_of(self._result_of(resp, symbol), symbol)

        splits, _ = await self._http.get(path, params, ENDPOINT, decode)
        return splits

    async def _fetch(
        self,
        path: str,
        symbol: str,
        tf: Timeframe,
        interval: str,
        p1: int,
        p2: int,
        window: tuple[datetime, datetime],
        splits: Splits | None = None,
    ) -> tuple[pl.DataFrame, str, str, int]:
        """(frame, source, request id, bytes) of one chart window; an empty window asks nothing. With
        ``splits`` (raw wanted) the bars are un-adjusted with them and the response's own split events."""
        if p2 <= p1:
            # no canonical stamp in the window (e.g. 10:00-15:00 of one day for daily bars)
            return pl.DataFrame(schema={**BAR_SCHEMA, "raw_ts": pl.String()}), self._last_source, uuid.uuid4().hex, 0
        params: dict[str, Any] = {"interval": interval, "period1": p1, "period2": p2, "includePrePost": "false"}
        if splits is not None:
            params["events"] = "split"

        def decode(resp: httpx.Response) -> tuple[tuple[pl.DataFrame, int], int]:
            result = self._result_of(resp, symbol)
            frame, padding = chart_to_frame(result, symbol, tf, sim_source(resp.headers, self.name), self._now())
            if splits is not None:
                meta = result.meta
                tz = (meta.exchangeTimezoneName if meta else None) or "America/New_York"
                hint = meta.priceHint if meta is not None and meta.priceHint is not None else 2
                frame = unadjust_splits(frame, tf, {**splits, **splits_of(result, symbol)}, tz, max(hint, 2))
            market_time = result.meta.regularMarketTime if result.meta else None
            return drop_non_bars(frame, tf, *window, market_time), padding

        ((frame, non_bars), dropped), resp = await self._http.get(path, params, ENDPOINT, decode, offload=True)
        if non_bars:
            self.non_bar_points_dropped += non_bars
            VENDOR_POINTS_DROPPED.labels(provider=self.name, reason="not_a_bar").inc(non_bars)
            log.info("yahoo_non_bar_points_dropped", symbol=symbol, interval=interval, rows=non_bars)
        if dropped:
            self.padding_rows_dropped += dropped
            log.debug("yahoo_padding_dropped", symbol=symbol, interval=interval, rows=dropped)
        self._last_source = sim_source(resp.headers, self.name)
        request_id = resp.headers.get("x-request-id") or resp.headers.get("y-rid") or uuid.uuid4().hex[:16]
        return frame, self._last_source, request_id, len(resp.content)


__all__ = [
    "DEFAULT_BASE_URL",
    "INTERVALS",
    "YahooProvider",
    "chart_to_frame",
    "from_yahoo",
    "map_http_error",
    "splits_of",
    "to_yahoo",
    "unadjust_splits",
    "wire_windows",
]
