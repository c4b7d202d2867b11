"""The simulator's corporate actions: real splits and dividends of symbols a new user knows, the
factors each vendor face adjusts its bars with, and faults that make one vendor wrong.

The book (:data:`DEFAULT_ACTIONS`) holds real events: ex-dates and ratios / per-share amounts as the
companies announced them (AAPL 4:1 ex 2020-08-31, NVDA 10:1 ex 2024-06-10, TSLA 3:1 ex 2022-08-25,
AAPL's quarterly cash dividends 2019-2025, among them 0.205 ex 2020-11-06, and GE's spin-offs of GE
HealthCare, 1 GEHC per 3 GE ex 2023-01-04, and GE Vernova, 1 GEV per 4 GE ex 2024-04-02). Their payable
and process dates are not kept here: the simulator sets a dividend's payable = process date to ex + 7
days (a dividend's process date trails its ex-date, trap 2 of next-capabilities §0) and a split's or a
spin-off's to its ex-date. Vendor ids are UUIDs derived from the event.

A spin-off's new line trades from its ex-date only (no bars, trades or quotes before it). The source's
raw prices of every session before the ex-date are its walk's plus the value distributed per source
share, ``V = new_rate / old_rate x`` the new line's raw close on the ex-date (``old_rate`` is Alpaca's
``source_rate``), so they drop by ``V`` there as real raw data does.

The market's raw prices follow the book: every price of a session before a split's ex-date is the
walk's price times the split ratio (so raw bars jump at the split, as real raw data does); dividends
leave raw prices alone. Each face adjusts with its own *view* of the book: the true book unless an
:class:`ActionFault` for that vendor changes it (a split missing, doubled or with a wrong ratio, a
dividend listed but left out of the adjusted prices, a split applied but not listed). The factors follow
next-capabilities §1.5:
split price factor old/new (volume new/old), dividend factor (C_prev - D) / C_prev on the raw close of
the session before the ex-date, spin-off factor 1 - V / C_prev (V as above), a bar's factor the product
over every action with ex-date after its New York date. This is the simulator's own implementation
(numpy, per session), independent of marketpipe's adjust-on-read (``quality/adjust.py``), so a test
comparing the two means something.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Literal

import msgspec
import numpy as np

VENDORS = ("alpaca", "polygon", "yahoo")
# unlisted_split: the split is applied to the vendor's adjusted prices (Yahoo: its OHLC) but not listed
FaultKind = Literal["missing_split", "doubled_split", "wrong_ratio", "unadjusted_dividend", "unlisted_split"]
_NS = uuid.UUID("6f1c8a52-30d4-4c55-9c0e-5d7f3e1a9b20")
PROCESS_LAG = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class SimAction:
    symbol: str
    type: str  # forward_split, reverse_split, cash_dividend or spin_off
    ex_date: date
    old_rate: float = 1.0  # a spin-off's source_rate: new_rate new shares per old_rate source shares
    new_rate: float = 1.0
    cash: float | None = None
    tag: str = ""  # tells apart the copies of a doubled split
    new_symbol: str | None = None  # a spin-off's new line

    @property
    def id(self) -> str:
        return str(uuid.uuid5(_NS, f"{self.symbol}|{self.type}|{self.ex_date}|{self.tag}"))

    @property
    def process_date(self) -> date:
        """Splits and spin-offs are processed on their ex-date; a dividend's process (= payable) date trails it."""
        return self.ex_date + PROCESS_LAG if self.type == "cash_dividend" else self.ex_date

    @property
    def is_split(self) -> bool:
        return self.type in ("forward_split", "reverse_split")


def _split(symbol: str, day: str, new: float, old: float = 1.0) -> SimAction:
    kind = "forward_split" if new >= old else "reverse_split"
    return SimAction(symbol, kind, date.fromisoformat(day), old_rate=float(old), new_rate=float(new))


def _spin_off(symbol: str, day: str, new_symbol: str, per: float) -> SimAction:
    """1 share of ``new_symbol`` per ``per`` shares of ``symbol``."""
    return SimAction(symbol, "spin_off", date.fromisoformat(day), old_rate=float(per), new_rate=1.0,
                     new_symbol=new_symbol)  # fmt: skip


