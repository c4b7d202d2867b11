"""Retry, rate limiting and circuit breaking for provider calls.

Retry uses tenacity (full-jitter exponential backoff, retryable errors only, ``Retry-After``
honoured). The rate limiter and the circuit breaker are our own: the limiter must follow the
vendor's ``X-RateLimit-Remaining/Reset`` headers so that it slows down *before* a 429 (aiolimiter
and friends only count locally), and the breaker's state has to be readable by health reporting and
metrics — both are small.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from marketpipe.core.config import CircuitPolicy, RetryPolicy
from marketpipe.core.errors import (
    CircuitOpen,
    MalformedResponse,
    MarketpipeError,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import CIRCUIT_STATE, CIRCUIT_STATUS, PROVIDER_RETRIES, RATELIMIT_REMAINING

T = TypeVar("T")

# Set while a router has another provider to fall back to: then a failing call is not retried here —
# moving on at once is faster than retrying a provider that is down, and avoids a retry storm.
_FAILOVER_AVAILABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("marketpipe_failover", default=False)


@contextlib.contextmanager
def failover_available() -> Iterator[None]:
    token = _FAILOVER_AVAILABLE.set(True)
    try:
        yield
    finally:
        _FAILOVER_AVAILABLE.reset(token)


log = get_logger("marketpipe.resilience")
Clock = Callable[[], float]


# --- rate limiter ------------------------------------------------------------------------------


class RateLimiter:
    """Token bucket (``per_minute``) that also obeys the server's own view of the window.

    When the server reports ``X-RateLimit-Remaining``, requests are spread evenly over the time
    left until ``X-RateLimit-Reset`` once the remaining count runs low, and wait for the reset when
    it reaches zero — so a well-behaved client never sees the 429 in the first place.
    """

    LOW_WATERMARK = 0.2  # start pacing when less than this share of the window is left

    def __init__(self, per_minute: int, *, name: str = "provider", clock: Clock = time.monotonic) -> None:
        self.name = name
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._tokens = float(min(per_minute, max(1, per_minute // 6)))  # small initial burst
        self._burst = self._tokens
        self._clock = clock
        self._last = clock()
        self._server_limit: int | None = None
        self._server_remaining: int | None = None
        self._server_reset: float | None = None  # monotonic
        self._blocked_until = 0.0
        self._next_paced = 0.0
        self._lock: asyncio.Lock | None = None
        self.waited_seconds = 0.0
        # A limit shared with other processes on the same vendor account (the distributed backfill's
        # workers): awaited after this process's own token, so the account's limit holds across them.
        self.shared: Callable[[], Awaitable[None]] | None = None

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def delay(self) -> float:
        """Seconds until the next request may go; 0 means now (takes nothing)."""
        now = self._clock()
        self._refill(now)
        wait = max(0.0, self._blocked_until - now)
        if self._tokens < 1:
            wait = max(wait, (1 - self._tokens) / self._rate)
        if self._server_remaining is not None and self._server_reset is not None:
            left = self._server_reset - now
            if left <= 0:
                self._server_remaining = None
            elif self._server_remaining <= 0:
                wait = max(wait, left)
            elif self._server_limit and self._server_remaining < self._server_limit * self.LOW_WATERMARK:
                wait = max(wait, self._next_paced - now)
        return wait

    def _take(self) -> None:
        now = self._clock()
        self._tokens -= 1
        if self._server_remaining is not None and self._server_reset is not None:
            left = max(0.0, self._server_reset - now)
            if self._server_remaining > 0:
                self._next_paced = now + left / self._server_remaining
            self._server_remaining -= 1
        RATELIMIT_REMAINING.labels(self.name).set(self.headroom)

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                wait = self.delay()
                if wait <= 0:
                    self._take()
                    break
                self.waited_seconds += wait
                await asyncio.sleep(wait)
            if self.shared is not None:
                began = time.monotonic()
                await self.shared()
                self.waited_seconds += time.monotonic() - began

    def observe(self, headers: Mapping[str, str]) -> None:
        """Take the server's rate-limit headers into account."""
        try:
            limit = headers.get("x-ratelimit-limit")
            remaining = headers.get("x-ratelimit-remaining")
            reset = headers.get("x-ratelimit-reset")
            if remaining is None or reset is None:
                return
            self._server_remaining = int(remaining)
            self._server_limit = int(limit) if limit is not None else self._server_limit
            self._server_reset = self._clock() + max(0.0, float(reset) - time.time())
        except ValueError:
            log.warning("ratelimit_headers_unparsable", provider=self.name)
            return
        RATELIMIT_REMAINING.labels(self.name).set(self.headroom)

    def penalize(self, seconds: float) -> None:
        """A 429 told us to wait: nobody sends until then."""
        self._blocked_until = max(self._blocked_until, self._clock() + max(0.0, seconds))

    @property
    def headroom(self) -> float:
        if self._server_remaining is not None:
            return float(max(0, self._server_remaining))
        return max(0.0, self._tokens)


