"""A deterministic synthetic stock market for the simulator.

Everything is derived from ``(seed, symbol, session day)`` and nothing else, so two
:class:`SimMarket` instances with the same seed and calendar give byte-identical answers, in any
order of queries, on any machine (seeds come from ``zlib.crc32``, never from ``hash()``).

How the data hangs together (so that every endpoint agrees with every other one):

* Per symbol a mean-reverting daily random walk over every calendar session gives each day's open
  and close. The start price (20–500) depends on the symbol.
* Per (symbol, session) trades are generated with numpy: 3–30 trades a minute (busier at the open
  and the close, with occasional bursts), prices following a Brownian bridge from the day's open to
  its close rounded to cents, sizes lognormal integers (mostly 1–500), nanosecond timestamps that
  are unique and increasing. Every trade carries condition ``@`` (the simulator flags no odd lots),
  so every trade updates its bar.
* Minute bars are aggregations of those trades (o first, h max, l min, c last, v sum of sizes,
  n count, vw volume-weighted price rounded to 4 dp). Every regular-session minute has trades, so a
  full session has exactly as many minute bars as it has minutes (390; 210 on an early close).
* Longer bars aggregate minute bars: N Min / N Hour buckets are aligned to the New York clock
  (bucket start = floor of the time of day since NY midnight); 1Day is stamped at NY midnight
  (``T05:00:00Z`` in winter, ``T04:00:00Z`` in summer); 1Week at the Monday of the week (even when
  that Monday is a holiday); N Month at the first day of the bucket's first month (buckets aligned
  to January). Only buckets with data appear.
* Quotes are a few per minute around the last trade: ``bid <= last trade < ask``, bid < ask.
  Quote sizes are round lots before 2025-11-03 and shares from then on, like the real SIP.
* Only real regular sessions of the exchange calendar have data (holidays, early closes and
  unscheduled closures such as 2025-01-09 come from exchange-calendars). Nothing exists at or after
  "now": a minute bar appears once its minute is over, a trade or quote once its time has passed, so
  today's session grows as the wall clock moves.
* Feeds: ``sip`` is the full tape. ``iex`` bars have the same timestamps and o/h/l/c/vw but volume
  and trade count scaled to 2.5 % (rounded, at least 1), aggregated upwards from those minute
  values. ``iex`` trades are the SIP trades printed on IEX (exchange ``V``, drawn with that same
  2.5 % share), so they are *not* what the IEX bars aggregate; ``iex`` quotes are the SIP quotes with
  both exchange codes set to ``V``. ``otc`` and ``boats`` are valid feeds with no data.

Data is cached per (symbol, day) in byte-bounded LRUs, and the JSON of each bar/trade/quote is
encoded once per (symbol, day, timeframe, feed) and served as byte slices, which keeps a
10,000-bar page at well under a millisecond of CPU once warm.
"""

from __future__ import annotations

import math
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import orjson
import polars as pl

from marketpipe.core.calendar import NS_PER_MIN, ExchangeCalendar, get_calendar
from marketpipe.core.errors import InvalidArgument, InvalidSymbol
from marketpipe.core.schema import BAR_SCHEMA
from marketpipe.core.timeframe import MIN1, Timeframe, Unit
from marketpipe.core.timeutil import NY, dt_to_ns, utcnow
from marketpipe.sim.actions import ActionBook, factors, spin_off_value, split_multiplier

SYMBOL_RE = re.compile(r"^[A-Z]{1,5}([./][A-Z]{1,2})?$")
DEFAULT_UNKNOWN = frozenset({"UNKNOWN", "ZZZZ", "NOPE"})
FEEDS = ("sip", "iex", "otc", "boats")  # otc/boats: valid, but the simulator has no such venue data
IEX_SHARE = 0.025  # IEX's share of consolidated volume and trade count in the simulator
QUOTE_SHARES_FROM = np.datetime64("2025-11-03", "D")  # SIP quote sizes switched from round lots to shares

NS_PER_SEC = 1_000_000_000
NS_PER_HOUR = 60 * NS_PER_MIN
NS_PER_DAY = 24 * NS_PER_HOUR
_BRACE = 123  # ord("{"): every encoded row is one flat JSON object, so "{" marks exactly the row starts

# Exchange codes and weights for trade prints; V (IEX) carries IEX_SHARE of the prints.
_TRADE_X = ("D", "Q", "K", "P", "Z", "N", "J", "Y", "U", "X", "B", "H", "A", "M", "V")
_TRADE_W = np.array([0.32, 0.16, 0.09, 0.08, 0.07, 0.06, 0.04, 0.04, 0.03, 0.02, 0.02, 0.02, 0.01, 0.015, 0.0])
_TRADE_W[-1] = IEX_SHARE
_TRADE_W[:-1] *= (1.0 - IEX_SHARE) / _TRADE_W[:-1].sum()
_V_INDEX = _TRADE_X.index("V")
_QUOTE_X = ("Q", "P", "K", "Z", "N", "V", "J", "Y", "U", "X")

Kind = Literal["bars", "trades", "quotes"]


def _size_quantiles(n: int = 4096, median: float = 60.0, sigma: float = 1.1) -> np.ndarray:
    """Trade sizes as an inverse-CDF table of a lognormal (median 60 shares, mostly 1-500):
    indexing it with a uniform draw is a lognormal draw rounded to whole shares."""
    normal = NormalDist()
    q = [math.exp(math.log(median) + sigma * normal.inv_cdf((k + 0.5) / n)) for k in range(n)]
    return np.maximum(1, np.rint(np.array(q))).astype(np.int64)


_SIZE_QUANTILES = _size_quantiles()


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def valid_symbol(symbol: str) -> bool:
    return bool(SYMBOL_RE.match(symbol))


_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+\- ]\d{2}:?\d{2}))?$"
)  # a space before the offset is a "+" that arrived unencoded in a query string


def parse_rfc3339_ns(text: str) -> tuple[int, bool]:
    """RFC-3339 with up to 9 fractional digits and ``Z`` or an offset, or ``YYYY-MM-DD`` (00:00
    UTC) -> (UTC ns, date_only). Raises ValueError. Python's datetime stops at microseconds,
    Alpaca's timestamps do not, hence a parser of our own."""
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"not an RFC-3339 time or YYYY-MM-DD date: {text!r}")
    y, mo, d, hh, mi, ss = (int(g or 0) for g in m.groups()[:6])
    frac, off = m.group(7), m.group(8)
    ns = dt_to_ns(datetime(y, mo, d, hh, mi, ss, tzinfo=UTC)) + (int(frac.ljust(9, "0")) if frac else 0)
    if off and off not in "Zz":
        digits = off[1:].replace(":", "")
        ns -= (-1 if off[0] == "-" else 1) * (int(digits[:2]) * 3600 + int(digits[2:]) * 60) * NS_PER_SEC
    return ns, m.group(4) is None


