from datetime import date

import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.errors import InvalidArgument, InvalidRange
from marketpipe.core.timeutil import parse_time


def day(d: str) -> tuple:
    return parse_time(d), parse_time(d, end=True)


def test_early_close_day_after_thanksgiving() -> None:
    cal = get_calendar()
    (s,) = cal.sessions(*day("2024-11-29"))
    assert s.minutes == 210  # 09:30-13:00 ET
    assert cal.regular_minutes(*day("2024-11-29")) == 210
    assert len(cal.minute_stamps(*day("2024-11-29"))) == 210


@pytest.mark.parametrize("holiday", ["2024-03-29", "2025-01-09", "2024-12-25", "2024-07-04"])
def test_closed_days(holiday: str) -> None:
    cal = get_calendar()
    assert cal.sessions(*day(holiday)) == []
    assert not cal.is_session(date.fromisoformat(holiday))
    assert cal.regular_minutes(*day(holiday)) == 0


def test_dst_week_session_times_in_utc() -> None:
    cal = get_calendar()
    before, after = cal.sessions(parse_time("2024-03-08"), parse_time("2024-03-11", end=True))
    assert before.open.hour == 14 and before.open.minute == 30  # EST: 09:30 = 14:30Z
    assert after.open.hour == 13 and after.open.minute == 30  # EDT: 09:30 = 13:30Z


def test_partial_ranges_count_minutes() -> None:
    cal = get_calendar()
    assert cal.regular_minutes(parse_time("2024-03-05T14:30:00Z"), parse_time("2024-03-05T15:00:00Z")) == 30
    stamps = cal.minute_stamps(parse_time("2024-03-05T14:30:30Z"), parse_time("2024-03-05T14:33:00Z"))
    assert len(stamps) == 2  # 14:31 and 14:32: a partial minute at the start is not a bar start


def test_unknown_calendar_and_bounds() -> None:
    with pytest.raises(InvalidArgument):
        get_calendar("NOPE")
    with pytest.raises(InvalidRange):
        get_calendar().check_bounds(parse_time("1990-01-01"), parse_time("1990-02-01"))
