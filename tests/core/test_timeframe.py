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
    """Alpaca's own grammar (what the simulator's Alpaca face accepts, like the vendor)."""
    with pytest.raises(InvalidTimeframe) as info:
        Timeframe.parse(text, strict=True)
    assert info.value.code == "INVALID_TIMEFRAME"
    assert "1-59Min" in info.value.message


@pytest.mark.parametrize(
    "text", ["0Min", "60Min", "60m", "24h", "2Day", "2d", "2wk", "5mo", "7M", "", "Min", "1Sec", "1s", "-1Min", "1x"]
)
def test_aliases_still_reject_what_no_vendor_serves(text: str) -> None:
    with pytest.raises(InvalidTimeframe) as info:
        Timeframe.parse(text)
    assert "1-59Min" in info.value.message and "1M is a month and 1m a minute" in info.value.message


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("1m", "1Min"),  # yfinance / alpaca-py users: a minute
        ("5m", "5Min"),
        ("1min", "1Min"),  # pandas
        ("15MIN", "15Min"),
        ("1 Minute", "1Min"),
        ("1h", "1Hour"),
        ("4hours", "4Hour"),
        ("1d", "1Day"),
        ("1day", "1Day"),
        ("1w", "1Week"),
        ("1wk", "1Week"),  # yfinance
        ("1mo", "1Month"),  # yfinance
        ("3mo", "3Month"),
        ("1M", "1Month"),  # Alpaca's short form keeps its meaning
        ("5T", "5Min"),
    ],
)
def test_user_aliases(text: str, canonical: str) -> None:
    """Issue 13 item 10: before, everything but Alpaca's ``1Min`` style was INVALID_TIMEFRAME."""
    assert str(Timeframe.parse(text)) == canonical
    if text not in ("1M", "5T"):  # not Alpaca's grammar: the vendor (and its simulated face) refuses them
        with pytest.raises(InvalidTimeframe):
            Timeframe.parse(text, strict=True)


def test_alpaca_py_timeframe_objects() -> None:
    from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

    assert Timeframe.parse(TimeFrame.Minute) == Timeframe(1, Unit.MINUTE)
    assert Timeframe.parse(TimeFrame(5, TimeFrameUnit.Minute)) == Timeframe(5, Unit.MINUTE)
    assert Timeframe.parse(TimeFrame.Hour) == Timeframe(1, Unit.HOUR)
    assert Timeframe.parse(TimeFrame.Day) == Timeframe(1, Unit.DAY)
    assert Timeframe.parse(TimeFrame(3, TimeFrameUnit.Month)) == Timeframe(3, Unit.MONTH)
    assert Timeframe.parse(str(TimeFrame(5, TimeFrameUnit.Minute))) == Timeframe(5, Unit.MINUTE)  # "5Min"


def test_objects_shaped_like_a_timeframe_without_alpaca_py() -> None:
    class Fake:
        def __init__(self, amount: object, unit: object) -> None:
            self.amount, self.unit = amount, unit

    assert Timeframe.parse(Fake(15, "Min")) == Timeframe(15, Unit.MINUTE)  # type: ignore[arg-type]
    for bad in (Fake(60, "Min"), Fake("1", "Min"), Fake(1, "Sec"), Fake(True, "Day")):
        with pytest.raises(InvalidTimeframe):
            Timeframe.parse(bad)  # type: ignore[arg-type]


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
