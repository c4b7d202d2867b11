"""Trading calendars, held as numpy arrays so that range questions are vectorized.

Two kinds behind one interface (:class:`ExchangeCalendar`'s): an exchange's real sessions
(holidays, early closes, unscheduled closures) from exchange-calendars for equities, and
:class:`ContinuousCalendar` for crypto, which trades around the clock: one "session" per day of its
zone, midnight to midnight, every minute expected. :func:`calendar_for` picks the calendar of a
symbol's asset class, so completeness, gap detection, backfill planning, freshness and TTLs need
no branch of their own."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property

import numpy as np
import polars as pl

from marketpipe.core.errors import InvalidArgument, InvalidRange
from marketpipe.core.schema import is_crypto

NS_PER_MIN = 60_000_000_000
NS_PER_HOUR = 60 * NS_PER_MIN
EXT_OPEN_NS = 4 * NS_PER_HOUR  # US pre-market opens 04:00 local
EXT_AFTER_CLOSE_NS = 4 * NS_PER_HOUR  # after-hours trading runs four hours past the close
CALENDAR_START = "2000-01-01"

_lock = threading.Lock()
_cache: dict[str, ExchangeCalendar] = {}


@dataclass(frozen=True)
class Session:
    day: date
    open: datetime  # UTC
    close: datetime  # UTC

    @property
    def minutes(self) -> int:
        return int((self.close - self.open).total_seconds() // 60)


class ExchangeCalendar:
    """One exchange's regular sessions. Times are UTC; ``day`` is the exchange-local date."""

    def __init__(self, name: str) -> None:
        import exchange_calendars as xc  # slow import (pandas); only when a calendar is needed

        try:
            cal = xc.get_calendar(name, start=CALENDAR_START)
        except xc.errors.InvalidCalendarName as exc:
            raise InvalidArgument(
                f"unknown exchange calendar {name!r}; examples: XNYS, XNAS, XLON",
                details={"calendar": name},
            ) from exc
        sched = cal.schedule
        self.name = name
        self.days: np.ndarray = sched.index.values.astype("datetime64[D]")
        self.opens: np.ndarray = sched["open"].dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype(np.int64)
        self.closes: np.ndarray = (
            sched["close"].dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype(np.int64)
        )

    # --- bounds --------------------------------------------------------------------------------
    @property
    def first_day(self) -> date:
        return self.days[0].astype(date)

    @property
    def last_day(self) -> date:
        return self.days[-1].astype(date)

    def check_bounds(self, start: datetime, end: datetime) -> None:
        lo = datetime(self.first_day.year, self.first_day.month, self.first_day.day, tzinfo=UTC)
        hi = datetime(self.last_day.year, self.last_day.month, self.last_day.day, 23, 59, tzinfo=UTC)
        if start < lo or end > hi:
            raise InvalidRange(
                f"range {start.isoformat()} .. {end.isoformat()} is outside the {self.name} calendar "
                f"({self.first_day} .. {self.last_day})",
                details={"calendar": self.name, "first": str(self.first_day), "last": str(self.last_day)},
            )

    # --- queries -------------------------------------------------------------------------------
    def _span(self, start_ns: int, end_ns: int) -> slice:
        """Sessions whose [open, close) intersects [start_ns, end_ns)."""
        lo = int(np.searchsorted(self.closes, start_ns, side="right"))
        hi = int(np.searchsorted(self.opens, end_ns, side="left"))
        return slice(lo, max(lo, hi))

    def sessions(self, start: datetime, end: datetime) -> list[Session]:
        sl = self._span(_ns(start), _ns(end))
        return [
            Session(
                self.days[i].astype(date),
                datetime.fromtimestamp(self.opens[i] / 1e9, UTC),
                datetime.fromtimestamp(self.closes[i] / 1e9, UTC),
            )
            for i in range(sl.start, sl.stop)
        ]

    def session_days(self, start_day: date, end_day: date) -> np.ndarray:
        """Session dates with start_day <= day <= end_day (datetime64[D] array)."""
        lo = np.searchsorted(self.days, np.datetime64(start_day, "D"), side="left")
        hi = np.searchsorted(self.days, np.datetime64(end_day, "D"), side="right")
        return self.days[lo:hi]

    def is_session(self, day: date) -> bool:
        i = np.searchsorted(self.days, np.datetime64(day, "D"))
        return bool(i < len(self.days) and self.days[i] == np.datetime64(day, "D"))

    def session_index(self, day: date) -> int:
        i = int(np.searchsorted(self.days, np.datetime64(day, "D")))
        if i >= len(self.days) or self.days[i] != np.datetime64(day, "D"):
            raise InvalidArgument(f"{day} is not a {self.name} session", details={"day": str(day)})
        return i

    def regular_minutes(self, start: datetime, end: datetime) -> int:
        """Number of regular-session minutes inside [start, end): the expected 1Min bar count."""
        s, e = _ns(start), _ns(end)
        sl = self._span(s, e)
        if sl.start >= sl.stop:
            return 0
        o = np.maximum(self.opens[sl], s)
        c = np.minimum(self.closes[sl], e)
        return int(np.clip(c - o, 0, None).sum() // NS_PER_MIN)

    def minute_stamps(self, start: datetime, end: datetime) -> np.ndarray:
        """Every regular-session minute start in [start, end) as int64 ns UTC, ascending."""
        s, e = _ns(start), _ns(end)
        sl = self._span(s, e)
        parts = []
        for i in range(sl.start, sl.stop):
            o = max(int(self.opens[i]), s + (-s) % NS_PER_MIN)
            c = min(int(self.closes[i]), e)
            if c > o:
                parts.append(np.arange(o, c, NS_PER_MIN, dtype=np.int64))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    @cached_property
    def day_ns(self) -> np.ndarray:
        return self.days.astype("datetime64[ns]").astype(np.int64)

    @cached_property
    def midnights(self) -> np.ndarray:
        """Local midnight of each session day, int64 ns UTC (what daily bars are stamped with)."""
        return local_midnights_ns(self.days, self.tz)

    @cached_property
    def tz(self) -> str:
        import exchange_calendars as xc

        return str(xc.get_calendar(self.name, start=CALENDAR_START).tz)

    def windows(self, start: datetime, end: datetime, *, extended: bool = False) -> tuple[np.ndarray, ...]:
        """Trading windows of the sessions that intersect ``[start, end)``, clipped to it:
        ``(session index, lo ns, hi ns)``. Regular hours, or with ``extended`` the US extended
        session: 04:00 local until four hours after the close (20:00, or 17:00 on an early close)."""
        s, e = _ns(start), _ns(end)
        if extended:
            opens = self.midnights + EXT_OPEN_NS
            closes = self.closes + EXT_AFTER_CLOSE_NS
        else:
            opens, closes = self.opens, self.closes
        lo = int(np.searchsorted(closes, s, side="right"))
        hi = int(np.searchsorted(opens, e, side="left"))
        idx = np.arange(lo, max(lo, hi), dtype=np.int64)
        return idx, np.maximum(opens[idx], s), np.minimum(closes[idx], e)


CONTINUOUS_FIRST_DAY = "2010-01-01"  # before any crypto pair the vendors serve
CONTINUOUS_LAST_DAY = "2040-12-31"
CRYPTO_DAILY_ZONES = ("UTC", "America/Chicago")


class ContinuousCalendar(ExchangeCalendar):
    """Around-the-clock trading: every day of ``tz`` is a session from its midnight to the next
    (23 or 25 hours across a DST change), so every minute is expected, weekends and holidays
    included, and daily bars are stamped at ``tz`` midnight. Crypto daily bars are stamped at UTC
    midnight today; older Alpaca answers used Chicago midnight (``tz="America/Chicago"``)."""

    def __init__(self, tz: str = "UTC") -> None:
        if tz not in CRYPTO_DAILY_ZONES:
            raise InvalidArgument(
                f"unknown crypto daily-bar zone {tz!r}; one of {', '.join(CRYPTO_DAILY_ZONES)}",
                details={"calendar": tz},
            )
        self.name = f"24/7 {tz}"
        self.days = np.arange(
            np.datetime64(CONTINUOUS_FIRST_DAY, "D"), np.datetime64(CONTINUOUS_LAST_DAY, "D") + 1, dtype="datetime64[D]"
        )
        self.__dict__["tz"] = tz
        nxt = np.append(self.days, self.days[-1] + 1)
        bounds = local_midnights_ns(nxt, tz)
        self.opens = bounds[:-1]
        self.closes = bounds[1:]
        self.__dict__["midnights"] = self.opens

    def windows(self, start: datetime, end: datetime, *, extended: bool = False) -> tuple[np.ndarray, ...]:
        """As :meth:`ExchangeCalendar.windows`; there are no extended hours: every hour is regular."""
        return super().windows(start, end, extended=False)


CONTINUOUS = "24/7"


def get_calendar(name: str = "XNYS") -> ExchangeCalendar:
    """An exchange calendar by name (``XNYS``…), or ``"24/7"`` / ``"24/7 <zone>"`` for the
    continuous one (zone UTC unless named)."""

    with _lock:
        cal = _cache.get(name)
        if cal is None:
            if name == CONTINUOUS or name.startswith(CONTINUOUS + " "):
                cal = ContinuousCalendar(name[len(CONTINUOUS) :].strip() or "UTC")
            else:
                cal = ExchangeCalendar(name)
            _cache[name] = cal
        return cal


def calendar_for(symbol: str, *, equities: str = "XNYS", crypto_daily: str = "UTC") -> ExchangeCalendar:
    """The calendar of ``symbol``'s asset class: continuous for a crypto pair (``BTC/USD``), the
    exchange calendar ``equities`` otherwise."""
    return get_calendar(f"{CONTINUOUS} {crypto_daily}" if is_crypto(symbol) else equities)


def local_midnights_ns(days: np.ndarray, tz: str) -> np.ndarray:
    """Midnight in ``tz`` of each ``datetime64[D]`` day, as int64 ns UTC (DST-aware)."""
    if len(days) == 0:
        return np.empty(0, dtype=np.int64)
    naive = pl.Series("d", days.astype("datetime64[D]")).cast(pl.Datetime("ns"))
    return naive.dt.replace_time_zone(tz).dt.epoch("ns").to_numpy().astype(np.int64)


def _ns(ts: datetime) -> int:
    if ts.tzinfo is None:
        raise InvalidArgument("naive datetime given where a UTC time was expected")
    return int(ts.timestamp() * 1_000_000) * 1000
