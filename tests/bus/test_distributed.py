"""Distributed backfill against real servers: nats-server (JetStream), PostgreSQL, the simulator. The
store after a distributed run equals a single-process run; two coordinators do not double the work; a
poison item ends in the dead letters with its error; a worker killed with -9 mid-item loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import polars as pl
import pytest

from marketpipe.bus import subjects
from marketpipe.bus.client import Bus, connect
from marketpipe.bus.envelope import WorkItem, decode, encode
from marketpipe.core.config import Config, config_from_dict
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_range
from marketpipe.service.data import MarketData
from marketpipe.service.distributed import enqueue, follow, run_worker
from marketpipe.sim.server import SimServer
from tests.conftest import SIM_ENV
from tests.nats_server import NatsServer
from tests.pg_server import PgServer

SYMBOLS = ["AAPL", "MSFT", "BRK.B", "SPY"]
RANGE = ("2024-03-04", "2024-03-08")
TF = Timeframe.parse("1Min")
KEY = ["symbol", "timeframe", "ts", "source"]


def cfg(sim: SimServer, store_url: str, bus_url: str | None = None, **bus: object) -> Config:
    raw: dict[str, object] = {
        "providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited", "rate_limit_per_min": 100_000}},
        "store": {"url": store_url},
        "backfill": {"page_limit": 800},  # several pages and items per symbol
    }
    if bus_url:
        raw["bus"] = {"url": bus_url, **bus}
    return config_from_dict(raw)


def bars_of(data: MarketData) -> pl.DataFrame:
    s, e = parse_range(*RANGE)
    return data.store.read_bars(SYMBOLS, str(TF), s, e).drop("fetched_at").sort(KEY)


async def single_process(sim: SimServer, pg: PgServer) -> pl.DataFrame:
    data = MarketData(cfg(sim, pg.database()), env=SIM_ENV)
    try:
        s, e = parse_range(*RANGE)
        await data.fill(SYMBOLS, TF, s, e)
        return bars_of(data)
    finally:
        await data.aclose()


async def _bus(url: str, **kw: object) -> Bus:
    bus = await connect(config_from_dict({"bus": {"url": url, **kw}}).bus)
    await bus.ensure_streams()
    return bus


async def test_distributed_run_equals_single_process_and_a_second_coordinator_adds_nothing(
    sim: SimServer, pg: PgServer, nats: NatsServer
) -> None:
    expected = await single_process(sim, pg)
    assert expected.height > 1000
    config = cfg(sim, pg.database(), nats.url)
    coordinator = MarketData(config, env=SIM_ENV)
    bus = await _bus(nats.url)
    s, e = parse_range(*RANGE)
    first = await enqueue(coordinator, bus, SYMBOLS, TF, s, e, run="one")
    second = await enqueue(coordinator, bus, SYMBOLS, TF, s, e, run="two")  # planned before any work ran
    assert len(first.items) >= 4 and first.new == len(first.items) and first.duplicates == 0
    assert second.new == 0 and second.duplicates == len(first.items)
    assert (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == len(first.items)

    workers = [MarketData(config, env=SIM_ENV) for _ in range(2)]
    buses = [await _bus(nats.url) for _ in workers]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_worker(w, b, stop=stop, name=f"w{i}"))
        for i, (w, b) in enumerate(zip(workers, buses, strict=True))
    ]
    seen: list[int] = []
    prog = await follow(bus, first, on_progress=lambda p: seen.append(p.finished), give_up_after=60)
    stop.set()
    stats = await asyncio.gather(*tasks)
    try:
        assert prog.finished == len(first.items) and not prog.dead
        assert sum(s.done for s in stats) == len(first.items)  # each item done once, by one of them
        assert seen == sorted(seen) and seen[-1] == len(first.items)
        got = bars_of(coordinator)
        assert got.equals(expected), "the distributed store differs from the single-process one"
        assert got.select(KEY).is_duplicated().sum() == 0
    finally:
        for w in [*workers, coordinator]:
            await w.aclose()
        for b in [*buses, bus]:
            await b.close()


async def test_poison_items_go_to_dead_letters_with_their_error_after_max_deliver(
    sim: SimServer, pg: PgServer, nats: NatsServer
) -> None:
    config = cfg(sim, pg.database(), nats.url, max_deliver=2, ack_wait=2)
    bus = await _bus(nats.url, max_deliver=2, ack_wait=2)
    s, e = parse_range(*RANGE)
    bad = WorkItem(["AAPL"], "7Sec", s, e, None, "poison")  # no delivery can succeed
    await bus.js.publish(subjects.work(bad.msg_id), encode(bad), headers={"Nats-Msg-Id": bad.msg_id})
    await bus.js.publish(subjects.work("garbage"), b"{not json", headers={"Nats-Msg-Id": "garbage"})
    dead = await bus.js.subscribe(subjects.DEAD_SUBJECTS, ordered_consumer=True)
    data = MarketData(config, env=SIM_ENV)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(data, bus, stop=stop, name="w"))
    try:
        got = [decode((await dead.next_msg(timeout=15)).data) for _ in range(2)]
        stop.set()
        stats = await task
        by_code = {g.data["code"]: g for g in got}
        assert by_code["INVALID_TIMEFRAME"].data["deliveries"] == 2  # retried once, then dead
        assert by_code["INVALID_TIMEFRAME"].data["item"]["symbols"] == ["AAPL"]
        assert by_code["MALFORMED_MESSAGE"].data["deliveries"] == 1  # undecodable: dead at once
        assert stats.dead == 2 and stats.retried == 1
        assert (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == 0  # termed out of the queue
    finally:
        stop.set()
        await data.aclose()
        await bus.close()


def _write_config(path: Path, sim: SimServer, store_url: str, bus_url: str) -> Path:
    path.write_text(
        f'[store]\nurl = "{store_url}"\n[backfill]\npage_limit = 800\n'
        f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[bus]\nurl = "{bus_url}"\nack_wait = 2.0\nmax_deliver = 5\n'
    )
    return path


def _worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **SIM_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "worker", "--config", str(config)],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
async def test_a_worker_killed_mid_item_loses_nothing(
    sim: SimServer, pg: PgServer, nats: NatsServer, tmp_path: Path
) -> None:
    expected = await single_process(sim, pg)
    url = pg.database()
    config = _write_config(tmp_path / "m.toml", sim, url, nats.url)
    coordinator = MarketData(cfg(sim, url, nats.url), env=SIM_ENV)
    bus = await _bus(nats.url, ack_wait=2.0)
    s, e = parse_range(*RANGE)
    sim.faults.load(msgspec.json.encode({"rules": [{"kind": "latency", "latency_ms": 150}]}))
    first = None
    victim = _worker(config, tmp_path / "victim.log")
    try:
        started: list[str] = []
        redelivered: list[int] = []
        inside = asyncio.Event()  # the victim has finished one item and holds the next

        async def on_msg(msg: object) -> None:
            ev = msgspec.json.decode(msg.data)  # type: ignore[attr-defined]
            started.append(ev["state"])
            if ev["state"] == "start" and ev["delivered"] > 1:
                redelivered.append(ev["delivered"])
            if "done" in started and started.count("start") > started.count("done"):
                inside.set()

        sub = await bus.nc.subscribe(subjects.progress("kill"), cb=on_msg)
        first = await enqueue(coordinator, bus, SYMBOLS, TF, s, e, run="kill")
        async with asyncio.timeout(30):
            await inside.wait()
        await asyncio.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        sim.faults.clear()
        survivor = _worker(config, tmp_path / "survivor.log")
        try:
            prog = await follow(bus, first, give_up_after=60)
        finally:
            survivor.send_signal(signal.SIGTERM)
            survivor.wait(20)
        await sub.unsubscribe()
        assert prog.finished == len(first.items) and not prog.dead
        assert redelivered, "the item the victim held was not redelivered"
        got = bars_of(coordinator)
        assert got.equals(expected), (tmp_path / "survivor.log").read_text()[-3000:]
    finally:
        if victim.poll() is None:
            victim.kill()
        sim.faults.clear()
        await coordinator.aclose()
        await bus.close()


@pytest.mark.slow
async def test_nats_restarted_mid_run_the_store_still_ends_identical(
    sim: SimServer, pg: PgServer, nats: NatsServer
) -> None:
    expected = await single_process(sim, pg)
    config = cfg(sim, pg.database(), nats.url, ack_wait=2.0)
    coordinator = MarketData(config, env=SIM_ENV)
    bus = await _bus(nats.url, ack_wait=2.0)
    s, e = parse_range(*RANGE)
    sim.faults.load(msgspec.json.encode({"rules": [{"kind": "latency", "latency_ms": 400}]}))
    first = await enqueue(coordinator, bus, SYMBOLS, TF, s, e, run="restart")
    workers = [MarketData(config, env=SIM_ENV) for _ in range(2)]
    buses = [await _bus(nats.url, ack_wait=2.0) for _ in workers]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_worker(w, b, stop=stop)) for w, b in zip(workers, buses, strict=True)]
    try:
        seen: list[int] = [0]
        follower = asyncio.create_task(
            follow(bus, first, on_progress=lambda p: seen.append(p.finished), give_up_after=90)
        )
        await asyncio.sleep(0.5)
        assert seen[-1] < len(first.items), "the run ended before the restart"
        nats.restart(down_seconds=1.0)  # same port and JetStream store: the queue survives
        sim.faults.clear()
        prog = await follower
        assert prog.finished == len(first.items) and not prog.dead
        assert bars_of(coordinator).equals(expected)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        sim.faults.clear()
        for w in [*workers, coordinator]:
            await w.aclose()
        for b in [*buses, bus]:
            await b.close()


def _cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SIM_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "marketpipe.cli.main", *args, "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_coordinator_worker_and_events_tail(sim: SimServer, pg: PgServer, nats: NatsServer, tmp_path: Path) -> None:
    config = _write_config(tmp_path / "m.toml", sim, pg.database(), nats.url)
    worker = _worker(config, tmp_path / "w.log")
    try:
        r = _cli("backfill", "AAPL", "BRK.B", "--start", RANGE[0], "--end", RANGE[1], "--distributed", config=config)
        assert r.returncode == 0, r.stderr
        assert "items finished by 1 worker(s)" in r.stdout and "0 dead" in r.stdout
        again = _cli(
            "backfill", "AAPL", "BRK.B", "--start", RANGE[0], "--end", RANGE[1], "--distributed", config=config
        )
        assert again.returncode == 0 and "0 work items" in again.stderr  # the ledger holds it all now
        tail = _cli("events", "tail", "mp.norm.bars.BRK_B", "--all", "-n", "1", config=config)
        assert tail.returncode == 0, tail.stderr
        line = json.loads(tail.stdout.splitlines()[0])
        assert line["subject"] == "mp.norm.bars.BRK_B" and line["event"]["symbol"] == "BRK.B"
        assert line["event"]["kind"] == "bars" and line["event"]["v"] == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)


async def test_a_pair_is_planned_on_the_24_7_calendar_and_ends_as_a_single_process_run(
    sim: SimServer, pg: PgServer, nats: NatsServer
) -> None:
    """BTC/USD over a weekend: the coordinator plans on the pair's continuous calendar (every minute of
    Saturday and Sunday, its location as the feed), a worker stores it, and the crypto tables equal a
    single-process run's."""
    pair, (s, e) = ["BTC/USD"], parse_range("2024-03-02T00:00:00Z", "2024-03-04T00:00:00Z")
    alone = MarketData(cfg(sim, pg.database()), env=SIM_ENV)
    try:
        await alone.fill(pair, TF, s, e)
        expected = alone.store.read_bars(pair, str(TF), s, e).drop("fetched_at").sort(KEY)
    finally:
        await alone.aclose()
    assert expected.height == 2 * 1440
    config = cfg(sim, pg.database(), nats.url)
    coordinator, worker = MarketData(config, env=SIM_ENV), MarketData(config, env=SIM_ENV)
    bus, wbus = await _bus(nats.url), await _bus(nats.url)
    try:
        run = await enqueue(coordinator, bus, pair, TF, s, e, run="pair")
        # one item a day of the 24/7 calendar (the exchange calendar would plan nothing on a weekend)
        assert [(i.start, i.end) for i in run.items] == [(s, s + (e - s) / 2), (s + (e - s) / 2, e)]
        assert {i.feed for i in run.items} == {"us"}
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(worker, wbus, stop=stop, name="wc"))
        prog = await follow(bus, run, give_up_after=60)
        stop.set()
        await task
        assert prog.finished == len(run.items) and not prog.dead
        got = coordinator.store.read_bars(pair, str(TF), s, e).drop("fetched_at").sort(KEY)
        assert got.equals(expected) and coordinator.store.counts()["crypto_bars"] == 2 * 1440
    finally:
        for d in (coordinator, worker):
            await d.aclose()
        for b in (bus, wbus):
            await b.close()