def to_ns(value: datetime | date | int | str) -> int:
    """UTC nanoseconds from an aware datetime, an int (already ns), an RFC-3339 string (ns
    precision), or a date / ``YYYY-MM-DD`` (00:00 UTC that date)."""
    if isinstance(value, bool):
        raise InvalidArgument("expected a time, got a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return parse_rfc3339_ns(value)[0]
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidArgument("naive datetime given where a UTC time was expected")
        return dt_to_ns(value)
    return dt_to_ns(datetime.combine(value, time(0), UTC))


@lru_cache(maxsize=65536)
def ny_midnight_ns(day: date) -> int:
    """00:00 America/New_York on ``day``, as UTC nanoseconds (the stamp of daily and longer bars)."""
    return dt_to_ns(datetime.combine(day, time(0), NY))


def _d64_to_date(d: np.datetime64) -> date:
    day: date = d.astype("datetime64[D]").astype(date)
    return day


# --- arrays --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BarArrays:
    """Bars as columns. ``pv`` (sum of price x size) and ``vden`` (its SIP volume) are kept unrounded
    so that vw of any aggregation is exact, and IEX bars keep SIP's vw while scaling v and n."""

    t: np.ndarray  # int64 ns UTC, bar start
    o: np.ndarray
    h: np.ndarray
    l: np.ndarray  # noqa: E741 - the wire letter
    c: np.ndarray
    v: np.ndarray  # int64
    n: np.ndarray  # int64
    pv: np.ndarray
    vden: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    @property
    def vw(self) -> np.ndarray:
        return np.round(self.pv / np.maximum(self.vden, 1), 4)

    def take(self, sel: slice | np.ndarray) -> BarArrays:
        return BarArrays(*(getattr(self, f)[sel] for f in _BAR_FIELDS))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in _BAR_FIELDS)

    def frame(self) -> dict[str, np.ndarray]:
        return {
            "t": self.t,
            "o": self.o,
            "h": self.h,
            "l": self.l,
            "c": self.c,
            "v": self.v,
            "n": self.n,
            "vw": self.vw,
        }

    @staticmethod
    def empty() -> BarArrays:
        f, i = np.empty(0, np.float64), np.empty(0, np.int64)
        return BarArrays(i, f, f, f, f, i, i, f, i)

    @staticmethod
    def concat(parts: list[BarArrays]) -> BarArrays:
        if not parts:
            return BarArrays.empty()
        if len(parts) == 1:
            return parts[0]
        return BarArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in _BAR_FIELDS))


_BAR_FIELDS = ("t", "o", "h", "l", "c", "v", "n", "pv", "vden")


@dataclass(frozen=True, slots=True)
class _DayMinutes:
    """One session's SIP minute bars plus the IEX volume/count columns."""

    sip: BarArrays
    iex_v: np.ndarray
    iex_n: np.ndarray

    def feed(self, feed: str) -> BarArrays:
        if feed == "sip":
            return self.sip
        s = self.sip
        return BarArrays(s.t, s.o, s.h, s.l, s.c, self.iex_v, self.iex_n, s.pv, s.vden)

    @property
    def nbytes(self) -> int:
        return self.sip.nbytes + self.iex_v.nbytes + self.iex_n.nbytes


@dataclass(frozen=True, slots=True)
class _DayTrades:
    t: np.ndarray  # int64 ns
    p: np.ndarray
    s: np.ndarray
    x: np.ndarray  # index into _TRADE_X
    i: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.t.nbytes * 5


@dataclass(frozen=True, slots=True)
class _DayQuotes:
    t: np.ndarray
    bp: np.ndarray
    ap: np.ndarray
    bs: np.ndarray
    as_: np.ndarray
    bx: np.ndarray  # index into _QUOTE_X
    ax: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.t.nbytes * 7


def aggregate(b: BarArrays, keys: np.ndarray) -> BarArrays:
    """Aggregate consecutive rows that share a key (keys non-decreasing); the key becomes ``t``."""
    if len(b) == 0:
        return b
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)] - 1
    return BarArrays(
        t=keys[starts],
        o=b.o[starts],
        h=np.maximum.reduceat(b.h, starts),
        l=np.minimum.reduceat(b.l, starts),
        c=b.c[ends],
        v=np.add.reduceat(b.v, starts),
        n=np.add.reduceat(b.n, starts),
        pv=np.add.reduceat(b.pv, starts),
        vden=np.add.reduceat(b.vden, starts),
    )


# --- encoded chunks ------------------------------------------------------------------------------


class Chunk:
    """Rows already encoded as JSON: one ``bytes`` blob of comma-separated flat objects plus the
    offset of each row, so a run of rows is one slice. The descending blob is built on first use."""

    __slots__ = ("_inner", "_rev", "_starts", "t")

    def __init__(self, t: np.ndarray, rows: list[dict[str, Any]]) -> None:
        self.t = t
        self._inner, self._starts = _blob(orjson.dumps(rows)[1:-1])
        self._rev: tuple[bytes, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.t)

    @property
    def nbytes(self) -> int:
        return len(self._inner) * (2 if self._rev else 1) + self.t.nbytes + self._starts.nbytes * 2 + 200

    def slice(self, i: int, j: int, desc: bool = False) -> memoryview:
        """Rows ``i..j-1`` (ascending positions) as comma-separated JSON objects, reversed if
        ``desc``. A view, not a copy: the page is copied once, when its parts are joined."""
        if not desc:
            return memoryview(self._inner)[self._starts[i] : self._starts[j] - 1]
        if self._rev is None:
            s = self._starts
            inner = self._inner
            self._rev = _blob(b",".join([inner[s[k] : s[k + 1] - 1] for k in range(len(self.t) - 1, -1, -1)]))
        n = len(self.t)
        rinner, rstarts = self._rev
        return memoryview(rinner)[rstarts[n - j] : rstarts[n - i] - 1]


def _blob(inner: bytes) -> tuple[bytes, np.ndarray]:
    starts = np.flatnonzero(np.frombuffer(inner, np.uint8) == _BRACE)
    return inner, np.append(starts, len(inner) + 1)


