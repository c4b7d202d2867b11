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


@pytest.mark.parametrize(
    ("value", "name", "end"),
    [
        ("9999-12-31", "end", True),  # the day after overflows `date`
        ("9999-12-31", "start", False),
        ("2201-01-01", "end", True),
        ("1969-12-31", "start", False),
        ("0001-01-01", "start", False),
        ("9999-12-31T23:59:59-05:00", "end", False),  # cannot even be converted to UTC
        ("0001-01-01T00:00:00+05:00", "start", False),
        ("2262-04-12T00:00:00Z", "end", False),  # past int64 nanoseconds
        ("1969-12-31T23:59:59Z", "start", False),
        (date(9999, 12, 31), "end", True),
        (datetime(9999, 12, 31, 23, tzinfo=UTC), "end", False),
        (datetime(1, 1, 1, tzinfo=UTC), "start", False),
    ],
)
def test_times_that_cannot_be_held_are_an_invalid_range(value: object, name: str, end: bool) -> None:
    with pytest.raises(InvalidRange) as info:
        parse_time(value, name=name, end=end)  # type: ignore[arg-type]
    assert info.value.code == "INVALID_RANGE"
    assert info.value.details == {"parameter": name}
    assert info.value.message.startswith(f"{name}: ")
    assert "1970-01-01 to 2200-12-31" in info.value.message


def test_range_edges_that_can_be_held() -> None:
    assert parse_time("1970-01-01T00:00:00Z") == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_time("1970-01-01") == datetime(1970, 1, 1, 5, tzinfo=UTC)
    last = parse_time("2200-12-31", end=True)
    assert last == datetime(2201, 1, 1, 5, tzinfo=UTC)
    assert ns_to_dt(dt_to_ns(last)) == last
    assert parse_time("2201-01-01T04:59:59Z") == datetime(2201, 1, 1, 4, 59, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "end", "name"),
    [("2024-03-01", "9999-12-31", "end"), ("1900-01-01", "2024-03-01", "start"), ("2024-03-01", "2262-04-12", "end")],
)
def test_parse_range_names_the_parameter_out_of_range(start: str, end: str, name: str) -> None:
    with pytest.raises(InvalidRange) as info:
        parse_range(start, end)
    assert info.value.details == {"parameter": name}
    assert "supported range" in info.value.message


# --- issue 13 item 10: one end-of-range rule for every type a user may pass ------------------------------------

NY_DAY = (datetime(2024, 3, 1, 5, tzinfo=UTC), datetime(2024, 3, 2, 5, tzinfo=UTC))  # 2024-03-01 in New York


def _days() -> list[object]:
    import numpy as np
    import pandas as pd

    return [
        "2024-03-01",
        date(2024, 3, 1),
        datetime(2024, 3, 1),  # naive midnight: no time of day given
        "2024-03-01T00:00:00",
        pd.Timestamp("2024-03-01"),
        pd.Timestamp(date(2024, 3, 1)),
        np.datetime64("2024-03-01"),
        np.datetime64("2024-03-01T00:00:00.000000000"),
    ]


@pytest.mark.parametrize("day", _days(), ids=lambda v: f"{type(v).__name__}:{v}")
def test_every_way_to_name_a_day_means_the_whole_new_york_day(day: object) -> None:
    """Before: a ``date`` end included the day, a naive ``pd.Timestamp``/``datetime``/``datetime64`` of the same
    day was refused (or not understood)."""
    assert parse_range(day, day) == NY_DAY  # type: ignore[arg-type]
    assert parse_time(day, end=True) == NY_DAY[1]  # type: ignore[arg-type]


def test_values_with_a_zone_are_instants_and_an_end_excludes_them() -> None:
    import pandas as pd

    utc_midnight = datetime(2024, 3, 1, tzinfo=UTC)
    for value in (utc_midnight, pd.Timestamp("2024-03-01", tz="UTC"), "2024-03-01T00:00:00Z"):
        assert parse_time(value, end=True) == utc_midnight  # type: ignore[arg-type]
    ny = pd.Timestamp("2024-03-01 09:30", tz="America/New_York")
    assert parse_time(ny) == datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


def test_naive_values_with_a_time_of_day_are_ambiguous() -> None:
    import numpy as np
    import pandas as pd

    for value in (datetime(2024, 3, 1, 9, 30), pd.Timestamp("2024-03-01 09:30"), np.datetime64("2024-03-01T09:30")):
        with pytest.raises(InvalidArgument) as info:
            parse_time(value, name="end", end=True)  # type: ignore[arg-type]
        assert info.value.details["parameter"] == "end" and "no time zone" in info.value.message
    for missing in (pd.NaT, np.datetime64("NaT")):
        with pytest.raises(InvalidArgument):
            parse_time(missing, name="start")  # type: ignore[arg-type]


def test_timeutil_does_not_import_pandas_or_numpy() -> None:
    import subprocess
    import sys

    code = "import sys, marketpipe.core.timeutil; assert 'pandas' not in sys.modules and 'numpy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
