"""Distributed backfill over the bus: a coordinator plans and enqueues, any number of workers fetch.

Coordinator (``marketpipe backfill … --distributed``): :func:`service.backfill.plan_for` cuts the request into
units (symbols × window) exactly as a single-process run would, and each becomes a work item on the
``MP_BACKFILL`` work-queue stream with a deterministic ``Nats-Msg-Id`` (its symbols, timeframe, feed and
window), so two coordinators planning the same range enqueue each item once. It then follows the run: the
workers' progress events (core NATS, ``mp.backfill.progress.<run>``) feed one progress bar, and the stream
itself says which of its items are still queued or in flight.

Worker (``marketpipe worker``): pulls one item at a time from the shared durable consumer ``workers``,
runs it through :meth:`MarketData.fill` (which plans against the ledger again, so a redelivered item fetches
only what its first delivery did not commit), tells the server it is still working (``in_progress``) while
paging, and acks after the store has committed. At-least-once delivery plus the store's idempotent insert
means each bar is stored once: a worker killed mid-item has its item redelivered after ``ack_wait``. A
failing item is retried with a growing delay (``nak``); after ``[bus] max_deliver`` deliveries it is
published to ``mp.backfill.dead.<key>`` (stream ``MP_DEAD``) with its error and then removed (``term``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from marketpipe.bus import subjects
from marketpipe.bus.client import BUS_ERRORS, Bus
from marketpipe.bus.envelope import Envelope, WorkItem, decode_work, encode
from marketpipe.bus.ratelimit import SharedRateLimit, rate_bucket
from marketpipe.core.errors import MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import WORK_ITEMS
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.service.backfill import BackfillStats, plan_for
from marketpipe.service.data import MarketData

log = get_logger("marketpipe.distributed")
_json = msgspec.json.Encoder()


# --- coordinator -----------------------------------------------------------------------------------


@dataclass
class Enqueued:
    run: str
    items: list[WorkItem]
    new: int = 0
    duplicates: int = 0
    covered: list[str] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {i.msg_id for i in self.items}


async def enqueue(
    data: MarketData,
    bus: Bus,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    feed: str | None = None,
    run: str | None = None,
) -> Enqueued:
    """Plan like a single-process run and publish one work item per unit (de-duplicated by id)."""
    end = min(end, utcnow())
    cal = data.calendar_of(symbols)  # a pair's 24/7 calendar, the exchange's for equities
    cal.check_bounds(start, end)
    source, feed = data.fetching(symbols, None, feed)  # a pair's feed is its location
    units, covered = await asyncio.to_thread(
        plan_for,
        source,
        data.store,
        cal,
        symbols,
        timeframe,
        start,
        end,
        feed=feed,
        page_limit=data.config.backfill.page_limit,
    )
    out = Enqueued(run or uuid.uuid4().hex[:12], [], covered=covered)
    acks = []
    for u in units:
        item = WorkItem(list(u.symbols), str(timeframe), u.start, u.end, feed, out.run)
        out.items.append(item)
        fut = await bus.js.publish_async(
            subjects.work(item.msg_id), encode(item), headers={"Nats-Msg-Id": item.msg_id}, stream=subjects.WORK_STREAM
        )
        acks.append(fut)
    for ack in await asyncio.gather(*acks):
        if ack.duplicate:
            out.duplicates += 1
        else:
            out.new += 1
    log.info("distributed_enqueued", run=out.run, items=len(units), new=out.new, duplicates=out.duplicates)
    return out


@dataclass
class RunProgress:
    """What the coordinator knows of its items: done and dead ids, and the bars the workers report."""

    total: int
    done: set[str] = field(default_factory=set)
    dead: dict[str, str] = field(default_factory=dict)
    bars_received: int = 0
    bars_stored: int = 0
    requests: int = 0
    workers: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)  # items whose worker's "done" event arrived
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None  # when the last item left the work queue

    @property
    def finished(self) -> int:
        return len(self.done) + len(self.dead)

    @property
    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started


async def follow(
    bus: Bus,
    enq: Enqueued,
    *,
    on_progress: Callable[[RunProgress], None] | None = None,
    give_up_after: float | None = None,
    poll: float = 0.25,
) -> RunProgress:
    """Until none of ``enq``'s items is left in the work queue. Progress events name the item they are
    about, so items another coordinator enqueued first (duplicates here) count when they finish."""
    prog = RunProgress(total=len(enq.items))
    mine = {subjects.work(i.msg_id): i.msg_id for i in enq.items}

    async def on_msg(msg: Msg) -> None:
        try:
            ev = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            return
        item = ev.get("item")
        if item not in enq.ids:
            return
        prog.workers.add(str(ev.get("worker")))
        if ev.get("state") == "done" and item not in prog.reported:
            prog.done.add(item)
            prog.reported.add(item)
            prog.bars_received += int(ev.get("bars_received", 0))
            prog.bars_stored += int(ev.get("bars_stored", 0))
            prog.requests += int(ev.get("requests", 0))
        elif ev.get("state") == "dead":
            prog.dead[item] = str(ev.get("error"))
        if on_progress:
            on_progress(prog)

    sub = await bus.nc.subscribe(f"{subjects.PREFIX}.backfill.progress.>", cb=on_msg)
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    try:
        while True:
            try:
                info = await bus.js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.WORK_SUBJECTS)
            except BUS_ERRORS as exc:  # an outage: keep following once the bus is back
                log.warning("distributed_follow_bus_error", error=repr(exc))
                await asyncio.sleep(poll)
                continue
            queued = set((info.state.subjects or {}).keys()) & set(mine)
            for subj, item in mine.items():  # left the queue without a "done" we saw: acked by a worker
                if subj not in queued and item not in prog.dead:
                    prog.done.add(item)
            if on_progress:
                on_progress(prog)
            if not queued:
                prog.ended = time.perf_counter()
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(poll)
        # the workers' last "done" events (sent just after their ack), for the counts: up to 2 s
        for _ in range(40):
            if prog.done <= prog.reported | set(prog.dead):
                break
            await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()
    return prog


# --- worker ----------------------------------------------------------------------------------------


@dataclass
class WorkerStats:
    name: str
    done: int = 0
    retried: int = 0
    dead: int = 0
    bars_stored: int = 0
    bars_received: int = 0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def _consumer(bus: Bus) -> Any:
    cfg = bus.cfg
    return await bus.js.pull_subscribe(
        subjects.WORK_SUBJECTS,
        durable=subjects.WORK_DURABLE,
        stream=subjects.WORK_STREAM,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait,
            max_deliver=cfg.max_deliver,
            max_ack_pending=10_000,
        ),
    )


async def share_rate_limit(data: MarketData, bus: Bus) -> list[SharedRateLimit]:
    """Every provider's limiter also takes from the account's shared budget in the KV bucket."""
    kv = await rate_bucket(bus)
    shared = []
    for p in data.router.providers:
        per_minute = int(getattr(getattr(p, "config", None), "rate_limit_per_min", 0) or 0)
        if per_minute <= 0:
            continue
        limit = SharedRateLimit(kv, p.name, per_minute)
        p.resilience.limiter.shared = limit.acquire
        shared.append(limit)
    return shared


async def run_worker(
    data: MarketData,
    bus: Bus,
    *,
    stop: asyncio.Event | None = None,
    idle_exit: float | None = None,
    name: str | None = None,
    on_ready: Callable[[WorkerStats], None] | None = None,
) -> WorkerStats:
    """Take items until ``stop`` is set (or, with ``idle_exit``, the queue stayed empty that long)."""
    stop = stop or asyncio.Event()
    stats = WorkerStats(name or worker_name())
    # ready before the first item: the exchange calendar, the store's connection and schema check, and
    # the providers (a cold start otherwise lands on the first item, in every worker at once)
    await asyncio.to_thread(lambda: (data.calendar, data.store, data.router))
    if bus.cfg.rate_share:
        await share_rate_limit(data, bus)
    # one pull subscription per lane, all bound to the one durable (concurrent fetches on one subscription
    # would share its reply inbox)
    subs = [await _consumer(bus) for _ in range(bus.cfg.worker_items)]
    log.info("worker_started", worker=stats.name, items=bus.cfg.worker_items)
    if on_ready is not None:
        on_ready(stats)
    idle = asyncio.Event()  # with idle_exit: set when a lane found the queue empty that long

    async def lane(sub: Any) -> None:
        """One item at a time; ``[bus] worker_items`` lanes share the consumer (and the store's lock)."""
        idle_since = time.monotonic()
        while not stop.is_set() and not idle.is_set():
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except BUS_ERRORS:
                if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    idle.set()
                continue
            for msg in msgs:
                try:
                    await _handle(data, bus, msg, stats)
                except BUS_ERRORS as exc:
                    # the bus went away mid-item (ack, nak or dead letter not sent): the item is redelivered
                    # once it is back, and the idempotent store makes the second run add nothing
                    log.warning("worker_bus_error", worker=stats.name, error=repr(exc))
            idle_since = time.monotonic()

    await asyncio.gather(*(lane(sub) for sub in subs))
    for sub in subs:
        with contextlib.suppress(*BUS_ERRORS):
            await sub.unsubscribe()
    log.info("worker_stopped", worker=stats.name, done=stats.done, dead=stats.dead, retried=stats.retried)
    return stats


async def _progress(bus: Bus, run: str, payload: dict[str, Any]) -> None:
    with contextlib.suppress(*BUS_ERRORS):
        await bus.nc.publish(subjects.progress(run or "_"), _json.encode(payload))


async def _handle(data: MarketData, bus: Bus, msg: Msg, stats: WorkerStats) -> None:
    delivered = msg.metadata.num_delivered if msg.metadata else 1
    try:
        item = decode_work(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Undecodable: no delivery can ever succeed, so it goes to the dead letters at once.
        await _dead(bus, msg, None, f"undecodable work item: {exc}", "MALFORMED_MESSAGE", stats)
        return
    base = {"item": item.msg_id, "worker": stats.name}
    await _progress(bus, item.run, {**base, "state": "start", "delivered": delivered})
    beat_every = max(0.2, bus.cfg.ack_wait / 3)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(beat_every)
            with contextlib.suppress(*BUS_ERRORS):
                await msg.in_progress()

    beat = asyncio.create_task(heartbeat())
    error: tuple[str, str] | None = None
    result: BackfillStats | None = None
    try:
        tf = Timeframe.parse(item.timeframe)
        result = await data.fill(item.symbols, tf, item.start, item.end, feed=item.feed)
        if result.errors:
            e = result.errors[0]
            error = (str(e.get("code")), str(e.get("message")))
    except MarketpipeError as exc:
        error = (exc.code, str(exc))
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
    if error is None:
        assert result is not None
        await msg.ack_sync()
        stats.done += 1
        stats.bars_stored += result.bars_stored
        stats.bars_received += result.bars_received
        WORK_ITEMS.labels("done").inc()
        await _progress(
            bus,
            item.run,
            {
                **base,
                "state": "done",
                "bars_received": result.bars_received,
                "bars_stored": result.bars_stored,
                "requests": result.requests,
            },
        )
        for sym in item.symbols:  # the normalized-bars contract: what was stored, where
            env = Envelope(
                "bars",
                f"bars:{sym}:{item.timeframe}:{item.start.isoformat()}:{item.end.isoformat()}",
                symbol=sym,
                data={
                    "timeframe": item.timeframe,
                    "start": item.start.isoformat(),
                    "end": item.end.isoformat(),
                    "good": result.per_symbol.get(sym, {}).get("good", 0),
                },
            )
            with contextlib.suppress(*BUS_ERRORS):
                await bus.publish(subjects.norm("bars", sym), env)
        return
    code, message = error
    if delivered >= bus.cfg.max_deliver:
        await _dead(bus, msg, item, message, code, stats)
        return
    stats.retried += 1
    WORK_ITEMS.labels("retried").inc()
    log.warning("work_item_retry", item=item.msg_id, code=code, error=message, delivered=delivered)
    await msg.nak(delay=min(2.0 ** (delivered - 1) * 0.5, 30.0))


async def _dead(bus: Bus, msg: Msg, item: WorkItem | None, message: str, code: str, stats: WorkerStats) -> None:
    """To the dead letters with the error, then out of the work queue (``term``)."""
    msg_id = item.msg_id if item is not None else f"undecodable:{msg.metadata.sequence.stream if msg.metadata else 0}"
    env = Envelope(
        "dead",
        f"dead:{msg_id}",
        data={
            "item": msgspec.to_builtins(item) if item is not None else msg.data.decode("utf-8", "replace"),
            "code": code,
            "error": message,
            "deliveries": msg.metadata.num_delivered if msg.metadata else None,
            "worker": stats.name,
        },
    )
    await bus.publish(subjects.dead(msg_id), env)
    await msg.term()
    stats.dead += 1
    WORK_ITEMS.labels("dead").inc()
    log.error("work_item_dead", item=msg_id, code=code, error=message)
    if item is not None:
        await _progress(bus, item.run, {"item": msg_id, "worker": stats.name, "state": "dead", "error": message})


__all__ = ["Enqueued", "RunProgress", "WorkerStats", "enqueue", "follow", "run_worker"]
