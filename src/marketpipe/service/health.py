"""Provider health: passive (every call's outcome and latency, smoothed) and active (a probe at an
interval). States: healthy, degraded, down. The router orders providers by this and by priority."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from marketpipe.core.errors import MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import PROVIDER_STATE
from marketpipe.core.resilience import CircuitState
from marketpipe.providers.base import BarsProvider

log = get_logger("marketpipe.health")


class State(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"


_RANK = {State.HEALTHY: 0, State.DEGRADED: 1, State.DOWN: 2}


@dataclass
class ProviderHealth:
    """Exponentially smoothed view of one provider (``alpha`` weights the newest observation)."""

    name: str
    alpha: float = 0.2
    error_rate: float = 0.0
    latency: float | None = None  # seconds, smoothed over successful calls
    calls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_ok: float | None = None
    last_probe: float | None = None
    probe_ok: bool | None = None
    errors_by_code: dict[str, int] = field(default_factory=dict)

    def record(self, ok: bool, code: str | None, seconds: float) -> None:
        self.calls += 1
        self.error_rate = (1 - self.alpha) * self.error_rate + self.alpha * (0.0 if ok else 1.0)
        if ok:
            self.consecutive_failures = 0
            self.last_ok = time.time()
            self.latency = seconds if self.latency is None else (1 - self.alpha) * self.latency + self.alpha * seconds
        else:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = code
            if code:
                self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1


class HealthMonitor:
    """Watches providers. ``down_after`` consecutive failures (or an open circuit) mean down; an
    error rate above ``degraded_error_rate`` or latency above ``degraded_latency`` mean degraded."""

    def __init__(
        self,
        providers: list[BarsProvider],
        *,
        down_after: int = 3,
        degraded_error_rate: float = 0.2,
        degraded_latency: float = 2.0,
        probes: dict[str, Callable[[], Awaitable[Any]]] | None = None,
    ) -> None:
        self.providers = {p.name: p for p in providers}
        self.health = {p.name: ProviderHealth(p.name) for p in providers}
        self.down_after = down_after
        self.degraded_error_rate = degraded_error_rate
        self.degraded_latency = degraded_latency
        self.probes = dict(probes or {})
        self._tasks: list[asyncio.Task[None]] = []
        for p in providers:
            p.resilience.observers.append(self._observer(p.name))

    def _observer(self, name: str) -> Callable[[bool, str | None, float], None]:
        def observe(ok: bool, code: str | None, seconds: float) -> None:
            self.health[name].record(ok, code, seconds)
            PROVIDER_STATE.labels(name).set(_RANK[self.state(name)])

        return observe

    def state(self, name: str) -> State:
        h = self.health[name]
        circuit = self.providers[name].resilience.breaker.state
        if circuit is CircuitState.OPEN:
            return State.DOWN
        if circuit is CircuitState.HALF_OPEN:
            return State.DEGRADED  # the breaker asks for a trial call
        if h.consecutive_failures >= self.down_after or h.probe_ok is False:
            return State.DOWN
        if h.error_rate > self.degraded_error_rate or (h.latency is not None and h.latency > self.degraded_latency):
            return State.DEGRADED
        return State.HEALTHY

    def rank(self, name: str) -> int:
        """Ordering weight: healthy first, then degraded, then down — except that a provider in its
        half-open recovery window ranks as healthy, so that the trial call goes to it and traffic
        returns to it by priority once the trial succeeds."""
        if self.providers[name].resilience.breaker.state is CircuitState.HALF_OPEN:
            return 0
        return _RANK[self.state(name)]

    async def probe(self, name: str) -> bool:
        """One active probe: the provider's cheapest call. The outcome also feeds the passive view
        through the resilience observer; ``probe_ok`` remembers the verdict until the next probe."""
        fn = self.probes.get(name)
        if fn is None:
            return True
        h = self.health[name]
        h.last_probe = time.time()
        try:
            await fn()
        except MarketpipeError as exc:
            h.probe_ok = False
            h.last_error = exc.code
            log.info("probe_failed", provider=name, code=exc.code)
            return False
        h.probe_ok = True
        return True

    async def probe_all(self) -> dict[str, bool]:
        names = list(self.providers)
        results = await asyncio.gather(*(self.probe(n) for n in names))
        return dict(zip(names, results, strict=True))

    def start(self, interval: float) -> None:
        """Probe every provider every ``interval`` seconds in the running loop until ``stop``."""

        async def loop() -> None:
            while True:
                await self.probe_all()
                await asyncio.sleep(interval)

        self._tasks.append(asyncio.create_task(loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def table(self) -> list[dict[str, Any]]:
        """One row per provider: state, circuit, latency, error rate, rate-limit headroom."""
        rows = []
        for name, p in self.providers.items():
            h = self.health[name]
            rows.append(
                {
                    "provider": name,
                    "state": self.state(name).value,
                    "circuit": p.resilience.breaker.state.value,
                    "latency_ms": None if h.latency is None else round(h.latency * 1000, 1),
                    "error_rate": round(h.error_rate, 3),
                    "calls": h.calls,
                    "failures": h.failures,
                    "ratelimit_headroom": round(p.resilience.limiter.headroom, 1),
                    "last_error": h.last_error,
                    "errors_by_code": dict(h.errors_by_code),
                    "seconds_since_ok": None if h.last_ok is None else round(time.time() - h.last_ok, 1),
                    "seconds_since_probe": None if h.last_probe is None else round(time.time() - h.last_probe, 1),
                }
            )
        return rows
