"""Internal events: the one hook through which quality findings and provider trouble are raised.

Producers call :func:`emit`; alert sinks and the event bus subscribe with :meth:`EventHub.subscribe`.
Every event is also logged and counted, so nothing depends on a subscriber being present. A failing
subscriber is logged and skipped: it never breaks the producer or the other subscribers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from marketpipe.core.log import get_logger
from marketpipe.core.metrics import EVENTS
from marketpipe.core.timeutil import utcnow

EventKind = Literal["missing_data", "stale_data", "outlier", "source_unavailable", "corporate_action_applied"]
Severity = Literal["info", "warning", "critical"]
MISSING_DATA: EventKind = "missing_data"
STALE_DATA: EventKind = "stale_data"
OUTLIER: EventKind = "outlier"
SOURCE_UNAVAILABLE: EventKind = "source_unavailable"
# a new corporate action (or a vendor's correction of one) was stored: adjusted reads of the bars before its
# adjustment date change; details: action_id, action (type), version, factors, affected (until)
CORPORATE_ACTION_APPLIED: EventKind = "corporate_action_applied"

log = get_logger("marketpipe.events")


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    severity: Severity
    message: str
    symbol: str | None = None
    source: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=utcnow)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["at"] = self.at.isoformat()
        return d


Subscriber = Callable[[Event], None]


class EventHub:
    """Synchronous fan-out to subscribers, plus a bounded memory of recent events (for the
    dashboard and tests)."""

    def __init__(self, keep: int = 1000) -> None:
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self.recent: deque[Event] = deque(maxlen=keep)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subs.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subs:
                    self._subs.remove(fn)

        return unsubscribe

    def emit(self, event: Event) -> None:
        EVENTS.labels(event.kind, event.severity).inc()
        log.info(
            "event",
            kind=event.kind,
            severity=event.severity,
            symbol=event.symbol,
            source=event.source,
            message=event.message,
        )
        with self._lock:
            self.recent.append(event)
            subs = list(self._subs)
        for fn in subs:
            try:
                fn(event)
            except Exception as exc:  # noqa: BLE001 -- a subscriber's bug must not break the producer
                log.error("event_subscriber_failed", kind=event.kind, error=repr(exc))


hub = EventHub()


def emit(
    kind: EventKind,
    severity: Severity,
    message: str,
    *,
    symbol: str | None = None,
    source: str | None = None,
    **details: Any,
) -> Event:
    event = Event(kind, severity, message, symbol, source, details)
    hub.emit(event)
    return event
