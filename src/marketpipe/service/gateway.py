"""The gateway service: what the REST API (v1 and the Alpaca-compatible v2) asks for, answered from
the store in page-sized windows (fetching what is missing through :class:`MarketData`) or, for
latest values and snapshots, through :class:`MarketData` as well (historical ticks, passed through
unstored, the API asks of :class:`MarketData` directly) — so the API fails over exactly as
``marketpipe.*`` and the CLI do, on the router's one path. Every answer carries where it came from,
when it was fetched, how old the data is and how good it is. Caching of encoded responses is the API
layer's business; the gateway holds no failover loop of its own."""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from marketpipe.core.calendar import ContinuousCalendar
from marketpipe.core.errors import (
    AllProvidersFailed,
    InvalidArgument,
    MarketpipeError,
    NotFound,
    ProviderBadRequest,
    ProviderError,
)
from marketpipe.core.log import get_logger
from marketpipe.core.schema import (
    BAR_SCHEMA,
    CRYPTO_BAR_SCHEMA,
    Bar,
    Quote,
    Snapshot,
    Trade,
    is_crypto,
    normalize_symbols,
)
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import record_ns, utcnow
from marketpipe.core.validation import validate_enum, validate_limit, validate_range, validate_sort, validate_timeframe
from marketpipe.service.backfill import chunk_interval, missing_ranges
from marketpipe.service.data import LatestKind, MarketData
from marketpipe.service.providers import probe_call
from marketpipe.service.quality import analyze
from marketpipe.service.router import CLIENT_ERRORS, Attempt, ProviderRouter
from marketpipe.wire.alpaca_crypto import validate_location

log = get_logger("marketpipe.gateway")
MAX_LIMIT = 10_000
MAX_WINDOWS = 8  # calendar windows one request may fetch / read before it hands back a token
_US = timedelta(microseconds=1)


@dataclass
class Meta:
    """Attribution of one symbol's answer."""

    sources: list[str] = field(default_factory=list)
    feed: str | None = None
    fetched_at: datetime | None = None
    newest: datetime | None = None  # end of the newest data point (bar end, trade / quote time)
    quality_score: float | None = None
    stale: bool = False
    warnings: list[str] = field(default_factory=list)

    def data_age(self, now: datetime) -> float | None:
        return max(0.0, (now - self.newest).total_seconds()) if self.newest else None

    def to_dict(self, now: datetime) -> dict[str, Any]:
        age = self.data_age(now)
        return {
            "source": self.sources[0] if len(self.sources) == 1 else (self.sources or None),
            "feed": self.feed,
            "fetched_at": self.fetched_at.isoformat() if self.fetched_at else None,
            "data_age_seconds": round(age, 3) if age is not None else None,
            "quality_score": round(self.quality_score, 4) if self.quality_score is not None else None,
            "stale": self.stale,
            **({"warnings": self.warnings} if self.warnings else {}),
        }


@dataclass
class BarsPage:
    frame: pl.DataFrame  # canonical bars, ordered by symbol then time (time descending with sort=desc)
    next_page_token: str | None
    meta: dict[str, Meta]

    @property
    def partial(self) -> bool:
        """Upstream failed for part of the page: what the store held was served (never cache it)."""
        return any(m.stale for m in self.meta.values())


def encode_token(symbol: str, ts: datetime) -> str:
    return base64.urlsafe_b64encode(f"{symbol}|{int(ts.timestamp() * 1_000_000)}".encode()).decode()


def decode_token(token: str, symbols: list[str]) -> tuple[str, datetime]:
    try:
        sym, us = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        ts = datetime.fromtimestamp(int(us) / 1_000_000, UTC)
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError) as exc:
        raise InvalidArgument("invalid page_token", details={"parameter": "page_token"}) from exc
    if sym not in symbols:
        raise InvalidArgument("page_token does not belong to this request", details={"parameter": "page_token"})
    return sym, ts


