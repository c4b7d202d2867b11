"""Time parsing at the edges. Inside marketpipe every instant is a UTC-aware datetime (or int64 ns)."""

from __future__ import annotations

import functools
import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from marketpipe.core.errors import InvalidArgument, InvalidRange

NY = ZoneInfo("America/New_York")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# The instants marketpipe can hold: the store and the wire carry int64 nanoseconds since the Unix epoch
# (which end in 2262), and nothing predates 1970. Days are New York days, so the last instant is the
# end of 2200-12-31 there.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(2200, 12, 31)
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME = datetime.combine(LAST_DAY + timedelta(days=1), time(0), NY).astimezone(UTC)
SUPPORTED = f"{FIRST_DAY.isoformat()} to {LAST_DAY.isoformat()}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Datetime64Like(Protocol):
    """numpy's ``datetime64`` (numpy is not imported here): what :func:`parse_time` needs of it."""

    def astype(self, dtype: str) -> Any:
        """The value in another datetime64 unit."""


TimeInput = str | date | datetime | Datetime64Like


def parse_time(value: TimeInput, *, name: str = "time", end: bool = False) -> datetime:
    """Parse a user or wire time to an aware UTC datetime. One rule for every type a user may pass:

    - **A day** — a value with no time of day and no time zone: ``"YYYY-MM-DD"``, a ``datetime.date``, or
      a naive ``datetime`` / ``pandas.Timestamp`` / ``numpy.datetime64`` (or ISO string) at exactly
      midnight — is the exchange-local (New York) day: as a start 00:00 that day, as an ``end`` 00:00
      the *next* day, so ``start=end=2024-01-02`` is that whole day.
    - **An instant** — a value with a time zone (an aware ``datetime`` or ``pandas.Timestamp``, RFC-3339
      with ``Z`` or an offset) — is taken as given, midnight included; as an end it is excluded.
    - A naive value with a time of day is ambiguous (which zone?) and an error naming the parameter.

    Ranges are half-open ``[start, end)`` throughout marketpipe.
    """
    if not isinstance(value, str | date) and type(value).__name__ == "datetime64":
        value = _from_datetime64(value, name)
    if isinstance(value, datetime):
        if str(value) == "NaT":  # pandas' missing time is a datetime subclass
            raise InvalidArgument(f"{name}: NaT is not a time", details={"parameter": name})
        if value.tzinfo is None or value.utcoffset() is None:
            return _naive(value, end, name, value.isoformat())
        return _in_range(value, name, value.isoformat())
    if isinstance(value, date):
        return _day_edge(value, end, name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{name}: expected a date or RFC-3339 time", details={"parameter": name})
    text = value.strip()
    if _DATE.match(text):
        try:
            day = date.fromisoformat(text)
        except ValueError as exc:
            raise InvalidArgument(f"{name}: invalid date {text!r}", details={"parameter": name}) from exc
        return _day_edge(day, end, name)
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(
            f"{name}: cannot parse {text!r}; use YYYY-MM-DD or RFC-3339 such as 2024-01-02T14:30:00Z",
            details={"parameter": name, "value": text},
        ) from exc
    if parsed.tzinfo is None:
        return _naive(parsed, end, name, repr(text))
    return _in_range(parsed, name, text)


def _from_datetime64(value: Datetime64Like, name: str) -> datetime:
    try:
        item = value.astype("datetime64[us]").item()
    except (ValueError, OverflowError, TypeError):
        item = None
    if not isinstance(item, datetime):  # NaT, or outside what a datetime holds
        raise InvalidArgument(f"{name}: {value!s} is not a time marketpipe can use", details={"parameter": name})
    return item


def _naive(value: datetime, end: bool, name: str, given: str) -> datetime:
    """A naive value: a day when it is exactly midnight, else ambiguous."""
    if value.time() == time(0) and not getattr(value, "nanosecond", 0):
        return _day_edge(value.date(), end, name)
    raise InvalidArgument(
        f"{name}: {given} has a time of day but no time zone, which is ambiguous: add a zone (Z or an offset "
        "such as -05:00, or tz= in pandas) for an instant, or give the date alone for a New York day",
        details={"parameter": name, "value": given},
    )


def _out_of_range(name: str, given: str) -> InvalidRange:
    return InvalidRange(
        f"{name}: {given} is outside the supported range {SUPPORTED} (New York days; times from "
        f"{MIN_TIME.isoformat()} to {MAX_TIME.isoformat()})",
        details={"parameter": name},
    )


def _in_range(ts: datetime, name: str, given: str) -> datetime:
    """``ts`` in UTC, or InvalidRange when marketpipe cannot hold it (a year such as 9999 or 0001 may not
    even convert to UTC: that is an OverflowError, reported the same way)."""
    try:
        utc = ts.astimezone(UTC)
    except OverflowError:
        raise _out_of_range(name, given) from None
    if not MIN_TIME <= utc <= MAX_TIME:
        raise _out_of_range(name, given)
    return utc


def _day_edge(day: date, end: bool, name: str = "time") -> datetime:
    if not FIRST_DAY <= day <= LAST_DAY:
        raise _out_of_range(name, day.isoformat())
    if end:
        day = day + timedelta(days=1)
    return datetime.combine(day, time(0), NY).astimezone(UTC)


def parse_range(start: TimeInput, end: TimeInput | None, *, now: datetime | None = None) -> tuple[datetime, datetime]:
    s = parse_time(start, name="start")
    e = parse_time(end, name="end", end=True) if end is not None else (now or utcnow())
    if e <= s:
        given = f" (start {start}, end {end}: an end given as a day ends with that day)" if end is not None else ""
        raise InvalidRange(
            f"end ({e.isoformat()}) must be after start ({s.isoformat()}){given}",
            details={"start": s.isoformat(), "end": e.isoformat()},
        )
    return s, e


def rfc3339(ts: datetime) -> str:
    """Format for the wire: UTC with Z, microseconds only when present."""
    ts = ts.astimezone(UTC)
    if ts.microsecond:
        return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def ns_to_dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).replace(microsecond=(ns // 1000) % 1_000_000)


@functools.lru_cache(maxsize=4096)
def _second_text(secs: int) -> str:
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def ns_text(ns: int) -> str:
    """Unix nanoseconds as RFC-3339 UTC with the fraction's trailing zeros trimmed (Go's RFC3339Nano).
    Live streams write one per trade or quote, many within the same second: the second's text is
    formatted once (strftime costs ~3 µs, ten times the rest)."""
    secs, frac = divmod(ns, 1_000_000_000)
    whole = _second_text(secs)
    digits = f"{frac:09d}".rstrip("0")
    return f"{whole}.{digits}Z" if digits else f"{whole}Z"


def record_ns(ts: datetime, ts_ns: int | None) -> int:
    """A record's exact instant in Unix nanoseconds: ``ts_ns`` when the vendor sent more than ``ts`` holds."""
    return ts_ns if ts_ns is not None else dt_to_ns(ts)


def dt_to_ns(ts: datetime) -> int:
    ts = ts.astimezone(UTC)
    return (int(ts.replace(microsecond=0).timestamp()) * 1_000_000 + ts.microsecond) * 1000
