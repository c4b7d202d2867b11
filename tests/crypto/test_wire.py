"""The crypto wire format: symbols, decoders keeping fractional sizes exact, the order-book rule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from marketpipe.core.errors import InvalidArgument, InvalidSymbol, OrderbookNotReset
from marketpipe.wire.alpaca_crypto import (
    LocalBook,
    bars_frame,
    crypto_symbols,
    orderbooks_frame,
    orderbooks_rows,
    rows_by_symbol,
    trades_frame,
    validate_location,
)

NOW = datetime(2024, 3, 2, tzinfo=UTC)


def test_pairs_are_checked_and_btcusd_gets_a_suggestion() -> None:
    assert crypto_symbols("btc/usd, ETH-USD,BTC/USD") == ["BTC/USD", "ETH/USD"]
    with pytest.raises(InvalidSymbol) as exc:
        crypto_symbols("BTCUSD")
    assert exc.value.details["suggestion"] == "BTC/USD" and "did you mean 'BTC/USD'" in exc.value.message
    with pytest.raises(InvalidSymbol):
        crypto_symbols("AAPL")
    assert validate_location("eu-1") == "eu-1"
    with pytest.raises(InvalidArgument, match="unknown crypto location"):
        validate_location("mars")


def test_fractional_sizes_round_trip_digit_for_digit() -> None:
    raw = {
        "BTC/USD": [
            {
                "t": "2024-03-02T00:00:00Z",
                "o": 1.5,
                "h": 2.0,
                "l": 1.0,
                "c": 1.75,
                "v": 0.123456789123,
                "n": 3,
                "vw": 1.6,
            }
        ]
    }
    bars = bars_frame(raw, "1Min", "alpaca", "us", NOW)
    assert bars["volume"].to_list() == [0.123456789123]
    assert rows_by_symbol("bars", bars) == raw
    trades = {"ETH/USD": [{"t": "2024-03-02T00:00:01.123456789Z", "p": 3000.5, "s": 0.000000017, "i": 42, "tks": "S"}]}
    frame = trades_frame(trades, "alpaca", "us", NOW)
    assert frame["size"].to_list() == [1.7e-08] and frame["taker_side"].to_list() == ["S"]
    assert rows_by_symbol("trades", frame) == trades  # nanoseconds kept


def test_orderbook_frames_and_local_book() -> None:
    raw = {"BTC/USD": {"t": "2024-03-02T00:00:00.5Z", "b": [{"p": 100.0, "s": 1.5}], "a": [{"p": 101.0, "s": 0.0}]}}
    frame = orderbooks_frame(raw, "alpaca", "us", NOW)
    assert frame.select("side", "price", "size").rows() == [("bid", 100.0, 1.5), ("ask", 101.0, 0.0)]
    assert orderbooks_rows(frame) == raw
    book = LocalBook("BTC/USD")
    with pytest.raises(OrderbookNotReset):
        book.apply({"t": "x", "b": [{"p": 1.0, "s": 1.0}], "a": []})
    assert book.bids == {}  # nothing applied before a full book
    book.apply(
        {"t": "a", "b": [{"p": 100.0, "s": 1.0}, {"p": 99.0, "s": 2.0}], "a": [{"p": 101.0, "s": 3.0}], "r": True}
    )
    book.apply({"t": "b", "b": [{"p": 100.0, "s": 0}], "a": [{"p": 101.0, "s": 0.25}]})
    assert book.levels() == {"b": [(99.0, 2.0)], "a": [(101.0, 0.25)]} and book.best() == (99.0, 101.0)
    book.apply({"t": "c", "b": [{"p": 50.0, "s": 1.0}], "a": [], "r": True})  # a reset replaces the book
    assert book.levels() == {"b": [(50.0, 1.0)], "a": []}