def _bar_rows(b: BarArrays) -> list[dict[str, Any]]:
    ts = np.datetime_as_string(b.t.view("datetime64[ns]").astype("datetime64[s]"), unit="s").tolist()
    return [
        {"t": t + "Z", "o": o, "h": h, "l": lo, "c": c, "v": v, "n": n, "vw": vw}
        for t, o, h, lo, c, v, n, vw in zip(
            ts,
            b.o.tolist(),
            b.h.tolist(),
            b.l.tolist(),
            b.c.tolist(),
            b.v.tolist(),
            b.n.tolist(),
            b.vw.tolist(),
            strict=True,
        )
    ]


def ns_strings(t: np.ndarray) -> list[str]:
    """RFC-3339 with nanoseconds and trailing zeros trimmed (Go's RFC3339Nano, as Alpaca sends)."""
    raw = np.datetime_as_string(t.view("datetime64[ns]"), unit="ns").tolist()
    return [s.rstrip("0").rstrip(".") + "Z" for s in raw]


def _trade_rows(tr: _DayTrades, tape: str) -> list[dict[str, Any]]:
    xs = [_TRADE_X[k] for k in tr.x.tolist()]
    return [
        {"t": t, "x": x, "p": p, "s": s, "c": ["@"], "i": i, "z": tape}
        for t, x, p, s, i in zip(ns_strings(tr.t), xs, tr.p.tolist(), tr.s.tolist(), tr.i.tolist(), strict=True)
    ]


def _quote_rows(q: _DayQuotes, tape: str, iex: bool) -> list[dict[str, Any]]:
    n = len(q.t)
    bxs = ["V"] * n if iex else [_QUOTE_X[k] for k in q.bx.tolist()]
    axs = ["V"] * n if iex else [_QUOTE_X[k] for k in q.ax.tolist()]
    return [
        {"t": t, "ax": ax, "ap": ap, "as": as_, "bx": bx, "bp": bp, "bs": bs, "c": ["R"], "z": tape}
        for t, ax, ap, as_, bx, bp, bs in zip(
            ns_strings(q.t), axs, q.ap.tolist(), q.as_.tolist(), bxs, q.bp.tolist(), q.bs.tolist(), strict=True
        )
    ]


# --- caches --------------------------------------------------------------------------------------


class _LRU:
    """Thread-safe LRU bounded by the summed ``nbytes`` of its values (tests read the market from
    the test thread while the server thread fills it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._d.get(key)
            if item is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._d[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and len(self._d) > 1:
                _, (_, nb) = self._d.popitem(last=False)
                self._bytes -= nb

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a historical query: per symbol (in order) the encoded row runs to join with
    commas, the number of rows, and the (symbol, ts_ns) to continue after — None when done."""

    parts: list[tuple[str, list[memoryview]]]
    count: int
    next_cursor: tuple[str, int] | None


# --- the market ----------------------------------------------------------------------------------


