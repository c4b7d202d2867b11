"""Alpaca Market Data API v2 (stocks), REST. Wire format: shared/reference/market-data-apis.md §1.

Pages are decoded with msgspec into column lists and handed on as polars frames — no per-row dicts
or model objects on the bulk path. Responses from marketpipe's own simulator carry the header
``X-Marketpipe-Sim`` and are labelled ``source="sim:alpaca"``, so simulator data never mixes with real data.
"""

from __future__ import annotations

import functools
import io
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import msgspec
import polars as pl

from marketpipe.core.config import alpaca_credentials
from marketpipe.core.errors import (
    AuthFailed,
    InvalidArgument,
    MalformedResponse,
    MarketpipeError,
    NotEntitled,
    ProviderError,
)
from marketpipe.core.log import get_logger
from marketpipe.core.schema import (
    BAR_SCHEMA,
    QUOTE_SCHEMA,
    TRADE_SCHEMA,
    UTC_US,
    Bar,
    Quote,
    Snapshot,
    Trade,
)
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import rfc3339, utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.base import BarPage, envelope_error, pagination_loop
from marketpipe.providers.http import HttpProvider, VendorHttp, error_text, status_error

DEFAULT_BASE_URL = "https://data.alpaca.markets"
ALPACA_HISTORY_START = datetime(2016, 1, 1, tzinfo=UTC)
SIP_DELAY = timedelta(minutes=15)
MAX_LIMIT = 10_000
FEEDS_HISTORICAL = ("sip", "iex", "otc", "boats")
FEEDS_LATEST = ("sip", "iex", "delayed_sip", "otc", "boats", "overnight")
ADJUSTMENTS = ("raw", "split", "dividend", "spin-off", "all")
T = TypeVar("T")
log = get_logger("marketpipe.providers.alpaca")


# --- wire structs (gc=False: decoded objects hold no cycles, which makes decoding much faster) ----


class _WBar(msgspec.Struct, gc=False):
    t: str
    o: float | None = None
    h: float | None = None
    l: float | None = None  # noqa: E741 - the vendor's key
    c: float | None = None
    v: int | float | None = None
    n: int | None = None
    vw: float | None = None


class _WTrade(msgspec.Struct, gc=False):
    t: str
    p: float | None = None
    s: int | float | None = None
    x: str | None = None
    i: int | None = None
    c: list[str] | None = None
    z: str | None = None
    u: str | None = None


class _WQuote(msgspec.Struct, gc=False, rename={"as_": "as"}):
    t: str
    bp: float | None = None
    bs: int | float | None = None
    bx: str | None = None
    ap: float | None = None
    as_: int | float | None = None
    ax: str | None = None
    c: list[str] | None = None
    z: str | None = None


def _page_structs(key: str, row: type) -> tuple[type, type]:
    """The multi-symbol (``{key: {sym: [...]}, "next_page_token"}``) and single-symbol (``{key: [...]
    or null, "symbol", "next_page_token"}``) page shapes. With ``row=msgspec.Raw`` each symbol's
    array stays undecoded bytes.

    Every key of the vendor's envelope is required (a token's value may be null): a ``{}`` from a
    proxy, or a bare ``{"bars": null}``, is a malformed answer — never an empty last page, which
    would let the ledger claim a range that was never delivered."""
    token = ("next_page_token", str | None)
    raw = row is msgspec.Raw
    rows: Any = row if raw else list[row]  # type: ignore[valid-type]
    maybe_rows: Any = rows if raw else rows | None  # Raw already captures a JSON null
    multi = msgspec.defstruct(f"_Multi_{key}", [(key, dict[str, rows] | None), token], gc=False)
    single = msgspec.defstruct(f"_Single_{key}", [(key, maybe_rows), ("symbol", str), token], gc=False)
    return multi, single


def _page_keys(kind: str, single: bool) -> tuple[str, ...]:
    return (kind, "symbol", "next_page_token") if single else (kind, "next_page_token")


