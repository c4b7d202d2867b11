"""Live data-source router: which source (primary stream or fallback REST vendors) serves live data.

A transport-free state machine. The owner feeds it health reports (``primary_ok``, ``primary_failed``,
``fallback_ok``, ``fallback_failed``) and calls ``tick`` to evaluate timers; the router decides the
state and tells the owner when to poll the fallback and when a reconnect was requested. All time
comes from the injected ``clock`` so the timing rules are testable without sleeping.

States::

    STARTUP ──primary ok──▶ PRIMARY_ACTIVE ──N primary failures──▶ FALLBACK_ACTIVE
       │                       ▲      │                               │      ▲
       │ N primary failures    │      │ N failures, fallback down     │      │ fallback ok
       ▼                       │      ▼                               ▼      │
    FALLBACK_ACTIVE         grace / primary ok ◀──────────── BOTH_UNAVAILABLE

Decisions worth knowing:

* Staleness is counted as a primary failure: each ``stale_seconds`` without any primary report is
  one failure (reason ``"stale"``), so a silent primary fails over after ``failure_threshold``
  stale intervals.
* Grace applies to switching back from a working fallback. From BOTH_UNAVAILABLE the primary is
  taken at once when it reports ok, because nothing else is serving; the fallback is taken at once
  when it recovers first, and the primary then needs its grace to take over.
* If the fallback fails while the primary is healthy but still in its grace period, the router goes
  to the primary at once rather than to BOTH_UNAVAILABLE.
* ``force_failover`` pins the router off the primary until ``release``; while pinned a failed
  fallback means BOTH_UNAVAILABLE.
* Last values are only ever what was recorded; ``last`` labels them stale, it never fills them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import msgspec

from marketpipe.core.errors import ConfigError, InvalidArgument
from marketpipe.core.events import SOURCE_UNAVAILABLE, Severity, emit
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import (
    STREAM_ROUTER_STATE,
    STREAM_ROUTER_STATE_SECONDS,
    STREAM_ROUTER_STATUS,
    STREAM_ROUTER_TRANSITIONS,
)

log = get_logger("marketpipe.service.stream_router")

Role = Literal["primary", "fallback"]
PRIMARY: Role = "primary"
FALLBACK: Role = "fallback"


class SourceState(StrEnum):
    STARTUP = "startup"
    PRIMARY_ACTIVE = "primary_active"
    FALLBACK_ACTIVE = "fallback_active"
    BOTH_UNAVAILABLE = "both_unavailable"


_STATE_CODE: dict[SourceState, int] = {
    SourceState.STARTUP: 0,
    SourceState.PRIMARY_ACTIVE: 1,
    SourceState.FALLBACK_ACTIVE: 2,
    SourceState.BOTH_UNAVAILABLE: 3,
}
_ACTIVE_SOURCE: dict[SourceState, Role | None] = {
    SourceState.STARTUP: None,
    SourceState.PRIMARY_ACTIVE: PRIMARY,
    SourceState.FALLBACK_ACTIVE: FALLBACK,
    SourceState.BOTH_UNAVAILABLE: None,
}


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    failure_threshold: int = 3  # consecutive primary failures (or stale intervals) before failover
    grace_seconds: float = 10.0  # primary continuously healthy this long before switching back
    fallback_poll_seconds: float = 5.0  # how often the owner polls the fallback REST vendors
    stale_seconds: float = 15.0  # primary silence counted as one failure; last values older are stale
    history_limit: int = 100  # transitions kept in memory

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        if self.failure_threshold < 1:
            problems["failure_threshold"] = "must be >= 1"
        if self.grace_seconds < 0:
            problems["grace_seconds"] = "must be >= 0"
        if self.fallback_poll_seconds <= 0:
            problems["fallback_poll_seconds"] = "must be > 0"
        if self.stale_seconds <= 0:
            problems["stale_seconds"] = "must be > 0"
        if self.history_limit < 1:
            problems["history_limit"] = "must be >= 1"
        if problems:
            text = ", ".join(f"{k} {v}" for k, v in problems.items())
            raise ConfigError(f"stream router config: {text}", details={"fields": problems})

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> RouterConfig:
        """Build from a TOML table; wrong types and unknown keys become :class:`ConfigError`."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"stream router config: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Transition:
    at: float
    from_state: SourceState
    to_state: SourceState
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": str(self.from_state), "to": str(self.to_state), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ReconnectRequest:
    source: Role
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class _LastValue:
    value: dict[str, Any]
    source: str
    received_at: float


TransitionListener = Callable[[SourceState, SourceState, str], None]


