"""Many gateways, one upstream: with a bus, one process holds the Alpaca stream through a KV lease and
publishes each frame; every gateway's live hub fans out from the bus. The owner killed with -9: another
takes the lease within a bounded time and the clients receive again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from marketpipe.bus.client import connect
from marketpipe.bus.envelope import decode
from marketpipe.bus.lease import Lease, lease_bucket
from marketpipe.core.config import Config, config_from_dict
from marketpipe.service.data import MarketData
from marketpipe.service.gateway import Gateway
from marketpipe.service.live import PRICES, LiveHub
from marketpipe.service.live.shared import BusLink
from marketpipe.sim.data import SimMarket
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import StreamConfig
from tests.conftest import SIM_ENV
from tests.nats_server import NatsServer, free_port

pytestmark = pytest.mark.timeout(90)
TTL = 2.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimServer]:
    with SimServer(SimMarket(), stream_config=StreamConfig(rate=400, bar_interval_s=0.3)) as s:
        yield s


def config(sim: SimServer, nats: NatsServer, store: Path) -> Config:
    return config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": sim.url, "plan": "unlimited", "rate_limit_per_min": 100_000},
                "polygon": {"enabled": False},
                "yahoo": {"enabled": False},
            },
            "store": {"path": str(store)},
            "stream": {"stale_seconds": 30.0, "cross_check_seconds": 0, "persist_bars": False},
            "bus": {"url": nats.url, "lease_ttl": TTL, "raw_log": True},
        }
    )


class Gw:
    """What a gateway runs for live data: its bus link and its hub over the link's BusStream."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data = MarketData(cfg, env=SIM_ENV)
        self.link: BusLink | None = None
        self.hub: LiveHub | None = None

    async def start(self) -> Gw:
        self.link = await BusLink.open(self.cfg, env=SIM_ENV)
        outages = self.outages = []  # type: ignore[var-annotated]

        async def seen(outage: Any) -> None:
            outages.append(outage)

        self.hub = LiveHub(self.cfg, Gateway(self.data), env=SIM_ENV, stream=self.link.stream, market_open=lambda: True)  # type: ignore[arg-type]
        assert self.link.stream is not None
        self.link.stream.on_reconnect = seen
        await self.hub.start()
        return self

    async def close(self) -> None:
        if self.hub is not None:
            await self.hub.close()
        if self.link is not None:
            await self.link.aclose()
        await self.data.aclose()


@pytest.fixture
async def gateways(upstream: SimServer, nats: NatsServer, tmp_path: Path) -> AsyncIterator[list[Gw]]:
    gws = [await Gw(config(upstream, nats, tmp_path / f"g{i}.duckdb")).start() for i in range(2)]
    yield gws
    for g in gws:
        await g.close()


async def until(cond: Any, within: float = 15.0) -> float:
    began = time.monotonic()
    while not cond():
        if time.monotonic() - began > within:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_two_gateways_share_one_upstream_connection(gateways: list[Gw], upstream: SimServer) -> None:
    assert upstream.stream is not None
    clients = []
    for g in gateways:
        assert g.hub is not None
        c = g.hub.attach("test", "c")
        await g.hub.subscribe(c, PRICES, ["AAPL", "BRK.B"])
        clients.append(c)
    await until(lambda: all(len(c.queue) >= 10 for c in clients))
    owners = [g.link.owner for g in gateways if g.link and g.link.owner and g.link.owner.holds]  # type: ignore[union-attr]
    assert len(owners) == 1, "exactly one gateway holds the lease"
    assert upstream.stream.stats()["authenticated"] == 1  # one Alpaca connection for both gateways
    assert owners[0].published > 0
    for g in gateways:
        assert g.link is not None and g.link.stream is not None
        assert g.link.stream.frames > 0  # every hub, the owner's included, is fed from the bus
    # raw_log: the owner also keeps each frame in MP_RAW, as a versioned envelope
    bus = gateways[0].link.bus  # type: ignore[union-attr]
    await until(lambda: owners[0].raw.sent > 0)
    sub = await bus.js.subscribe("mp.raw.alpaca.frame.sip", ordered_consumer=True)
    env = decode((await sub.next_msg(timeout=5)).data)
    assert env.kind == "raw" and env.v == 1 and env.data["messages"][0][0] in ("trades", "quotes", "bars")
    await sub.unsubscribe()


async def test_lease_is_exclusive_and_cas_renewal_detects_a_takeover(nats: NatsServer) -> None:
    bus = await connect(config_from_dict({"bus": {"url": nats.url}}).bus)
    try:
        kv = await lease_bucket(bus, TTL)
        a, b = Lease(kv, "stream.owner.t", "a", TTL), Lease(kv, "stream.owner.t", "b", TTL)
        assert await a.try_acquire() and not await b.try_acquire()
        assert await a.renew() and await a.owner() == "a"
        began = time.monotonic()
        for _ in range(int(TTL * 20)):  # a stops renewing: its key expires with the bucket TTL
            if await b.try_acquire():
                break
            await asyncio.sleep(0.1)
        assert b.held
        assert time.monotonic() - began < TTL + 1.5
        assert not await a.renew() and not a.held  # CAS fails: a knows it lost it
    finally:
        await bus.close()


def _serve(cfg_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **SIM_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "serve", "--config", str(cfg_path), "--port", str(port)],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
async def test_the_owner_killed_with_sigkill_is_replaced_within_the_lease_ttl(
    upstream: SimServer, nats: NatsServer, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "owner.toml"
    cfg_path.write_text(
        f'[store]\npath = "{tmp_path / "owner.duckdb"}"\n'
        f'[providers.alpaca]\nbase_url = "{upstream.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f"[providers.polygon]\nenabled = false\n[providers.yahoo]\nenabled = false\n"
        f'[stream]\ncross_check_seconds = 0\npersist_bars = false\n[bus]\nurl = "{nats.url}"\nlease_ttl = {TTL}\n'
    )
    owner = _serve(cfg_path, free_port(), tmp_path / "owner.log")
    bus = await connect(config_from_dict({"bus": {"url": nats.url}}).bus)
    gw: Gw | None = None
    try:
        lease = Lease(await lease_bucket(bus, TTL), "stream.owner.sip", "probe", TTL)
        deadline = time.monotonic() + 30
        while await lease.owner() is None:
            assert owner.poll() is None, (tmp_path / "owner.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first gateway never took the lease"
            await asyncio.sleep(0.1)
        first = await lease.owner()
        gw = await Gw(config(upstream, nats, tmp_path / "g.duckdb")).start()
        assert gw.hub is not None and gw.link is not None and gw.link.stream is not None
        client = gw.hub.attach("test", "c")
        await gw.hub.subscribe(client, PRICES, ["AAPL"])
        await until(lambda: gw.link.stream.frames > 5)  # type: ignore[union-attr]
        assert gw.link.owner is not None and not gw.link.owner.holds  # fed by the other process
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        killed = time.monotonic()
        frames = gw.link.stream.frames
        await until(lambda: gw.link.owner.holds, within=TTL * 4)  # type: ignore[union-attr]
        took = time.monotonic() - killed
        await until(lambda: gw.link.stream.frames > frames + 5)  # type: ignore[union-attr]
        assert await lease.owner() != first
        assert gw.outages and gw.outages[0].reason == "stream owner changed"  # the gap, for the bar writer
        assert gw.outages[0].last_data_at is not None
        assert took < TTL + TTL / 3 + 1.0, f"takeover took {took:.2f}s"
    finally:
        if owner.poll() is None:
            owner.kill()
        if gw is not None:
            await gw.close()
        await bus.close()
