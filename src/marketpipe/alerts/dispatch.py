"""One worker per sink between the engine and the receiver. The engine only ever calls
:meth:`SinkWorker.submit`, which never waits: it routes (the sink's ``min_severity``; a resolve only
for an alert this sink was sent), drops duplicates of the last notification for an alert, and queues
up to ``queue`` notifications (beyond: dropped and counted). The worker task sends them in order,
paced to ``rate_per_minute``, each within ``timeout`` per attempt and retried with backoff on 429/5xx
and connection trouble, honouring ``Retry-After`` (``core/resilience.py``'s :class:`Backoff`). A sink
that fails or hangs holds up only its own queue."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from marketpipe.alerts.model import RESOLVE, TRIGGER, Action, Notification, probe
from marketpipe.alerts.sinks import SINK_NAMES, Sink, build_sink
from marketpipe.core.config import SEVERITY_RANK, AlertsConfig, AlertSeverity
from marketpipe.core.errors import AlertSinkUnavailable, MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import ALERT_DROPPED, ALERT_NOTIFICATIONS, ALERT_SEND_SECONDS, BACKLOG
from marketpipe.core.resilience import Backoff
from marketpipe.core.timeutil import utcnow
from marketpipe.core.validation import validate_enum

log = get_logger("marketpipe.alerts")


class SinkWorker:
    def __init__(
        self,
        sink: Sink,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.config = sink.config
        self.queue: deque[Notification] = deque()
        self._last: dict[str, tuple[Action, AlertSeverity]] = {}  # the last notification queued per alert id
        self._clock = clock
        self._sleep = sleep or asyncio.sleep
        self._next_at = 0.0
        self._wake: asyncio.Event | None = None
        self.sent = self.failed = self.dropped = self.filtered = 0
        self.last_error: str | None = None
        BACKLOG.labels(self.queue_name).set(0)

    @property
    def queue_name(self) -> str:
        return f"alerts_{self.name}"

    def _filter(self) -> bool:
        self.filtered += 1
        ALERT_NOTIFICATIONS.labels(self.name, "filtered").inc()
        return False

    def submit(self, n: Notification) -> bool:
        """Queue ``n`` for this sink if it is routed here; never waits. False when filtered or dropped."""
        a = n.alert
        last = self._last.get(a.id)
        if n.action == TRIGGER and SEVERITY_RANK[a.severity] < SEVERITY_RANK[self.config.min_severity]:
            if last is not None and last[0] == TRIGGER:  # fell below this sink's level: it is over here
                n = Notification(RESOLVE, a, n.source, n.test)
            else:
                return self._filter()
        if n.action == RESOLVE and (not self.config.send_resolved or last is None or last[0] != TRIGGER):
            if last is not None:
                self._last[a.id] = (RESOLVE, a.severity)
            return self._filter()
        if last == (n.action, a.severity):
            return self._filter()
        if len(self.queue) >= self.config.queue:
            self.dropped += 1
            ALERT_DROPPED.labels(self.name).inc()
            log.warning("alert_dropped", sink=self.name, alert=a.id, action=n.action, queue=len(self.queue))
            return False
        self._last[a.id] = (n.action, a.severity)
        self.queue.append(n)
        BACKLOG.labels(self.queue_name).set(len(self.queue))
        if self._wake is not None:
            self._wake.set()
        return True

    async def run(self) -> None:
        """Send queued notifications for as long as the task lives (cancel it to stop)."""
        self._wake = asyncio.Event()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            n = self.queue.popleft()
            BACKLOG.labels(self.queue_name).set(len(self.queue))
            await self._pace()
            await self.deliver(n)

    async def _pace(self) -> None:
        interval = 60.0 / self.config.rate_per_minute
        wait = self._next_at - self._clock()
        if wait > 0:
            await self._sleep(wait)
        self._next_at = max(self._clock(), self._next_at) + interval

    async def deliver(self, n: Notification) -> bool:
        """Send ``n`` with retries; True when the receiver took it. A failure is logged and counted, never
        raised (``marketpipe alerts test`` calls :meth:`send_with_retries`, which raises it)."""
        try:
            await self.send_with_retries(n)
        except MarketpipeError as exc:
            self.failed += 1
            self.last_error = str(exc)
            ALERT_NOTIFICATIONS.labels(self.name, "failed").inc()
            log.error(
                "alert_not_sent", sink=self.name, alert=n.alert.id, action=n.action, code=exc.code, error=exc.message
            )
            return False
        return True

    async def send_with_retries(self, n: Notification) -> None:
        policy = self.config.retry
        started = self._clock()

        def retryable(exc: BaseException) -> bool:
            if not isinstance(exc, MarketpipeError) or not exc.retryable:
                return False
            return exc.retry_after is None or exc.retry_after <= policy.max_retry_after_seconds

        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("alert_retry", sink=self.name, alert=n.alert.id, attempt=state.attempt_number, error=str(exc))

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=Backoff(policy),
            retry=retry_if_exception(retryable),
            reraise=True,
            sleep=self._sleep,
            before_sleep=before_sleep,
        ):
            with attempt:
                try:
                    async with asyncio.timeout(self.config.timeout):
                        await self.sink.send(n)
                except TimeoutError:
                    raise AlertSinkUnavailable(
                        f"alert sink {self.name}: no answer within {self.config.timeout:g} s",
                        details={"sink": self.name},
                    ) from None
        self.sent += 1
        ALERT_NOTIFICATIONS.labels(self.name, "sent").inc()
        ALERT_SEND_SECONDS.labels(self.name).observe(max(0.0, self._clock() - started))
        log.info("alert_sent", sink=self.name, alert=n.alert.id, action=n.action, severity=n.alert.severity)

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.name,
            "min_severity": self.config.min_severity,
            "queued": len(self.queue),
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "filtered": self.filtered,
            "last_error": self.last_error,
        }


async def send_test(config: AlertsConfig, name: str, env: Mapping[str, str], *, resolve: bool = True) -> list[str]:
    """``marketpipe alerts test --sink NAME``: one test alert to sink ``name`` (its table need not be
    enabled, its secret must be set), then its resolve unless ``resolve`` is off. Delivery errors are
    raised (ALERT_SINK_FAILED / ALERT_SINK_UNAVAILABLE after the retries). Returns the actions sent."""
    validate_enum(name, SINK_NAMES, "sink", message="{param} must be one of {allowed}")
    worker = SinkWorker(build_sink(name, getattr(config.sinks, name), env))
    source = config.source or socket.gethostname()
    sent: list[str] = []
    try:
        for action in (TRIGGER, RESOLVE) if resolve else (TRIGGER,):
            await worker.send_with_retries(probe(source, utcnow(), action))
            sent.append(action)
    finally:
        await worker.sink.aclose()
    return sent
