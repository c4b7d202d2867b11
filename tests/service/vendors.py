"""Alpaca, Polygon and Yahoo simulator faces over one market, shared by the cross-vendor service tests
(``vendors`` / ``clean_vendors`` fixtures in tests/service/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer

ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "POLYGON_API_KEY": "POLYKEY"}
# provider settings that keep a faulted vendor from slowing a test down
FAST = {
    "rate_limit_per_min": 100_000,
    "connect_timeout": 2.0,
    "read_timeout": 5.0,
    "retry": {"attempts": 2, "base_seconds": 0.01, "max_seconds": 0.02},
}


@contextmanager
def three_faces() -> Iterator[dict[str, SimServer]]:
    market = SimMarket()
    with (
        SimServer(market, vendor="alpaca") as a,
        SimServer(market, vendor="polygon") as p,
        SimServer(market, vendor="yahoo") as y,
    ):
        yield {"alpaca": a, "polygon": p, "yahoo": y}


def reset(faces: dict[str, SimServer]) -> None:
    """Every fault and every face-level distortion a test may have set, cleared."""
    for s in faces.values():
        s.faults.clear()
    faces["polygon"].face.price_shift_pct = 0.0
    faces["yahoo"].face.missing_days = set()
    faces["yahoo"].face.volume_ratio = 1.0
