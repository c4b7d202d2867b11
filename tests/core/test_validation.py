"""The shared argument checks: each names the parameter it refused, keeps the caller's wording, and
returns the value (canonicalised where that is its job)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from marketpipe.core.errors import InvalidArgument, InvalidSymbol, InvalidTimeframe
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.validation import (
    validate_enum,
    validate_limit,
    validate_number,
    validate_range,
    validate_required,
    validate_sort,
    validate_symbol,
    validate_symbols,
    validate_timeframe,
    validate_type,
)

T0 = datetime(2024, 3, 5, 14, 30, tzinfo=UTC)
T1 = datetime(2024, 3, 5, 15, 30, tzinfo=UTC)


def test_enum_returns_the_allowed_spelling_and_names_the_parameter() -> None:
    assert validate_enum("csv", ("json", "csv"), "format") == "csv"
    assert validate_enum("CSV", ("json", "csv"), "format", casefold=True) == "csv"
    assert validate_enum("usd", ("USD",), "currency", casefold=True) == "USD"
    with pytest.raises(InvalidArgument) as info:
        validate_enum("CSV", ("json", "csv"), "format")
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.details == {"parameter": "format"}
    assert info.value.message == "format must be json or csv"


def test_enum_default_message_lists_more_than_two_choices() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_enum("x", ("a", "b", "c"), "kind")
    assert info.value.message == "kind must be one of a, b, c"


def test_enum_refuses_a_value_that_is_not_a_string() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_enum(3, ("fallback", "auto"), "live", message='live must be "fallback" or "auto"')  # type: ignore[arg-type]
    assert info.value.message == 'live must be "fallback" or "auto"'
    assert info.value.details == {"parameter": "live"}


def test_message_templates_fill_only_their_fields_and_keep_other_braces() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_enum("{x}", ("a{b}",), "source", message="unknown {param} {value!r}; one of {allowed}; {other}")
    assert info.value.message == "unknown source '{x}'; one of a{b}; {other}"


def test_sort() -> None:
    assert validate_sort("desc") == "desc"
    with pytest.raises(InvalidArgument) as info:
        validate_sort("up")
    assert info.value.message == "sort must be asc or desc"
    assert info.value.details == {"parameter": "sort"}
    with pytest.raises(InvalidArgument, match=r": invalid sort$"):
        validate_sort("up", message="invalid sort")


@pytest.mark.parametrize("value", [0, 10_001, -1, "0", "ten", "1.5", "", " 5", True])
def test_limit_out_of_bounds_or_not_an_integer(value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_limit(value, 1, 10_000)  # type: ignore[arg-type]
    assert info.value.message == "limit must be 1..10000"
    assert info.value.details == {"parameter": "limit"}


def test_limit_accepts_ints_and_digit_strings() -> None:
    assert validate_limit(1, 1, 10_000) == 1
    assert validate_limit("10000", 1, 10_000) == 10_000
    assert validate_limit("0010", 1, 10_000) == 10


def test_number_bounds_and_non_finite_values() -> None:
    assert validate_number(100, "hard-pct", gt=0, le=100) == 100
    for bad in (0, 100.5, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument) as info:
            validate_number(bad, "hard-pct", gt=0, le=100)
        assert info.value.details == {"parameter": "hard-pct"}
        assert info.value.message.startswith("hard-pct must be > 0 and <= 100, got ")
    with pytest.raises(InvalidArgument, match=r": --duration must be > 0 seconds$"):
        validate_number(-1.0, "duration", gt=0, message="--duration must be > 0 seconds")


def test_required() -> None:
    assert validate_required("2024-03-05", "start") == "2024-03-05"
    assert validate_required(["AAPL"], "symbols") == ["AAPL"]
    cases: list[str | list[str] | None] = [None, "", []]
    for missing in cases:
        with pytest.raises(InvalidArgument) as info:
            validate_required(missing, "start")
        assert info.value.message == "start is required"
        assert info.value.details == {"parameter": "start"}


def test_type() -> None:
    assert validate_type(None, (str, type(None)), "provider") is None
    with pytest.raises(InvalidArgument) as info:
        validate_type(5, (str, type(None)), "provider", message="provider must be a string or null")
    assert info.value.message == "provider must be a string or null"
    assert info.value.details == {"parameter": "provider"}


def test_symbols_canonical_deduplicated_and_never_empty() -> None:
    assert validate_symbols("brk-b, AAPL,,aapl ") == ["BRK.B", "AAPL"]
    assert validate_symbols(["msft", "MSFT"]) == ["MSFT"]
    with pytest.raises(InvalidArgument) as info:
        validate_symbols(" , ", message="missing symbols")
    assert type(info.value) is InvalidArgument
    assert info.value.message == "missing symbols"
    assert info.value.details == {"parameter": "symbols"}
    with pytest.raises(InvalidSymbol) as bad:
        validate_symbols("AAPL,$$$", symbol_message="invalid symbol: {value}")
    assert bad.value.message == "invalid symbol: $$$"
    assert bad.value.details == {"symbol": "$$$"}


def test_symbol_keeps_a_comma_inside_one_symbol() -> None:
    with pytest.raises(InvalidSymbol) as info:
        validate_symbol("A,B", message="invalid symbol: {value}")
    assert info.value.message == "invalid symbol: A,B"
    assert validate_symbol("brk/b") == "BRK.B"


def test_timeframe_names_the_parameter() -> None:
    assert validate_timeframe("5Min") == Timeframe.parse("5Min")
    with pytest.raises(InvalidTimeframe) as info:
        validate_timeframe("7Fortnight")
    assert info.value.details["parameter"] == "timeframe"
    assert info.value.details["timeframe"] == "7Fortnight"  # the parser's own details are kept
    with pytest.raises(InvalidTimeframe) as wire:
        validate_timeframe(None, message="invalid timeframe")
    assert wire.value.message == "invalid timeframe"
    assert wire.value.details == {"parameter": "timeframe"}


def test_timeframe_outside_an_allowed_set() -> None:
    allowed = [Timeframe.parse("1Min"), Timeframe.parse("1Day")]
    assert validate_timeframe(Timeframe.parse("1Day"), allowed=allowed) == allowed[1]
    with pytest.raises(InvalidTimeframe) as info:
        validate_timeframe("1Hour", allowed=allowed, message="no {value} bars; it serves {allowed}")
    assert info.value.message == "no 1Hour bars; it serves 1Min, 1Day"
    assert info.value.details == {"timeframe": "1Hour", "parameter": "timeframe"}


def test_range() -> None:
    validate_range(T0, T1)
    validate_range(T0, T0, allow_empty=True)
    for end in (T0, datetime(2024, 3, 5, 14, tzinfo=UTC)):
        with pytest.raises(InvalidArgument) as info:
            validate_range(T0, end)
        assert info.value.message == "end must be after start"
        assert info.value.details == {"parameter": "end"}
    with pytest.raises(InvalidArgument, match=r": end should not be before start$"):
        validate_range(T1, T0, allow_empty=True, message="end should not be before start")
