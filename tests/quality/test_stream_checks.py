"""Checks on live trades and quotes: each rule, the jump breaker's alert and re-anchoring, cross-source."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from marketpipe.core.config import StreamSettings
from marketpipe.core.events import Event
from marketpipe.quality.stream_checks import (
    FUTURE,
    JUMP,
    NEGATIVE_SIZE,
    NOT_POSITIVE,
    StreamChecker,
)

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def trade(c: StreamChecker, price: float, size: float = 100, ts: datetime = NOW, symbol: str = "AAPL") -> str | None:
    return c.check_trade(symbol, price, size, ts, NOW, "sim:alpaca")


def test_basic_rules() -> None:
    c = StreamChecker()
    assert trade(c, 0.0) == NOT_POSITIVE
    assert trade(c, -1.0) == NOT_POSITIVE
    assert trade(c, float("nan")) == NOT_POSITIVE
    assert trade(c, 100.0, size=-1) == NEGATIVE_SIZE
    assert trade(c, 100.0, size=float("nan")) == NEGATIVE_SIZE
    assert trade(c, 100.0, ts=NOW + timedelta(minutes=5, seconds=1)) == FUTURE
    assert trade(c, 100.0, ts=NOW + timedelta(minutes=4, seconds=59)) is None
    assert trade(c, 100.0, size=0) is None  # size 0 is allowed (>= 0)
    assert c.rejected == {NOT_POSITIVE: 3, NEGATIVE_SIZE: 2, FUTURE: 1}
    assert c.last_price("AAPL") == 100.0


def test_quote_rules() -> None:
    c = StreamChecker()

    def quote(bid: float, ask: float, bs: float = 1, asz: float = 1, ts: datetime = NOW) -> str | None:
        return c.check_quote("AAPL", bid, bs, ask, asz, ts, NOW, "sim:alpaca")

    assert quote(99.9, 100.1) is None
    assert quote(0.0, 100.1) is None  # one empty side is a real quote
    assert quote(0.0, 0.0) == NOT_POSITIVE
    assert quote(-1.0, 100.0) == NOT_POSITIVE
    assert quote(99.0, 100.0, bs=-5) == NEGATIVE_SIZE
    assert quote(99.0, 100.0, ts=NOW + timedelta(hours=1)) == FUTURE


def test_jump_breaker_rejects_and_alerts_once_per_excursion(raised: list[Event]) -> None:
    c = StreamChecker(StreamSettings(jump_pct=20.0, reanchor_after=5))
    assert trade(c, 100.0) is None
    assert trade(c, 119.0) is None  # 19 %: accepted, becomes the last price
    assert trade(c, 150.0) == JUMP  # 26 % from 119
    assert trade(c, 60.0) == JUMP  # a different excursion (does not agree with 150)
    assert trade(c, 118.0) is None  # back in range: the excursion is over
    assert c.last_price("AAPL") == 118.0
    alerts = [e for e in raised if e.details.get("check") == "jump_breaker"]
    assert len(alerts) == 1  # one per excursion, not one per rejected trade
    assert alerts[0].kind == "outlier" and alerts[0].severity == "critical" and alerts[0].symbol == "AAPL"
    assert alerts[0].details["last"] == 119.0 and alerts[0].details["price"] == 150.0


def test_jump_breaker_reanchors_on_a_consistent_new_level(raised: list[Event]) -> None:
    c = StreamChecker(StreamSettings(jump_pct=20.0, reanchor_after=3))
    trade(c, 100.0)
    assert trade(c, 50.0) == JUMP
    assert trade(c, 50.5) == JUMP
    assert trade(c, 49.8) is None  # the third agreeing price: accepted as the new level
    assert c.last_price("AAPL") == 49.8
    assert trade(c, 50.1) is None
    kinds = [e.details.get("check") for e in raised]
    assert kinds == ["jump_breaker", "jump_reanchor"]


def test_symbols_are_independent() -> None:
    c = StreamChecker()
    trade(c, 100.0, symbol="AAPL")
    assert trade(c, 400.0, symbol="MSFT") is None
    assert trade(c, 400.0, symbol="AAPL") == JUMP


def test_cross_source(raised: list[Event]) -> None:
    c = StreamChecker(StreamSettings(cross_source_pct=5.0))
    assert c.cross_check("AAPL", 100.0, "polygon") is None  # nothing to compare with yet
    trade(c, 100.0)
    ok = c.cross_check("AAPL", 104.0, "polygon")
    assert ok is not None and not ok.warned and ok.delta_pct == pytest.approx(4.0)
    bad = c.cross_check("AAPL", 106.0, "polygon")
    assert bad is not None and bad.warned
    warnings = [e for e in raised if e.details.get("check") == "cross_source"]
    assert len(warnings) == 1 and warnings[0].severity == "warning" and warnings[0].source == "polygon"
