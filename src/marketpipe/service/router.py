"""Provider router: which vendors to try, in which order, and why the others were skipped.

Order: live health first (healthy, then degraded), configured priority second. Skipped: providers
the capability table rules out for the request, and providers whose circuit is open. Providers the
health monitor calls *down* are skipped while any other candidate remains, and kept as a last
resort otherwise (their health may simply be stale). Providers without credentials never get here:
they are left out when the router is built (``build_router``), with the reason kept in ``skipped``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marketpipe.core.config import Config
from marketpipe.core.errors import (
    DISABLED,
    PROVIDER_DOWN,
    UNSUPPORTED,
    CircuitOpen,
    ConfigError,
    MarketpipeError,
    MissingCredentials,
)
from marketpipe.core.resilience import CircuitState
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.base import BarsProvider
from marketpipe.service.health import HealthMonitor, State


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider's part in a request: skipped or failed, with the stable code and a reason."""

    provider: str
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"provider": self.provider, "code": self.code, "message": self.message}


class ProviderRouter:
    def __init__(
        self,
        providers: list[BarsProvider],
        *,
        priorities: dict[str, int] | None = None,
        health: HealthMonitor | None = None,
        skipped: list[Attempt] | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        if not providers:
            raise MarketpipeError("no provider is enabled and has credentials", details={"skipped": skipped or []})
        self.providers = list(providers)
        self.priorities = {p.name: (priorities or {}).get(p.name, i) for i, p in enumerate(providers)}
        self.health = health or HealthMonitor(providers)
        self.unavailable = list(skipped or [])
        self._now = now

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.providers]

    def get(self, name: str) -> BarsProvider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def candidates(
        self, kind: str, timeframe: Timeframe | None, start: datetime | None, end: datetime | None
    ) -> tuple[list[BarsProvider], list[Attempt]]:
        """Providers to try, best first, and the ones left out with why."""
        skipped = list(self.unavailable)
        usable: list[BarsProvider] = []
        down: list[BarsProvider] = []
        now = self._now()
        ordered = sorted(self.providers, key=lambda p: (self.health.rank(p.name), self.priorities[p.name]))
        for p in ordered:
            reason = p.supports(kind, timeframe, start, end, now)
            if reason is not None:
                skipped.append(Attempt(p.name, UNSUPPORTED, reason))
            elif p.resilience.breaker.state is CircuitState.OPEN:
                skipped.append(Attempt(p.name, CircuitOpen.code, "circuit open"))
            elif self.health.state(p.name) is State.DOWN:
                down.append(p)
            else:
                usable.append(p)
        if usable:
            skipped += [Attempt(p.name, PROVIDER_DOWN, "health monitor reports it down") for p in down]
            return usable, skipped
        return down, skipped

    async def aclose(self) -> None:
        await self.health.stop()
        for p in self.providers:
            await p.aclose()


def build_router(config: Config, *, env: dict[str, str] | None = None, **provider_kw: Any) -> ProviderRouter:
    """Every enabled provider that can be built (credentials present), ordered by priority."""
    from marketpipe.providers.registry import create_provider

    providers: list[BarsProvider] = []
    skipped: list[Attempt] = []
    for name, cfg in sorted(config.providers.items(), key=lambda kv: kv[1].priority):
        if not cfg.enabled:
            skipped.append(Attempt(name, DISABLED, "disabled in the config"))
            continue
        try:
            providers.append(create_provider(name, cfg, env=env, **provider_kw))
        except MarketpipeError as exc:
            skipped.append(Attempt(name, exc.code, exc.message))
    if not providers:
        reasons = "; ".join(f"{a.provider}: {a.message}" for a in skipped)
        if any(a.code == MissingCredentials.code for a in skipped):
            raise MissingCredentials(
                f"no data provider is usable: {reasons}", details={"skipped": [a.to_dict() for a in skipped]}
            )
        raise ConfigError(f"no data provider is usable: {reasons}")
    return ProviderRouter(providers, priorities={n: c.priority for n, c in config.providers.items()}, skipped=skipped)
