"""Many gateways, one upstream stream: the Alpaca stream is held by one process, chosen by a lease.

Alpaca allows one stream connection per account and feed. With a bus (``[bus] url``), every gateway's
:class:`~.hub.LiveHub` is given a :class:`BusStream` instead of its own :class:`AlpacaStream`: it reads the
upstream frames from ``mp.live.<feed>`` (core NATS: one message per upstream frame, trap 10) and writes the
references its clients hold to the KV key ``subs.<feed>.<instance>``. Beside it, every gateway runs an
:class:`UpstreamOwner` that competes for the lease ``stream.owner.<feed>`` (:class:`~marketpipe.bus.lease.Lease`):
the holder opens the one :class:`AlpacaStream`, subscribes the union of every instance's references, and
publishes each frame it receives. When the owner dies its lease expires after ``[bus] lease_ttl`` and another
gateway takes it and connects upstream; the hubs see a silent stream meanwhile, which their data-source
router handles as it does a dropped connection (the fallback poller, labelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec
import nats.js.errors

from marketpipe.bus import subjects
from marketpipe.bus.client import BUS_ERRORS, Bus
from marketpipe.bus.frames import decode_frame, encode_frame
from marketpipe.bus.lease import Lease, lease_bucket
from marketpipe.core.config import Config
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import STREAM_LEASE_HELD
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_stream import (
    AlpacaStream,
    BatchHandler,
    Outage,
    ReconnectHook,
    StreamHealth,
    StreamMessage,
)

log = get_logger("marketpipe.service.live.shared")
SUBS_BUCKET = "mp_subs"


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _feed(config: Config) -> str:
    return config.stream.feed or config.provider("alpaca", AlpacaConfig).feed


async def subs_bucket(bus: Bus) -> Any:
    return await bus.js.create_key_value(
        nats.js.api.KeyValueConfig(bucket=SUBS_BUCKET, ttl=max(30.0, bus.cfg.lease_ttl * 3), history=1)
    )


class BusStream:
    """What a :class:`LiveHub` needs of its upstream stream, served from the bus."""

    def __init__(self, bus: Bus, feed: str, instance: str) -> None:
        self.bus = bus
        self.feed = feed
        self.instance = instance
        self.refs: Counter[tuple[str, str]] = Counter()
        self._handlers: list[BatchHandler] = []
        self._sub: Any = None
        self._kv: Any = None
        self._refresh: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self.messages = 0
        self.frames = 0
        self.latency_ns: list[int] = []  # owner publish → here, per frame (the bench reads it)
        self.keep_latency = False
        self._last: dict[str, datetime] = {}
        self._since: datetime | None = None
        self._owner_sub: Any = None
        self.owner: str | None = None  # the instance holding the upstream stream, as it announced itself
        self.owner_changes = 0
        # called with the window between the old owner's last frame and the new owner's start, so the
        # hub's bar writer fetches the missed minute bars over REST (the hub's on_outage)
        self.on_reconnect: ReconnectHook | None = None

    @property
    def key(self) -> str:
        return f"{subjects.token(self.feed)}.{subjects.token(self.instance)}"

    async def start(self) -> None:
        if self._sub is not None:
            return
        self._kv = await subs_bucket(self.bus)
        self._sub = await self.bus.nc.subscribe(subjects.live(self.feed), cb=self._on_frame)
        self._owner_sub = await self.bus.nc.subscribe(subjects.live(self.feed) + ".owner", cb=self._on_owner)
        self._since = utcnow()
        self._refresh = asyncio.create_task(self._keep_subs(), name="bus-stream-subs")

    async def _on_frame(self, msg: Any) -> None:
        import time

        try:
            sent_ns, recs = decode_frame(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError, IndexError) as exc:
            log.warning("live_frame_undecodable", error=repr(exc))
            return
        if self.keep_latency:
            self.latency_ns.append(time.time_ns() - sent_ns)
        self.frames += 1
        self.messages += len(recs)
        now = utcnow()
        msgs = [StreamMessage(ch, rec) for ch, rec in recs]
        for ch, _ in recs:
            self._last[ch] = now
        for h in list(self._handlers):
            try:
                r = h(msgs)
                if r is not None and inspect.isawaitable(r):
                    await r
            except Exception as exc:  # noqa: BLE001 -- a consumer's bug must not stop the feed
                log.error("live_handler_failed", error=repr(exc))

    async def _on_owner(self, msg: Any) -> None:
        """A new owner announced itself: when it replaces another, the time between is an outage."""
        try:
            doc = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            return
        new, previous = str(doc.get("owner")), self.owner
        self.owner = new
        # frames came before from an owner that started before this gateway (unannounced here): a change too
        if previous == new or (previous is None and not self.frames):
            return
        self.owner_changes += 1
        now = utcnow()
        last = max(self._last.values()) if self._last else None
        log.warning("live_stream_owner_changed", previous=previous, owner=new, last_frame=last)
        if self.on_reconnect is not None:
            try:
                r = self.on_reconnect(Outage(last or now, now, last, "stream owner changed", self.feed))
                if r is not None:
                    await r
            except Exception as exc:  # noqa: BLE001 -- the hook's failure must not stop the feed
                log.error("live_outage_hook_failed", error=repr(exc))

    def wanted(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for (ch, sym), n in self.refs.items():
            if n > 0:
                out.setdefault(ch, []).append(sym)
        return {ch: sorted(v) for ch, v in out.items()}

    async def _keep_subs(self) -> None:
        """Write this instance's references to the KV (on change, and every third of the lease TTL so
        the key outlives no dead gateway)."""
        every = self.bus.cfg.lease_ttl / 3
        while True:
            with contextlib.suppress(*BUS_ERRORS):
                await self._kv.put(self.key, msgspec.json.encode(self.wanted()))
            self._dirty.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._dirty.wait()

    async def subscribe(self, **channels: Iterable[str]) -> None:
        for ch, syms in channels.items():
            for s in syms:
                self.refs[(ch, s)] += 1
        self._dirty.set()

    async def unsubscribe(self, **channels: Iterable[str]) -> None:
        for ch, syms in channels.items():
            for s in syms:
                if self.refs[(ch, s)] > 0:
                    self.refs[(ch, s)] -= 1
        self._dirty.set()

    def add_batch_handler(self, handler: BatchHandler) -> Any:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    async def reconnect(self, reason: str = "requested") -> bool:
        return False  # the owner holds the upstream connection

    def health(self) -> StreamHealth:
        return StreamHealth(
            connected=self.bus.nc.is_connected,
            feed=self.feed,
            url=f"{self.bus.url} {subjects.live(self.feed)}",
            encoding="msgpack",
            source="alpaca",
            connected_since=self._since,
            last_message_at=dict(self._last),
            messages_received=self.messages,
            messages_by_channel={},
            reconnects=0,
            connections=1,
            errors_by_code={},
            decode_errors=0,
            handler_errors=0,
            subscriptions={ch: dict.fromkeys(v, 1) for ch, v in self.wanted().items()},
            server_subscriptions=self.wanted(),
            last_error=None,
            next_retry_at=None,
            stopped=False,
            stop_error=None,
        )

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        if self._kv is not None:
            with contextlib.suppress(*BUS_ERRORS):
                await self._kv.delete(self.key)
        for sub in (self._sub, self._owner_sub):
            if sub is not None:
                with contextlib.suppress(*BUS_ERRORS):
                    await sub.unsubscribe()
        self._sub = self._owner_sub = None


class UpstreamOwner:
    """Competes for the feed's lease; while holding it, runs the one upstream stream for every gateway."""

    def __init__(
        self, config: Config, bus: Bus, instance: str, *, env: dict[str, str] | None = None, sync_seconds: float = 0.5
    ) -> None:
        self.config = config
        self.bus = bus
        self.feed = _feed(config)
        self.instance = instance
        self.env = env
        self.sync_seconds = sync_seconds
        self.stream: AlpacaStream | None = None
        self.lease: Lease | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sync: asyncio.Task[None] | None = None
        self._have: set[tuple[str, str]] = set()
        self.published = 0
        self.gained = 0
        self.raw: Any = None  # a Publisher into MP_RAW when [bus] raw_log is on (bounded: drops are counted)

    @property
    def holds(self) -> bool:
        return self.lease is not None and self.lease.held

    async def start(self) -> None:
        if self.bus.cfg.raw_log:
            from marketpipe.bus.client import Publisher

            self.raw = Publisher(self.bus).start()
        kv = await lease_bucket(self.bus, self.bus.cfg.lease_ttl)
        self.lease = Lease(kv, f"stream.owner.{subjects.token(self.feed)}", self.instance, self.bus.cfg.lease_ttl)
        self._task = asyncio.create_task(self.lease.hold(self._gained, self._lost, self._stop), name="stream-lease")

    async def _gained(self) -> None:
        from marketpipe.service.live.hub import stream_url

        s = self.config.stream
        self.gained += 1
        STREAM_LEASE_HELD.labels(self.feed).set(1)
        self.stream = AlpacaStream(
            self.feed,
            base_url=stream_url(self.config),
            env=self.env,
            encoding="json" if s.encoding == "json" else "msgpack",
            stale_seconds=s.stale_seconds,
        )
        self.stream.add_batch_handler(self._publish)
        self._have = set()
        self._sync = asyncio.create_task(self._run_sync(), name="stream-owner-sync")
        with contextlib.suppress(*BUS_ERRORS):
            await self.bus.nc.publish(
                subjects.live(self.feed) + ".owner", msgspec.json.encode({"owner": self.instance, "at": utcnow()})
            )
        log.info("stream_owner_started", feed=self.feed, instance=self.instance)

    async def _lost(self) -> None:
        STREAM_LEASE_HELD.labels(self.feed).set(0)
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
            self._sync = None
        if self.stream is not None:
            await self.stream.close()
            self.stream = None
        log.warning("stream_owner_stopped", feed=self.feed, instance=self.instance)

    async def _publish(self, msgs: list[StreamMessage]) -> None:
        with contextlib.suppress(*BUS_ERRORS):
            await self.bus.nc.publish(subjects.live(self.feed), encode_frame([(m.channel, m.record) for m in msgs]))
            self.published += 1
        if self.raw is not None:
            from marketpipe.bus.envelope import Envelope

            env = Envelope(
                "raw",
                f"raw:alpaca:{self.feed}:{self.instance}:{self.published}",
                source="alpaca",
                data={"feed": self.feed, "messages": [[m.channel, msgspec.to_builtins(m.record)] for m in msgs]},
            )
            self.raw.put(subjects.raw("alpaca", "frame", self.feed), env)

    async def _union(self) -> set[tuple[str, str]]:
        kv = await subs_bucket(self.bus)
        want: set[tuple[str, str]] = set()
        prefix = f"{subjects.token(self.feed)}."
        try:
            keys = await kv.keys()  # no server-side filter before nats-server 2.10
        except nats.js.errors.NoKeysError:
            return want
        for k in (k for k in keys if k.startswith(prefix)):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await kv.get(k)
                for ch, syms in msgspec.json.decode(entry.value or b"{}").items():
                    want |= {(ch, s) for s in syms}
        return want

    async def _run_sync(self) -> None:
        """Keep the upstream subscriptions equal to the union of every gateway's references."""
        while True:
            try:
                want = await self._union()
                stream = self.stream
                if stream is not None:
                    add, drop = want - self._have, self._have - want
                    if add:
                        await stream.start()
                        await stream.subscribe(**_by_channel(add))
                    if drop:
                        await stream.unsubscribe(**_by_channel(drop))
                    self._have = want
            except BUS_ERRORS as exc:
                log.warning("stream_owner_sync_failed", error=repr(exc))
            await asyncio.sleep(self.sync_seconds)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self.raw is not None:
            await self.raw.aclose()


