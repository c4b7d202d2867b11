"""Bar timeframes in Alpaca's grammar: ``{1-59}Min|T``, ``{1-23}Hour|H``, ``1Day|D``, ``1Week|W``,
``{1,2,3,4,6,12}Month|M``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from marketpipe.core.errors import InvalidTimeframe


class Unit(StrEnum):
    MINUTE = "Min"
    HOUR = "Hour"
    DAY = "Day"
    WEEK = "Week"
    MONTH = "Month"


_SHORT = {"T": Unit.MINUTE, "H": Unit.HOUR, "D": Unit.DAY, "W": Unit.WEEK, "M": Unit.MONTH}
_LONG = {u.value: u for u in Unit}
_ALLOWED: dict[Unit, frozenset[int]] = {
    Unit.MINUTE: frozenset(range(1, 60)),
    Unit.HOUR: frozenset(range(1, 24)),
    Unit.DAY: frozenset({1}),
    Unit.WEEK: frozenset({1}),
    Unit.MONTH: frozenset({1, 2, 3, 4, 6, 12}),
}
_GRAMMAR = re.compile(r"^\s*(\d{1,3})\s*(Min|Hour|Day|Week|Month|T|H|D|W|M)\s*$")
ALLOWED_TEXT = "1-59Min (or T), 1-23Hour (or H), 1Day (D), 1Week (W), 1/2/3/4/6/12Month (M)"


@dataclass(frozen=True, slots=True)
class Timeframe:
    amount: int
    unit: Unit

    @classmethod
    def parse(cls, value: str | Timeframe) -> Timeframe:
        if isinstance(value, Timeframe):
            return value
        if not isinstance(value, str):
            raise InvalidTimeframe(
                f"timeframe must be a string such as '1Min', got {type(value).__name__}",
                details={"allowed": ALLOWED_TEXT},
            )
        m = _GRAMMAR.match(value)
        if not m:
            raise InvalidTimeframe(
                f"invalid timeframe {value!r}; allowed: {ALLOWED_TEXT}",
                details={"timeframe": value, "allowed": ALLOWED_TEXT},
            )
        amount, word = int(m.group(1)), m.group(2)
        unit = _LONG.get(word) or _SHORT[word]
        if amount not in _ALLOWED[unit]:
            raise InvalidTimeframe(
                f"invalid timeframe {value!r}: {amount} is not an allowed amount for {unit.value}; "
                f"allowed: {ALLOWED_TEXT}",
                details={"timeframe": value, "allowed": ALLOWED_TEXT},
            )
        return cls(amount, unit)

    def __str__(self) -> str:
        return f"{self.amount}{self.unit.value}"

    @property
    def is_intraday(self) -> bool:
        return self.unit in (Unit.MINUTE, Unit.HOUR)

    @property
    def seconds(self) -> int:
        """Length of one bar for intraday timeframes (daily and longer depend on the calendar)."""
        if self.unit is Unit.MINUTE:
            return self.amount * 60
        if self.unit is Unit.HOUR:
            return self.amount * 3600
        if self.unit is Unit.DAY:
            return 86400
        if self.unit is Unit.WEEK:
            return 7 * 86400
        return 31 * 86400 * self.amount

    @property
    def delta(self) -> timedelta:
        return timedelta(seconds=self.seconds)


MIN1 = Timeframe(1, Unit.MINUTE)
DAY1 = Timeframe(1, Unit.DAY)