_PAGES = {kind: _page_structs(kind, msgspec.Raw) for kind in ("bars", "trades", "quotes")}
# Pages are the bulk path: the envelope is decoded with each symbol's array left as raw bytes, and
# polars' JSON reader (Rust, without the GIL, so pages decode in parallel threads) parses them.
_RAW_BAR_SCHEMA = {
    "t": pl.String(),
    "o": pl.Float64(),
    "h": pl.Float64(),
    "l": pl.Float64(),
    "c": pl.Float64(),
    "v": pl.Float64(),
    "n": pl.Float64(),
    "vw": pl.Float64(),
}
_RAW_TRADE_SCHEMA = {
    "t": pl.String(),
    "p": pl.Float64(),
    "s": pl.Float64(),
    "x": pl.String(),
    "i": pl.UInt64(),
    "c": pl.List(pl.String()),
    "z": pl.String(),
    "u": pl.String(),
}
_RAW_QUOTE_SCHEMA = {
    "t": pl.String(),
    "bp": pl.Float64(),
    "bs": pl.Float64(),
    "bx": pl.String(),
    "ap": pl.Float64(),
    "as": pl.Float64(),
    "ax": pl.String(),
    "c": pl.List(pl.String()),
    "z": pl.String(),
}


# Latest values: the wrapper key is required (its value may be null: an unknown symbol). Only the
# multi-snapshot has no wrapper, so there an empty object is a legitimate "nothing known".


class _LatestTrade(msgspec.Struct):
    trade: _WTrade | None


class _LatestQuote(msgspec.Struct):
    quote: _WQuote | None


class _LatestTrades(msgspec.Struct):
    trades: dict[str, _WTrade] | None


class _LatestQuotes(msgspec.Struct):
    quotes: dict[str, _WQuote] | None


class _LatestBars(msgspec.Struct):
    bars: dict[str, _WBar] | None


class _WSnapshot(msgspec.Struct):
    latestTrade: _WTrade | None = None
    latestQuote: _WQuote | None = None
    minuteBar: _WBar | None = None
    dailyBar: _WBar | None = None
    prevDailyBar: _WBar | None = None


_LATEST: dict[str, type] = {"trades": _LatestTrades, "quotes": _LatestQuotes, "bars": _LatestBars}
_LATEST_ONE: dict[str, type] = {"trade": _LatestTrade, "quote": _LatestQuote}
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


# --- columnar conversion -----------------------------------------------------------------------

_FAST_TS = "%Y-%m-%dT%H:%M:%SZ"


def _parse_ts(col: pl.Series, unit: str) -> pl.Series:
    """RFC-3339 strings to UTC datetimes; the fixed whole-second form is parsed on the fast path,
    anything else (fractions, offsets) by the general parser; unparsable stays null (and is then
    quarantined by the checks, never dropped)."""
    fast = col.str.to_datetime(_FAST_TS, time_unit=unit, time_zone="UTC", strict=False)  # type: ignore[arg-type]
    missing = fast.is_null() & col.is_not_null()
    if not missing.any():
        return fast
    slow = (
        col.str.replace(r"Z$", "+00:00")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", time_unit=unit, strict=False)  # type: ignore[arg-type]
        .dt.convert_time_zone("UTC")
    )
    return fast.fill_null(slow)


def _read_groups(groups: list[tuple[str, msgspec.Raw | None]], schema: dict[str, pl.DataType]) -> pl.DataFrame | None:
    """Each symbol's raw JSON array through polars' reader, with the symbol added; None if empty."""
    parts = []
    for sym, raw in groups:
        if raw is None:
            continue
        data = memoryview(raw)
        if data.nbytes == 4 and data.tobytes() == b"null":
            continue
        part = pl.read_json(io.BytesIO(data), schema=schema)
        if part.height:
            parts.append(part.with_columns(symbol=pl.lit(sym, pl.String)))
    if not parts:
        return None
    return pl.concat(parts) if len(parts) > 1 else parts[0]


def _stamped(source: str, feed: str, fetched_at: datetime) -> list[pl.Expr]:
    return [
        pl.lit(source, pl.String).alias("source"),
        pl.lit(feed, pl.String).alias("feed"),
        pl.lit(fetched_at, UTC_US).alias("fetched_at"),
    ]


