"""A lease in the JetStream KV bucket ``mp_leases``: at most one holder at a time, for a bounded time.

Taken with ``create`` (fails when the key exists), kept with ``update(last=revision)`` (compare-and-set)
every third of the TTL. The bucket's TTL is the lease's: when the holder dies (``kill -9``) its key expires
and the next ``create`` wins, so a successor holds it within ``ttl`` plus one retry interval. A holder whose
CAS fails has lost it (it was too slow and another took it) and must stop acting as the owner at once.
nats-server 2.9 has no per-key TTL, hence one bucket per TTL (``mp_leases_<ttl>``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from marketpipe.bus import subjects
from marketpipe.bus.client import BUS_ERRORS, Bus
from marketpipe.core.errors import MarketpipeError
from marketpipe.core.log import get_logger

log = get_logger("marketpipe.bus.lease")
Callback = Callable[[], Awaitable[None]]


async def lease_bucket(bus: Bus, ttl: float) -> KeyValue:
    return await bus.js.create_key_value(
        KeyValueConfig(bucket=f"{subjects.KV_LEASES}_{int(ttl * 1000)}", ttl=ttl, history=1)
    )


class Lease:
    def __init__(self, kv: KeyValue, key: str, holder: str, ttl: float) -> None:
        self.kv = kv
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self.revision: int | None = None

    @property
    def held(self) -> bool:
        return self.revision is not None

    async def try_acquire(self) -> bool:
        try:
            self.revision = await self.kv.create(self.key, self.holder.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        log.info("lease_acquired", key=self.key, holder=self.holder)
        return True

    async def renew(self) -> bool:
        if self.revision is None:
            return False
        try:
            self.revision = await self.kv.update(self.key, self.holder.encode(), last=self.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            log.warning("lease_lost", key=self.key, holder=self.holder)
            self.revision = None
            return False

    async def release(self) -> None:
        if self.revision is not None:
            with contextlib.suppress(*BUS_ERRORS):
                await self.kv.delete(self.key, last=self.revision)
            self.revision = None

    async def owner(self) -> str | None:
        try:
            entry = await self.kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def hold(self, on_gain: Callback, on_loss: Callback, stop: asyncio.Event) -> None:
        """Compete for the lease until ``stop``: ``on_gain`` when taken, ``on_loss`` when lost or released.
        A bus error while holding counts as a loss (another may take it once the key expires)."""
        every = self.ttl / 3
        try:
            while not stop.is_set():
                try:
                    if self.held:
                        if not await self.renew():
                            await on_loss()
                    elif await self.try_acquire():
                        try:
                            await on_gain()
                        except MarketpipeError as exc:  # e.g. no credentials: let another instance hold it
                            log.error("lease_holder_failed", key=self.key, code=exc.code, error=exc.message)
                            await self.release()
                            await on_loss()
                except BUS_ERRORS as exc:
                    if self.held:
                        log.warning("lease_renew_failed", key=self.key, error=repr(exc))
                        self.revision = None
                        await on_loss()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every):
                        await stop.wait()
        finally:
            if self.held:
                await self.release()
                await on_loss()
