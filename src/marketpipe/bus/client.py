"""Connecting to NATS (bounded), the streams, and the publisher that never blocks the pipeline.

nats-py's first connect to a server that is not up retries ``max_reconnect_attempts`` × ``reconnect_time_wait``
(~120 s with its defaults) even with ``allow_reconnect=False``. So :func:`connect` first probes the TCP port
within ``connect_timeout`` and then connects under the same deadline; once connected the client reconnects on
its own for as long as it takes (a restarted server is picked up again).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from marketpipe.bus import subjects
from marketpipe.bus.envelope import Envelope, encode
from marketpipe.core.config import BusConfig
from marketpipe.core.errors import BusUnavailable
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import BUS_BUFFERED, BUS_CONNECTED, BUS_DROPPED, BUS_PUBLISH_FAILURES, BUS_PUBLISHED

log = get_logger("marketpipe.bus")
BUS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
    TimeoutError,
    OSError,
)


def _probe(url: str, timeout: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(0.05, deadline - time.monotonic())):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise BusUnavailable(
        f"the NATS bus at {host}:{port} did not answer within {timeout:g}s ({last}); is nats-server running "
        "with -js there?",
        details={"host": host, "port": port},
    )


class Bus:
    """One NATS connection and its JetStream context."""

    def __init__(self, nc: NATS, cfg: BusConfig, url: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.cfg = cfg
        self.url = url

    async def ensure_streams(self) -> None:
        """Create (or update) every stream the bus uses; idempotent."""
        cfgs = [
            StreamConfig(
                name=name,
                subjects=[subj],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=max_age,
                duplicate_window=self.cfg.duplicate_window,
            )
            for name, (subj, max_age) in subjects.event_streams(self.cfg).items()
        ]
        cfgs.append(
            StreamConfig(
                name=subjects.WORK_STREAM,
                subjects=[subjects.WORK_SUBJECTS],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=self.cfg.duplicate_window,
            )
        )
        for sc in cfgs:
            try:
                await self.js.add_stream(sc)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(sc)  # it exists with other limits: take ours
            except BUS_ERRORS as exc:
                raise BusUnavailable(f"cannot create stream {sc.name} on the bus: {exc!r}") from exc

    async def publish(self, subject: str, env: Envelope, *, ack_within: float = 2.0) -> bool:
        """Publish through JetStream with ``Nats-Msg-Id``; True when the server de-duplicated it."""
        ack = await self.js.publish(subject, encode(env), timeout=ack_within, headers={"Nats-Msg-Id": env.id})
        dup = bool(ack.duplicate)
        BUS_PUBLISHED.labels(env.kind, str(dup).lower()).inc()
        return dup

    async def close(self) -> None:
        # flush what was published, then close: drain() waits up to 30 s on a pull subscription's
        # pending fetch, and every publish that matters was acknowledged already
        with contextlib.suppress(*BUS_ERRORS):
            await self.nc.flush(timeout=1)
        with contextlib.suppress(*BUS_ERRORS):
            await self.nc.close()
        BUS_CONNECTED.set(0)


async def connect(cfg: BusConfig, url: str | None = None, *, name: str = "marketpipe") -> Bus:
    target = url or cfg.target()
    if not target:
        raise BusUnavailable("no bus configured: set [bus] url or MARKETPIPE_BUS_URL")
    await asyncio.to_thread(_probe, target, cfg.connect_timeout)

    down = [False]  # while disconnected, each failed reconnect is not logged again

    async def disconnected() -> None:
        BUS_CONNECTED.set(0)
        if not down[0]:
            log.warning("bus_disconnected", url=target)
        down[0] = True

    async def reconnected() -> None:
        BUS_CONNECTED.set(1)
        down[0] = False
        log.info("bus_reconnected", url=target)

    async def error(exc: Exception) -> None:
        if not down[0]:
            log.warning("bus_error", error=repr(exc))

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                target,
                name=name,
                connect_timeout=cfg.connect_timeout,
                max_reconnect_attempts=-1,  # once connected, reconnect for as long as it takes
                reconnect_time_wait=0.25,
                allow_reconnect=True,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            ),
            timeout=cfg.connect_timeout * 2,
        )
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"cannot connect to the NATS bus at {target}: {exc!r}") from exc
    BUS_CONNECTED.set(1)
    return Bus(nc, cfg, target)


class Publisher:
    """Events onto the bus without ever blocking the caller: :meth:`put` appends to a bounded buffer (any
    thread) and returns; one task sends them in order with their ``Nats-Msg-Id``. During an outage each
    failed send is counted and logged once per outage, the buffer keeps the newest ``[bus] buffer`` events
    (older ones dropped and counted), and sending resumes when the bus is back; a resent event the server
    already has is de-duplicated by its id."""

    def __init__(self, bus: Bus, capacity: int | None = None) -> None:
        self.bus = bus
        self.capacity = capacity or bus.cfg.buffer
        self._buf: deque[tuple[str, Envelope]] = deque()
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self.outage = False

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name="bus-publisher")
        return self

    def put(self, subject: str, env: Envelope) -> None:
        with self._lock:
            if len(self._buf) >= self.capacity:
                self._buf.popleft()
                self.dropped += 1
                BUS_DROPPED.inc()
            self._buf.append((subject, env))
            BUS_BUFFERED.set(len(self._buf))
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._woken()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the event stays buffered, unsent
                self._loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._empty.clear()
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buf)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buf:
                with self._lock:
                    subject, env = self._buf[0]
                try:
                    await self.bus.publish(subject, env, ack_within=1.0)
                except BUS_ERRORS as exc:
                    self.failures += 1
                    BUS_PUBLISH_FAILURES.inc()
                    if not self.outage:
                        log.warning("bus_publish_failed", subject=subject, error=repr(exc), buffered=len(self._buf))
                        self.outage = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if self.outage:
                    log.info("bus_publish_recovered", buffered=len(self._buf), dropped=self.dropped)
                    self.outage = False
                delay = 0.05
                with self._lock:
                    if self._buf and self._buf[0][1] is env:
                        self._buf.popleft()
                    BUS_BUFFERED.set(len(self._buf))
                self.sent += 1
            if not self._buf:
                self._empty.set()

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until the buffer is empty (True) or ``within`` seconds pass (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._empty.wait()
        return not self._buf

    async def aclose(self, within: float = 2.0) -> None:
        await self.flush(within)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def event_envelope(event: Any) -> tuple[str, Envelope]:
    """A ``core.events.Event`` as its subject and envelope: provider trouble is provider health, a
    stored corporate action (version) ``mp.corpact.<type>.<sym>``, the rest data-quality alerts.

    A corporate action's id is the fact itself (symbol, action id, version), not the moment it was
    announced: two processes storing the same version, or one re-announcing it, publish one message."""
    at = event.at
    eid = f"event:{event.kind}:{event.symbol or '-'}:{event.source or '-'}:{at.isoformat()}"
    data = {"event": event.kind, "severity": event.severity, "message": event.message, "details": event.details}
    if event.kind == "corporate_action_applied":
        d = event.details
        cid = f"corpact:{event.symbol or '-'}:{d.get('action_id') or '-'}:{d.get('version') or '-'}"
        subj = subjects.corpact(str(d.get("action") or "unknown"), event.symbol or "_")
        return subj, Envelope("corpact", cid, at=at, source=event.source, symbol=event.symbol, data=data)
    if event.kind == "source_unavailable":
        subj = subjects.health(event.source or "unknown")
        return subj, Envelope("health", eid, at=at, source=event.source, symbol=event.symbol, data=data)
    subj = subjects.quality(event.severity, event.symbol)
    return subj, Envelope("quality", eid, at=at, source=event.source, symbol=event.symbol, data=data)


def wire_events(publisher: Publisher) -> Any:
    """Send every ``core.events`` event onto the bus; returns the unsubscribe function."""
    from marketpipe.core.events import hub

    def on_event(event: Any) -> None:
        publisher.put(*event_envelope(event))

    return hub.subscribe(on_event)


async def publish_events(cfg: BusConfig, evs: list[Any], *, url: str | None = None) -> int:
    """Publish ``core.events`` events from a process that holds no :class:`Publisher` (the CLI, a notebook,
    a worker's store write): connect (bounded by ``connect_timeout``), make sure the streams exist, send each
    with its ``Nats-Msg-Id`` and wait for the acknowledgements. Returns how many the server stored (the
    others were duplicates). A bus that cannot be reached is logged and counted, never raised: the facts
    the events describe are stored already, and the bus is a notification."""
    if not evs:
        return 0
    try:
        bus = await connect(cfg, url, name="marketpipe-events")
    except BusUnavailable as exc:
        BUS_PUBLISH_FAILURES.inc(len(evs))
        log.warning("bus_events_not_published", events=len(evs), error=exc.message)
        return 0
    stored = 0
    try:
        await bus.ensure_streams()
        for ev in evs:
            subject, env = event_envelope(ev)
            stored += not await bus.publish(subject, env)
    except (*BUS_ERRORS, BusUnavailable) as exc:  # type: ignore[misc]
        BUS_PUBLISH_FAILURES.inc(len(evs) - stored)
        log.warning("bus_events_not_published", events=len(evs) - stored, error=repr(exc))
    finally:
        await bus.close()
    return stored