# --- circuit breaker ---------------------------------------------------------------------------


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


def counts_against_health(exc: BaseException) -> bool:
    """Failures that say the provider is unwell (not the caller's mistake, not a 429)."""
    return isinstance(exc, ProviderUnavailable | MalformedResponse)


class CircuitBreaker:
    def __init__(self, name: str, policy: CircuitPolicy | None = None, *, clock: Clock = time.monotonic):
        self.name = name
        self.policy = policy or CircuitPolicy()
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0
        self.opened_count = 0
        CIRCUIT_STATE.labels(name).set(0)
        CIRCUIT_STATUS.labels(name).state(CircuitState.CLOSED.value)

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.policy.recovery_seconds:
            self._set(CircuitState.HALF_OPEN)
            self._trials = 0
        return self._state

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            log.info("circuit_state", provider=self.name, state=state.value)
        self._state = state
        CIRCUIT_STATE.labels(self.name).set(_STATE_VALUE[state])
        CIRCUIT_STATUS.labels(self.name).state(state.value)

    def allow(self) -> None:
        """Raise CIRCUIT_OPEN unless a call may go now."""
        state = self.state
        if state is CircuitState.CLOSED:
            return
        if state is CircuitState.HALF_OPEN and self._trials < self.policy.half_open_max_calls:
            self._trials += 1
            return
        retry_in = max(0.0, self.policy.recovery_seconds - (self._clock() - self._opened_at))
        raise CircuitOpen(
            f"{self.name}: circuit open after {self._failures} consecutive failures",
            provider=self.name,
            retry_after=retry_in,
            details={"retry_in_seconds": round(retry_in, 3)},
        )

    def success(self) -> None:
        self._failures = 0
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or self._failures >= self.policy.failure_threshold:
            self._opened_at = self._clock()
            if self._state is not CircuitState.OPEN:
                self.opened_count += 1
            self._set(CircuitState.OPEN)

    def release_trial(self) -> None:
        """A half-open trial ended without a verdict on health (e.g. a 4xx, or the caller was cancelled)."""
        if self._state is CircuitState.HALF_OPEN and self._trials > 0:
            self._trials -= 1

    def retry_in(self) -> float | None:
        """Seconds until a call may go: 0 when one may go now (closed, or half-open with a trial slot
        free), the time left until half-open while open, ``None`` while the half-open trials are out
        and their verdict (closed again, or open again) is awaited."""
        state = self.state
        if state is CircuitState.CLOSED:
            return 0.0
        if state is CircuitState.HALF_OPEN:
            return 0.0 if self._trials < self.policy.half_open_max_calls else None
        return max(0.0, self.policy.recovery_seconds - (self._clock() - self._opened_at))

    async def wait_until_allowed(
        self, *, poll: float = 0.05, sleep: Callable[[float], Awaitable[Any]] | None = None
    ) -> None:
        """Wait until a call may go (see :meth:`retry_in`); cancellable at any point. It only waits: the
        caller's next call still goes through :meth:`allow`, so while half-open only the trial calls
        reach the vendor and everyone else comes back here. A verdict on the trial is polled for every
        ``poll`` seconds (the breaker belongs to no event loop, so it keeps no loop-bound waiters)."""
        pause = sleep or asyncio.sleep
        while (delay := self.retry_in()) != 0.0:
            await pause(poll if delay is None else max(delay, 0.001))


