"""Fixtures of the bus tests: a fresh nats-server (JetStream, temp dir, free port) per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import nats_server


@pytest.fixture
def nats() -> Iterator[nats_server.NatsServer]:
    if not nats_server.available():
        pytest.skip("nats-server not found (apt-get install nats-server)")
    with nats_server.NatsServer() as server:
        yield server