def _by_channel(pairs: set[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ch, s in sorted(pairs):
        out.setdefault(ch, []).append(s)
    return out


class BusLink:
    """A gateway's ties to the bus: the connection, the event publisher (``core.events`` onto the bus)
    and, with streaming on, the hub's :class:`BusStream` and this instance's :class:`UpstreamOwner`."""

    def __init__(self, bus: Bus, publisher: Any, unsubscribe: Any) -> None:
        self.bus = bus
        self.publisher = publisher
        self._unsubscribe = unsubscribe
        self.stream: BusStream | None = None
        self.owner: UpstreamOwner | None = None

    @classmethod
    async def open(cls, config: Config, *, env: dict[str, str] | None = None, live: bool = True) -> BusLink:
        from marketpipe.bus.client import Publisher, connect, wire_events

        bus = await connect(config.bus, name="marketpipe-gateway")
        await bus.ensure_streams()
        publisher = Publisher(bus).start()
        link = cls(bus, publisher, wire_events(publisher))
        if live:
            instance = instance_id()
            link.stream = BusStream(bus, _feed(config), instance)
            link.owner = UpstreamOwner(config, bus, instance, env=env)
            await link.owner.start()
        return link

    async def aclose(self) -> None:
        self._unsubscribe()
        if self.owner is not None:
            await self.owner.close()
        if self.stream is not None:
            await self.stream.close()
        await self.publisher.aclose()
        await self.bus.close()
