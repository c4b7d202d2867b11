"""Checks on live trades and quotes, one message at a time (the stream's counterpart of ``validate``).

* price > 0 and size >= 0 (bid/ask prices > 0 where present, sizes >= 0);
* timestamp not more than ``max_future_seconds`` ahead of the receive time;
* jump breaker: a trade price farther than ``jump_pct`` from the symbol's last accepted price is
  rejected and an ``outlier`` alert is raised. A real re-pricing (a halt reopening far away) would
  otherwise be rejected forever, so ``reanchor_after`` consecutive rejected prices that agree with each
  other (within ``jump_pct / 4``) become the new level, with a second alert saying so;
* cross-source: a fallback vendor's price more than ``cross_source_pct`` away from the primary's last
  price raises a warning (the data is still served: which one is right is not known here).

Rejections are counted by reason and logged (throttled); nothing rejected reaches a client or the store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from marketpipe.core.config import StreamSettings
from marketpipe.core.events import OUTLIER, emit
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import STREAM_CHECK_REJECTED, STREAM_CROSS_SOURCE_WARNINGS

log = get_logger("marketpipe.quality.stream_checks")

NOT_POSITIVE = "price_not_positive"
NEGATIVE_SIZE = "negative_size"
FUTURE = "timestamp_in_future"
JUMP = "price_jump"
_LOG_EVERY_S = 10.0


@dataclass(slots=True)
class _SymbolState:
    last_price: float | None = None
    rejected: list[float] = field(default_factory=list)  # consecutive jump rejections that agree
    excursion: bool = False  # trades are being rejected since the last accepted one


@dataclass(frozen=True, slots=True)
class CrossCheck:
    symbol: str
    primary: float
    other: float
    other_source: str
    delta_pct: float
    warned: bool


class StreamChecker:
    """Per-symbol state for the jump breaker; not thread-safe (one event loop owns it)."""

    def __init__(self, config: StreamSettings | None = None) -> None:
        self.config = config or StreamSettings()  # [stream]: max_future_seconds, jump_pct, reanchor_after, …
        self._future = timedelta(seconds=self.config.max_future_seconds)
        self._state: dict[str, _SymbolState] = {}
        self._logged: dict[str, float] = {}
        self.rejected: dict[str, int] = {}

    def last_price(self, symbol: str) -> float | None:
        st = self._state.get(symbol)
        return None if st is None else st.last_price

    def seed(self, symbol: str, price: float) -> None:
        """Anchor the breaker (e.g. on the latest REST trade) before the first streamed trade."""
        if price > 0 and math.isfinite(price):
            self._state.setdefault(symbol, _SymbolState()).last_price = price

    def check_trade(
        self, symbol: str, price: float, size: float, ts: datetime, received: datetime, source: str
    ) -> str | None:
        """None when the trade is accepted (and becomes the last price), else the rejection reason."""
        reason = self._basic(price, size, ts, received)
        if reason is None:
            reason = self._jump(symbol, price, ts, source)
        if reason is not None:
            self._reject(reason, symbol, source, price=price, size=size, ts=ts.isoformat())
        return reason

    def check_quote(
        self,
        symbol: str,
        bid: float,
        bid_size: float,
        ask: float,
        ask_size: float,
        ts: datetime,
        received: datetime,
        source: str,
    ) -> str | None:
        """Quotes: both sides may be 0 (no quote on that side) but never negative or NaN; sizes >= 0."""
        if not (math.isfinite(bid) and math.isfinite(ask)) or bid < 0 or ask < 0 or (bid == 0 and ask == 0):
            reason: str | None = NOT_POSITIVE
        elif not (bid_size >= 0 and ask_size >= 0):
            reason = NEGATIVE_SIZE
        elif ts - received > self._future:
            reason = FUTURE
        else:
            reason = None
        if reason is not None:
            self._reject(reason, symbol, source, bid=bid, ask=ask, ts=ts.isoformat())
        return reason

    def cross_check(self, symbol: str, other: float, other_source: str) -> CrossCheck | None:
        """Compare a fallback vendor's price with the primary's last accepted price."""
        primary = self.last_price(symbol)
        if primary is None or not (other > 0 and math.isfinite(other)):
            return None
        delta = abs(other - primary) / primary * 100.0
        warned = delta > self.config.cross_source_pct
        if warned:
            STREAM_CROSS_SOURCE_WARNINGS.labels(other_source).inc()
            emit(
                OUTLIER,
                "warning",
                f"{symbol}: {other_source} price {other:g} is {delta:.1f}% from the stream's {primary:g}",
                symbol=symbol,
                source=other_source,
                check="cross_source",
                primary=primary,
                other=other,
                delta_pct=round(delta, 3),
            )
        return CrossCheck(symbol, primary, other, other_source, delta, warned)

    # --- internals ----------------------------------------------------------------------------------

    def _basic(self, price: float, size: float, ts: datetime, received: datetime) -> str | None:
        if not (math.isfinite(price) and price > 0):
            return NOT_POSITIVE
        if not size >= 0:  # also NaN
            return NEGATIVE_SIZE
        if ts - received > self._future:
            return FUTURE
        return None

    def _jump(self, symbol: str, price: float, ts: datetime, source: str) -> str | None:
        st = self._state.get(symbol)
        if st is None:  # not setdefault: that would build a state object for every trade
            st = self._state[symbol] = _SymbolState()
        last = st.last_price
        if last is None or abs(price - last) / last * 100.0 <= self.config.jump_pct:
            st.last_price = price
            st.rejected.clear()
            st.excursion = False
            return None
        band = self.config.jump_pct / 4.0
        if st.rejected and abs(price - st.rejected[-1]) / st.rejected[-1] * 100.0 > band:
            st.rejected.clear()  # the rejected prices do not agree: no new level
        st.rejected.append(price)
        if len(st.rejected) >= self.config.reanchor_after:
            emit(
                OUTLIER,
                "warning",
                f"{symbol}: price level moved from {last:g} to {price:g}; "
                f"{len(st.rejected)} consecutive trades agree, accepted as the new level",
                symbol=symbol,
                source=source,
                check="jump_reanchor",
                previous=last,
                price=price,
            )
            st.last_price = price
            st.rejected.clear()
            st.excursion = False
            return None
        if not st.excursion:  # one alert per excursion, not one per rejected trade
            st.excursion = True
            emit(
                OUTLIER,
                "critical",
                f"{symbol}: trade at {price:g} is {abs(price - last) / last * 100.0:.1f}% from the last price "
                f"{last:g} (limit {self.config.jump_pct:g}%): rejected",
                symbol=symbol,
                source=source,
                check="jump_breaker",
                last=last,
                price=price,
                ts=ts.isoformat(),
            )
        return JUMP

    def _reject(self, reason: str, symbol: str, source: str, **fields: object) -> None:
        STREAM_CHECK_REJECTED.labels(reason).inc()
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(reason, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[reason] = now
            log.warning("stream_check_rejected", reason=reason, symbol=symbol, source=source, **fields)
