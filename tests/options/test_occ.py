"""OCC option symbols: parse, format, the vectorized form, and the typed error for bad ones."""

from __future__ import annotations

from datetime import date

import polars as pl
import pytest

from marketpipe.core.errors import InvalidOptionSymbol, InvalidSymbol
from marketpipe.core.options import format_occ, occ_fields, parse_occ, parse_occs


def test_parse_reference_examples() -> None:
    a = parse_occ("AAPL240419P00140000")
    assert (a.root, a.expiration, a.type, a.strike) == ("AAPL", date(2024, 4, 19), "put", 140.0)
    s = parse_occ("SPY250321C00575500")
    assert (s.root, s.expiration, s.type, s.strike) == ("SPY", date(2025, 3, 21), "call", 575.5)
    adj = parse_occ("aapl1240621c00001500")  # adjusted root with a digit, any case
    assert (adj.symbol, adj.root, adj.strike) == ("AAPL1240621C00001500", "AAPL1", 1.5)


@pytest.mark.parametrize(
    "bad",
    [
        "TSLA",
        "AAPL240419X00140000",
        "AAPL241319P00140000",
        "AAPL240230C00100000",
        "AAPL240419P00000000",
        "AAPL 240419P00140000",
        "AAPL240419P0014000",
        "TOOLONGROOT240419P00140000",
        "",
    ],
)
def test_malformed_symbols_are_typed_errors(bad: str) -> None:
    with pytest.raises(InvalidOptionSymbol) as info:
        parse_occ(bad)
    assert info.value.code == "INVALID_OPTION_SYMBOL"
    assert isinstance(info.value, InvalidSymbol)  # an INVALID_SYMBOL kind: 400 on every interface
    assert info.value.details["parameter"] == "symbol"


def test_non_string_and_strike_as_string() -> None:
    with pytest.raises(InvalidOptionSymbol, match="string"):
        parse_occ(140)
    with pytest.raises(InvalidOptionSymbol):
        format_occ("SPY", date(2025, 3, 21), "call", 0.0)
    with pytest.raises(InvalidOptionSymbol):
        format_occ("SPY", date(2025, 3, 21), "call", 575.0001)  # no thousandths form


def test_format_round_trips() -> None:
    for sym in ("AAPL240419P00140000", "SPY250321C00575500", "AAPL1240621C00001500"):
        o = parse_occ(sym)
        assert format_occ(o.root, o.expiration, o.type, o.strike) == sym


def test_parse_many_dedups_and_needs_one() -> None:
    assert [o.symbol for o in parse_occs("SPY250321C00575500, SPY250321C00575500,AAPL240419P00140000")] == [
        "SPY250321C00575500",
        "AAPL240419P00140000",
    ]
    with pytest.raises(InvalidOptionSymbol):
        parse_occs(" , ")


def test_vectorized_fields_match_the_scalar_parse() -> None:
    syms = ["AAPL240419P00140000", "SPY250321C00575500", "nope", "AAPL240230C00100000"]
    got = pl.DataFrame({"contract": syms}).with_columns(occ_fields()).rows()
    assert got[0][1:] == ("AAPL", date(2024, 4, 19), "put", 140.0)
    assert got[1][1:] == ("SPY", date(2025, 3, 21), "call", 575.5)
    assert got[2][1:] == (None, None, None, None)
    assert got[3][2] is None  # 30 February: no date
