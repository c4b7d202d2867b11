"""Expected bars from the real exchange calendar, and gap / confirmed-empty classification."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_range
from marketpipe.quality.completeness import assess, expected_stamps, merge_intervals

CAL = get_calendar("XNYS")


def stamps(tf: str, a: str, b: str, **kw: bool) -> list[str]:
    s, e = parse_range(a, b)
    st, _ = expected_stamps(CAL, Timeframe.parse(tf), s, e, **kw)
    return [str(np.datetime64(int(x), "ns"))[:16] for x in st]


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


@pytest.mark.parametrize(
    ("day", "minutes", "first", "last"),
    [
        ("2024-11-29", 210, "2024-11-29T14:30", "2024-11-29T17:59"),  # day after Thanksgiving: 13:00 close
        ("2024-03-29", 0, None, None),  # Good Friday
        ("2025-01-09", 0, None, None),  # national day of mourning (President Carter): unscheduled closure
        ("2024-03-08", 390, "2024-03-08T14:30", "2024-03-08T20:59"),  # last Friday of EST
        ("2024-03-11", 390, "2024-03-11T13:30", "2024-03-11T19:59"),  # first Monday of EDT
        ("2024-11-01", 390, "2024-11-01T13:30", "2024-11-01T19:59"),  # last Friday of EDT
        ("2024-11-04", 390, "2024-11-04T14:30", "2024-11-04T20:59"),  # first Monday of EST
        ("2024-07-03", 210, "2024-07-03T13:30", "2024-07-03T16:59"),  # early close in summer time
    ],
)
def test_minute_bars_follow_the_real_sessions(day: str, minutes: int, first: str | None, last: str | None) -> None:
    got = stamps("1Min", day, day)
    assert len(got) == minutes
    if minutes:
        assert (got[0], got[-1]) == (first, last)


def test_longer_timeframes_bucket_on_the_new_york_clock() -> None:
    assert len(stamps("5Min", "2024-03-04", "2024-03-04")) == 78
    hours = stamps("1Hour", "2024-03-04", "2024-03-04")
    assert hours == [f"2024-03-04T{h:02d}:00" for h in range(14, 21)]  # 09:00 ET (holds 09:30) .. 15:00 ET
    assert stamps("4Hour", "2024-03-04", "2024-03-04") == ["2024-03-04T13:00", "2024-03-04T17:00"]  # 08-12, 12-16
    assert len(stamps("1Hour", "2024-11-29", "2024-11-29")) == 4  # 09:00 .. 12:00 ET on the early close
    week = stamps("1Day", "2024-03-25", "2024-03-31")
    assert week == [f"2024-03-{d}T04:00" for d in (25, 26, 27, 28)]  # Good Friday has no bar
    assert stamps("1Week", "2024-03-25", "2024-04-05") == ["2024-03-25T04:00", "2024-04-01T04:00"]
    assert stamps("1Month", "2024-02-15", "2024-04-15") == ["2024-02-01T05:00", "2024-03-01T05:00", "2024-04-01T04:00"]
    assert stamps("3Month", "2024-02-15", "2024-04-15") == ["2024-01-01T05:00", "2024-04-01T04:00"]
    assert stamps("1Day", "2025-01-06", "2025-01-10") == [f"2025-01-{d:02d}T05:00" for d in (6, 7, 8, 10)]


def test_extended_hours_run_from_four_until_four_hours_after_the_close() -> None:
    full = stamps("1Min", "2024-03-04", "2024-03-04", extended=True)
    assert (len(full), full[0], full[-1]) == (960, "2024-03-04T09:00", "2024-03-05T00:59")
    early = stamps("1Min", "2024-11-29", "2024-11-29", extended=True)
    assert (len(early), early[-1]) == (780, "2024-11-29T21:59")  # 04:00 .. 17:00 ET


def test_gap_confirmed_empty_and_extra_bars() -> None:
    tf = Timeframe.parse("1Min")
    s, e = parse_range("2024-03-04", "2024-03-05")
    expected, _ = expected_stamps(CAL, tf, s, e)
    held = np.concatenate([[ns("2024-03-04T12:00")], expected[:100], expected[110:390], expected[400:]])
    covered = (np.array([ns("2024-03-04T05:00")]), np.array([ns("2024-03-05T14:35")]))
    c = assess("X", tf, CAL, s, e, held, covered)
    assert (c.expected, c.present, c.confirmed_empty, c.gap, c.extra) == (780, 760, 15, 5, 1)
    assert c.ratio == pytest.approx(760 / 780)
    assert c.days["day"].cast(str).to_list() == ["2024-03-04", "2024-03-05"]
    assert c.days.select("present", "confirmed_empty", "gap").rows() == [(380, 10, 0), (380, 5, 5)]
    assert [(k, n) for k, _, _, n in c.ranges.rows()] == [("confirmed_empty", 10), ("confirmed_empty", 5), ("gap", 5)]
    assert c.gaps() == [(datetime(2024, 3, 5, 14, 35, tzinfo=UTC), datetime(2024, 3, 5, 14, 40, tzinfo=UTC))]


def test_daily_gaps_merge_across_weekends_and_holidays() -> None:
    tf = Timeframe.parse("1Day")
    s, e = parse_range("2024-03-25", "2024-04-05")
    expected, _ = expected_stamps(CAL, tf, s, e)
    c = assess("X", tf, CAL, s, e, np.concatenate([expected[:2], expected[-1:]]), (np.empty(0), np.empty(0)))
    # Wed 27 .. Thu 4 April missing: Good Friday and the weekend in between are not breaks.
    assert c.ranges.select("kind", "bars").rows() == [("gap", 6)]
    start, end = c.gaps()[0]
    assert (start.isoformat(), end.isoformat()) == ("2024-03-27T04:00:00+00:00", "2024-04-05T04:00:00+00:00")


def test_no_data_and_empty_ranges_are_defined_results() -> None:
    tf = Timeframe.parse("1Min")
    s, e = parse_range("2024-03-29", "2024-03-29")  # no session at all
    c = assess("X", tf, CAL, s, e, np.empty(0, np.int64), (np.empty(0, np.int64), np.empty(0, np.int64)))
    assert (c.expected, c.ratio, c.days.height, c.ranges.height) == (0, None, 0, 0)


def test_merge_intervals() -> None:
    s, e = merge_intervals(np.array([5, 1, 3, 20]), np.array([8, 4, 6, 30]))
    assert s.tolist() == [1, 20] and e.tolist() == [8, 30]
