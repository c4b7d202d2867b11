"""The vendor's per-account rate limit shared by every worker, in the JetStream KV bucket ``mp_rate``.

Why the KV and not Redis: the workers already need the bus and nothing else (the store is PostgreSQL), and
the limit is small (Alpaca: 200 requests/minute on the free plan, 10,000 on the paid one; a few to a few
hundred a second), so one compare-and-set per request is cheap and contention is rare. Redis's ``INCR`` would
win at many thousands of requests a second, which no vendor account allows.

A fixed one-minute window per provider: key ``<provider>.<minute>`` holds the requests taken in that
minute; a worker takes one by ``create`` (first of the minute) or ``update(last=revision)`` (CAS), and
when the minute's budget is spent it sleeps until the next minute. The bucket's TTL removes old minutes.
"""

from __future__ import annotations

import asyncio
import time

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from marketpipe.bus import subjects
from marketpipe.bus.client import Bus
from marketpipe.core.log import get_logger

log = get_logger("marketpipe.bus.ratelimit")
WINDOW = 60.0


async def rate_bucket(bus: Bus) -> KeyValue:
    return await bus.js.create_key_value(KeyValueConfig(bucket=subjects.KV_RATE, ttl=3 * WINDOW, history=1))


class SharedRateLimit:
    def __init__(self, kv: KeyValue, name: str, per_minute: int, *, window: float = WINDOW) -> None:
        """``per_minute`` requests per ``window`` seconds (a minute, but for tests)."""
        self.kv = kv
        self.name = subjects.token(name)
        self.per_minute = per_minute
        self.window = window
        self.taken = 0
        self.waited = 0.0
        self.conflicts = 0
        self.last_window = -1  # the window the last request was taken in

    async def acquire(self) -> None:
        while True:
            now = time.time()
            window = int(now // self.window)
            key = f"{self.name}.{window}"
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            count = int(entry.value or b"0") if entry is not None else 0
            if count >= self.per_minute:
                wait = (window + 1) * self.window - now + 0.01
                self.waited += wait
                log.info("shared_rate_limit_wait", provider=self.name, seconds=round(wait, 3), taken=count)
                await asyncio.sleep(wait)
                continue
            try:
                if entry is None:
                    await self.kv.create(key, b"1")
                else:
                    await self.kv.update(key, str(count + 1).encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts += 1  # another worker took one at the same moment: read again
                continue
            self.taken += 1
            self.last_window = window
            return
