from datetime import UTC, date, datetime

import pytest

from marketpipe.core.errors import InvalidArgument, InvalidRange
from marketpipe.core.timeutil import dt_to_ns, ns_to_dt, parse_range, parse_time, rfc3339


def test_bare_dates_are_new_york_days() -> None:
    assert parse_time("2024-01-02") == datetime(2024, 1, 2, 5, tzinfo=UTC)
    assert parse_time("2024-07-02", end=True) == datetime(2024, 7, 3, 4, tzinfo=UTC)
    assert parse_time(date(2024, 1, 2)) == datetime(2024, 1, 2, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "text", ["2024-03-05T14:30:00Z", "2024-03-05T09:30:00-05:00", "2024-03-05T14:30:00.000000+00:00"]
)
def test_rfc3339_forms(text: str) -> None:
    assert parse_time(text) == datetime(2024, 3, 5, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01", "2024-03-05T14:30:00", "", "   "])
def test_bad_input_names_the_parameter(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_time(bad, name="start")
    assert info.value.details.get("parameter") == "start"


def test_reversed_range() -> None:
    with pytest.raises(InvalidRange):
        parse_range("2024-03-05", "2024-03-01")


def test_round_trips() -> None:
    ts = datetime(2024, 3, 5, 14, 30, 0, 123456, tzinfo=UTC)
    assert ns_to_dt(dt_to_ns(ts)) == ts
    assert rfc3339(ts) == "2024-03-05T14:30:00.123456Z"
    assert rfc3339(ts.replace(microsecond=0)) == "2024-03-05T14:30:00Z"