# --- retry -------------------------------------------------------------------------------------


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, MarketpipeError) and exc.retryable


class Backoff:
    """tenacity wait strategy: Retry-After when the server gave one, else full jitter."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, MarketpipeError) and exc.retry_after is not None:
            return min(exc.retry_after, self.policy.max_retry_after_seconds) + self.rng.uniform(0, 0.05)
        cap = min(self.policy.max_seconds, self.policy.base_seconds * 2 ** (state.attempt_number - 1))
        return self.rng.uniform(0, cap)


class Resilience:
    """Everything that stands between a provider adapter and the network for one provider."""

    def __init__(
        self,
        name: str,
        *,
        retry: RetryPolicy | None = None,
        circuit: CircuitPolicy | None = None,
        rate_limit_per_min: int = 200,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> None:
        self.name = name
        self.retry_policy = retry or RetryPolicy()
        self.breaker = CircuitBreaker(name, circuit, clock=clock)
        self.limiter = RateLimiter(rate_limit_per_min, name=name, clock=clock)
        self.retries = 0
        self._sleep = sleep or asyncio.sleep
        self._clock = clock
        # Called after every attempt with (ok, error code or None, seconds): passive health.
        self.observers: list[Callable[[bool, str | None, float], None]] = []

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` under the breaker, the limiter and the retry policy."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            code = exc.code if isinstance(exc, MarketpipeError) else "UNKNOWN"
            self.retries += 1
            PROVIDER_RETRIES.labels(self.name, code).inc()
            log.info("provider_retry", provider=self.name, code=code, attempt=state.attempt_number)

        def retry_allowed(exc: BaseException) -> bool:
            if not _is_retryable(exc):
                return False
            ra = exc.retry_after if isinstance(exc, MarketpipeError) else None
            return ra is None or ra <= self.retry_policy.max_retry_after_seconds

        attempts = 1 if _FAILOVER_AVAILABLE.get() else max(1, self.retry_policy.attempts)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=Backoff(self.retry_policy),
            retry=retry_if_exception(retry_allowed),
            reraise=True,
            before_sleep=before_sleep,
            sleep=self._sleep,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(fn)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _observe(self, ok: bool, code: str | None, seconds: float) -> None:
        for observer in self.observers:
            observer(ok, code, seconds)

    async def _once(self, fn: Callable[[], Awaitable[T]]) -> T:
        self.breaker.allow()
        await self.limiter.acquire()
        started = self._clock()
        try:
            result = await fn()
        except MarketpipeError as exc:
            self._observe(False, exc.code, self._clock() - started)
            self._after_failure(exc)
            raise
        except BaseException:
            # Cancelled (or a bug below): no verdict on the provider, but a half-open trial slot taken
            # by this call must be given back, or the circuit would stay half-open with no trial left.
            self.breaker.release_trial()
            raise
        self.breaker.success()
        self._observe(True, None, self._clock() - started)
        return result

    def _after_failure(self, exc: MarketpipeError) -> None:
        if isinstance(exc, RateLimited):
            self.limiter.penalize(exc.retry_after if exc.retry_after is not None else 1.0)
            self.breaker.release_trial()
        elif counts_against_health(exc):
            self.breaker.failure()
        else:
            self.breaker.release_trial()
