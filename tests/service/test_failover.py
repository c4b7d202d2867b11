"""Router, partial-range failover and health against real simulator servers sharing one market."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import polars as pl
import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import CircuitPolicy, RetryPolicy
from marketpipe.core.resilience import CircuitState
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.service.backfill import run_backfill
from marketpipe.service.health import HealthMonitor, State
from marketpipe.service.router import ProviderRouter
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV, provider_config

CAL = get_calendar()
TF = Timeframe.parse("1Min")
WEEK = (parse_time("2024-03-04"), parse_time("2024-03-06", end=True))
SYMS = ["AAPL", "MSFT", "SPY"]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SimServer, SimServer]]:
    market = SimMarket()
    with SimServer(market) as primary, SimServer(market) as backup:
        yield primary, backup


@pytest.fixture(autouse=True)
def _clear(servers: tuple[SimServer, SimServer]) -> Iterator[None]:
    yield
    for s in servers:
        s.faults.clear()


def named(url: str, name: str, **kw: object) -> AlpacaProvider:
    p = AlpacaProvider.from_config(provider_config(url, **kw), env=SIM_ENV)
    p.name = name  # a second Alpaca-format vendor: labels rows sim:<name>
    p.resilience.name = name
    return p


@pytest.fixture
async def router(servers: tuple[SimServer, SimServer]) -> AsyncIterator[ProviderRouter]:
    primary = named(
        servers[0].url,
        "primary",
        retry=RetryPolicy(attempts=2, base_seconds=0.01),
        circuit=CircuitPolicy(failure_threshold=2, recovery_seconds=0.3),
    )
    backup = named(servers[1].url, "backup")
    r = ProviderRouter([primary, backup], priorities={"primary": 1, "backup": 2})
    yield r
    await r.aclose()


def values(store: DuckDBStore) -> pl.DataFrame:
    return store.read_bars(SYMS, "1Min", *WEEK).drop("fetched_at", "source")


async def test_healthy_primary_serves_everything(router: ProviderRouter, store: DuckDBStore) -> None:
    stats = await run_backfill(router, store, CAL, SYMS, TF, *WEEK, page_limit=500)
    assert stats.ok and stats.failovers == 0
    assert store.read_bars(SYMS, "1Min", *WEEK)["source"].unique().to_list() == ["sim:primary"]


@pytest.mark.parametrize("kind", ["http_500", "http_503", "reset", "truncated_json", "html_200"])
async def test_primary_failing_mid_backfill_rest_comes_from_backup(
    router: ProviderRouter, servers: tuple[SimServer, SimServer], store: DuckDBStore, tmp_path, kind: str
) -> None:  # type: ignore[no-untyped-def]
    servers[0].faults.set([FaultRule(kind=kind, after=3)])
    stats = await run_backfill(router, store, CAL, SYMS, TF, *WEEK, page_limit=500, concurrency=1)
    assert stats.ok, stats.errors
    assert stats.failovers >= 1
    rows = store.read_bars(SYMS, "1Min", *WEEK)
    by_source = dict(rows.group_by("source").len().iter_rows())
    assert set(by_source) == {"sim:primary", "sim:backup"}  # every row says where it came from
    assert rows.height == 3510
    # the same values an undisturbed run gives: no gap, no duplicate
    ref = DuckDBStore(tmp_path / "ref.duckdb")
    servers[0].faults.clear()
    clean_router = ProviderRouter([named(servers[0].url, "primary")])
    await run_backfill(clean_router, ref, CAL, SYMS, TF, *WEEK)
    await clean_router.aclose()
    assert values(store).equals(values(ref))
    ref.close()
    # the ledger says who covered what
    cov = store.coverage(SYMS, "1Min", *WEEK)
    assert set(cov["provider"].unique().to_list()) == {"primary", "backup"}


async def test_hang_fails_over_after_the_timeout(router: ProviderRouter, servers, store: DuckDBStore) -> None:  # type: ignore[no-untyped-def]
    router.get("primary").config.read_timeout = 0.3
    router.get("primary").config.connect_timeout = 0.3
    servers[0].faults.set([FaultRule(kind="hang", hang_seconds=5, after=1)])
    stats = await run_backfill(router, store, CAL, SYMS, TF, *WEEK, page_limit=1000, concurrency=1)
    # no retries while a fallback exists: each failover costs one timeout, and after two the
    # primary's circuit opens and later units go straight to the backup
    assert stats.ok and 1 <= stats.failovers <= 2
    assert router.get("primary").resilience.retries == 0
    assert stats.seconds < 2.5


async def test_all_providers_failed_lists_each_cause(router: ProviderRouter, servers, store: DuckDBStore) -> None:  # type: ignore[no-untyped-def]
    servers[0].faults.set([FaultRule(kind="http_500")])
    servers[1].faults.set([FaultRule(kind="http_502")])
    stats = await run_backfill(router, store, CAL, ["AAPL"], TF, *WEEK)
    assert not stats.ok
    (err,) = stats.errors
    assert err["code"] == "ALL_PROVIDERS_FAILED"
    assert [(a["provider"], a["code"]) for a in err["attempts"]] == [
        ("primary", "PROVIDER_UNAVAILABLE"),
        ("backup", "PROVIDER_UNAVAILABLE"),
    ]
    assert store.counts()["bars"] == 0


async def test_open_circuit_is_skipped_then_recovers_half_open_to_closed(
    router: ProviderRouter, servers: tuple[SimServer, SimServer], store: DuckDBStore
) -> None:
    import asyncio

    primary = router.get("primary")
    servers[0].faults.set([FaultRule(kind="http_503")])
    # two one-day units, each failing once on the primary: the second failure opens its circuit
    await run_backfill(
        router,
        store,
        CAL,
        ["AAPL"],
        TF,
        parse_time("2024-03-04"),
        parse_time("2024-03-05", end=True),
        page_limit=390,
        concurrency=1,
    )
    assert primary.resilience.breaker.state is CircuitState.OPEN
    assert router.health.state("primary") is State.DOWN
    candidates, skipped = router.candidates("bars", TF, *WEEK)
    assert [p.name for p in candidates] == ["backup"]
    assert ("primary", "CIRCUIT_OPEN") in [(a.provider, a.code) for a in skipped]

    servers[0].faults.clear()
    await asyncio.sleep(0.35)  # recovery_seconds
    assert primary.resilience.breaker.state is CircuitState.HALF_OPEN
    stats = await run_backfill(
        router, store, CAL, ["MSFT"], TF, parse_time("2024-03-05"), parse_time("2024-03-05", end=True)
    )
    assert stats.ok
    assert primary.resilience.breaker.state is CircuitState.CLOSED
    assert store.read_bars(["MSFT"], "1Min", *WEEK)["source"].unique().to_list() == ["sim:primary"]


async def test_health_states_and_probes(router: ProviderRouter, servers: tuple[SimServer, SimServer]) -> None:
    from marketpipe.service.providers import provider_table

    rows = {r["provider"]: r for r in await provider_table(router)}
    assert rows["primary"]["state"] == "healthy" and rows["backup"]["state"] == "healthy"
    assert rows["primary"]["latency_ms"] is not None
    assert rows["primary"]["seconds_since_probe"] is not None and rows["primary"]["seconds_since_ok"] is not None
    servers[1].faults.set([FaultRule(kind="http_500")])
    await router.health.probe_all()
    assert router.health.state("backup") is State.DOWN
    assert router.health.state("primary") is State.HEALTHY
    assert router.health.table()[1]["errors_by_code"] == {"PROVIDER_UNAVAILABLE": 3}  # every attempt counts
    servers[1].faults.clear()
    await router.health.probe_all()
    assert router.health.state("backup") is not State.DOWN


async def test_monitor_orders_by_health_before_priority(router: ProviderRouter) -> None:
    h: HealthMonitor = router.health
    for _ in range(5):
        h.health["primary"].record(False, "PROVIDER_UNAVAILABLE", 0.1)
        h.health["primary"].consecutive_failures = 0  # degraded (error rate), not down
    assert h.state("primary") is State.DEGRADED
    candidates, _ = router.candidates("bars", TF, *WEEK)
    assert [p.name for p in candidates] == ["backup", "primary"]
