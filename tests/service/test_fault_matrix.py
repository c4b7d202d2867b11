"""Each fault kind on each vendor face makes the router fail over to the next vendor."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import config_from_dict
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.service.backfill import run_backfill
from marketpipe.service.router import build_router
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore

CAL = get_calendar()
ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "POLYGON_API_KEY": "POLYKEY"}
RANGE = (parse_time("2024-01-02"), parse_time("2024-01-31", end=True))
KINDS = ["http_500", "http_502", "http_503", "reset", "truncated_json", "html_200", "hang", "rate_limit"]
# (primary, fallback): every face takes a turn as the one that breaks
PAIRS = [("alpaca", "polygon"), ("polygon", "yahoo"), ("yahoo", "alpaca")]


@pytest.fixture(scope="module")
def faces() -> Iterator[dict[str, SimServer]]:
    market = SimMarket()
    with (
        SimServer(market, vendor="alpaca") as a,
        SimServer(market, vendor="polygon") as p,
        SimServer(market, vendor="yahoo") as y,
    ):
        yield {"alpaca": a, "polygon": p, "yahoo": y}


@pytest.mark.parametrize(("primary", "fallback"), PAIRS)
@pytest.mark.parametrize("kind", KINDS)
async def test_fault_on_primary_face_fails_over(
    faces: dict[str, SimServer], tmp_path, primary: str, fallback: str, kind: str
) -> None:  # type: ignore[no-untyped-def]
    fast = {"rate_limit_per_min": 100_000, "connect_timeout": 1.0, "read_timeout": 0.5}
    plans = {"alpaca": {"plan": "unlimited"}, "polygon": {"plan": "unlimited"}}  # Yahoo has no plan
    cfg = config_from_dict(
        {
            "providers": {
                name: {
                    "base_url": faces[name].url,
                    "enabled": name in (primary, fallback),
                    "priority": 1 if name == primary else 2,
                    **fast,
                    **plans.get(name, {}),
                }
                for name in faces
            }
        }
    )
    router = build_router(cfg, env=ENV)
    faces[primary].faults.set([FaultRule(kind=kind, hang_seconds=5)])
    store = DuckDBStore(tmp_path / "s.duckdb")
    try:
        stats = await run_backfill(router, store, CAL, ["AAPL"], Timeframe.parse("1Day"), *RANGE)
        assert stats.ok, stats.errors
        assert stats.failovers == 1
        rows = store.read_bars(["AAPL"], "1Day", *RANGE)
        assert rows.height == len(CAL.sessions(*RANGE))
        assert rows["source"].unique().to_list() == [f"sim:{fallback}"]
        cov = store.coverage(["AAPL"], "1Day", *RANGE)
        assert cov["provider"].unique().to_list() == [fallback]
    finally:
        faces[primary].faults.clear()
        store.close()
        await router.aclose()
