"""Recurring updates: each job updates its symbols every ``every`` (``30s``, ``1m``, ``1h``, …).

Runs are aligned to the wall clock (an every-minute job runs just after each minute closes, so the
minute's bar exists), with a bounded number of symbols updating at once. Each symbol is updated on
its own, so one symbol's failure — a bad symbol, a vendor outage — never stops the others; every
run leaves one ``job_runs`` row per symbol in the store. The same :class:`Scheduler` runs under
``marketpipe schedule`` and, later, inside the server.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from marketpipe.core.config import JobConfig
from marketpipe.core.errors import InvalidArgument, MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import SCHEDULED_RUNS
from marketpipe.core.schema import normalize_symbols
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.service.maintain import STRATEGIES, SymbolUpdate

log = get_logger("marketpipe.scheduler")
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hour|d|day)s?\s*$")
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
SETTLE_SECONDS = 2.0  # after a boundary, so that the bar that just closed is published


def parse_every(text: str) -> float:
    m = _EVERY.match(text or "")
    if not m:
        raise InvalidArgument(
            f"invalid interval {text!r}; use a number and a unit: 30s, 1m, 15m, 1h, 1d",
            details={"parameter": "every"},
        )
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds < 1:
        raise InvalidArgument("the interval must be at least 1 second", details={"parameter": "every"})
    return seconds


@dataclass(frozen=True)
class Job:
    name: str
    symbols: tuple[str, ...]
    every: float
    timeframe: Timeframe
    strategy: str = "smart"
    feed: str | None = None

    @classmethod
    def from_config(cls, cfg: JobConfig) -> Job:
        if cfg.strategy not in STRATEGIES:
            raise InvalidArgument(f"job {cfg.name}: unknown strategy {cfg.strategy!r}; use {', '.join(STRATEGIES)}")
        return cls(
            cfg.name,
            tuple(normalize_symbols(cfg.symbols)),
            parse_every(cfg.every),
            Timeframe.parse(cfg.timeframe),
            cfg.strategy,
            cfg.feed,
        )


@dataclass
class JobRun:
    job: str
    run_id: str
    started_at: datetime
    finished_at: datetime | None = None
    results: dict[str, SymbolUpdate] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [s for s, r in self.results.items() if not r.ok]


UpdateFn = Callable[[Job, str], Awaitable[SymbolUpdate]]
RunLogger = Callable[[list[dict[str, object]]], None]


class Scheduler:
    """``update(job, symbol)`` does one symbol's update; ``log_runs`` stores the per-symbol rows."""

    def __init__(
        self,
        jobs: list[Job],
        update: UpdateFn,
        log_runs: RunLogger,
        *,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
        on_run: Callable[[JobRun], None] | None = None,
    ) -> None:
        if not jobs:
            raise InvalidArgument("no jobs to schedule: give symbols or define [[jobs]] in the config")
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"job names must be unique: {names}")
        self.jobs = jobs
        self._update = update
        self._log_runs = log_runs
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self._clock = clock
        self._on_run = on_run
        self.history: list[JobRun] = []

    async def run_once(self, job: Job) -> JobRun:
        run = JobRun(job.name, uuid.uuid4().hex[:12], utcnow())

        async def one(sym: str) -> None:
            async with self._sem:
                try:
                    run.results[sym] = await self._update(job, sym)
                except MarketpipeError as exc:
                    run.results[sym] = SymbolUpdate(
                        sym, job.strategy, None, utcnow(), error={"code": exc.code, "message": exc.message}
                    )
                except Exception as exc:
                    log.exception("scheduled_update_crashed", job=job.name, symbol=sym)
                    run.results[sym] = SymbolUpdate(
                        sym, job.strategy, None, utcnow(), error={"code": MarketpipeError.code, "message": repr(exc)}
                    )

        await asyncio.gather(*(one(s) for s in job.symbols))
        run.finished_at = utcnow()
        rows = []
        for sym in job.symbols:
            r = run.results[sym]
            status = "ok" if r.ok else "failed"
            SCHEDULED_RUNS.labels(job.name, status).inc()
            err = r.error or (r.stats.errors[0] if r.stats and r.stats.errors else None)
            rows.append(
                {
                    "job": job.name,
                    "run_id": run.run_id,
                    "symbol": sym,
                    "strategy": r.strategy,
                    "started_at": run.started_at,
                    "finished_at": run.finished_at,
                    "status": status,
                    "code": err.get("code") if err else None,
                    "message": str(err.get("message")) if err else None,
                    "bars_stored": r.stats.bars_stored if r.stats else 0,
                    "bars_rejected": r.stats.bars_rejected if r.stats else 0,
                }
            )
        self._log_runs(rows)
        log.info("job_run", job=job.name, run_id=run.run_id, symbols=len(job.symbols), failed=run.failed)
        self.history.append(run)
        if self._on_run:
            self._on_run(run)
        return run

    def next_due(self, job: Job, after: float) -> float:
        """The next wall-clock boundary of ``job.every`` after ``after``, plus the settle delay."""
        return (after // job.every + 1) * job.every + SETTLE_SECONDS

    async def _loop(self, job: Job, runs: int | None, stop: asyncio.Event) -> None:
        done = 0
        while not stop.is_set() and (runs is None or done < runs):
            await self.run_once(job)
            done += 1
            if runs is not None and done >= runs:
                return
            delay = max(0.0, self.next_due(job, self._clock()) - self._clock())
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                continue

    async def run(self, *, runs: int | None = None, stop: asyncio.Event | None = None) -> None:
        """Run every job now and then on its interval, ``runs`` times each (None: until ``stop``)."""
        stop = stop or asyncio.Event()
        await asyncio.gather(*(self._loop(job, runs, stop) for job in self.jobs))
