"""Provider router: which vendors to try, in which order, and why the others were skipped — and
the one failover path, :meth:`ProviderRouter.first`, that every fetch goes through (bars pages,
historical trades and quotes, latest values, snapshots, and each work unit of a backfill).

Order: a pinned provider first (``POST /admin/failover``), then live health (healthy, then
degraded), then configured priority. Skipped: providers the capability table (``supports``) rules
out for the request, and providers whose circuit is open. Providers the health monitor calls
*down* are skipped while any other candidate remains, and kept as a last resort otherwise (their
health may simply be stale). Providers without credentials never get here: they are left out when
the router is built (``build_router``), with the reason kept in ``unavailable``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from marketpipe.core import events
from marketpipe.core.config import Config
from marketpipe.core.errors import (
    DISABLED,
    PROVIDER_DOWN,
    UNSUPPORTED,
    AllProvidersFailed,
    CircuitOpen,
    ConfigError,
    MarketpipeError,
    MissingCredentials,
    NotFound,
    ProviderBadRequest,
    ProviderError,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import FAILOVERS
from marketpipe.core.resilience import CircuitState, failover_available
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.base import BarsProvider
from marketpipe.service.health import HealthMonitor, State

log = get_logger("marketpipe.router")
T = TypeVar("T")
# The vendor refused the request itself: another vendor would refuse it too, so these end a call
# at once for callers that answer one request (latest values, a page of ticks).
CLIENT_ERRORS: tuple[type[ProviderError], ...] = (ProviderBadRequest, NotFound)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider's part in a request: skipped or failed, with the stable code and a reason."""

    provider: str
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"provider": self.provider, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Served(Generic[T]):
    """What :meth:`ProviderRouter.first` hands back: the answer, the provider that gave it, and every
    provider skipped or failed before it (in order)."""

    value: T
    provider: BarsProvider
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.provider.name


Call = Callable[[BarsProvider], Awaitable[T]]
Symbols = Sequence[str] | Callable[[], Sequence[str]]
Again = Callable[[list[Attempt]], Awaitable[bool]]
OnFailure = Callable[[BarsProvider, ProviderError], None]


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
        self.pinned: str | None = None  # tried first whenever it is a usable candidate
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
        else:
            usable = down
        if self.pinned:
            usable.sort(key=lambda p: p.name != self.pinned)
        return usable, skipped

    async def first(
        self,
        kind: str,
        call: Call[T],
        *,
        timeframe: Timeframe | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        symbols: Symbols = (),
        what: str | None = None,
        refused: tuple[type[BaseException], ...] = (),
        at_most: int | None = None,
        exclude: Collection[str] = (),
        again: Again | None = None,
        on_failure: OnFailure | None = None,
    ) -> Served[T]:
        """The first provider that supports this kind of request and answers: ``call(provider)`` on
        each candidate (:meth:`candidates`, pinned / health / priority order) until one returns.

        Every candidate but the last is called under ``failover_available()``, so its own retries
        give way to moving on. A ``ProviderError`` is a failover: recorded as an attempt, counted
        (``marketpipe_failovers_total``), raised as a ``source_unavailable`` event and logged. A
        half-open circuit lets its trial call through and answers ``CIRCUIT_OPEN`` to the others,
        which fail over like any other error. ``refused`` errors (e.g. :data:`CLIENT_ERRORS`) end the
        call at once, as do errors that are not provider errors (bad arguments). ``at_most``: call no
        more than that many providers (a vendor's page token means nothing to another vendor).
        ``exclude``: names of providers the caller does not want tried (e.g. the live stream's own
        vendor when polling for a fallback).

        A caller that continues a piece of work from its own state (a backfill unit, from where its
        committed pages end) gives a ``call`` that starts from that state, so the next provider
        picks up where the failed one stopped; ``symbols`` may then be a function naming what is
        still pending. When every candidate has failed or was left out, ``again(attempts)`` (if
        given) may wait for something to change (an open circuit turning half-open) and return
        ``True`` to run the candidates once more; otherwise the call raises ``ALL_PROVIDERS_FAILED``
        listing every attempt, skipped ones included.
        """
        label = what or kind.replace("_", " ")
        while True:
            candidates, attempts = self.candidates(kind, timeframe, start, end)
            candidates = [p for p in candidates if p.name not in exclude]
            if at_most is not None:
                candidates = candidates[:at_most]
            for i, p in enumerate(candidates):
                fallback = failover_available() if i < len(candidates) - 1 else contextlib.nullcontext()
                try:
                    with fallback:
                        value = await call(p)
                except refused:
                    raise
                except ProviderError as exc:
                    attempts.append(Attempt(p.name, exc.code, exc.message))
                    self._failed_over(kind, p, exc, list(_names(symbols)))
                    if on_failure is not None:
                        on_failure(p, exc)
                    continue
                return Served(value, p, attempts)
            if again is not None and await again(attempts):
                continue
            pending = list(_names(symbols))
            raise AllProvidersFailed(
                f"no provider could serve {label}{' for ' + ', '.join(pending) if pending else ''}: "
                + ("; ".join(f"{a.provider} {a.code}" for a in attempts) or "none configured"),
                details={"kind": kind, "symbols": pending, "attempts": [a.to_dict() for a in attempts]},
                retry_after=5.0,
            )

    @staticmethod
    def _failed_over(kind: str, p: BarsProvider, exc: ProviderError, symbols: list[str]) -> None:
        FAILOVERS.labels(p.name, exc.code).inc()
        events.emit(
            events.SOURCE_UNAVAILABLE,
            "warning",
            f"{p.name} failed with {exc.code}; moving on to the next provider",
            source=p.name,
            code=exc.code,
            request=kind,
            symbols=symbols,
        )
        log.warning("failover", kind=kind, provider=p.name, code=exc.code, symbols=symbols, error=exc.message)

    async def aclose(self) -> None:
        await self.health.stop()
        for p in self.providers:
            await p.aclose()


def _names(symbols: Symbols) -> Sequence[str]:
    return symbols() if callable(symbols) else symbols


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
