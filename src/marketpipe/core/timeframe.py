"""Bar timeframes. Canonical form and Alpaca's grammar: ``{1-59}Min|T``, ``{1-23}Hour|H``, ``1Day|D``,
``1Week|W``, ``{1,2,3,4,6,12}Month|M``.

What users type is accepted too (:meth:`Timeframe.parse`; ``strict=True`` is Alpaca's grammar alone, for
the simulator's Alpaca face): the words in any case and the short forms of pandas and yfinance — ``1m``
``5m`` ``1min`` ``1h`` ``1d`` ``1w``/``1wk`` ``1mo`` — and alpaca-py's ``TimeFrame`` objects (anything with
``amount`` and ``unit`` attributes, the unit an enum whose value is ``Min``/``Hour``/…; alpaca-py itself is
never imported). One letter is case-sensitive: ``1M`` is a month (Alpaca), ``1m`` a minute (yfinance)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Protocol, runtime_checkable

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
_LOOSE = re.compile(r"^\s*(\d{1,3})\s*([A-Za-z]+)\s*$")
# Lower-case unit words users write (pandas, yfinance, plain English); "M" alone is Alpaca's month.
_ALIASES: dict[str, Unit] = {
    **{w: Unit.MINUTE for w in ("m", "t", "min", "mins", "minute", "minutes")},
    **{w: Unit.HOUR for w in ("h", "hr", "hrs", "hour", "hours")},
    **{w: Unit.DAY for w in ("d", "day", "days")},
    **{w: Unit.WEEK for w in ("w", "wk", "wks", "week", "weeks")},
    **{w: Unit.MONTH for w in ("mo", "mon", "mons", "month", "months")},
}
ALLOWED_TEXT = (
    "1-59Min (or T, m, min), 1-23Hour (or H, h), 1Day (D, d), 1Week (W, w, wk), 1/2/3/4/6/12Month (M, mo); "
    "note 1M is a month and 1m a minute"
)
STRICT_TEXT = "1-59Min (or T), 1-23Hour (or H), 1Day (D), 1Week (W), 1/2/3/4/6/12Month (M)"


@runtime_checkable
class TimeframeObject(Protocol):
    """alpaca-py's ``TimeFrame`` and anything shaped like it: an amount and a unit (``unit.value`` or
    ``str(unit)`` one of ``Min``, ``Hour``, ``Day``, ``Week``, ``Month``)."""

    @property
    def amount(self) -> int:
        """How many units one bar spans."""

    @property
    def unit(self) -> object:
        """The unit: an enum member whose value (or the object itself, as text) is ``Min``, ``Hour``, …"""


TimeframeLike = str | TimeframeObject


@dataclass(frozen=True, slots=True)
class Timeframe:
    amount: int
    unit: Unit

    @classmethod
    def parse(cls, value: TimeframeLike | Timeframe, *, strict: bool = False) -> Timeframe:
        """``value`` as a Timeframe: a string (Alpaca's grammar, or with ``strict=False`` the aliases in the
        module docstring) or an alpaca-py-style ``TimeFrame`` object. INVALID_TIMEFRAME otherwise."""
        allowed = STRICT_TEXT if strict else ALLOWED_TEXT
        if isinstance(value, Timeframe):
            return value
        if not isinstance(value, str) and not strict and isinstance(value, TimeframeObject):
            return cls._from_object(value)
        if not isinstance(value, str):
            raise InvalidTimeframe(
                f"timeframe must be a string such as '1Min' (or an alpaca-py TimeFrame), got {type(value).__name__}",
                details={"allowed": allowed},
            )
        m = _GRAMMAR.match(value)
        unit: Unit | None = None
        if m:
            unit = _LONG.get(m.group(2)) or _SHORT[m.group(2)]
        elif not strict and (m := _LOOSE.match(value)):
            unit = _ALIASES.get(m.group(2).lower())
        if m is None or unit is None:
            raise InvalidTimeframe(
                f"invalid timeframe {value!r}; allowed: {allowed}",
                details={"timeframe": value, "allowed": allowed},
            )
        amount = int(m.group(1))
        if amount not in _ALLOWED[unit]:
            raise InvalidTimeframe(
                f"invalid timeframe {value!r}: {amount} is not an allowed amount for {unit.value}; allowed: {allowed}",
                details={"timeframe": value, "allowed": allowed},
            )
        return cls(amount, unit)

    @classmethod
    def _from_object(cls, value: TimeframeObject) -> Timeframe:
        unit = getattr(value.unit, "value", value.unit)
        amount = value.amount
        if not isinstance(amount, int) or isinstance(amount, bool) or str(unit) not in _LONG:
            raise InvalidTimeframe(
                f"invalid timeframe {value!r}: amount {amount!r}, unit {unit!r}; allowed: {ALLOWED_TEXT}",
                details={"timeframe": repr(value), "allowed": ALLOWED_TEXT},
            )
        return cls.parse(f"{amount}{unit}", strict=True)

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