class DataSourceRouter:
    """Decides which live source is active. Thread-safe; listeners and events run outside the lock."""

    def __init__(
        self,
        config: RouterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "live",
    ) -> None:
        self.config = config or RouterConfig()
        self.name = name
        self._clock = clock
        self._lock = threading.RLock()
        now = clock()
        self._created = now
        self._state = SourceState.STARTUP
        self._since = now
        self._accrued_to = now
        self._time_in: dict[SourceState, float] = dict.fromkeys(SourceState, 0.0)
        self._history: deque[Transition] = deque(maxlen=self.config.history_limit)
        self._transitions = 0
        self._failovers = 0
        self._forced = False
        # primary health
        self._consecutive_failures = 0
        self._primary_ok_since: float | None = None  # start of the current continuous healthy run
        self._primary_last_ok: float | None = None
        self._primary_last_report = now  # any report; silence beyond stale_seconds counts as a failure
        self._primary_last_failure: str | None = None
        self._primary_ever_ok = False
        # fallback health: None until the first report
        self._fallback_up: bool | None = None
        self._fallback_last_report: float | None = None
        self._fallback_last_failure: str | None = None
        self._reconnects: list[ReconnectRequest] = []
        self._last_values: dict[str, _LastValue] = {}
        self._listeners: list[TransitionListener] = []
        self._pending: list[tuple[Transition, bool, int]] = []  # with forced flag and failure count
        STREAM_ROUTER_STATE.labels(self.name).set(_STATE_CODE[self._state])
        STREAM_ROUTER_STATUS.labels(self.name).state(self._state.value)

    # --- inputs -------------------------------------------------------------------------------

    def primary_ok(self) -> None:
        with self._lock:
            now = self._now()
            self._consecutive_failures = 0
            self._primary_last_report = now
            self._primary_last_ok = now
            self._primary_ever_ok = True
            if self._primary_ok_since is None:
                self._primary_ok_since = now
            self._evaluate(now, "primary_ok")
        self._flush()

    def primary_failed(self, reason: str) -> None:
        with self._lock:
            now = self._now()
            self._primary_failure(now, reason)
            self._evaluate(now, f"primary_failed:{reason}")
        self._flush()

    def primary_idle(self) -> None:
        """Nothing needs the primary yet (no subscriptions): restart its staleness clock without
        counting an ok or a failure, so silence before the first subscription is not held against it."""
        with self._lock:
            self._primary_last_report = self._now()

    def fallback_ok(self) -> None:
        with self._lock:
            now = self._now()
            self._fallback_up = True
            self._fallback_last_report = now
            self._evaluate(now, "fallback_ok")
        self._flush()

    def fallback_failed(self, reason: str) -> None:
        with self._lock:
            now = self._now()
            self._fallback_up = False
            self._fallback_last_report = now
            self._fallback_last_failure = reason
            self._evaluate(now, f"fallback_failed:{reason}")
        self._flush()

    def tick(self) -> SourceState:
        """Evaluate timers (primary staleness, grace); returns the state afterwards."""
        with self._lock:
            now = self._now()
            reason = "tick"
            if now - self._primary_last_report >= self.config.stale_seconds:
                self._primary_failure(now, "stale")
                reason = "primary_failed:stale"
            self._evaluate(now, reason)
            state = self._state
        self._flush()
        return state

    # --- admin --------------------------------------------------------------------------------

    def force_failover(self, reason: str = "admin") -> None:
        """Pin the router off the primary until :meth:`release`."""
        with self._lock:
            now = self._now()
            self._forced = True
            if self._state in (SourceState.STARTUP, SourceState.PRIMARY_ACTIVE):
                self._fail_over(now, f"forced:{reason}")
            else:
                self._evaluate(now, f"forced:{reason}")
        self._flush()

    def release(self, reason: str = "admin") -> None:
        """Undo :meth:`force_failover`; the normal grace logic then decides when the primary returns."""
        with self._lock:
            now = self._now()
            self._forced = False
            self._evaluate(now, f"released:{reason}")
        self._flush()

    def request_reconnect(self, source: Role = PRIMARY, reason: str = "admin") -> ReconnectRequest:
        """Record a reconnect request for the owner's stream client; collect them with :meth:`take_reconnects`."""
        if source not in (PRIMARY, FALLBACK):
            raise InvalidArgument(f"unknown source {source!r}", details={"source": source})
        with self._lock:
            req = ReconnectRequest(source=source, reason=reason, at=self._now())
            self._reconnects.append(req)
        log.info("stream_router_reconnect_requested", router=self.name, source=source, reason=reason)
        return req

    def take_reconnects(self) -> list[ReconnectRequest]:
        """Pending reconnect requests, oldest first; the list is cleared."""
        with self._lock:
            out, self._reconnects = self._reconnects, []
        return out

    def should_poll_fallback(self, now: float | None = None) -> bool:
        """True when the fallback is needed (active, or both down) and the last poll result is at least
        ``fallback_poll_seconds`` old (or there was none)."""
        with self._lock:
            t = self._clock() if now is None else now
            if self._state not in (SourceState.FALLBACK_ACTIVE, SourceState.BOTH_UNAVAILABLE):
                return False
            last = self._fallback_last_report
            return last is None or t - last >= self.config.fallback_poll_seconds

    # --- last values --------------------------------------------------------------------------

    def record(self, symbol: str, value: dict[str, Any], *, source: str | None = None) -> None:
        """Keep ``value`` as the last value for ``symbol``; ``source`` defaults to the active source.
        The value is kept as given (not copied): do not change it afterwards."""
        if not symbol:
            raise InvalidArgument("symbol must not be empty")
        with self._lock:
            src = source or _ACTIVE_SOURCE[self._state]
            if src is None:
                raise InvalidArgument(
                    f"no active source in state {self._state}; pass source explicitly",
                    details={"symbol": symbol, "state": str(self._state)},
                )
            self._last_values[symbol] = _LastValue(value, src, self._clock())

    def last(self, symbol: str) -> dict[str, Any] | None:
        """The last recorded value for ``symbol`` with its source and age, or None. ``stale`` is True
        while both sources are unavailable or when the value is older than ``stale_seconds``."""
        with self._lock:
            lv = self._last_values.get(symbol)
            if lv is None:
                return None
            age = self._clock() - lv.received_at
            stale = self._state is SourceState.BOTH_UNAVAILABLE or age > self.config.stale_seconds
            return {
                "symbol": symbol,
                "value": dict(lv.value),
                "source": lv.source,
                "received_at": lv.received_at,
                "age_seconds": age,
                "stale": stale,
            }

    # --- exposure -----------------------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def active_source(self) -> Role | None:
        return _ACTIVE_SOURCE[self._state]

    @property
    def failovers(self) -> int:
        return self._failovers

    @property
    def forced(self) -> bool:
        return self._forced

    def history(self) -> list[Transition]:
        with self._lock:
            return list(self._history)

    def time_in_state(self) -> dict[SourceState, float]:
        with self._lock:
            self._accrue(self._clock())
            return dict(self._time_in)

    def time_in_fallback(self) -> float:
        return self.time_in_state()[SourceState.FALLBACK_ACTIVE]

    def uptime_pct(self) -> float:
        """Share of time since the end of STARTUP with a source available (primary or fallback active), in %."""
        with self._lock:
            now = self._clock()
            self._accrue(now)
            return self._uptime_pct_locked(now)

    def grace_remaining(self) -> float | None:
        """Seconds until the primary may take over again; None when no switch back is pending."""
        with self._lock:
            return self._grace_remaining(self._clock())

    def on_transition(self, callback: TransitionListener) -> Callable[[], None]:
        """Call ``callback(old, new, reason)`` after every transition; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/health/datasource`` shows."""
        with self._lock:
            now = self._clock()
            self._accrue(now)
            return {
                "router": self.name,
                "state": str(self._state),
                "active_source": self.active_source,
                "since": self._since,
                "in_state_seconds": now - self._since,
                "forced": self._forced,
                "consecutive_failures": self._consecutive_failures,
                "failure_threshold": self.config.failure_threshold,
                "grace_remaining": self._grace_remaining(now),
                "primary": {
                    "healthy": self._primary_ok_since is not None,
                    "ever_ok": self._primary_ever_ok,
                    "last_ok": self._primary_last_ok,
                    "last_failure": self._primary_last_failure,
                },
                "fallback": {
                    "up": self._fallback_up,
                    "last_report": self._fallback_last_report,
                    "last_failure": self._fallback_last_failure,
                },
                "counters": {
                    "failovers": self._failovers,
                    "transitions": self._transitions,
                    "time_in_state": {str(k): v for k, v in self._time_in.items()},
                    "time_in_fallback": self._time_in[SourceState.FALLBACK_ACTIVE],
                    "uptime_pct": self._uptime_pct_locked(now),
                },
                "pending_reconnects": len(self._reconnects),
                "history": [t.to_dict() for t in self._history],
            }

    # --- internals (called with the lock held) ------------------------------------------------

    def _now(self) -> float:
        now = self._clock()
        self._accrue(now)
        return now

    def _accrue(self, now: float) -> None:
        elapsed = now - self._accrued_to
        if elapsed > 0:
            self._time_in[self._state] += elapsed
            STREAM_ROUTER_STATE_SECONDS.labels(self.name, str(self._state)).inc(elapsed)
            self._accrued_to = now

    def _uptime_pct_locked(self, now: float) -> float:
        # Time in STARTUP is not counted either way: a source that is still being connected to has not
        # been down, and a gateway that has just started would otherwise report a low uptime for hours.
        total = now - self._created - self._time_in[SourceState.STARTUP]
        if total <= 0:
            return 100.0 if self.active_source else 0.0
        up = self._time_in[SourceState.PRIMARY_ACTIVE] + self._time_in[SourceState.FALLBACK_ACTIVE]
        return 100.0 * up / total

    def _grace_remaining(self, now: float) -> float | None:
        if self._state is not SourceState.FALLBACK_ACTIVE or self._primary_ok_since is None:
            return None
        return max(0.0, self.config.grace_seconds - (now - self._primary_ok_since))

    def _primary_failure(self, now: float, reason: str) -> None:
        self._consecutive_failures += 1
        self._primary_ok_since = None
        self._primary_last_report = now
        self._primary_last_failure = reason

    def _primary_usable(self) -> bool:
        return not self._forced and self._primary_ok_since is not None

    def _evaluate(self, now: float, reason: str) -> None:
        st = self._state
        threshold_hit = self._consecutive_failures >= self.config.failure_threshold
        if st is SourceState.STARTUP:
            if self._primary_usable():
                self._transition(now, SourceState.PRIMARY_ACTIVE, reason)
            elif threshold_hit:
                self._fail_over(now, reason)
        elif st is SourceState.PRIMARY_ACTIVE:
            if threshold_hit:
                self._fail_over(now, reason)
        elif st is SourceState.FALLBACK_ACTIVE:
            if self._fallback_up is False:
                if self._primary_usable():
                    self._transition(now, SourceState.PRIMARY_ACTIVE, f"{reason};primary_healthy")
                else:
                    self._transition(now, SourceState.BOTH_UNAVAILABLE, reason)
            elif self._primary_usable() and self._grace_remaining(now) == 0.0:
                self._transition(now, SourceState.PRIMARY_ACTIVE, f"{reason};grace_elapsed")
        elif st is SourceState.BOTH_UNAVAILABLE:
            if self._primary_usable():
                self._transition(now, SourceState.PRIMARY_ACTIVE, reason)
            elif self._fallback_up:
                self._transition(now, SourceState.FALLBACK_ACTIVE, reason)

    def _fail_over(self, now: float, reason: str) -> None:
        if self._fallback_up is False:
            self._transition(now, SourceState.BOTH_UNAVAILABLE, f"{reason};fallback_down")
        else:
            self._failovers += 1
            self._transition(now, SourceState.FALLBACK_ACTIVE, reason)

    def _transition(self, now: float, new: SourceState, reason: str) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        self._since = now
        self._transitions += 1
        tr = Transition(now, old, new, reason)
        self._history.append(tr)
        self._pending.append((tr, self._forced, self._consecutive_failures))
        STREAM_ROUTER_STATE.labels(self.name).set(_STATE_CODE[new])
        STREAM_ROUTER_STATUS.labels(self.name).state(new.value)
        STREAM_ROUTER_TRANSITIONS.labels(self.name, str(old), str(new)).inc()

    def _flush(self) -> None:
        """Log, raise events and notify listeners for transitions made under the lock."""
        with self._lock:
            pending, self._pending = self._pending, []
            listeners = list(self._listeners)
        for tr, forced, consecutive in pending:
            # normal operation (a source taking over) is info; leaving a working source is a warning
            level = log.info if tr.to_state is SourceState.PRIMARY_ACTIVE else log.warning
            level(
                "stream_router_transition",
                router=self.name,
                from_state=str(tr.from_state),
                to_state=str(tr.to_state),
                reason=tr.reason,
            )
            self._raise_event(tr, forced=forced, consecutive=consecutive)
            for fn in listeners:
                try:
                    fn(tr.from_state, tr.to_state, tr.reason)
                except Exception as exc:  # noqa: BLE001 -- a listener's bug must not break the router
                    log.error("stream_router_listener_failed", router=self.name, error=repr(exc))

    def _raise_event(self, tr: Transition, *, forced: bool, consecutive: int) -> None:
        severity: Severity
        if tr.to_state is SourceState.BOTH_UNAVAILABLE:
            severity, source, message = "critical", None, "no live data source available (primary and fallback down)"
        elif tr.to_state is SourceState.FALLBACK_ACTIVE and tr.from_state in (
            SourceState.STARTUP,
            SourceState.PRIMARY_ACTIVE,
        ):
            severity, source, message = "warning", PRIMARY, "primary live source unavailable; failed over to fallback"
        else:
            return
        emit(
            SOURCE_UNAVAILABLE,
            severity,
            message,
            source=source,
            router=self.name,
            from_state=str(tr.from_state),
            to_state=str(tr.to_state),
            reason=tr.reason,
            forced=forced,
            consecutive_failures=consecutive,
        )
