"""Shared fixtures: a real simulator over HTTP, fresh stores, providers pointed at the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from marketpipe.core.config import CircuitPolicy, ProviderConfig, RetryPolicy
from marketpipe.core.events import Event
from marketpipe.core.events import hub as event_hub
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests import pg_server

SIM_ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}


@pytest.fixture(scope="session")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _clear_sim_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sim" in request.fixturenames:
        server = request.getfixturevalue("sim")
        server.faults.clear()
        if server.stream is not None:
            server.stream.clear_faults()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBStore]:
    s = DuckDBStore(tmp_path / "store.duckdb")
    yield s
    s.close()


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_server.PgServer]:
    """One PostgreSQL server (Debian binaries, free port, temp dir) for the whole session; each test
    takes its own database (``pg.database()``). Never the machine's own server."""
    if not pg_server.available():
        pytest.skip(f"PostgreSQL binaries not found in {pg_server.PG_BIN} (apt-get install postgresql-15)")
    with pg_server.PgServer() as server:
        yield server


@pytest.fixture
def pg_url(pg: pg_server.PgServer) -> str:
    """A fresh empty database on the session's server."""
    if not pg.running():  # a restart test may have left it down
        pg.start()
    return pg.database()


def provider_config(url: str, kind: type[ProviderConfig] = AlpacaConfig, **kw: object) -> ProviderConfig:
    """A fast-failing config for a simulator at ``url``, of vendor class ``kind`` (``plan`` only where it has one)."""
    defaults: dict[str, object] = {
        "base_url": url,
        "plan": "unlimited",
        "rate_limit_per_min": 100_000,
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "retry": RetryPolicy(attempts=3, base_seconds=0.01, max_seconds=0.05),
        "circuit": CircuitPolicy(failure_threshold=50, recovery_seconds=0.5),
    }
    if "plan" not in kind.__struct_fields__:
        del defaults["plan"]
    defaults.update(kw)
    return kind(**defaults)  # type: ignore[arg-type]


@pytest.fixture
async def alpaca(sim: SimServer) -> AsyncIterator[AlpacaProvider]:
    p = AlpacaProvider.from_config(provider_config(sim.url), env=SIM_ENV)
    yield p
    await p.aclose()


@pytest.fixture
def raised() -> Iterator[list[Event]]:
    """The events raised (``marketpipe.core.events.emit``) while the test runs."""
    seen: list[Event] = []
    unsubscribe = event_hub.subscribe(seen.append)
    yield seen
    unsubscribe()


async def alpaca_py_receive(
    url: str, key: str, secret: str, wait_s: float = 15.0, *, raw_data: bool = False
) -> dict[str, list[Any]]:
    """Run the real alpaca-py ``StockDataStream`` against ``url`` (the simulator's or the gateway's stream)
    until its handlers have at least three AAPL trades, AAPL/MSFT quotes and SPY bars; returns them
    (alpaca-py's models, or with ``raw_data`` the messages as it unpacked them: ``t`` a msgpack Timestamp)."""
    from alpaca.data.live import StockDataStream

    got: dict[str, list[Any]] = {"trades": [], "quotes": [], "bars": []}
    enough = asyncio.Event()

    def collect(kind: str) -> Callable[[Any], Any]:
        async def handler(item: Any) -> None:
            got[kind].append(item)
            if all(len(v) >= 3 for v in got.values()):
                enough.set()

        return handler

    client = StockDataStream(key, secret, url_override=url, raw_data=raw_data)
    client.subscribe_trades(collect("trades"), "AAPL")
    client.subscribe_quotes(collect("quotes"), "AAPL", "MSFT")
    client.subscribe_bars(collect("bars"), "SPY")
    task = asyncio.create_task(client._run_forever())
    try:
        await asyncio.wait_for(enough.wait(), wait_s)
    finally:
        await client.stop_ws()
        await asyncio.wait_for(task, 10)
    return got