class SimMarket:
    """Deterministic synthetic market. Thread-safe; all caches are bounded (``cache_mb`` in total).

    Times given to the public methods may be aware datetimes, ISO strings or int ns UTC; ranges are
    inclusive at both ends (on bar start / trade time) like Alpaca's ``start``/``end``. ``now``
    defaults to the wall clock; pass one for reproducible "latest" answers.
    """

    def __init__(
        self,
        calendar: str = "XNYS",
        seed: int = 0,
        unknown_symbols: frozenset[str] = DEFAULT_UNKNOWN,
        *,
        cache_mb: int = 512,
        actions: ActionBook | None = None,
    ) -> None:
        self.seed = seed
        self.actions = actions or ActionBook()
        self._factors: dict[tuple[str, str, str, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._factor_lock = threading.Lock()
        self.unknown_symbols = frozenset(unknown_symbols)
        self.cal: ExchangeCalendar = get_calendar(calendar)
        self.days = self.cal.days
        self.day_ints = self.days.astype(np.int64)  # days since 1970, stable across calendar spans
        self.opens = self.cal.opens
        self.closes = self.cal.closes
        self.midnights = np.array([ny_midnight_ns(d) for d in self.days.astype(date).tolist()], dtype=np.int64)
        budget = cache_mb * 1024 * 1024
        # Encoded chunks are what a warm bulk pull reads, so they get most of the budget.
        self._chunks = _LRU(budget * 10 // 16)
        self._minutes = _LRU(budget * 3 // 16)
        self._ticks = _LRU(budget * 2 // 16)  # trades and quotes arrays
        self._walks = _LRU(budget // 32)
        self._daily = _LRU(budget // 32)  # 1Day rows per symbol, about 0.5 MB each

    # --- symbols ----------------------------------------------------------------------------------
    def has_data(self, symbol: str) -> bool:
        return valid_symbol(symbol) and symbol not in self.unknown_symbols

    def check_symbol(self, symbol: str) -> None:
        if not valid_symbol(symbol):
            raise InvalidSymbol(f"invalid symbol {symbol!r}", details={"symbol": symbol})

    def _sym_seed(self, symbol: str) -> int:
        return stable_seed("marketpipe-sim", self.seed, symbol)

    def tape(self, symbol: str) -> str:
        """Tape by listing venue: C (Nasdaq) for 4-5 letter roots, A (NYSE) for short ones, B for a few."""
        root = re.split(r"[./]", symbol)[0]
        if stable_seed("tape", symbol) % 10 == 0:
            return "B"
        return "C" if len(root) >= 4 else "A"

    # --- daily random walk ------------------------------------------------------------------------
    def _walk(self, symbol: str) -> tuple[np.ndarray, np.ndarray]:
        """Open and close price of every calendar session: a mean-reverting log random walk, so a
        symbol stays in a plausible price band over decades."""
        hit = self._walks.get(symbol)
        if hit is not None:
            return hit
        s = self._sym_seed(symbol)
        n = len(self.days)
        # Separate generators per series, so a calendar extended at its end keeps every earlier value.
        gaps = np.random.default_rng([s, 7]).normal(0.0, 0.004, n).tolist()
        rets = np.random.default_rng([s, 8]).normal(0.0002, 0.014, n).tolist()
        x0 = math.log(20.0 + (s % 48001) / 100.0)
        kappa = 0.004
        opens, closes = [0.0] * n, [0.0] * n
        prev = x0
        for k in range(n):
            op = prev + gaps[k]
            prev = op + rets[k] - kappa * (op - x0)
            opens[k], closes[k] = op, prev
        # raw prices follow the share count: before a split's ex-date they are the ratio higher
        mult = split_multiplier(self.days, self.actions.splits(symbol))
        # and what was distributed: before a spin-off's ex-date they hold the value of the new line's
        # shares (in the share units of the ex-date, hence / mult there)
        held = np.zeros(n)
        for a in self.actions.spin_offs(symbol):
            value = spin_off_value(a, self.days, lambda sym, i: self.raw_close(sym, i, 1 << 62))
            k = int(np.searchsorted(self.days, np.datetime64(a.ex_date, "D"), side="left"))
            if value is not None and k < n:
                held[:k] += value / mult[k]
        out = ((np.exp(np.array(opens)) + held) * mult, (np.exp(np.array(closes)) + held) * mult)
        self._walks.put(symbol, out, n * 16)
        return out

    def _first_session(self, symbol: str) -> int:
        """The index of the first session ``symbol`` trades in (a spin-off's new line: its ex-date)."""
        since = self.actions.listed_from(symbol)
        return 0 if since is None else int(np.searchsorted(self.days, np.datetime64(since, "D"), side="left"))

    # --- one session: path, minute bars, trades, quotes ------------------------------------------
    def _path(self, symbol: str, di: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-minute trade counts, trade prices and sizes of one session (stream 0); nothing in a
        session before the symbol trades."""
        if di < self._first_session(symbol):
            return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64)
        rng = np.random.default_rng([self._sym_seed(symbol), int(self.day_ints[di]), 0])
        m = int((self.closes[di] - self.opens[di]) // NS_PER_MIN)
        x = (np.arange(m) + 0.5) / m
        lam = 4.0 + 14.0 * (2.0 * x - 1.0) ** 2  # busier at the open and the close
        counts = np.minimum(3 + rng.poisson(lam), 30)
        burst = rng.random(m) < 0.02  # news-like bursts: "some minutes maybe more"
        counts[burst] *= 3
        total = int(counts.sum())
        day_open, day_close = (float(a[di]) for a in self._walk(symbol))
        # One uniform draw per trade and purpose; uniforms are several times cheaper than normal or
        # lognormal draws, and generation is most of the cost of a cold page.
        u = rng.random((3, total))
        # Uniform increments of variance (0.009 * open)^2 / total: by the central limit theorem the
        # walk is Brownian at any scale that matters for bars.
        w = np.cumsum((u[0] - 0.5) * (math.sqrt(12.0) * 0.009 * day_open / math.sqrt(total)))
        w -= w[0]
        frac = np.arange(total) / (total - 1)
        # Brownian bridge: the first print is the day's open and the last its close.
        px = day_open + (day_close - day_open) * frac + (w - frac * w[-1])
        bounce = (np.floor(u[1] * 3.0) - 1.0) * 0.01  # bid/ask bounce of a cent
        bounce[0] = bounce[-1] = 0.0
        px = np.maximum(np.round(px + bounce, 2), 0.01)
        sizes = _SIZE_QUANTILES[(u[2] * len(_SIZE_QUANTILES)).astype(np.intp)]
        return counts.astype(np.int64), px, sizes

    def _day_minutes(self, symbol: str, di: int) -> _DayMinutes:
        key = (symbol, di)
        hit = self._minutes.get(key)
        if hit is not None:
            return hit
        counts, px, sizes = self._path(symbol, di)
        if len(counts) == 0:  # not trading yet
            none = _DayMinutes(BarArrays.empty(), np.empty(0, np.int64), np.empty(0, np.int64))
            self._minutes.put(key, none, 64)
            return none
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        ends = starts + counts - 1
        v = np.add.reduceat(sizes, starts)
        sip = BarArrays(
            t=self.opens[di] + np.arange(len(counts), dtype=np.int64) * NS_PER_MIN,
            o=px[starts],
            h=np.maximum.reduceat(px, starts),
            l=np.minimum.reduceat(px, starts),
            c=px[ends],
            v=v,
            n=counts,
            pv=np.add.reduceat(px * sizes, starts),
            vden=v,
        )
        day = _DayMinutes(
            sip,
            np.maximum(1, np.rint(v * IEX_SHARE)).astype(np.int64),
            np.maximum(1, np.rint(counts * IEX_SHARE)).astype(np.int64),
        )
        self._minutes.put(key, day, day.nbytes)
        return day

    def _trades(self, symbol: str, di: int) -> _DayTrades:
        key = ("T", symbol, di)
        hit = self._ticks.get(key)
        if hit is not None:
            return hit
        counts, px, sizes = self._path(symbol, di)
        rng = np.random.default_rng([self._sym_seed(symbol), int(self.day_ints[di]), 1])
        total = len(px)
        t = self._stamps(rng, counts, int(self.opens[di]))
        x = rng.choice(len(_TRADE_X), size=total, p=_TRADE_W)
        ids = int(self.day_ints[di]) * 1_000_000 + np.arange(1, total + 1, dtype=np.int64)
        tr = _DayTrades(t, px, sizes, x, ids)
        self._ticks.put(key, tr, tr.nbytes)
        return tr

    @staticmethod
    def _stamps(rng: np.random.Generator, counts: np.ndarray, open_ns: int) -> np.ndarray:
        """Unique increasing ns timestamps, ``counts[m]`` of them inside minute ``m``."""
        total = int(counts.sum())
        minute = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        key = minute * NS_PER_MIN + rng.integers(0, NS_PER_MIN - 1_000_000, total)
        key.sort()  # minute dominates, so this sorts within each minute
        first = np.r_[0, np.cumsum(counts)[:-1]]
        rank = np.arange(total, dtype=np.int64) - first[minute]  # +rank makes equal draws distinct
        return open_ns + key + rank

    def _quotes(self, symbol: str, di: int) -> _DayQuotes:
        key = ("Q", symbol, di)
        hit = self._ticks.get(key)
        if hit is not None:
            return hit
        tr = self._trades(symbol, di)
        if len(tr.t) == 0:  # not trading yet: no quotes either
            e, f = np.empty(0, np.int64), np.empty(0, np.float64)
            none = _DayQuotes(e, f, f, e, e, e, e)
            self._ticks.put(key, none, 64)
            return none
        rng = np.random.default_rng([self._sym_seed(symbol), int(self.day_ints[di]), 2])
        m = int((self.closes[di] - self.opens[di]) // NS_PER_MIN)
        counts = 2 + rng.poisson(3.0, m)
        t = self._stamps(rng, counts, int(self.opens[di]))
        total = len(t)
        ref = tr.p[np.maximum(np.searchsorted(tr.t, t, side="right") - 1, 0)]
        bid = np.maximum(np.round(ref - 0.01 * rng.integers(0, 3, total), 2), 0.01)
        ask = np.round(np.maximum(ref, bid) + 0.01 * rng.integers(1, 4, total), 2)
        lot = 1 if self.days[di] < QUOTE_SHARES_FROM else 100
        q = _DayQuotes(
            t=t,
            bp=bid,
            ap=ask,
            bs=rng.geometric(0.35, total).astype(np.int64) * lot,
            as_=rng.geometric(0.35, total).astype(np.int64) * lot,
            bx=rng.integers(0, len(_QUOTE_X), total),
            ax=rng.integers(0, len(_QUOTE_X), total),
        )
        self._ticks.put(key, q, q.nbytes)
        return q

    # --- bars of one session at an intraday timeframe --------------------------------------------
    def _intraday(self, symbol: str, di: int, tf: Timeframe, feed: str, now_ns: int) -> BarArrays:
        """Bars of session ``di`` whose minutes are complete before ``now_ns``."""
        mins = self._day_minutes(symbol, di).feed(feed)
        if self.closes[di] > now_ns:
            mins = mins.take(slice(0, int(np.searchsorted(mins.t, now_ns - NS_PER_MIN, side="right"))))
        if tf == MIN1:
            return mins
        width = tf.amount * (NS_PER_MIN if tf.unit is Unit.MINUTE else NS_PER_HOUR)
        base = int(self.midnights[di])
        return aggregate(mins, base + (mins.t - base) // width * width)

    def _daily_table(self, symbol: str) -> np.ndarray:
        """Per session (o, h, l, c, v, n, pv, v_iex, n_iex) of finished sessions, NaN until computed.
        Float64 holds the integer columns exactly (far below 2**53)."""
        table: np.ndarray | None = self._daily.get(symbol)
        if table is None:
            table = np.full((len(self.days), 9), np.nan)
            self._daily.put(symbol, table, table.nbytes)
        return table

    def _day_row(self, symbol: str, di: int, now_ns: int) -> np.ndarray | None:
        """(o, h, l, c, v, n, pv, v_iex, n_iex) of session ``di`` up to ``now``; kept once the
        session is over (concurrent fills of a row write identical values)."""
        final = self.closes[di] <= now_ns
        table = self._daily_table(symbol) if final else None
        if table is not None and not np.isnan(table[di, 0]):
            return table[di]
        day = self._day_minutes(symbol, di)
        s = day.sip
        k = len(s) if final else int(np.searchsorted(s.t, now_ns - NS_PER_MIN, side="right"))
        if k == 0:
            return None
        row = np.array(
            [s.o[0], s.h[:k].max(), s.l[:k].min(), s.c[k - 1], s.v[:k].sum(), s.n[:k].sum(), s.pv[:k].sum(),
             day.iex_v[:k].sum(), day.iex_n[:k].sum()],
            dtype=np.float64,
        )  # fmt: skip
        if table is not None:
            table[di] = row
        return row

    def _daily_bars(self, symbol: str, lo: int, hi: int, feed: str, now_ns: int) -> BarArrays:
        """1Day bars of sessions ``lo..hi-1`` (those with at least one complete minute)."""
        idx: list[int] = []
        rows: list[np.ndarray] = []
        for di in range(lo, hi):
            if self.opens[di] + NS_PER_MIN > now_ns:
                break
            row = self._day_row(symbol, di, now_ns)
            if row is not None:
                idx.append(di)
                rows.append(row)
        if not rows:
            return BarArrays.empty()
        a = np.vstack(rows)
        v = a[:, 4].astype(np.int64)
        iex = feed == "iex"
        return BarArrays(
            t=self.midnights[np.array(idx)],
            o=a[:, 0],
            h=a[:, 1],
            l=a[:, 2],
            c=a[:, 3],
            v=a[:, 7].astype(np.int64) if iex else v,
            n=(a[:, 8] if iex else a[:, 5]).astype(np.int64),
            pv=a[:, 6],
            vden=v,
        )

    # --- ranges ------------------------------------------------------------------------------------
    def _session_span(self, start_ns: int, end_ns: int, now_ns: int) -> range:
        """Sessions whose NY day can hold a stamp in [start, end] and that have begun before now."""
        lo = int(np.searchsorted(self.midnights, start_ns - NS_PER_DAY, side="right"))
        hi = int(np.searchsorted(self.midnights, end_ns, side="right"))
        hi = min(hi, int(np.searchsorted(self.opens, now_ns, side="left")))
        return range(lo, max(lo, hi))

    def _long_bars(self, symbol: str, tf: Timeframe, start_ns: int, end_ns: int, feed: str, now_ns: int) -> BarArrays:
        """1Day / 1Week / N Month bars stamped in [start, end]; week and month buckets always hold
        all their sessions (up to now), so a stamp always means the same bar."""
        lo = int(np.searchsorted(self.midnights, start_ns, side="left"))
        if tf.unit is Unit.DAY:
            hi = int(np.searchsorted(self.midnights, end_ns, side="right"))
            return self._daily_bars(symbol, lo, hi, feed, now_ns)
        end_day = datetime.fromtimestamp(end_ns // NS_PER_SEC, UTC).astimezone(NY).date()
        nxt = _next_bucket(self._bucket_start(np.datetime64(end_day, "D"), tf), tf)
        hi = int(np.searchsorted(self.days, nxt, side="left"))
        daily = self._daily_bars(symbol, lo, hi, feed, now_ns)
        if len(daily) == 0:
            return daily
        # the NY date of a midnight stamp is the UTC date of stamp + 12h
        days = (daily.t + 12 * NS_PER_HOUR).view("datetime64[ns]").astype("datetime64[D]")
        bucket_days = self._bucket_start(days, tf)
        stamps = np.array([ny_midnight_ns(_d64_to_date(d)) for d in bucket_days], dtype=np.int64)
        out = aggregate(daily, stamps)
        return out.take(out.t >= start_ns)

    @staticmethod
    def _bucket_start(days: Any, tf: Timeframe) -> Any:
        if tf.unit is Unit.WEEK:
            d = np.asarray(days).astype("datetime64[D]")
            weekday = (d.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
            return d - weekday.astype("timedelta64[D]")
        months = np.asarray(days).astype("datetime64[M]").astype(np.int64)
        return ((months // tf.amount) * tf.amount).astype("datetime64[M]").astype("datetime64[D]")

    # --- chunks (encoded rows) -----------------------------------------------------------------------
    def _runs(
        self,
        kind: Kind,
        symbol: str,
        tf: Timeframe | None,
        feed: str,
        start_ns: int,
        end_ns: int,
        desc: bool,
        now_ns: int,
        adjustment: str = "raw",
        vendor: str = "alpaca",
    ) -> Iterator[tuple[Chunk, int, int]]:
        """(chunk, i, j): non-empty runs of rows in [start, end] visible at ``now``, in page order.
        Bars other than ``adjustment="raw"`` are adjusted with ``vendor``'s view of the actions."""
        if not self.has_data(symbol) or feed not in ("sip", "iex") or start_ns > end_ns:
            return
        adjusted = kind == "bars" and adjustment != "raw"
        fac = self.factors(symbol, adjustment, vendor, now_ns) if adjusted else None
        if kind == "bars" and tf is not None and not tf.is_intraday:
            bars = self._long_bars(symbol, tf, start_ns, end_ns, feed, now_ns)
            if len(bars):
                rows = self._adjusted_rows(bars, fac) if fac is not None else _bar_rows(bars)
                yield Chunk(bars.t, rows), 0, len(bars)
            return
        span = self._session_span(start_ns, end_ns, now_ns)
        for di in reversed(span) if desc else span:
            if fac is not None:
                bars = self._intraday(symbol, di, tf or MIN1, feed, now_ns)
                chunk, cut = Chunk(bars.t, self._adjusted_rows(bars, fac)), len(bars)
            else:
                chunk, cut = self._chunk(kind, symbol, di, tf, feed, now_ns)
            i = int(np.searchsorted(chunk.t, start_ns, side="left"))
            j = min(int(np.searchsorted(chunk.t, end_ns, side="right")), cut)
            if j > i:
                yield chunk, i, j

    def factors(self, symbol: str, adjustment: str, vendor: str, now_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """(price, volume) factor per session of ``symbol`` as ``vendor`` adjusts it now (see
        :mod:`marketpipe.sim.actions`)."""
        today = self.ny_date(now_ns)
        key = (symbol, adjustment, vendor, self.actions.version, today.toordinal())
        with self._factor_lock:
            hit = self._factors.get(key)
        if hit is not None:
            return hit

        applied = self.actions.view(symbol, vendor).applied
        out = factors(self.days, applied, lambda sym, i: self.raw_close(sym, i, now_ns), adjustment, today)
        with self._factor_lock:
            if len(self._factors) > 256:
                self._factors.clear()
            self._factors[key] = out
        return out

    def raw_close(self, symbol: str, di: int, now_ns: int) -> float | None:
        """The raw close of session ``di`` (None before the calendar, for a symbol without data, or when it
        has no bar by ``now``)."""
        row = self._day_row(symbol, di, now_ns) if 0 <= di < len(self.days) and self.has_data(symbol) else None
        return float(row[3]) if row is not None else None

    @staticmethod
    def ny_date(ns: int) -> date:
        """The New York date of a UTC ns instant."""
        return datetime.fromtimestamp(ns / NS_PER_SEC, NY).date()

    def _adjusted_rows(self, b: BarArrays, fac: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
        """Bars as JSON rows with prices (and vwap) times the price factor of their New York day and
        volume times its volume factor (rounded to whole shares)."""
        di = np.maximum(np.searchsorted(self.midnights, b.t, side="right") - 1, 0)
        fp, fv = fac[0][di], fac[1][di]
        ts = np.datetime_as_string(b.t.view("datetime64[ns]").astype("datetime64[s]"), unit="s").tolist()
        cols = (b.o * fp, b.h * fp, b.l * fp, b.c * fp, np.rint(b.v * fv).astype(np.int64), b.n, b.vw * fp)
        return [
            {"t": t + "Z", "o": o, "h": h, "l": lo, "c": c, "v": v, "n": n, "vw": vw}
            for t, o, h, lo, c, v, n, vw in zip(ts, *(x.tolist() for x in cols), strict=True)
        ]

    def _chunk(
        self, kind: Kind, symbol: str, di: int, tf: Timeframe | None, feed: str, now_ns: int
    ) -> tuple[Chunk, int]:
        """The encoded rows of one session and how many of them are visible at ``now``."""
        final = self.closes[di] <= now_ns
        if not final and kind == "bars" and tf is not None and tf != MIN1:
            # today's partial buckets change every minute: build them fresh, never cache
            bars = self._intraday(symbol, di, tf, feed, now_ns)
            return Chunk(bars.t, _bar_rows(bars)), len(bars)
        key = (kind, symbol, di, str(tf) if kind == "bars" else "", feed)
        chunk: Chunk | None = self._chunks.get(key)
        if chunk is None:
            chunk = self._build_chunk(kind, symbol, di, tf, feed)
            self._chunks.put(key, chunk, chunk.nbytes)
        if final:
            return chunk, len(chunk)
        # A full-day chunk of a session still in progress: show what has happened by now.
        if kind == "bars":
            return chunk, int(np.searchsorted(chunk.t, now_ns - NS_PER_MIN, side="right"))
        return chunk, int(np.searchsorted(chunk.t, now_ns, side="left"))

    def _build_chunk(self, kind: Kind, symbol: str, di: int, tf: Timeframe | None, feed: str) -> Chunk:
        far = 1 << 62  # a complete session: every row is in the past
        if kind == "bars":
            bars = self._intraday(symbol, di, tf or MIN1, feed, far)
            return Chunk(bars.t, _bar_rows(bars))
        if kind == "trades":
            tr = self._trades_feed(symbol, di, feed)
            return Chunk(tr.t, _trade_rows(tr, self.tape(symbol)))
        q = self._quotes(symbol, di)
        return Chunk(q.t, _quote_rows(q, self.tape(symbol), feed == "iex"))

    def _trades_feed(self, symbol: str, di: int, feed: str) -> _DayTrades:
        tr = self._trades(symbol, di)
        if feed != "iex":
            return tr
        sel = tr.x == _V_INDEX
        return _DayTrades(tr.t[sel], tr.p[sel], tr.s[sel], tr.x[sel], tr.i[sel])

    # --- paging ------------------------------------------------------------------------------------
    def page(
        self,
        kind: Kind,
        symbols: list[str],
        start_ns: int,
        end_ns: int,
        *,
        timeframe: Timeframe | None = None,
        feed: str = "sip",
        limit: int = 1000,
        desc: bool = False,
        cursor: tuple[str, int] | None = None,
        now_ns: int | None = None,
        adjustment: str = "raw",
        vendor: str = "alpaca",
    ) -> Page:
        """One page of a historical query, ordered by symbol then time, at most ``limit`` rows in
        total. ``cursor`` = (symbol, ts_ns) of the last row already delivered."""
        now = dt_to_ns(utcnow()) if now_ns is None else now_ns
        if kind == "bars" and timeframe is None:
            timeframe = MIN1
        syms = sorted(set(symbols))
        if cursor is not None:
            syms = [s for s in syms if s >= cursor[0]]
        remaining = limit
        parts: list[tuple[str, list[memoryview]]] = []
        last: tuple[str, int] | None = None
        more = False
        for sym in syms:
            s, e = start_ns, end_ns
            if cursor is not None and sym == cursor[0]:
                if desc:
                    e = min(e, cursor[1] - 1)
                else:
                    s = max(s, cursor[1] + 1)
            frags: list[memoryview] = []
            for chunk, i, j in self._runs(kind, sym, timeframe, feed, s, e, desc, now, adjustment, vendor):
                if remaining == 0:
                    more = True  # something is left after a full page
                    break
                take = min(j - i, remaining)
                a, b = (j - take, j) if desc else (i, i + take)
                frags.append(chunk.slice(a, b, desc))
                remaining -= take
                last = (sym, int(chunk.t[a] if desc else chunk.t[b - 1]))
                if take < j - i:
                    more = True
                    break
            if frags:
                parts.append((sym, frags))
            if more:
                break
        return Page(parts, limit - remaining, last if more else None)

    # --- pure-Python API -----------------------------------------------------------------------------
    def bars_frame(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        start: datetime | date | int | str,
        end: datetime | date | int | str,
        feed: str = "sip",
        *,
        now: datetime | int | None = None,
        adjustment: str = "raw",
        vendor: str = "alpaca",
    ) -> dict[str, np.ndarray]:
        """Bars stamped in [start, end] as columns ``t`` (int64 ns UTC), ``o h l c`` (float64),
        ``v n`` (int64), ``vw`` (float64) — exactly what the HTTP face serves (adjusted as ``vendor``
        adjusts them for ``adjustment``)."""
        tf = Timeframe.parse(timeframe)
        s, e, now_ns = to_ns(start), to_ns(end), self._now(now)
        self._check(symbol, feed)
        if not self.has_data(symbol) or feed not in ("sip", "iex"):
            return BarArrays.empty().frame()
        if not tf.is_intraday:
            out = self._long_bars(symbol, tf, s, e, feed, now_ns)
        else:
            parts = []
            for di in self._session_span(s, e, now_ns):
                b = self._intraday(symbol, di, tf, feed, now_ns)
                parts.append(b.take((b.t >= s) & (b.t <= e)))
            out = BarArrays.concat(parts)
        frame = out.frame()
        if adjustment != "raw":
            fp_all, fv_all = self.factors(symbol, adjustment, vendor, now_ns)
            idx = np.maximum(np.searchsorted(self.midnights, out.t, side="right") - 1, 0)
            fp, fv = fp_all[idx], fv_all[idx]
            frame.update({k: frame[k] * fp for k in ("o", "h", "l", "c", "vw")})
            frame["v"] = np.rint(frame["v"] * fv).astype(np.int64)
        return frame

    def canonical_bars(
        self,
        symbol: str,
        timeframe: str | Timeframe,
        start: datetime | date | int | str,
        end: datetime | date | int | str,
        feed: str = "sip",
        *,
        source: str = "sim:alpaca",
        fetched_at: datetime | None = None,
    ) -> pl.DataFrame:
        """:meth:`bars_frame` in marketpipe's canonical bar schema, as if fetched from a vendor face —
        for benchmarks and tests that need stored-looking bars without HTTP."""
        d = self.bars_frame(symbol, timeframe, start, end, feed)
        n = len(d["t"])
        return pl.DataFrame(
            {
                "symbol": [symbol] * n,
                "timeframe": [str(Timeframe.parse(timeframe))] * n,
                "ts": d["t"] // 1000,
                "open": d["o"],
                "high": d["h"],
                "low": d["l"],
                "close": d["c"],
                "volume": d["v"],
                "trade_count": d["n"],
                "vwap": d["vw"],
                "source": [source] * n,
                "feed": [feed] * n,
                "fetched_at": [fetched_at or datetime(2026, 1, 1, tzinfo=UTC)] * n,
            }
        ).cast(BAR_SCHEMA)  # type: ignore[arg-type]

    def _tick_days(
        self,
        symbol: str,
        start: datetime | date | int | str,
        end: datetime | date | int | str,
        feed: str,
        now: datetime | int | None,
    ) -> tuple[int, int, range]:
        """The checked window of a trades or quotes request, ``start <= t <= end`` and ``t < now``, in
        ns, and the sessions it covers (none for a symbol without data or a feed without ticks)."""
        s, e, now_ns = to_ns(start), min(to_ns(end), self._now(now) - 1), self._now(now)
        self._check(symbol, feed)
        days = self._session_span(s, e, now_ns) if self.has_data(symbol) and feed in ("sip", "iex") else range(0)
        return s, e, days

    def trades_frame(
        self,
        symbol: str,
        start: datetime | date | int | str,
        end: datetime | date | int | str,
        feed: str = "sip",
        *,
        now: datetime | int | None = None,
    ) -> dict[str, np.ndarray]:
        """Trades with start <= t <= end (and t < now): ``t`` int64 ns, ``p``, ``s``, ``x`` (str),
        ``i``."""
        s, e, days = self._tick_days(symbol, start, end, feed, now)
        parts: list[_DayTrades] = []
        for di in days:
            tr = self._trades_feed(symbol, di, feed)
            sel = (tr.t >= s) & (tr.t <= e)
            parts.append(_DayTrades(tr.t[sel], tr.p[sel], tr.s[sel], tr.x[sel], tr.i[sel]))
        cat = (lambda f: np.concatenate([getattr(p, f) for p in parts])) if parts else (lambda f: np.empty(0))
        x = cat("x").astype(np.int64)
        return {
            "t": cat("t").astype(np.int64),
            "p": cat("p").astype(np.float64),
            "s": cat("s").astype(np.int64),
            "x": np.array([_TRADE_X[k] for k in x.tolist()], dtype="U1"),
            "i": cat("i").astype(np.int64),
        }

    def quotes_frame(
        self,
        symbol: str,
        start: datetime | date | int | str,
        end: datetime | date | int | str,
        feed: str = "sip",
        *,
        now: datetime | int | None = None,
    ) -> dict[str, np.ndarray]:
        """Quotes with start <= t <= end (and t < now): ``t`` int64 ns, ``bp ap`` float64,
        ``bs as`` int64."""
        s, e, days = self._tick_days(symbol, start, end, feed, now)
        parts: list[_DayQuotes] = []
        for di in days:
            q = self._quotes(symbol, di)
            sel = (q.t >= s) & (q.t <= e)
            parts.append(_DayQuotes(q.t[sel], q.bp[sel], q.ap[sel], q.bs[sel], q.as_[sel], q.bx[sel], q.ax[sel]))

        def cat(f: str, dt: type) -> np.ndarray:
            return np.concatenate([getattr(p, f) for p in parts]).astype(dt) if parts else np.empty(0, dt)

        return {
            "t": cat("t", np.int64),
            "bp": cat("bp", np.float64),
            "ap": cat("ap", np.float64),
            "bs": cat("bs", np.int64),
            "as": cat("as_", np.int64),
        }

    # --- latest and snapshots (wire-shaped dicts) --------------------------------------------------
    def _current_session(self, now_ns: int) -> int:
        """Index of the last session that has begun by ``now`` (-1 if none)."""
        return int(np.searchsorted(self.opens, now_ns, side="left")) - 1

    def latest_trade(self, symbol: str, feed: str = "sip", now: datetime | int | None = None) -> dict[str, Any] | None:
        """The last trade before ``now`` (from the last session if the market is closed)."""
        now_ns = self._now(now)
        self._check(symbol, feed)
        if not self.has_data(symbol) or feed not in ("sip", "iex"):
            return None
        for di in range(self._current_session(now_ns), max(-1, self._current_session(now_ns) - 10), -1):
            tr = self._trades_feed(symbol, di, feed)
            k = int(np.searchsorted(tr.t, now_ns, side="left"))
            if k:
                return {
                    "t": ns_strings(tr.t[k - 1 : k])[0],
                    "x": _TRADE_X[int(tr.x[k - 1])],
                    "p": float(tr.p[k - 1]),
                    "s": int(tr.s[k - 1]),
                    "c": ["@"],
                    "i": int(tr.i[k - 1]),
                    "z": self.tape(symbol),
                }
        return None

    def latest_quote(self, symbol: str, feed: str = "sip", now: datetime | int | None = None) -> dict[str, Any] | None:
        """The last quote before ``now``."""
        now_ns = self._now(now)
        self._check(symbol, feed)
        if not self.has_data(symbol) or feed not in ("sip", "iex"):
            return None
        for di in range(self._current_session(now_ns), max(-1, self._current_session(now_ns) - 10), -1):
            q = self._quotes(symbol, di)
            k = int(np.searchsorted(q.t, now_ns, side="left"))
            if k:
                one = _DayQuotes(*(getattr(q, f)[k - 1 : k] for f in ("t", "bp", "ap", "bs", "as_", "bx", "ax")))
                return _quote_rows(one, self.tape(symbol), feed == "iex")[0]
        return None

    def latest_bar(self, symbol: str, feed: str = "sip", now: datetime | int | None = None) -> dict[str, Any] | None:
        """The last complete minute bar before ``now``."""
        now_ns = self._now(now)
        self._check(symbol, feed)
        if not self.has_data(symbol) or feed not in ("sip", "iex"):
            return None
        one = MIN1
        for di in range(self._current_session(now_ns), max(-1, self._current_session(now_ns) - 10), -1):
            bars = self._intraday(symbol, di, one, feed, now_ns)
            if len(bars):
                return _bar_rows(bars.take(slice(len(bars) - 1, len(bars))))[0]
        return None

    def snapshot(self, symbol: str, feed: str = "sip", now: datetime | int | None = None) -> dict[str, Any] | None:
        """latestTrade, latestQuote, minuteBar, dailyBar (current or last session, partial while it
        runs) and prevDailyBar (the session before); members without data are omitted."""
        now_ns = self._now(now)
        self._check(symbol, feed)
        if not self.has_data(symbol) or feed not in ("sip", "iex"):
            return None
        snap: dict[str, Any] = {}
        for name, fn in (
            ("latestTrade", self.latest_trade),
            ("latestQuote", self.latest_quote),
            ("minuteBar", self.latest_bar),
        ):
            item = fn(symbol, feed, now_ns)
            if item is not None:
                snap[name] = item
        cur = self._current_session(now_ns)
        if cur >= 0 and self.opens[cur] + NS_PER_MIN > now_ns:
            cur -= 1  # no complete minute yet today: the daily bar is the last session's
        if cur >= 0:
            daily = self._daily_bars(symbol, max(0, cur - 1), cur + 1, feed, now_ns)
            rows = _bar_rows(daily)
            if rows:
                snap["dailyBar"] = rows[-1]
            if len(rows) == 2:
                snap["prevDailyBar"] = rows[0]
        return snap or None

    # --- helpers -----------------------------------------------------------------------------------
    def _now(self, now: datetime | int | None) -> int:
        return dt_to_ns(utcnow()) if now is None else to_ns(now)

    def _check(self, symbol: str, feed: str) -> None:
        self.check_symbol(symbol)
        if feed not in FEEDS:
            raise InvalidArgument(f"invalid feed {feed!r}; allowed: {', '.join(FEEDS)}", details={"feed": feed})

    def cache_info(self) -> dict[str, int]:
        return {
            "minutes_bytes": self._minutes.size_bytes,
            "chunks_bytes": self._chunks.size_bytes,
            "ticks_bytes": self._ticks.size_bytes,
            "chunk_hits": self._chunks.hits,
            "chunk_misses": self._chunks.misses,
        }


def _next_bucket(bucket_start: np.datetime64, tf: Timeframe) -> np.datetime64:
    if tf.unit is Unit.WEEK:
        return bucket_start + np.timedelta64(7, "D")
    return (bucket_start.astype("datetime64[M]") + tf.amount).astype("datetime64[D]")
