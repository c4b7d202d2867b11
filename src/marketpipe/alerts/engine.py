"""The alert engine: every ``evaluate_seconds`` it samples the metrics the pipeline keeps, runs the
rules, and turns what they find into alerts — new conditions fire (after the rule's ``for_seconds``),
a changed severity fires again, a condition that is gone resolves its alert. Pipeline events
(``core/events.py``) become alerts too, resolved after a quiet ``[alerts.rules.events] window_seconds``;
an event wakes the loop at once. Each change is handed to every sink's worker, which never blocks the
engine. The clock is injectable (``now``), so tests step time by hand and call :meth:`evaluate`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from marketpipe.alerts.dispatch import SinkWorker
from marketpipe.alerts.model import RESOLVE, TRIGGER, Alert, Condition, Notification
from marketpipe.alerts.rules import METRIC_RULES, SAMPLED, Context, disk_share, longest_window, rule_config
from marketpipe.alerts.samples import MetricHistory
from marketpipe.alerts.sinks import SINK_NAMES, build_sink
from marketpipe.core.config import SEVERITY_RANK, AlertsConfig
from marketpipe.core.events import Event, EventHub
from marketpipe.core.events import hub as event_hub
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import ALERT_TRANSITIONS, ALERTS_ACTIVE, MARKET_OPEN, REGISTRY, STORE_DISK_USED
from marketpipe.core.timeutil import utcnow

log = get_logger("marketpipe.alerts")


def _always_open(_: datetime) -> bool:
    return True


class AlertEngine:
    def __init__(
        self,
        config: AlertsConfig,
        *,
        workers: list[SinkWorker] | None = None,
        registry: CollectorRegistry = REGISTRY,
        now: Callable[[], datetime] = utcnow,
        market_open: Callable[[datetime], bool] = _always_open,
        store_path: Path | None = None,
        disk_usage: Callable[[Path], tuple[int, int, int]] = shutil.disk_usage,
        events: EventHub = event_hub,
    ) -> None:
        self.config = config
        self.workers = list(workers or [])
        self.source = config.source or socket.gethostname()
        self._now = now
        self._market_open = market_open
        self._store_path = store_path
        self._disk_usage = disk_usage
        self.history = MetricHistory(registry, SAMPLED, longest_window(config.rules) + config.evaluate_seconds)
        self.active: dict[str, Alert] = {}
        self.resolved: deque[Alert] = deque(maxlen=config.resolved_keep)
        self._pending: dict[str, float] = {}  # condition key -> when it was first seen (for for_seconds)
        self._events: dict[str, tuple[Condition, datetime]] = {}
        self._events_lock = threading.Lock()
        self._gauged: set[tuple[str, str]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.evaluations = 0
        self._events_hub = events
        self._unsubscribe: Callable[[], None] | None = None

    def listen(self) -> None:
        """Subscribe to the events hub (``start`` does; tests that step :meth:`evaluate` by hand call it)."""
        if self._unsubscribe is None:
            self._unsubscribe = self._events_hub.subscribe(self.on_event)

    @classmethod
    def build(cls, config: AlertsConfig, env: Mapping[str, str] | None = None, **kw: Any) -> AlertEngine:
        """The engine with a worker for every enabled sink; an enabled sink whose secret is not set is
        MISSING_CREDENTIALS naming the variable."""
        environ = os.environ if env is None else env
        workers = [
            SinkWorker(build_sink(name, getattr(config.sinks, name), environ))
            for name in SINK_NAMES
            if getattr(config.sinks, name).enabled
        ]
        return cls(config, workers=workers, **kw)

    # --- events -----------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """An events-hub subscriber (any thread): remember the event as a condition, wake the loop."""
        rule = self.config.rules.events
        if not rule.enabled or SEVERITY_RANK[event.severity] < SEVERITY_RANK[rule.severity]:
            return
        labels = {}
        if event.symbol:
            labels["symbol"] = event.symbol
        if event.source:
            labels["provider"] = event.source
        cond = Condition(f"event_{event.kind}", event.severity, event.message, labels)
        with self._events_lock:
            self._events[cond.key] = (cond, event.at)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(wake.set)

    def _event_conditions(self, now: datetime) -> list[Condition]:
        window = self.config.rules.events.window_seconds
        with self._events_lock:
            for key, (_, at) in list(self._events.items()):
                if (now - at).total_seconds() >= window:
                    del self._events[key]
            return [c for c, _ in self._events.values()]

    # --- evaluation -------------------------------------------------------------------------------

    def conditions(self, now: datetime) -> dict[str, Condition]:
        self.history.sample(now.timestamp())
        market_open = self._market_open(now)
        disk = None
        if self._store_path is not None:
            try:
                disk = disk_share(self._store_path, self._disk_usage)
            except OSError as exc:
                log.error("alert_disk_unreadable", path=str(self._store_path), error=repr(exc))
        # exported too, so that deploy/prometheus/rules.yml can say the same thing in PromQL
        MARKET_OPEN.set(1 if market_open else 0)
        if disk is not None:
            STORE_DISK_USED.set(disk[1])
        ctx = Context(now, market_open, self._store_path, disk)
        found: dict[str, Condition] = {}
        for name, fn in METRIC_RULES.items():
            cfg = rule_config(self.config.rules, name)
            if not cfg.enabled:
                continue
            try:
                conds = fn(self.history, cfg, ctx)
            except Exception as exc:  # noqa: BLE001 -- one rule's bug (or an unreadable disk) must not stop the others
                log.error("alert_rule_failed", rule=name, error=repr(exc))
                continue
            for c in conds:
                kept = found.get(c.key)
                if kept is None or SEVERITY_RANK[c.severity] > SEVERITY_RANK[kept.severity]:
                    found[c.key] = c
        for c in self._event_conditions(now):
            found.setdefault(c.key, c)
        return found

    def evaluate(self) -> list[Notification]:
        """One pass: the notifications it produced (already handed to the sinks)."""
        now = self._now()
        return self.apply(now, self.conditions(now))

    def apply(self, now: datetime, found: dict[str, Condition]) -> list[Notification]:
        """Reconcile the alerts with what the rules found at ``now``; on the loop that owns the workers."""
        t = now.timestamp()
        out: list[Notification] = []
        for key, c in found.items():
            for_seconds = rule_config(self.config.rules, c.rule).for_seconds if c.rule in METRIC_RULES else 0.0
            since = self._pending.setdefault(key, t)
            if t - since < for_seconds:
                continue
            old = self.active.get(key)
            if old is None:
                alert = Alert(key, c.rule, c.severity, c.summary, dict(c.labels), now, now, c.value)
                out.append(Notification(TRIGGER, alert, self.source))
            else:
                alert = old.seen(c, now)
                if alert.severity != old.severity:
                    out.append(Notification(TRIGGER, alert, self.source))
            self.active[key] = alert
        for key in [k for k in self.active if k not in found]:
            alert = self.active.pop(key).resolved(now)
            self.resolved.appendleft(alert)
            out.append(Notification(RESOLVE, alert, self.source))
        for key in [k for k in self._pending if k not in found]:
            del self._pending[key]
        self.evaluations += 1
        self._gauge()
        for n in out:
            ALERT_TRANSITIONS.labels(n.alert.rule, n.action).inc()
            log.warning(
                "alert_" + ("resolved" if n.action == RESOLVE else "firing"),
                alert=n.alert.id,
                severity=n.alert.severity,
                summary=n.alert.summary,
            )
            for w in self.workers:
                w.submit(n)
        return out

    def _gauge(self) -> None:
        counts = Counter((a.rule, a.severity) for a in self.active.values())
        for key in self._gauged - set(counts):
            ALERTS_ACTIVE.labels(*key).set(0)
        for key, n in counts.items():
            ALERTS_ACTIVE.labels(*key).set(n)
        self._gauged = set(counts) | self._gauged

    # --- what the API shows -------------------------------------------------------------------------

    def snapshot(self, limit: int = 50) -> dict[str, Any]:
        active = sorted(self.active.values(), key=lambda a: (-a.rank, a.first_seen))
        return {
            "active": [a.to_dict() for a in active],
            "resolved": [a.to_dict() for a in list(self.resolved)[:limit]],
            "sinks": [w.status() for w in self.workers],
            "evaluate_seconds": self.config.evaluate_seconds,
            "evaluations": self.evaluations,
        }

    # --- running ------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            now = self._now()
            try:
                # reading the registry is the costly part (a few ms on a busy gateway): off the event loop
                self.apply(now, await asyncio.to_thread(self.conditions, now))
            except Exception as exc:  # noqa: BLE001 -- the engine's own bug must not end alerting for good
                log.error("alert_evaluation_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.evaluate_seconds):
                    await self._wake.wait()
            self._wake.clear()

    def start(self) -> None:
        """On the running loop: the evaluation loop and one task per sink worker."""
        self.listen()
        self._tasks = [asyncio.create_task(w.run(), name=f"alerts-{w.name}") for w in self.workers]
        self._tasks.append(asyncio.create_task(self.run(), name="alerts-engine"))

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        self._loop = self._wake = None
        for w in self.workers:
            await w.sink.aclose()