def bars_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], timeframe: str, source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    """Raw per-symbol JSON arrays of Alpaca bars to one canonical frame."""
    raw_frame = _read_groups(groups, _RAW_BAR_SCHEMA)
    if raw_frame is None:
        return pl.DataFrame(schema=BAR_SCHEMA)
    t = raw_frame.get_column("t")
    return raw_frame.select(
        pl.col("symbol"),
        pl.lit(timeframe, pl.String).alias("timeframe"),
        _parse_ts(t, "us").alias("ts"),
        pl.col("o").alias("open"),
        pl.col("h").alias("high"),
        pl.col("l").alias("low"),
        pl.col("c").alias("close"),
        pl.col("v").cast(pl.Int64, strict=False).alias("volume"),
        pl.col("n").cast(pl.Int64, strict=False).alias("trade_count"),
        pl.col("vw").alias("vwap"),
        *_stamped(source, feed, fetched_at),
        t.alias("raw_ts"),
    )


def trades_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    raw = _read_groups(groups, _RAW_TRADE_SCHEMA)
    if raw is None:
        return pl.DataFrame(schema=TRADE_SCHEMA)
    return raw.select(
        pl.col("symbol"),
        _parse_ts(raw.get_column("t"), "ns").alias("ts"),
        pl.col("p").alias("price"),
        pl.col("s").cast(pl.Int64, strict=False).alias("size"),
        pl.col("x").alias("exchange"),
        pl.col("i").alias("trade_id"),
        pl.col("c").alias("conditions"),
        pl.col("z").alias("tape"),
        pl.col("u").alias("update"),
        *_stamped(source, feed, fetched_at),
    )


def quotes_to_frame(
    groups: list[tuple[str, msgspec.Raw | None]], source: str, feed: str, fetched_at: datetime
) -> pl.DataFrame:
    raw = _read_groups(groups, _RAW_QUOTE_SCHEMA)
    if raw is None:
        return pl.DataFrame(schema=QUOTE_SCHEMA)
    return shares_from_lots(
        raw.select(
            pl.col("symbol"),
            _parse_ts(raw.get_column("t"), "ns").alias("ts"),
            pl.col("bp").alias("bid_price"),
            pl.col("bs").cast(pl.Int64, strict=False).alias("bid_size"),
            pl.col("bx").alias("bid_exchange"),
            pl.col("ap").alias("ask_price"),
            pl.col("as").cast(pl.Int64, strict=False).alias("ask_size"),
            pl.col("ax").alias("ask_exchange"),
            pl.col("c").alias("conditions"),
            pl.col("z").alias("tape"),
            *_stamped(source, feed, fetched_at),
        )
    )


# Alpaca's SIP quote sizes were round lots until 2025-11-03 and are shares since; canonical quotes
# are always in shares (a round lot was 100 shares for every symbol before that date).
QUOTE_SHARES_FROM = datetime(2025, 11, 3, 5, tzinfo=UTC)  # midnight New York
ROUND_LOT = 100


def shares_from_lots(frame: pl.DataFrame) -> pl.DataFrame:
    before = pl.col("ts") < pl.lit(QUOTE_SHARES_FROM)
    return frame.with_columns(
        [pl.when(before).then(pl.col(c) * ROUND_LOT).otherwise(pl.col(c)).alias(c) for c in ("bid_size", "ask_size")]
    )


def _one_ts(text: str) -> datetime:
    s = _parse_ts(pl.Series([text], dtype=pl.String), "ns")[0]
    if s is None:
        raise MalformedResponse(f"unparsable timestamp {text!r}", provider="alpaca")
    return s  # type: ignore[no-any-return]