class Gateway:
    def __init__(self, data: MarketData) -> None:
        self.data = data
        self._lock = asyncio.Lock()
        self._probing = False
        self.started = utcnow()

    # --- providers ---------------------------------------------------------------------------------

    @property
    def router(self) -> ProviderRouter:
        return self.data.router

    @property
    def pinned(self) -> str | None:
        """POST /admin/failover: the provider served from first (kept on the façade, so every fetch
        honours it and it survives a reconnect)."""
        return self.data.pinned

    def candidates(self, kind: str, timeframe: Timeframe | None = None) -> tuple[list[Any], list[Attempt]]:
        """The router's candidates for ``kind`` (pinned provider first), for status pages."""
        return self.router.candidates(kind, timeframe, None, None)

    def failover(self, provider: str | None) -> dict[str, Any]:
        """Pin ``provider`` as first choice (``None`` returns to health order)."""
        if provider is not None:
            validate_enum(
                provider, self.router.names, "provider", message="unknown provider {value!r}; configured: {allowed}"
            )
        self.data.pinned = provider
        log.warning("admin_failover", pinned=provider)
        return self.datasource()

    async def reconnect(self) -> dict[str, Any]:
        """Drop every provider client and build them again (new connections, fresh circuits)."""
        async with self._lock:
            await self.data.reset_providers()
            names = self.router.names
            if self._probing:
                self.start_probes()
        log.warning("admin_reconnect", providers=names)
        return self.datasource()

    def datasource(self) -> dict[str, Any]:
        usable, skipped = self.candidates("bars")
        return {
            "mode": "rest",
            "active": usable[0].name if usable else None,
            "pinned": self.pinned,
            "order": [p.name for p in usable],
            "unavailable": [a.to_dict() for a in skipped],
            "providers": self.provider_rows(),
        }

    def provider_rows(self) -> list[dict[str, Any]]:
        """The health monitor's table (passive stats plus the background probes' results)."""
        rows = self.router.health.table()
        rows += [
            {"provider": a.provider, "state": "unavailable", "circuit": "", "note": f"{a.code}: {a.message}"}
            for a in self.router.unavailable
        ]
        return rows

    def start_probes(self) -> None:
        """Active health probes in the background, every provider's ``probe_interval`` (the shortest)."""
        router = self.router
        for p in router.providers:
            router.health.probes.setdefault(p.name, probe_call(p))
        interval = min((self.data.config.provider(p.name).probe_interval for p in router.providers), default=30.0)
        router.health.start(interval)
        self._probing = True

    # --- bars ----------------------------------------------------------------------------------------

    async def bars(
        self,
        symbols: list[str] | str,
        timeframe: str | Timeframe,
        start: datetime,
        end: datetime,
        *,
        source: str = "auto",
        feed: str | None = None,
        limit: int = 1000,
        page_token: str | None = None,
        sort: str = "asc",
        fetch: bool = True,
    ) -> BarsPage:
        """One page of bars, ordered by symbol then time (``limit`` counts rows across symbols).

        Work is bounded by the page, not by the range: the range is cut (by the calendar) into
        windows expected to hold about ``limit`` bars, and only the windows this page reaches are
        fetched (what the ledger lacks) and read. A request for 20 years of minute bars therefore
        costs one page of work per call, and the token carries the position.

        Crypto pairs take the same path on their 24/7 calendar: held ranges are read from the store
        (``crypto_bars``, fractional volumes as fetched), missing windows fetched from Alpaca's crypto
        data and stored; ``feed`` names the vendor location and ``source`` may only be ``alpaca``."""
        syms = normalize_symbols(symbols)
        tf = validate_timeframe(timeframe)
        validate_limit(limit, 1, MAX_LIMIT)
        validate_sort(sort)
        validate_range(start, end)
        now = utcnow()
        end = min(end, now)
        cal = self.data.calendar_of(syms)  # the pairs' 24/7 calendar, or the exchange's for stocks
        pairs = isinstance(cal, ContinuousCalendar)
        cal.check_bounds(start, max(start, end))
        if pairs and feed:
            validate_location(feed, "feed")  # a pair's feed is the vendor location: checked even when held
        desc = sort == "desc"
        after = decode_token(page_token, syms) if page_token else None
        provider: Any = None
        if source != "auto" and pairs:
            provider = self.data.crypto_source(source)  # pairs: Alpaca's crypto data only
        elif source != "auto":
            validate_enum(
                source, self.router.names, "source", message="unknown source {value!r}; use auto or one of {allowed}"
            )
            provider = self.router.get(source)
        sources = [source, f"sim:{source}"] if provider is not None else None
        store = self.data.store
        parts: list[pl.DataFrame] = []
        have, windows = 0, 0
        warnings: dict[str, list[str]] = {}
        fetched: set[str] = set()  # symbols something was fetched for just now: their stored scores predate it
        nxt: str | None = None
        first = syms.index(after[0]) if after else 0
        for sym in syms[first:]:
            lo, hi = start, end
            if after and sym == after[0]:
                if desc:
                    hi = min(hi, after[1])
                else:
                    lo = max(lo, after[1] + _US)
            pieces = [(a, b) for a, b, _ in chunk_interval(cal, tf, lo, hi, limit)] if hi > lo else []
            for ps, pe in reversed(pieces) if desc else pieces:
                if windows >= MAX_WINDOWS:
                    # Enough work for one call: hand back a position (no row there, none skipped).
                    nxt = encode_token(sym, pe if desc else pe - _US)
                    break
                windows += 1
                if fetch and end > start:
                    warned, filled = await self._ensure([sym], tf, ps, pe, feed, provider)
                    if filled:
                        fetched.add(sym)
                    if warned:
                        warnings.setdefault(sym, []).extend(warned)
                rows = await asyncio.to_thread(
                    store.read_bars,
                    [sym],
                    str(tf),
                    ps,
                    pe,
                    limit=limit + 1 - have,
                    desc=desc,
                    sources=sources,
                    feed=feed,
                )
                if rows.height:
                    parts.append(rows)
                    have += rows.height
                if have > limit:
                    break
            if nxt is not None or have > limit:
                break
        frame = pl.concat(parts) if parts else pl.DataFrame(schema=CRYPTO_BAR_SCHEMA if pairs else BAR_SCHEMA)
        whole = True  # every window the page reached was read to its end
        if frame.height > limit:
            frame = frame.head(limit)
            last = frame.row(limit - 1, named=True)
            nxt = encode_token(last["symbol"], last["ts"])
            whole = False
        # One symbol read whole, unfiltered: the frame is the store's own read of the span it covers,
        # so scoring it needs no second read of those bars.
        exact = whole and len(syms) == 1 and sources is None and feed is None
        meta = await asyncio.to_thread(self._bars_meta, frame, syms, tf, start, end, exact, fetched)
        for sym, m in meta.items():
            m.warnings = sorted(set(warnings.get(sym, [])))
            m.stale = bool(m.warnings)
        return BarsPage(frame, nxt, meta)

    async def _ensure(
        self, syms: list[str], tf: Timeframe, start: datetime, end: datetime, feed: str | None, provider: Any
    ) -> tuple[list[str], bool]:
        """Fetch what the ledger lacks: (warnings, whether a fetch ran). A failure is fatal only when
        nothing is held for the range."""
        store = self.data.store
        name = provider.name if provider is not None else None
        missing = await asyncio.to_thread(missing_ranges, store, syms, tf, start, end, provider=name, feed=feed)
        if not any(missing.values()):
            return [], False
        try:
            stats = await self.data.fill(syms, tf, start, end, feed=feed, provider=name)
        except CLIENT_ERRORS:
            raise
        except ProviderError as exc:
            return await asyncio.to_thread(self._held_or_raise, syms, tf, start, end, exc.code, exc.message), True
        refused = [e for e in stats.errors if e["code"] in (ProviderBadRequest.code, NotFound.code)]
        if refused and len(refused) == len(stats.errors):
            raise ProviderBadRequest(f"the vendor refused the request: {refused[0]['message']}")
        if stats.errors:
            codes = sorted({str(e["code"]) for e in stats.errors})
            warned = await asyncio.to_thread(
                self._held_or_raise, syms, tf, start, end, ",".join(codes), str(stats.errors[0]["message"])
            )
            return warned, True
        return [], stats.units_total > 0

    def _held_or_raise(
        self, syms: list[str], tf: Timeframe, start: datetime, end: datetime, code: str, message: str
    ) -> list[str]:
        held = self.data.store.read_bars(syms, str(tf), start, end, limit=1)
        if not held.height:
            raise AllProvidersFailed(
                f"no provider could serve the range and nothing is held: {code}: {message}",
                details={"symbols": syms, "code": code},
                retry_after=5.0,
            )
        return [f"upstream failed ({code}); serving what the store holds, which may be incomplete"]

    def _bars_meta(
        self,
        frame: pl.DataFrame,
        syms: list[str],
        tf: Timeframe,
        start: datetime,
        end: datetime,
        exact: bool = False,
        fresh: set[str] | frozenset[str] = frozenset(),
    ) -> dict[str, Meta]:
        """Attribution and quality score per symbol. ``exact``: ``frame`` holds every bar the store
        has for its one symbol between its first and last row (every source and feed), so a page that
        must be scored is scored on it instead of reading those bars again. ``fresh``: symbols whose
        bars were just fetched and stored for this page: any day score stored before describes less
        than the store now holds, so they are scored afresh (and the fresh scores stored) rather than
        looked up."""
        out = {s: Meta() for s in syms}
        if frame.height:
            agg = frame.group_by("symbol").agg(
                pl.col("source").unique().sort(),
                pl.col("feed").drop_nulls().first(),
                pl.col("fetched_at").max(),
                pl.col("ts").max(),
            )
            width = tf.delta if tf.is_intraday else None
            for sym, sources, feed, fetched, newest in agg.iter_rows():
                m = out[sym]
                m.sources, m.feed, m.fetched_at = list(sources), feed, fetched
                m.newest = newest + width if width is not None else newest
        missing_score = []
        for sym, m in out.items():
            m.quality_score = None if sym in fresh else self._stored_score(sym, str(tf), start, end)
            if m.quality_score is None and m.newest is not None:
                missing_score.append(sym)
        if missing_score:
            # Not scored yet: score what this page covers now (stored, so the next answer reuses it).
            lo = frame["ts"].min()
            hi = frame["ts"].max()
            span_start = max(start, lo) if isinstance(lo, datetime) else start
            span_end = min(end, hi + tf.delta) if isinstance(hi, datetime) else end
            results = analyze(
                self.data.store,
                self.data.calendar_of(syms),
                missing_score,
                tf,
                span_start,
                span_end,
                self.data.config.quality,
                raise_events=False,
                bars=(frame if frame["ts"].is_sorted() else frame.sort("ts")) if exact else None,
            )
            for r in results:
                out[r.symbol].quality_score = r.summary["score"]
        return out

    def _stored_score(self, symbol: str, timeframe: str, start: datetime, end: datetime) -> float | None:
        """The expected-weighted mean of stored day scores in the range (``marketpipe quality``)."""
        scores = self.data.store.scores(symbol, timeframe)
        if not scores.height:
            return None
        days = scores.filter(pl.col("day").is_between(start.date(), end.date()) & pl.col("score").is_not_null())
        if not days.height:
            return None
        w = days["expected"].cast(pl.Float64).clip(lower_bound=1.0)
        weighted = days["score"].cast(pl.Float64) * w
        return float(weighted.sum()) / float(w.sum())

    def last_close(self, now: datetime, symbols: list[str] | None = None) -> datetime:
        """The close of the last session that has ended by ``now`` (older data cannot change), on the
        calendar of ``symbols``' asset class (the exchange's by default; crypto: the last midnight)."""
        cal = self.data.calendar_of(symbols) if symbols else self.data.calendar
        ns = int(now.timestamp() * 1e9)
        i = int(np.searchsorted(cal.closes, ns, side="right")) - 1
        return datetime.fromtimestamp(int(cal.closes[max(i, 0)]) / 1e9, UTC)

    # --- latest values -------------------------------------------------------------------------------

    async def latest(self, kind: LatestKind, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Any]:
        """Latest trade / quote / minute bar per symbol from the first provider that serves it and answers."""
        return await self.data.latest(kind, symbols, feed=feed)

    async def snapshots(self, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Snapshot]:
        return await self.data.snapshots(symbols, feed=feed)

    def is_market_hours(self, at: datetime | None = None, symbols: list[str] | None = None) -> bool:
        """Whether the market of ``symbols``' asset class is open (crypto: always); the TTLs follow it."""
        cal = self.data.calendar_of(symbols) if symbols else self.data.calendar
        ns = int((at or utcnow()).timestamp() * 1e9)
        i = int(np.searchsorted(cal.opens, ns, side="right")) - 1
        return i >= 0 and ns < int(cal.closes[i])

    def timeliness(self, newest: datetime | None, now: datetime, symbols: list[str] | None = None) -> float | None:
        """The quality score of a latest value: its freshness, on the same scale as the series scores
        (on ``symbols``' calendar: a crypto value is always expected to be fresh)."""
        if newest is None:
            return None
        q = self.data.config.quality
        if not self.is_market_hours(now, symbols):
            return 1.0  # nothing newer can exist while the market is closed
        age = (now - newest).total_seconds()
        return float(min(1.0, max(0.0, 1 - (age - q.fresh_seconds) / (q.stale_seconds - q.fresh_seconds))))

    # --- views -----------------------------------------------------------------------------------------

    def quote_view(self, q: Quote, now: datetime) -> dict[str, Any]:
        age = max(0.0, (now - q.ts).total_seconds())
        return {
            "symbol": q.symbol,
            "bid": q.bid_price,
            "bid_size": q.bid_size,
            "ask": q.ask_price,
            "ask_size": q.ask_size,
            "spread": round(q.spread, 6) if q.spread is not None else None,
            "mid": round(q.mid, 6) if q.mid is not None else None,
            "bid_exchange": q.bid_exchange,
            "ask_exchange": q.ask_exchange,
            "conditions": list(q.conditions),
            "tape": q.tape,
            "timestamp": q.ts.isoformat(),
            "timestamp_ns": record_ns(q.ts, q.ts_ns),  # exact: the vendor's nanoseconds
            "source": q.source,
            "feed": q.feed,
            "fetched_at": q.fetched_at.isoformat(),
            "data_age_seconds": round(age, 3),
            "is_market_hours": self.is_market_hours(now, [q.symbol]),
            "quality_score": self.timeliness(q.ts, now, [q.symbol]),
            **_location(q.symbol, q.feed),
        }

    def trade_view(self, t: Trade, now: datetime) -> dict[str, Any]:
        return {
            "symbol": t.symbol,
            "price": t.price,
            "size": t.size,
            "exchange": t.exchange,
            "conditions": list(t.conditions),
            "tape": t.tape,
            "id": t.trade_id,
            "timestamp": t.ts.isoformat(),
            "timestamp_ns": record_ns(t.ts, t.ts_ns),
            "source": t.source,
            "feed": t.feed,
            "fetched_at": t.fetched_at.isoformat(),
            "data_age_seconds": round(max(0.0, (now - t.ts).total_seconds()), 3),
            "is_market_hours": self.is_market_hours(now, [t.symbol]),
            "quality_score": self.timeliness(t.ts, now, [t.symbol]),
            **_location(t.symbol, t.feed),
        }

    def bar_view(self, b: Bar) -> dict[str, Any]:
        return {
            "timestamp": b.ts.isoformat(),
            "open": b.open,
            "high": b.high,
            "low": b.low,
            "close": b.close,
            "volume": b.volume,
            "trade_count": b.trade_count,
            "vwap": b.vwap,
            "source": b.source,
            "feed": b.feed,
        }

    def snapshot_view(self, s: Snapshot, now: datetime) -> dict[str, Any]:
        newest = max(
            [x for x in (s.latest_trade and s.latest_trade.ts, s.latest_quote and s.latest_quote.ts) if x],
            default=None,
        )
        prev = s.prev_daily_bar.close if s.prev_daily_bar else None
        last = s.latest_trade.price if s.latest_trade else (s.daily_bar.close if s.daily_bar else None)
        change = last - prev if last is not None and prev else None
        return {
            "symbol": s.symbol,
            "latest_trade": self.trade_view(s.latest_trade, now) if s.latest_trade else None,
            "latest_quote": self.quote_view(s.latest_quote, now) if s.latest_quote else None,
            "minute_bar": self.bar_view(s.minute_bar) if s.minute_bar else None,
            "daily_bar": self.bar_view(s.daily_bar) if s.daily_bar else None,
            "prev_daily_bar": self.bar_view(s.prev_daily_bar) if s.prev_daily_bar else None,
            "change": round(change, 6) if change is not None else None,
            "change_percent": round(change / prev * 100, 4) if change is not None and prev else None,
            "source": s.source,
            "fetched_at": s.fetched_at.isoformat(),
            "data_age_seconds": round(max(0.0, (now - newest).total_seconds()), 3) if newest else None,
            "is_market_hours": self.is_market_hours(now, [s.symbol]),
            "quality_score": self.timeliness(newest, now, [s.symbol]),
            **_location(s.symbol, next((r.feed for r in (s.latest_trade, s.latest_quote, s.daily_bar) if r), None)),
        }


def _location(symbol: str, feed: str | None) -> dict[str, Any]:
    """A crypto pair's attribution beyond ``source``: its asset class and the vendor location."""
    return {"asset_class": "crypto", "location": feed} if is_crypto(symbol) else {}


__all__ = ["BarsPage", "Gateway", "MarketpipeError", "Meta", "decode_token", "encode_token"]
