"""Fixtures for the simulator's own tests: one real server over HTTP for the session."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from marketpipe.sim.alpaca import DEFAULT_KEYS
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer

AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}
FREE = {"APCA-API-KEY-ID": "FREEKEY", "APCA-API-SECRET-KEY": "FREESECRET"}
# A key of its own for rate-limit tests, so their per-minute counts never touch other tests.
RL = {"APCA-API-KEY-ID": "RLKEY", "APCA-API-SECRET-KEY": "RLSECRET"}


@pytest.fixture(scope="session")
def market() -> SimMarket:
    return SimMarket()


@pytest.fixture(scope="session")
def sim_server(market: SimMarket) -> Iterator[SimServer]:
    keys = {**DEFAULT_KEYS, "RLKEY": ("RLSECRET", "unlimited")}
    with SimServer(market, keys=keys) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_faults_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sim_server" in request.fixturenames:
        request.getfixturevalue("sim_server").faults.clear()


@pytest.fixture
def http(sim_server: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_server.url, headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
def anon(sim_server: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_server.url, timeout=10) as client:
        yield client
