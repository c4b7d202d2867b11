"""Corporate-action events on the bus, against a real nats-server and the simulator: a newly stored action
version is published on ``mp.corpact.<type>.<sym>`` (also from a process without a gateway), the same
version stored again by another process is de-duplicated by its ``Nats-Msg-Id``, a vendor's correction is a
message of its own, and ``marketpipe events tail`` shows them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from marketpipe.bus.client import Publisher, connect, event_envelope, wire_events
from marketpipe.bus.envelope import decode
from marketpipe.core import events
from marketpipe.core.config import Config, config_from_dict
from marketpipe.service.data import MarketData
from marketpipe.sim.actions import ActionFault
from marketpipe.sim.server import SimServer
from tests.conftest import SIM_ENV
from tests.nats_server import NatsServer


def _cfg(sim: SimServer, store: Path, bus_url: str, **bus: object) -> Config:
    return config_from_dict(
        {
            "providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited", "rate_limit_per_min": 100_000}},
            "store": {"path": str(store)},
            "bus": {"url": bus_url, **bus},
        }
    )


async def _stored(bus_url: str, subject: str = "mp.corpact.>") -> list[tuple[str, dict]]:
    bus = await connect(config_from_dict({"bus": {"url": bus_url}}).bus)
    try:
        info = await bus.js.stream_info("MP_CORPACT")
        sub = await bus.js.subscribe(subject, ordered_consumer=True)
        out = []
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=2)
            env = decode(msg.data)
            assert env.kind == "corpact" and msg.header and msg.header["Nats-Msg-Id"] == env.id
            out.append((msg.subject, {"id": env.id, "symbol": env.symbol, **env.data["details"]}))
        await sub.unsubscribe()
        return out
    finally:
        await bus.close()


def _tail(config: Path, bus_url: str, subject: str, n: int) -> list[dict]:
    config.write_text(f'[bus]\nurl = "{bus_url}"\n')
    env = {**os.environ, **SIM_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    args = ["events", "tail", subject, "--all", "-n", str(n), "--config", str(config)]
    tail = subprocess.run(
        [sys.executable, "-m", "marketpipe.cli.main", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert tail.returncode == 0, tail.stderr
    return [json.loads(x) for x in tail.stdout.splitlines()]


async def test_new_actions_are_published_once_and_a_correction_again(
    sim: SimServer, nats: NatsServer, tmp_path: Path
) -> None:
    one = MarketData(_cfg(sim, tmp_path / "one.duckdb", nats.url), env=SIM_ENV)
    two = MarketData(_cfg(sim, tmp_path / "two.duckdb", nats.url), env=SIM_ENV)
    try:
        await one.corporate_actions("TSLA", "2022-01-01", "2022-12-31")
        got = await _stored(nats.url)
        assert [(s, d["action"], d["version"], d["symbol"]) for s, d in got] == [
            ("mp.corpact.forward_split.TSLA", "forward_split", 1, "TSLA")
        ]
        split = got[0][1]
        assert split["factors"]["new_rate"] == 3.0 and split["affected"] == {"until": "2022-08-25"}
        assert split["id"] == f"corpact:TSLA:{split['action_id']}:1"
        # another process (its own store) stores the same version: announced there, one message on the bus
        await two.corporate_actions("TSLA", "2022-01-01", "2022-12-31")
        assert len(await _stored(nats.url)) == 1
        # the vendor corrects the ratio: a new version, a new message
        sim.market.actions.set_faults([ActionFault(vendor="alpaca", kind="wrong_ratio", symbol="TSLA")])
        page = await one.router.get("alpaca").corporate_actions(["TSLA"], date(2022, 1, 1), date(2022, 12, 31))
        await one.actions._store_page(page, "alpaca")
        got = await _stored(nats.url)
        assert [(d["version"], d["factors"]["new_rate"]) for _, d in got] == [(1, 3.0), (2, 3.75)]
    finally:
        sim.market.actions.clear_faults()
        await one.aclose()
        await two.aclose()

    # `marketpipe events tail` shows them (the stored ones, with --all)
    lines = await asyncio.to_thread(_tail, tmp_path / "m.toml", nats.url, "mp.corpact.>", 2)
    assert [x["subject"] for x in lines] == ["mp.corpact.forward_split.TSLA"] * 2
    assert [x["event"]["data"]["details"]["version"] for x in lines] == [1, 2]


async def test_the_gateway_publisher_sends_corporate_actions_to_their_stream(nats: NatsServer) -> None:
    """A gateway relays every core.events event through its Publisher: a corporate action goes to
    MP_CORPACT (not the quality alerts), with the same id as a direct publish of the same version."""
    bus = await connect(config_from_dict({"bus": {"url": nats.url}}).bus)
    await bus.ensure_streams()
    pub = Publisher(bus).start()
    off = wire_events(pub)
    try:
        details = {"action_id": "alpaca:x1", "action": "forward_split", "version": 1}
        e1 = events.emit(events.CORPORATE_ACTION_APPLIED, "info", "split", symbol="BRK.B", source="sim", **details)
        e2 = events.emit(events.CORPORATE_ACTION_APPLIED, "info", "split", symbol="BRK.B", source="sim", **details)
        assert e1.at != e2.at and event_envelope(e1)[1].id == event_envelope(e2)[1].id
        assert await pub.flush(5)
        got = await _stored(nats.url)
        assert [s for s, _ in got] == ["mp.corpact.forward_split.BRK_B"]
        quality = await bus.js.stream_info("MP_QUALITY")
        assert quality.state.messages == 0
    finally:
        off()
        await pub.aclose()
        await bus.close()


async def test_an_unreachable_bus_does_not_fail_the_store_write(sim: SimServer, tmp_path: Path) -> None:
    from marketpipe.core.metrics import BUS_PUBLISH_FAILURES
    from tests.nats_server import free_port

    before = BUS_PUBLISH_FAILURES._value.get()
    nobody = f"nats://127.0.0.1:{free_port()}"
    md = MarketData(_cfg(sim, tmp_path / "a.duckdb", nobody, connect_timeout=0.3), env=SIM_ENV)
    try:
        acts = await md.corporate_actions("NVDA", "2024-01-01", "2024-12-31")
        assert "forward_split" in acts["type"].to_list()
        assert BUS_PUBLISH_FAILURES._value.get() > before
    finally:
        await md.aclose()
