import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketpipe.core.errors import InvalidTimeframe
from marketpipe.core.timeframe import Timeframe, Unit


@pytest.mark.parametrize(
    ("text", "amount", "unit"),
    [
        ("1Min", 1, Unit.MINUTE),
        ("59Min", 59, Unit.MINUTE),
        ("30T", 30, Unit.MINUTE),
        ("1Hour", 1, Unit.HOUR),
        ("23H", 23, Unit.HOUR),
        ("1Day", 1, Unit.DAY),
        ("1D", 1, Unit.DAY),
        ("1Week", 1, Unit.WEEK),
        ("1W", 1, Unit.WEEK),
        ("4Month", 4, Unit.MONTH),
        ("12M", 12, Unit.MONTH),
        ("3Month", 3, Unit.MONTH),
    ],
)
def test_parses_alpaca_grammar(text: str, amount: int, unit: Unit) -> None:
    tf = Timeframe.parse(text)
    assert (tf.amount, tf.unit) == (amount, unit)
    assert Timeframe.parse(str(tf)) == tf


@pytest.mark.parametrize(
    "text", ["0Min", "60Min", "24Hour", "2Day", "2Week", "5Month", "7M", "1min", "1 Minute", "", "Min", "1Sec", "-1Min"]
)
def test_rejects_with_the_allowed_list(text: str) -> None:
    with pytest.raises(InvalidTimeframe) as info:
        Timeframe.parse(text)
    assert info.value.code == "INVALID_TIMEFRAME"
    assert "1-59Min" in info.value.message


def test_rejects_non_strings() -> None:
    with pytest.raises(InvalidTimeframe):
        Timeframe.parse(5)  # type: ignore[arg-type]


@given(st.text(max_size=12))
def test_never_crashes_on_garbage(text: str) -> None:
    try:
        tf = Timeframe.parse(text)
    except InvalidTimeframe:
        return
    assert Timeframe.parse(str(tf)) == tf


def test_properties() -> None:
    assert Timeframe.parse("15Min").seconds == 900
    assert Timeframe.parse("1Hour").is_intraday
    assert not Timeframe.parse("1Day").is_intraday