def _divs(symbol: str, rows: str) -> tuple[SimAction, ...]:
    out = []
    for item in rows.split():
        day, amount = item.split("=")
        out.append(SimAction(symbol, "cash_dividend", date.fromisoformat(day), cash=float(amount)))
    return tuple(out)


DEFAULT_ACTIONS: tuple[SimAction, ...] = (
    _split("AAPL", "2020-08-31", 4),
    _split("NVDA", "2024-06-10", 10),
    _split("TSLA", "2022-08-25", 3),
    _spin_off("GE", "2023-01-04", "GEHC", 3),
    _spin_off("GE", "2024-04-02", "GEV", 4),
    *_divs(
        "AAPL",
        "2019-02-08=0.73 2019-05-10=0.77 2019-08-09=0.77 2019-11-07=0.77 "
        "2020-02-07=0.77 2020-05-08=0.82 2020-08-07=0.82 2020-11-06=0.205 "
        "2021-02-05=0.205 2021-05-07=0.22 2021-08-06=0.22 2021-11-05=0.22 "
        "2022-02-04=0.22 2022-05-06=0.23 2022-08-05=0.23 2022-11-04=0.23 "
        "2023-02-10=0.23 2023-05-12=0.24 2023-08-11=0.24 2023-11-10=0.24 "
        "2024-02-09=0.24 2024-05-10=0.25 2024-08-12=0.25 2024-11-08=0.25 "
        "2025-02-10=0.25 2025-05-12=0.26 2025-08-11=0.26 2025-11-10=0.26",
    ),
)