def _trade_record(sym: str, w: _WTrade, source: str, feed: str, fetched: datetime) -> Trade:
    if w.p is None or w.s is None:
        raise MalformedResponse(f"trade for {sym} lacks price or size", provider="alpaca")
    return Trade(
        symbol=sym,
        ts=_one_ts(w.t),
        price=w.p,
        size=int(w.s),
        exchange=w.x,
        trade_id=w.i,
        conditions=tuple(w.c or ()),
        tape=w.z,
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


def _quote_record(sym: str, w: _WQuote, source: str, feed: str, fetched: datetime) -> Quote:
    ts = _one_ts(w.t)
    lot = ROUND_LOT if ts < QUOTE_SHARES_FROM else 1
    return Quote(
        symbol=sym,
        ts=ts,
        bid_price=w.bp or 0.0,
        bid_size=int(w.bs or 0) * lot,
        ask_price=w.ap or 0.0,
        ask_size=int(w.as_ or 0) * lot,
        bid_exchange=w.bx,
        ask_exchange=w.ax,
        conditions=tuple(w.c or ()),
        tape=w.z,
        source=source,
        feed=feed,
        fetched_at=fetched,
    )


def _bar_record_tf(tf: str, sym: str, w: _WBar, source: str, feed: str, fetched: datetime) -> Bar:
    return _bar_record(sym, tf, w, source, feed, fetched)


def _bar_record(sym: str, tf: str, w: _WBar, source: str, feed: str, fetched: datetime) -> Bar:
    if None in (w.o, w.h, w.l, w.c, w.v):
        raise MalformedResponse(f"bar for {sym} lacks a price or the volume", provider="alpaca")
    return Bar(
        symbol=sym,
        timeframe=tf,
        ts=_one_ts(w.t),
        open=w.o,
        high=w.h,
        low=w.l,
        close=w.c,  # type: ignore[arg-type]
        volume=int(w.v),
        trade_count=w.n,
        vwap=w.vw,
        source=source,
        feed=feed,
        fetched_at=fetched,  # type: ignore[arg-type]
    )


# --- errors ------------------------------------------------------------------------------------


def map_http_error(status: int, body: bytes, headers: httpx.Headers, *, provider: str, url: str) -> MarketpipeError:
    msg, doc = error_text(body)
    details: dict[str, Any] = {"status": status, "vendor_message": msg, "endpoint": url}
    if doc is not None and doc.get("code") is not None:
        details["vendor_code"] = doc["code"]
    forbidden: type[ProviderError] = AuthFailed
    hint = "; check ALPACA_API_KEY/ALPACA_SECRET_KEY"
    if status == 403 and "subscription does not permit" in msg:
        details["reason"] = "recent_sip"
        forbidden = NotEntitled
    return status_error(
        status, msg, provider=provider, details=details, headers=headers, forbidden=forbidden, auth_hint=hint
    )


# --- the client --------------------------------------------------------------------------------


class AlpacaProvider(HttpProvider):
    """Async Alpaca REST client. Use as ``async with AlpacaProvider.from_config(cfg) as p: ...``."""

    name = "alpaca"

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
        self.base_url = (base_url or self.config.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._now = now
        self._http = VendorHttp(
            self.name,
            self.config,
            base_url=self.base_url,
            headers={"APCA-API-KEY-ID": key, "APCA-API-SECRET-KEY": secret},
            transport=transport,
            secrets=(key, secret),
            map_error=lambda status, body, headers, endpoint: map_http_error(
                status, body, headers, provider=self.name, url=endpoint
            ),
        )
        self.resilience = self._http.resilience

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
        if kind not in ("bars", "trades", "quotes", "latest_trade", "latest_quote", "latest_bar", "snapshot"):
            return f"alpaca does not serve {kind}"
        if start is not None and start < ALPACA_HISTORY_START:
            return f"alpaca history starts {ALPACA_HISTORY_START.date()}"
        return None

    # --- feed and the 15-minute SIP rule --------------------------------------------------------

    def _plan_feed(self, feed: str | None, end: datetime, start: datetime) -> tuple[str, datetime]:
        """Apply the free plan's rule: SIP only up to 15 minutes ago (clamp ``end``, or use IEX)."""
        feed = (feed or self.config.feed).lower()
        if feed not in FEEDS_HISTORICAL:
            raise InvalidArgument(
                f"invalid feed {feed!r}; allowed: {', '.join(FEEDS_HISTORICAL)}",
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
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be 1..{MAX_LIMIT}", details={"parameter": "limit"})
        if sort not in ("asc", "desc"):
            raise InvalidArgument("sort must be asc or desc", details={"parameter": "sort"})
        used_feed, used_end = self._plan_feed(feed, end, start)
        single = len(symbols) == 1
        path = f"/v2/stocks/{_quote_path(symbols[0])}/{kind}" if single else f"/v2/stocks/{kind}"
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
            page.complete_through = _complete_through(page, sort)
            yield page
            if not nxt:
                return
            followed.add(nxt)
            token = nxt

    # --- latest and snapshots ----------------------------------------------------------------

    def _latest_feed(self, feed: str | None) -> str:
        f = (feed or ("iex" if self.config.plan == "free" else self.config.feed)).lower()
        if f not in FEEDS_LATEST:
            raise InvalidArgument(
                f"invalid feed {f!r}; allowed: {', '.join(FEEDS_LATEST)}", details={"parameter": "feed"}
            )
        return f

    async def _latest(self, kind: str, symbols: list[str], feed: str | None, record: Callable[..., T]) -> dict[str, T]:
        f = self._latest_feed(feed)
        wire = _LATEST[kind]
        endpoint = f"latest_{kind}"
        doc, resp = await self._get(
            f"/v2/stocks/{kind}/latest",
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
            f"/v2/stocks/{_quote_path(symbol)}/{key}s/latest",
            {"feed": f},
            endpoint,
            lambda r: _decode_envelope(_LATEST_ONE[key], r.content, endpoint, (key,)),
        )
        w = getattr(doc, key)
        return record(symbol, w, self._source(resp), f, self._now()) if w is not None else None

    async def latest_trades(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Trade]:
        return await self._latest("trades", symbols, feed, _trade_record)

    async def latest_quotes(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Quote]:
        return await self._latest("quotes", symbols, feed, _quote_record)

    async def latest_bars(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Bar]:
        return await self._latest("bars", symbols, feed, functools.partial(_bar_record_tf, "1Min"))

    async def latest_trade(self, symbol: str, *, feed: str | None = None) -> Trade | None:
        return await self._latest_one("trade", symbol, feed, _trade_record)

    async def latest_quote(self, symbol: str, *, feed: str | None = None) -> Quote | None:
        return await self._latest_one("quote", symbol, feed, _quote_record)

    async def snapshots(self, symbols: list[str], *, feed: str | None = None) -> dict[str, Snapshot]:
        f = self._latest_feed(feed)
        # The stock multi-snapshot has no wrapper key: symbol -> snapshot at the top level.
        doc, resp = await self._get(
            "/v2/stocks/snapshots",
            {"symbols": ",".join(symbols), "feed": f},
            "snapshots",
            lambda r: _decoder(dict[str, _WSnapshot | None]).decode(r.content),
        )
        src, now = self._source(resp), self._now()
        out: dict[str, Snapshot] = {}
        for sym, snap in doc.items():
            if snap is None:
                continue
            out[sym] = Snapshot(
                symbol=sym,
                latest_trade=_trade_record(sym, snap.latestTrade, src, f, now) if snap.latestTrade else None,
                latest_quote=_quote_record(sym, snap.latestQuote, src, f, now) if snap.latestQuote else None,
                minute_bar=_bar_record(sym, "1Min", snap.minuteBar, src, f, now) if snap.minuteBar else None,
                daily_bar=_bar_record(sym, "1Day", snap.dailyBar, src, f, now) if snap.dailyBar else None,
                prev_daily_bar=_bar_record(sym, "1Day", snap.prevDailyBar, src, f, now) if snap.prevDailyBar else None,
                source=src,
                fetched_at=now,
            )
        return out

    async def snapshot(self, symbol: str, *, feed: str | None = None) -> Snapshot | None:
        return (await self.snapshots([symbol], feed=feed)).get(symbol)


def _quote_path(symbol: str) -> str:
    from urllib.parse import quote

    return quote(symbol, safe="")


def _page_decoder(
    kind: str, single: bool, symbol: str, tf: str, feed: str, provider: AlpacaProvider
) -> Callable[[httpx.Response], tuple[pl.DataFrame, str | None, int]]:
    multi_t, single_t = _PAGES[kind]
    endpoint, required = (f"{kind}_single" if single else kind), _page_keys(kind, single)

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


def _complete_through(page: BarPage, sort: str) -> dict[str, datetime]:
    """See BarPage.complete_through. Relies on the documented order: symbol first, then time."""
    if page.last_page:
        return dict.fromkeys(page.symbols, page.end)
    if sort != "asc" or page.frame.height == 0:
        return {}
    order = page.frame.get_column("symbol")
    present = order.unique(maintain_order=True).to_list()
    out = dict.fromkeys(present[:-1], page.end)
    last = present[-1]
    ts = page.frame.filter(pl.col("symbol") == last).get_column("ts").drop_nulls()
    if len(ts):
        out[last] = ts.max() + timedelta(microseconds=1)  # type: ignore[operator]
    return out


__all__ = ["DEFAULT_BASE_URL", "AlpacaProvider", "bars_to_frame", "map_http_error"]
