"""Vendor code tables shared by the adapters and the simulator (both depend on core).

Polygon identifies exchanges, tapes and trade conditions by number; marketpipe's canonical records
use the letters Alpaca and the SIPs use.
"""

from __future__ import annotations

# Polygon's numeric exchange ids (/v3/reference/exchanges) -> participant letters.
POLYGON_EXCHANGES: dict[int, str] = {
    1: "A", 2: "B", 3: "C", 4: "D", 5: "E", 6: "I", 7: "J", 8: "K", 9: "M", 10: "N", 11: "P", 12: "Q",
    13: "S", 14: "L", 15: "V", 16: "W", 17: "X", 18: "Y", 19: "Z", 20: "H", 21: "U", 22: "G",
}  # fmt: skip
POLYGON_TAPES: dict[int, str] = {1: "A", 2: "B", 3: "C"}
# Polygon trade condition ids -> CTA/UTP sale-condition letters.
POLYGON_TRADE_CONDITIONS: dict[int, str] = {0: "@", 12: "T", 14: "F", 15: "M", 16: "Q", 17: "O", 19: "6", 37: "I"}


def inverse(table: dict[int, str]) -> dict[str, int]:
    return {letter: code for code, letter in table.items()}
