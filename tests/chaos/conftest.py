"""Chaos fixtures: one simulator with its own random credentials, the unfaulted reference store
(computed once per session by the real CLI), and a fresh scenario directory per test."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from marketpipe.sim.server import SimServer
from tests.chaos.harness import (
    BARS_PER_SESSION,
    SEED,
    SESSIONS,
    SYMBOLS,
    Chaos,
    Secrets,
    SimControl,
    StoreImage,
)


@pytest.fixture(scope="session")
def chaos_secrets() -> Secrets:
    return Secrets.draw(random.Random(SEED))


@pytest.fixture(scope="session")
def chaos_sim(chaos_secrets: Secrets) -> Iterator[SimControl]:
    """The simulator (Alpaca face, seeded market), accepting only the drawn vendor key pair."""
    keys = {chaos_secrets.vendor_key: (chaos_secrets.vendor_secret, "unlimited")}
    with SimServer(keys=keys) as server:
        control = SimControl(server.url)
        yield control
        control.close()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, chaos_sim: SimControl, chaos_secrets: Secrets) -> StoreImage:
    """The store an unfaulted ``marketpipe backfill`` leaves, with the same config every scenario uses."""
    root = tmp_path_factory.mktemp("chaos-reference")
    chaos_sim.clear()
    ch = Chaos(root, chaos_sim, chaos_secrets, None, random.Random(SEED))
    store = root / "reference.duckdb"
    done = ch.backfill(store, ch.config())
    assert done.returncode == 0, done.tail()
    ch.assert_clean()
    img = ch.image(store)
    want = len(SYMBOLS) * SESSIONS * BARS_PER_SESSION
    assert img.rows == want and len(set(img.bars)) == want, img.describe()
    assert sorted(k[0] for k in img.ledger) == sorted(SYMBOLS), img.describe()
    assert all(len(v) == 1 for v in img.ledger.values()), f"the reference ledger has holes: {img.describe()}"
    assert img.quarantine == 0, img.describe()
    return img


@pytest.fixture
def chaos(
    request: pytest.FixtureRequest, tmp_path: Path, chaos_sim: SimControl, chaos_secrets: Secrets, reference: StoreImage
) -> Iterator[Chaos]:
    """A scenario: its own directory and seeded RNG, the simulator without faults and with fresh counters."""
    chaos_sim.clear()
    chaos_sim.reset_stats()
    ch = Chaos(tmp_path, chaos_sim, chaos_secrets, reference, random.Random(f"{SEED}:{request.node.name}"))
    yield ch
    for proc in list(ch.running):
        proc.killed()
    chaos_sim.clear()
