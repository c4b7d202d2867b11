"""Time parsing at the edges. Inside marketpipe every instant is a UTC-aware datetime (or int64 ns)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from marketpipe.core.errors import InvalidArgument, InvalidRange

NY = ZoneInfo("America/New_York")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_time(value: str | date | datetime, *, name: str = "time", end: bool = False) -> datetime:
    """Parse a user or wire time to an aware UTC datetime.

    A bare date means the exchange-local (New York) day: as a start it is 00:00 that day, as an
    ``end`` it is 00:00 the *next* day, so ``--start 2024-01-02 --end 2024-01-02`` is that whole
    day. Ranges are half-open ``[start, end)`` throughout marketpipe.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidArgument(
                f"{name}: naive datetime {value.isoformat()} is ambiguous; give a time zone",
                details={"parameter": name},
            )
        return value.astimezone(UTC)
    if isinstance(value, date):
        return _day_edge(value, end)
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{name}: expected a date or RFC-3339 time", details={"parameter": name})
    text = value.strip()
    if _DATE.match(text):
        try:
            return _day_edge(date.fromisoformat(text), end)
        except ValueError as exc:
            raise InvalidArgument(f"{name}: invalid date {text!r}", details={"parameter": name}) from exc
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(
            f"{name}: cannot parse {text!r}; use YYYY-MM-DD or RFC-3339 such as 2024-01-02T14:30:00Z",
            details={"parameter": name, "value": text},
        ) from exc
    if parsed.tzinfo is None:
        raise InvalidArgument(
            f"{name}: {text!r} has no time zone; add Z or an offset such as -05:00",
            details={"parameter": name, "value": text},
        )
    return parsed.astimezone(UTC)


def _day_edge(day: date, end: bool) -> datetime:
    if end:
        day = day + timedelta(days=1)
    return datetime.combine(day, time(0), NY).astimezone(UTC)


def parse_range(
    start: str | date | datetime, end: str | date | datetime | None, *, now: datetime | None = None
) -> tuple[datetime, datetime]:
    s = parse_time(start, name="start")
    e = parse_time(end, name="end", end=True) if end is not None else (now or utcnow())
    if e <= s:
        given = f" (start {start}, end {end}: a bare end date means the end of that day)" if end is not None else ""
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


def dt_to_ns(ts: datetime) -> int:
    ts = ts.astimezone(UTC)
    return (int(ts.replace(microsecond=0).timestamp()) * 1_000_000 + ts.microsecond) * 1000
