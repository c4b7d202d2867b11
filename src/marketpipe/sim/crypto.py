"""Alpaca's crypto market data (``/v1beta3/crypto/{loc}/...``) on the simulator's Alpaca face.

Speaks :mod:`marketpipe.wire.alpaca_crypto` so that alpaca-py's ``CryptoHistoricalDataClient
(url_override=sim.url)`` works unchanged. One synthetic market that trades around the clock:

* Pairs: :data:`PAIRS` (``BTC/USD``, ``ETH/USD``, ... and ``ETH/BTC``); at ``eu-1`` the EUR pairs
  too. Every UTC day of every pair has trades in every minute (1 + Poisson(4) a minute), so every
  1Min bar exists, weekends and holidays included. Prices follow a seeded walk, continuous across
  midnights; sizes are fractions of a coin with up to 8 decimals, so volumes have many decimals.
  Bars, quotes, latest values, order books and snapshots are all derived from those trades (the
  bars are their aggregates), so they agree with each other.
* Daily bars are stamped at midnight of ``CryptoConfig.daily_tz``: ``UTC`` (Alpaca today) or
  ``America/Chicago`` (Alpaca before mid-2025; trap 6). Minute and hour bars are UTC-aligned; only
  timeframes that tile a day are served (``1Min``..``30Min`` dividing 1440, ``1Hour``..``12Hour``
  dividing 24, ``1Day``); others get 400 ``invalid timeframe``.
* No authentication is needed (keys, when sent, are still checked by the face); faults and rate
  limits apply as to the stock routes.
* A location outside ``LOCATIONS`` is 404 ``not found``; one the simulated account lacks (not in
  ``CryptoConfig.locations``) is 403 ``forbidden: location not enabled``.
* ``symbols`` must be pairs (``BTC/USD`` or ``BTC%2FUSD``): ``BTCUSD`` is 400 ``invalid symbol``;
  a well-formed pair the location does not list is left out of the answer (no error), as the vendor does.
* Only what has happened is served: trades up to now, bars whose period has ended (today's daily bar
  so far is included, as the vendor's is). Data starts on 2020-01-01.
* ``start`` and ``end`` are both inclusive, as the vendor's; default ``start`` is 00:00 UTC today,
  ``end`` now.
* Pagination: rows ordered by symbol, then time (``sort=desc`` reverses time); ``limit`` counts rows
  over all symbols; ``next_page_token`` is base64 of ``SYMBOL|ts_ns`` of the last row given.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import orjson
from aiohttp import web

from marketpipe.core.errors import InvalidTimeframe
from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.timeutil import ns_text
from marketpipe.sim.data import parse_rfc3339_ns, stable_seed
from marketpipe.sim.vendor import TOKEN_LOOP
from marketpipe.wire.alpaca_crypto import BASE, LOCATIONS, MAX_LIMIT, SORTS

NS_PER_SEC = 1_000_000_000
NS_PER_MIN = 60 * NS_PER_SEC
NS_PER_DAY = 1440 * NS_PER_MIN
EPOCH_DAY = np.datetime64("2020-01-01", "D")
EPOCH_NS = int(EPOCH_DAY.astype("datetime64[ns]").astype(np.int64))
N_DAYS = 366 * 21  # 2020 .. 2040
BOOK_DEPTH = 20

# pair -> opening price on 2020-01-01
PAIRS: dict[str, float] = {
    "BTC/USD": 42_000.0,
    "ETH/USD": 2_300.0,
    "LTC/USD": 70.0,
    "SOL/USD": 100.0,
    "DOGE/USD": 0.08,
    "AVAX/USD": 30.0,
    "USDT/USD": 1.0,
    "USDC/USD": 1.0,
    "ETH/BTC": 0.055,
    "BTC/USDT": 42_000.0,
}
EU_PAIRS: dict[str, float] = {"BTC/EUR": 38_000.0, "ETH/EUR": 2_100.0}
_PAIR_FORM = re.compile(r"^[A-Z0-9]{1,10}/[A-Z]{3,4}$")


def pairs_at(loc: str) -> dict[str, float]:
    return {**PAIRS, **EU_PAIRS} if loc == "eu-1" else PAIRS


@dataclass
class CryptoConfig:
    daily_tz: str = "UTC"  # "UTC" or "America/Chicago"
    locations: tuple[str, ...] = LOCATIONS  # the locations the simulated account has


class Reject(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", charset="utf-8")


def _decimals(price: float) -> int:
    return 2 if price >= 1000 else 4 if price >= 1 else 6


@dataclass
class Trades:
    t: np.ndarray  # int64 ns, ascending
    p: np.ndarray
    s: np.ndarray
    i: np.ndarray
    tks: np.ndarray  # bool: True = buyer took

    def between(self, lo: int, hi: int) -> Trades:
        a, b = np.searchsorted(self.t, lo, "left"), np.searchsorted(self.t, hi, "left")
        return Trades(self.t[a:b], self.p[a:b], self.s[a:b], self.i[a:b], self.tks[a:b])

    @staticmethod
    def concat(parts: list[Trades]) -> Trades:
        return Trades(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("t", "p", "s", "i", "tks")))


@dataclass
class Bars:
    t: np.ndarray
    o: np.ndarray
    h: np.ndarray
    l: np.ndarray  # noqa: E741 - the vendor's letter
    c: np.ndarray
    v: np.ndarray
    n: np.ndarray
    vw: np.ndarray

    def rows(self, sel: Iterable[int]) -> list[dict[str, Any]]:
        return [
            {
                "t": ns_text(int(self.t[k])),
                "o": float(self.o[k]),
                "h": float(self.h[k]),
                "l": float(self.l[k]),
                "c": float(self.c[k]),
                "v": float(self.v[k]),
                "n": int(self.n[k]),
                "vw": float(self.vw[k]),
            }
            for k in sel
        ]


def aggregate(tr: Trades, keys: np.ndarray, stamps: Callable[[np.ndarray], np.ndarray], decimals: int) -> Bars:
    """Trades (time-ordered) into one bar per distinct bucket key."""
    if not len(tr.t):
        e = np.empty(0)
        return Bars(np.empty(0, np.int64), e, e, e, e, e, np.empty(0, np.int64), e)
    uniq, starts = np.unique(keys, return_index=True)
    ends = np.append(starts[1:], len(keys))
    h = np.maximum.reduceat(tr.p, starts)
    low = np.minimum.reduceat(tr.p, starts)
    v = np.add.reduceat(tr.s, starts)
    vw = np.clip(np.round(np.add.reduceat(tr.p * tr.s, starts) / v, decimals + 4), low, h)
    return Bars(stamps(uniq), tr.p[starts], h, low, tr.p[ends - 1], np.round(v, 9), ends - starts, vw)


class CryptoMarket:
    """The synthetic around-the-clock market: deterministic per (pair, UTC day)."""

    def __init__(self, config: CryptoConfig | None = None, *, cache_days: int = 256) -> None:
        self.config = config or CryptoConfig()
        self._days: OrderedDict[tuple[str, int], Trades] = OrderedDict()
        self._anchors: dict[str, np.ndarray] = {}
        self._cache_days = cache_days

    def _anchor(self, symbol: str) -> np.ndarray:
        a = self._anchors.get(symbol)
        if a is None:
            base = {**PAIRS, **EU_PAIRS}[symbol]
            rng = np.random.default_rng(stable_seed("crypto-anchor", symbol))
            sigma = 0.0005 if symbol.startswith("USD") else 0.02
            a = self._anchors[symbol] = math.log(base) + np.concatenate(
                ([0.0], np.cumsum(rng.normal(0, sigma, N_DAYS)))
            )
        return a

    def day(self, symbol: str, di: int) -> Trades:
        """Every trade of ``symbol`` on UTC day ``di`` (days since 2020-01-01)."""
        key = (symbol, di)
        hit = self._days.get(key)
        if hit is not None:
            self._days.move_to_end(key)
            return hit
        if di < 0 or di >= N_DAYS:
            e = np.empty(0)
            return Trades(np.empty(0, np.int64), e, e, np.empty(0, np.int64), np.empty(0, bool))
        rng = np.random.default_rng(stable_seed("crypto", symbol, di))
        counts = 1 + rng.poisson(4, 1440)
        n = int(counts.sum())
        minute = np.repeat(np.arange(1440, dtype=np.int64), counts)
        offs = rng.integers(0, NS_PER_MIN, n)
        order = np.lexsort((offs, minute))
        t = EPOCH_NS + di * NS_PER_DAY + minute[order] * NS_PER_MIN + offs[order]
        anchors = self._anchor(symbol)
        a0, a1 = anchors[di], anchors[di + 1]
        path = np.cumsum(rng.normal(0, 0.0004 if not symbol.startswith("USD") else 0.00002, n))
        logp = a0 + path - np.arange(1, n + 1) / n * (path[-1] - (a1 - a0))
        raw = np.exp(logp)
        p = np.round(raw, _decimals(float(raw[0])))
        notional = np.exp(rng.normal(math.log(400.0), 1.3, n))
        s = np.maximum(np.round(notional / p, 8), 1e-8)
        trades = Trades(t, p, s, di * 10_000_000 + np.arange(n, dtype=np.int64), rng.random(n) < 0.5)
        self._days[key] = trades
        if len(self._days) > self._cache_days:
            self._days.popitem(last=False)
        return trades

    def trades(self, symbol: str, lo: int, hi: int) -> Trades:
        """Trades in ``[lo, hi)`` (ns)."""
        d0 = max(0, (lo - EPOCH_NS) // NS_PER_DAY)
        d1 = min(N_DAYS - 1, (hi - 1 - EPOCH_NS) // NS_PER_DAY)
        if hi <= lo or d1 < d0:
            return self.day(symbol, -1)
        return Trades.concat([self.day(symbol, d) for d in range(int(d0), int(d1) + 1)]).between(lo, hi)

    # --- periods ---------------------------------------------------------------------------------
    def zone_midnight(self, ns: int, *, after: bool = False) -> int:
        """Midnight of the daily-bar zone at or before ``ns`` (with ``after``: the next one)."""
        tz = ZoneInfo(self.config.daily_tz)
        local = datetime.fromtimestamp(ns // NS_PER_SEC, UTC).astimezone(tz)
        day = local.date()
        if after:
            day = day.fromordinal(day.toordinal() + 1)
        mid = datetime(day.year, day.month, day.day, tzinfo=tz)
        return int(mid.timestamp()) * NS_PER_SEC

    def periods(self, tf: Timeframe, lo: int, hi: int) -> list[tuple[int, int]]:
        """Chunks ``[a, b)`` of whole bar periods covering ``[lo, hi)``: UTC days for intraday
        timeframes, zone days for daily bars."""
        out = []
        if tf.unit is Unit.DAY:
            a = self.zone_midnight(lo)
            while a < hi:
                b = self.zone_midnight(a, after=True)
                out.append((a, b))
                a = b
            return out
        a = lo - (lo - EPOCH_NS) % NS_PER_DAY
        while a < hi:
            out.append((a, a + NS_PER_DAY))
            a += NS_PER_DAY
        return out

    def bars(self, symbol: str, tf: Timeframe, chunk: tuple[int, int], now: int) -> Bars:
        """The bars of one chunk (see :meth:`periods`) whose period has ended by ``now``
        (a daily bar: begun by ``now``)."""
        a, b = chunk
        tr = self.trades(symbol, a, min(b, now + 1))
        dec = _decimals(float(tr.p[0])) if len(tr.p) else 2
        if tf.unit is Unit.DAY:
            return aggregate(tr, np.zeros(len(tr.t), np.int64), lambda u: np.full(len(u), a, np.int64), dec)
        step = tf.seconds * NS_PER_SEC
        keys = (tr.t - a) // step
        bars = aggregate(tr, keys, lambda u: a + u * step, dec)
        keep = bars.t + step <= now
        return Bars(*(getattr(bars, f)[keep] for f in ("t", "o", "h", "l", "c", "v", "n", "vw")))

    # --- latest ----------------------------------------------------------------------------------
    def last_trade(self, symbol: str, now: int) -> tuple[Trades, int] | None:
        tr = self.trades(symbol, now - 2 * NS_PER_MIN, now + 1)
        return (tr, len(tr.t) - 1) if len(tr.t) else None

    def orderbook(self, symbol: str, now: int) -> dict[str, Any] | None:
        last = self.last_trade(symbol, now)
        if last is None:
            return None
        tr, k = last
        price = float(tr.p[k])
        dec = _decimals(price)
        tick = 10.0**-dec
        spread = max(tick, round(price * 0.0002, dec))
        rng = np.random.default_rng(stable_seed("book", symbol, int(tr.t[k]) // NS_PER_SEC))
        sizes = np.round(np.exp(rng.normal(math.log(2000.0 / price), 1.0, 2 * BOOK_DEPTH)), 8)
        bid0 = round(price - spread / 2, dec)
        ask0 = round(bid0 + spread, dec)
        bids = [{"p": round(bid0 - j * spread, dec), "s": float(sizes[j])} for j in range(BOOK_DEPTH)]
        asks = [{"p": round(ask0 + j * spread, dec), "s": float(sizes[BOOK_DEPTH + j])} for j in range(BOOK_DEPTH)]
        return {"t": ns_text(int(tr.t[k])), "b": bids, "a": asks}

    def quote_at(self, symbol: str, tr: Trades, k: int) -> dict[str, Any]:
        price = float(tr.p[k])
        dec = _decimals(price)
        spread = max(10.0**-dec, round(price * 0.0002, dec))
        rng = np.random.default_rng(stable_seed("quote", symbol, int(tr.i[k])))
        bs, as_ = np.round(np.exp(rng.normal(math.log(1500.0 / price), 1.0, 2)), 8)
        bp = round(price - spread / 2, dec)
        return {
            "t": ns_text(int(tr.t[k]) + 1000),
            "bp": bp,
            "bs": float(bs),
            "ap": round(bp + spread, dec),
            "as": float(as_),
        }

    def trade_row(self, tr: Trades, k: int) -> dict[str, Any]:
        return {
            "t": ns_text(int(tr.t[k])),
            "p": float(tr.p[k]),
            "s": float(tr.s[k]),
            "i": int(tr.i[k]),
            "tks": "B" if tr.tks[k] else "S",
        }


# --- the face ------------------------------------------------------------------------------------


def _token(symbol: str, ts_ns: int) -> str:
    return base64.b64encode(f"{symbol}|{ts_ns}".encode()).decode()


def _untoken(text: str, symbols: list[str]) -> tuple[str, int]:
    try:
        sym, _, ns = base64.b64decode(text, validate=True).decode().rpartition("|")
        if sym in symbols:
            return sym, int(ns)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise Reject("invalid page token")


def _time(q: Any, name: str, default: int) -> int:
    raw = q.get(name)
    if not raw:
        return default
    try:
        return parse_rfc3339_ns(raw)[0]
    except ValueError as exc:
        raise Reject(f"invalid {name}") from exc


def _timeframe(raw: str) -> Timeframe:
    try:
        tf = Timeframe.parse(raw, strict=True)
    except InvalidTimeframe as exc:
        raise Reject("invalid timeframe") from exc
    ok = (
        (tf.unit is Unit.MINUTE and tf.amount <= 30 and 1440 % tf.amount == 0)
        or (tf.unit is Unit.HOUR and tf.amount <= 12 and 24 % tf.amount == 0)
        or (tf.unit is Unit.DAY and tf.amount == 1)
    )
    if not ok:
        raise Reject("invalid timeframe")
    return tf


@dataclass
class CryptoFace:
    """The crypto routes; mounted on :class:`marketpipe.sim.alpaca.AlpacaFace`'s application."""

    market: CryptoMarket
    now_ns: Callable[[], int]
    config: CryptoConfig = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.market.config

    def add_routes(self, r: web.UrlDispatcher) -> None:
        for kind in ("bars", "trades", "quotes"):
            r.add_get(f"{BASE}/{{loc}}/{kind}", self._wrap(self._historical(kind)))
        for kind in ("bars", "trades", "quotes", "orderbooks"):
            r.add_get(f"{BASE}/{{loc}}/latest/{kind}", self._wrap(self._latest(kind)))
        r.add_get(f"{BASE}/{{loc}}/snapshots", self._wrap(self._snapshots))

    def _wrap(self, fn: Callable[[web.Request, str, list[str]], Awaitable[Any]]) -> Callable[..., Any]:
        async def handler(request: web.Request) -> web.Response:
            try:
                loc = request.match_info["loc"]
                if loc not in LOCATIONS:
                    raise Reject("not found", 404)
                if loc not in self.config.locations:
                    raise Reject(f"forbidden: location {loc} is not enabled for this account", 403)
                raw = request.query.get("symbols", "")
                symbols = [s.strip().upper() for s in raw.split(",") if s.strip()]
                if not symbols:
                    raise Reject("missing symbols")
                for s in symbols:
                    if not _PAIR_FORM.match(s):
                        raise Reject(f"invalid symbol: {s}")
                symbols = list(dict.fromkeys(symbols))
                known = pairs_at(loc)
                return _json(await fn(request, loc, [s for s in symbols if s in known]))
            except Reject as exc:
                return _json({"message": exc.message}, exc.status)

        return handler

    def _historical(self, kind: str) -> Callable[[web.Request, str, list[str]], Awaitable[Any]]:
        async def handler(request: web.Request, loc: str, symbols: list[str]) -> Any:
            q = request.query
            now = self.now_ns()
            tf = _timeframe(q.get("timeframe", "")) if kind == "bars" else None
            start = _time(q, "start", now - (now - EPOCH_NS) % NS_PER_DAY)
            end = min(_time(q, "end", now), now) + 1  # the vendor's end is inclusive
            limit_raw = q.get("limit") or "1000"
            try:
                limit = int(limit_raw)
            except ValueError as exc:
                raise Reject("invalid limit") from exc
            if not 1 <= limit <= MAX_LIMIT:
                raise Reject(f"invalid limit: must be between 1 and {MAX_LIMIT}")
            sort = q.get("sort") or "asc"
            if sort not in SORTS:
                raise Reject("invalid sort")
            if start > end:
                raise Reject("end should not be before start")
            symbols = sorted(symbols)
            after = _untoken(q["page_token"], symbols) if q.get("page_token") else None
            out: dict[str, list[dict[str, Any]]] = {}
            left, nxt = limit, None
            first = symbols.index(after[0]) if after else 0
            for sym in symbols[first:]:
                cursor = after[1] if after and sym == after[0] else None
                rows, stamps = self._rows(kind, sym, tf, start, end, now, sort, cursor, left + 1)
                if len(rows) > left:
                    out[sym] = rows[:left]
                    nxt = _token(sym, stamps[left - 1])
                    break
                if rows:
                    out[sym] = rows
                    left -= len(rows)
                if left == 0 and sym != symbols[-1]:
                    nxt = _token(sym, stamps[-1])
                    break
            if request.get(TOKEN_LOOP):  # the fault: the carried token again, or one that restarts the query
                nxt = q.get("page_token") or nxt or _token(symbols[0] if symbols else "BTC/USD", start - 1)
            return {kind: out, "next_page_token": nxt}

        return handler

    def _rows(
        self,
        kind: str,
        sym: str,
        tf: Timeframe | None,
        start: int,
        end: int,
        now: int,
        sort: str,
        cursor: int | None,
        want: int,
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """Up to ``want`` rows of one symbol in ``[start, end)`` after ``cursor`` (in ``sort`` order),
        and their stamps."""
        desc = sort == "desc"
        rows: list[dict[str, Any]] = []
        stamps: list[int] = []
        m = self.market
        if kind == "bars":
            assert tf is not None
            chunks = m.periods(tf, start, end)
        else:
            chunks = [(a, a + NS_PER_DAY) for a in range(start - (start - EPOCH_NS) % NS_PER_DAY, end, NS_PER_DAY)]
        for a, b in reversed(chunks) if desc else chunks:
            if kind == "bars":
                assert tf is not None
                bars = m.bars(sym, tf, (a, b), now)
                t = bars.t
            else:
                tr = m.trades(sym, max(a, start), min(b, end))
                t = tr.t
            sel = (t >= start) & (t < end)
            if cursor is not None:
                sel &= (t < cursor) if desc else (t > cursor)
            idx = np.flatnonzero(sel)
            if desc:
                idx = idx[::-1]
            idx = idx[: want - len(rows)]
            if kind == "bars":
                rows.extend(bars.rows(int(k) for k in idx))
            elif kind == "trades":
                rows.extend(m.trade_row(tr, int(k)) for k in idx)
            else:
                rows.extend(m.quote_at(sym, tr, int(k)) for k in idx)
            stamps.extend(int(t[k]) for k in idx)
            if len(rows) >= want:
                break
        return rows, stamps

    def _latest(self, kind: str) -> Callable[[web.Request, str, list[str]], Awaitable[Any]]:
        async def handler(request: web.Request, loc: str, symbols: list[str]) -> Any:
            now = self.now_ns()
            out: dict[str, Any] = {}
            for sym in symbols:
                value = self._latest_one(kind, sym, now)
                if value is not None:
                    out[sym] = value
            return {kind: out}

        return handler

    def _latest_one(self, kind: str, sym: str, now: int) -> dict[str, Any] | None:
        m = self.market
        if kind == "orderbooks":
            return m.orderbook(sym, now)
        if kind == "bars":
            return self.minute_bar(sym, now)
        last = m.last_trade(sym, now)
        if last is None:
            return None
        tr, k = last
        return m.trade_row(tr, k) if kind == "trades" else m.quote_at(sym, tr, k)

    def minute_bar(self, sym: str, now: int) -> dict[str, Any] | None:
        tf = Timeframe.parse("1Min")
        day0 = now - (now - EPOCH_NS) % NS_PER_DAY
        for a in (day0, day0 - NS_PER_DAY):
            bars = self.market.bars(sym, tf, (a, a + NS_PER_DAY), now)
            if len(bars.t):
                return bars.rows(range(len(bars.t) - 1, len(bars.t)))[0]
        return None

    def daily(self, sym: str, now: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        m = self.market
        tf = Timeframe.parse("1Day")
        today = m.zone_midnight(now)
        prev = m.zone_midnight(today - 1)
        cur = m.bars(sym, tf, (today, m.zone_midnight(today, after=True)), now)
        old = m.bars(sym, tf, (prev, today), now)
        return (
            cur.rows(range(len(cur.t)))[0] if len(cur.t) else None,
            old.rows(range(len(old.t)))[0] if len(old.t) else None,
        )

    async def _snapshots(self, request: web.Request, loc: str, symbols: list[str]) -> Any:
        now = self.now_ns()
        out: dict[str, Any] = {}
        for sym in symbols:
            daily, prev = self.daily(sym, now)
            out[sym] = {
                "latestTrade": self._latest_one("trades", sym, now),
                "latestQuote": self._latest_one("quotes", sym, now),
                "minuteBar": self.minute_bar(sym, now),
                "dailyBar": daily,
                "prevDailyBar": prev,
            }
        return {"snapshots": out}
