import asyncio

import pytest

from marketpipe.core.config import CircuitPolicy, RetryPolicy
from marketpipe.core.errors import (
    CircuitOpen,
    InvalidArgument,
    ProviderBadRequest,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.resilience import CircuitBreaker, CircuitState, RateLimiter, Resilience


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    b = CircuitBreaker("p", CircuitPolicy(failure_threshold=3, recovery_seconds=10), clock=clock)
    for _ in range(2):
        b.failure()
    assert b.state is CircuitState.CLOSED
    b.failure()
    assert b.state is CircuitState.OPEN
    with pytest.raises(CircuitOpen) as info:
        b.allow()
    assert info.value.retry_after == pytest.approx(10)
    clock.t += 10
    assert b.state is CircuitState.HALF_OPEN
    b.allow()  # the one trial call
    with pytest.raises(CircuitOpen):
        b.allow()
    b.success()
    assert b.state is CircuitState.CLOSED


def test_half_open_failure_reopens() -> None:
    clock = FakeClock()
    b = CircuitBreaker("p", CircuitPolicy(failure_threshold=1, recovery_seconds=5), clock=clock)
    b.failure()
    clock.t += 5
    b.allow()
    b.failure()
    assert b.state is CircuitState.OPEN
    assert b.opened_count == 2  # opened, then re-opened from half-open


def test_limiter_paces_when_server_says_window_is_nearly_spent() -> None:
    clock = FakeClock()
    lim = RateLimiter(10_000, clock=clock)
    assert lim.delay() == 0
    import time as _t

    lim.observe({"x-ratelimit-limit": "200", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(_t.time() + 30)})
    assert lim.delay() == pytest.approx(30, abs=1)
    lim.observe({"x-ratelimit-limit": "200", "x-ratelimit-remaining": "10", "x-ratelimit-reset": str(_t.time() + 20)})
    lim._take()
    assert lim.delay() == pytest.approx(2, abs=0.2)  # 20 s left / 10 requests
    assert lim.headroom == 9


def test_limiter_local_bucket() -> None:
    clock = FakeClock()
    lim = RateLimiter(60, clock=clock)  # one per second, burst 10
    for _ in range(10):
        assert lim.delay() == 0
        lim._take()
    assert lim.delay() == pytest.approx(1.0)
    clock.t += 1
    assert lim.delay() == 0


async def test_retries_only_retryable_errors_and_honours_retry_after() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    r = Resilience(
        "p", retry=RetryPolicy(attempts=4, base_seconds=0.01, max_seconds=0.02), sleep=sleep, rate_limit_per_min=100_000
    )
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RateLimited("slow down", retry_after=1.5)
        if calls == 2:
            raise ProviderUnavailable("502")
        return "ok"

    assert await r.call(flaky) == "ok"
    assert calls == 3
    assert slept[0] == pytest.approx(1.5, abs=0.06)
    assert 0 <= slept[1] <= 0.02
    assert r.retries == 2

    async def bad() -> None:
        raise ProviderBadRequest("invalid timeframe")

    with pytest.raises(ProviderBadRequest):
        await r.call(bad)
    assert r.retries == 2  # not retried


async def test_gives_up_after_attempts_and_opens_breaker() -> None:
    async def sleep(s: float) -> None:
        return None

    r = Resilience("p", retry=RetryPolicy(attempts=3), circuit=CircuitPolicy(failure_threshold=3), sleep=sleep)
    n = 0

    async def down() -> None:
        nonlocal n
        n += 1
        raise ProviderUnavailable("down")

    with pytest.raises(ProviderUnavailable):
        await r.call(down)
    assert n == 3
    assert r.breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpen):
        await r.call(down)
    assert n == 3  # the open circuit stopped the call before it went out


async def test_caller_errors_do_not_count_against_health() -> None:
    r = Resilience("p", circuit=CircuitPolicy(failure_threshold=1))

    async def bad() -> None:
        raise InvalidArgument("bad")

    for _ in range(3):
        with pytest.raises(InvalidArgument):
            await r.call(bad)
    assert r.breaker.state is CircuitState.CLOSED


async def test_limiter_acquire_waits() -> None:
    lim = RateLimiter(6000)  # 100/s, burst 1000
    lim._tokens = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await lim.acquire()
    assert loop.time() - t0 >= 0.005