class ActionFault(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Makes one vendor's view of one symbol's actions wrong. ``ex_date`` picks the action (absent:
    every split, or every dividend, of the symbol). ``factor``: for ``wrong_ratio`` the vendor's
    ``new_rate`` is the true one times ``factor`` (default 1.25: 4:1 becomes 5:1)."""

    vendor: str
    kind: FaultKind
    symbol: str
    ex_date: date | None = None
    factor: float = 1.25

    def __post_init__(self) -> None:
        if self.vendor not in VENDORS:
            raise ValueError(f"vendor must be one of {', '.join(VENDORS)}")
        if self.factor <= 0:
            raise ValueError("factor must be > 0")

    def hits(self, a: SimAction) -> bool:
        kind_ok = a.type == "cash_dividend" if self.kind == "unadjusted_dividend" else a.is_split
        return a.symbol == self.symbol and kind_ok and (self.ex_date is None or a.ex_date == self.ex_date)


@dataclass(frozen=True, slots=True)
class VendorView:
    """What one vendor lists (``listed``) and what its adjusted prices apply (``applied``)."""

    listed: tuple[SimAction, ...]
    applied: tuple[SimAction, ...]


class ActionBook:
    """The market's actions and the vendor faults over them. Thread-safe: faults change while the
    server runs (tests set them from their own thread)."""

    def __init__(self, actions: tuple[SimAction, ...] = DEFAULT_ACTIONS) -> None:
        self._actions = tuple(sorted(actions, key=lambda a: (a.symbol, a.ex_date, a.type)))
        self._faults: tuple[ActionFault, ...] = ()
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change, part of every factor cache key

    @property
    def actions(self) -> tuple[SimAction, ...]:
        return self._actions

    @property
    def faults(self) -> tuple[ActionFault, ...]:
        return self._faults

    def set_faults(self, faults: list[ActionFault]) -> None:
        with self._lock:
            self._faults = tuple(faults)
            self.version += 1

    def clear_faults(self) -> None:
        self.set_faults([])

    def of(self, symbol: str) -> tuple[SimAction, ...]:
        return tuple(a for a in self._actions if a.symbol == symbol)

    def splits(self, symbol: str) -> tuple[SimAction, ...]:
        return tuple(a for a in self.of(symbol) if a.is_split)

    def spin_offs(self, symbol: str) -> tuple[SimAction, ...]:
        """The spin-offs whose source is ``symbol``."""
        return tuple(a for a in self.of(symbol) if a.type == "spin_off" and a.new_symbol)

    def listed_from(self, symbol: str) -> date | None:
        """The first session of a line a spin-off created (its ex-date); None: it trades all along."""
        days = [a.ex_date for a in self._actions if a.type == "spin_off" and a.new_symbol == symbol]
        return min(days) if days else None

    def view(self, symbol: str, vendor: str) -> VendorView:
        true = self.of(symbol)
        faults = [f for f in self._faults if f.vendor == vendor and f.symbol == symbol]
        if not faults:
            return VendorView(true, true)
        listed: list[SimAction] = []
        applied: list[SimAction] = []
        for a in true:
            hit = next((f for f in faults if f.hits(a)), None)
            if hit is None:
                listed.append(a)
                applied.append(a)
            elif hit.kind == "missing_split":
                continue
            elif hit.kind == "doubled_split":
                twin = replace(a, tag="dup")
                listed += [a, twin]
                applied += [a, twin]
            elif hit.kind == "wrong_ratio":
                wrong = replace(a, new_rate=a.new_rate * hit.factor)
                listed.append(wrong)
                applied.append(wrong)
            elif hit.kind == "unlisted_split":  # applied, yet not listed (Yahoo pre-applies splits)
                applied.append(a)
            else:  # unadjusted_dividend: listed, yet left out of the adjusted prices
                listed.append(a)
        return VendorView(tuple(listed), tuple(applied))


def split_multiplier(days: np.ndarray, splits: tuple[SimAction, ...]) -> np.ndarray:
    """Per session (``days``: datetime64[D]) the factor from today's share count to that day's: the
    product of new/old over the splits with ex-date after it (raw price = walk price x this)."""
    m = np.ones(len(days))
    for a in splits:
        m[days < np.datetime64(a.ex_date, "D")] *= a.new_rate / a.old_rate
    return m


def spin_off_value(a: SimAction, days: np.ndarray, raw_close: Callable[[str, int], float | None]) -> float | None:
    """What a spin-off distributes per source share: new/old x the new line's raw close on the ex-date
    (None when the new line has no close there)."""
    k = int(np.searchsorted(days, np.datetime64(a.ex_date, "D"), side="left"))
    price = raw_close(a.new_symbol, k) if a.new_symbol and k < len(days) else None
    return None if price is None else a.new_rate / a.old_rate * price


def factors(
    days: np.ndarray,
    applied: tuple[SimAction, ...],
    raw_close: Callable[[str, int], float | None],
    adjustment: str,
    today: date,
) -> tuple[np.ndarray, np.ndarray]:
    """(price factor, volume factor) per session for ``adjustment`` (raw, split, dividend, spin-off, all
    or a comma list of them): actions with ex-date up to ``today``; ``raw_close(symbol, i)`` is the raw
    close of ``symbol``'s session ``i`` (None when it has none). A dividend (a spin-off's value) with no
    previous close, or at least as large as it, is left out (a vendor cannot adjust with it either)."""
    parts = {p.strip() for p in adjustment.split(",")}
    want_split = bool(parts & {"split", "all"})
    want_div = bool(parts & {"dividend", "all"})
    want_spin = bool(parts & {"spin-off", "all"})
    fp, fv = np.ones(len(days)), np.ones(len(days))
    for a in applied:
        if a.ex_date > today:
            continue
        ex = np.datetime64(a.ex_date, "D")
        before = days < ex
        k = int(np.searchsorted(days, ex, side="left"))
        if a.is_split and want_split:
            fp[before] *= a.old_rate / a.new_rate
            fv[before] *= a.new_rate / a.old_rate
        elif a.type == "cash_dividend" and want_div and a.cash is not None:
            prev = raw_close(a.symbol, k - 1) if k > 0 else None
            if prev is None or not prev > a.cash:
                continue
            fp[before] *= (prev - a.cash) / prev
        elif a.type == "spin_off" and want_spin:
            prev = raw_close(a.symbol, k - 1) if k > 0 else None
            value = spin_off_value(a, days, raw_close)
            if prev is None or value is None or not prev > value:
                continue
            fp[before] *= 1.0 - value / prev
    return fp, fv
