"""The scheduler: runs per job on the wall clock, bounded concurrency, per-symbol isolation, run log."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime

import pytest

from marketpipe.core.config import JobConfig
from marketpipe.core.errors import InvalidArgument, ProviderUnavailable
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.service.backfill import BackfillStats
from marketpipe.service.maintain import SymbolUpdate, update
from marketpipe.service.scheduler import SETTLE_SECONDS, Job, Scheduler, parse_every
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.service.test_quality import CAL, ENV, config

TF = Timeframe.parse("1Min")


@pytest.fixture(scope="module")
def alpaca_face() -> Iterator[dict[str, SimServer]]:
    with SimServer(vendor="alpaca") as a:
        yield {"alpaca": a, "polygon": a}


def test_parse_every() -> None:
    assert [parse_every(t) for t in ("30s", "1m", "15min", "2h", "1d", "1.5m")] == [30, 60, 900, 7200, 86400, 90]
    for bad in ("", "soon", "0s", "5 weeks", "-1m"):
        with pytest.raises(InvalidArgument):
            parse_every(bad)


def test_jobs_from_config_are_checked() -> None:
    job = Job.from_config(JobConfig(name="eod", symbols=["aapl", "brk/b"], every="1d", timeframe="1Day"))
    assert job.symbols == ("AAPL", "BRK.B") and job.every == 86400 and str(job.timeframe) == "1Day"
    with pytest.raises(InvalidArgument, match="strategy"):
        Job.from_config(JobConfig(name="x", symbols=["AAPL"], strategy="sometimes"))
    with pytest.raises(InvalidArgument):
        Job.from_config(JobConfig(name="x", symbols=["AAPL"], timeframe="7Day"))


def test_runs_align_to_the_wall_clock() -> None:
    job = Job("j", ("AAPL",), 60.0, TF)
    s = Scheduler([job], lambda j, s: None, lambda rows: None)  # type: ignore[arg-type, return-value]
    assert s.next_due(job, 120.0) == 180.0 + SETTLE_SECONDS
    assert s.next_due(job, 179.9) == 180.0 + SETTLE_SECONDS


async def test_one_failing_symbol_never_stops_the_others_and_every_run_is_logged(store: DuckDBStore) -> None:
    calls: list[str] = []
    in_flight = 0
    peak = 0

    async def fake_update(job: Job, symbol: str) -> SymbolUpdate:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        calls.append(symbol)
        if symbol == "BAD":
            raise ProviderUnavailable("vendor down")
        if symbol == "BUG":
            raise ZeroDivisionError("a bug")
        stats = BackfillStats()
        stats.bars_stored = 10
        return SymbolUpdate(symbol, "incremental", None, datetime.now().astimezone(), stats=stats)

    job = Job("every-second", ("AAPL", "BAD", "MSFT", "BUG", "SPY"), 1.0, TF)
    sched = Scheduler([job], fake_update, store.log_job_runs, concurrency=2)
    await sched.run(runs=2)
    assert sorted(calls) == sorted(list(job.symbols) * 2)
    assert peak <= 2
    runs = store.job_runs("every-second")
    assert runs.height == 10
    by_status = {(r["symbol"], r["status"], r["code"]) for r in runs.iter_rows(named=True)}
    assert ("BAD", "failed", "PROVIDER_UNAVAILABLE") in by_status and ("BUG", "failed", "INTERNAL") in by_status
    assert {s for s, st, _ in by_status if st == "ok"} == {"AAPL", "MSFT", "SPY"}
    assert len(set(runs["run_id"].to_list())) == 2
    assert [r.failed for r in sched.history] == [["BAD", "BUG"], ["BAD", "BUG"]]


async def test_stop_event_ends_the_loop_between_runs(store: DuckDBStore) -> None:
    async def ok(job: Job, symbol: str) -> SymbolUpdate:
        return SymbolUpdate(symbol, "incremental", None, datetime.now().astimezone(), stats=BackfillStats())

    stop = asyncio.Event()
    sched = Scheduler([Job("j", ("AAPL",), 3600.0, TF)], ok, store.log_job_runs)
    task = asyncio.create_task(sched.run(stop=stop))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(sched.history) == 1


async def test_scheduled_updates_against_the_simulator(alpaca_face: dict[str, SimServer], store: DuckDBStore) -> None:
    from marketpipe.service.router import build_router

    cfg = config(alpaca_face, polygon=False)
    router = build_router(cfg, env=ENV)
    await update(
        router.providers[0],
        store,
        CAL,
        cfg,
        ["AAPL"],
        TF,
        strategy="incremental",
        start=parse_time("2024-03-04"),
        now=lambda: parse_time("2024-03-04", end=True),
    )
    clock = iter([parse_time("2024-03-05", end=True), parse_time("2024-03-06", end=True)])
    now = next(clock)

    async def one(job: Job, symbol: str) -> SymbolUpdate:
        res = await update(
            router.providers[0], store, CAL, cfg, [symbol], job.timeframe, strategy="incremental", now=lambda: now
        )
        return res[symbol]

    sched = Scheduler([Job("intraday", ("AAPL", "ZZZZ"), 1.0, TF, "incremental")], one, store.log_job_runs)
    await sched.run_once(sched.jobs[0])
    now = next(clock)
    await sched.run_once(sched.jobs[0])
    await router.aclose()
    runs = store.job_runs("intraday").sort("id")
    assert runs.filter(runs["symbol"] == "AAPL")["bars_stored"].to_list() == [390, 390]
    assert runs.filter(runs["symbol"] == "ZZZZ")["status"].to_list() == ["failed", "failed"]  # no history, no start
    assert (
        store.read_bars(["AAPL"], "1Min", parse_time("2024-03-04"), parse_time("2024-03-06", end=True)).height == 1170
    )
