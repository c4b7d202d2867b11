"""What the crypto and options lanes of the live hub share: a primary stream that is one client of
a shared upstream hub (:class:`~.crypto.CryptoHub` per location, :class:`~.options.OptionsLive` per
feed), so ``/v1/stream`` and the Alpaca-compatible stream of that asset class hold one vendor
connection between them.

:class:`LaneStream` keeps the references per (channel, symbol) — the hub client is routed once for
each — and reconciles the client's subscriptions with them. When the upstream cannot be reached the
references stay counted and are applied again with jittered exponential backoff, and the subclass's
``health()`` says disconnected (one reconnect per failed attempt), so the lane's router fails over as
it does for a lost stock stream. A subclass says how its hub client is routed (:meth:`_held`,
:meth:`_change`), reads its client (``_read``) and builds its records; delivery to the hub's batch
handlers is shared (:meth:`_handle`).
"""

from __future__ import annotations

import asyncio
import inspect
import random
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from marketpipe.core.errors import MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.providers.alpaca_stream import BatchHandler, StreamMessage

log = get_logger("marketpipe.service.live")

Ref = tuple[str, str]  # (channel, symbol)


class LaneStream(ABC):
    """The shared part of a lane's primary stream (see the module docstring). ``kind`` names it in
    log events and task names (``crypto_live``, ``options_live``); ``lane`` is its location or feed."""

    kind = "lane_live"

    def __init__(self, lane: str, *, base_backoff_s: float = 0.2, max_backoff_s: float = 10.0) -> None:
        self.lane = lane
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self.refs: Counter[Ref] = Counter()
        self._handlers: list[BatchHandler] = []
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self.error: MarketpipeError | None = None
        self.failures = 0  # failed attempts to reach the upstream
        self.messages = 0
        self.decode_errors = 0
        self.by_channel: Counter[str] = Counter()
        self.last_message_at: dict[str, datetime] = {}
        self._closed = False

    # --- what a subclass provides -------------------------------------------------------------------
    @abstractmethod
    def _held(self) -> set[Ref]:
        """What the hub client is subscribed to now, in the terms of :meth:`_wanted`."""

    @abstractmethod
    async def _change(self, channel: str, symbols: list[str], add: bool) -> None:
        """Subscribe (``add``) or release the hub client's ``symbols`` on ``channel``."""

    @abstractmethod
    async def _read(self) -> None:
        """Read the hub client until closed, handing each batch on through :meth:`_handle`."""

    def _wanted(self) -> set[Ref]:
        """What the references want of the hub client (a subclass may map channel names)."""
        return {k for k, n in self.refs.items() if n > 0}

    # --- the stream interface the hub uses ----------------------------------------------------------
    async def start(self) -> None:
        if self._reader is None and not self._closed:
            self._reader = asyncio.create_task(self._read(), name=f"{self.kind}-{self.lane}")

    def add_batch_handler(self, handler: BatchHandler) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    async def subscribe(self, **channels: Iterable[str]) -> None:
        for ch, syms in channels.items():
            for s in syms:
                self.refs[(ch, s)] += 1
        await self._reconcile()

    async def unsubscribe(self, **channels: Iterable[str]) -> None:
        for ch, syms in channels.items():
            for s in syms:
                if self.refs[(ch, s)] > 0:
                    self.refs[(ch, s)] -= 1
                if self.refs[(ch, s)] == 0:
                    del self.refs[(ch, s)]
        await self._reconcile()

    def subscription_counts(self) -> dict[str, dict[str, int]]:
        """The references as ``health().subscriptions`` shows them: channel -> symbol -> count."""
        subs: dict[str, dict[str, int]] = defaultdict(dict)
        for (ch, s), n in self.refs.items():
            subs[ch][s] = n
        return dict(subs)

    # --- shared machinery ---------------------------------------------------------------------------
    async def _reconcile(self) -> None:
        """Make the hub client hold what the references want; on failure keep trying in the background."""
        async with self._lock:
            want, have = self._wanted(), self._held()
            try:
                for delta, add in ((want - have, True), (have - want, False)):
                    by: dict[str, list[str]] = defaultdict(list)
                    for ch, s in sorted(delta):
                        by[ch].append(s)
                    for ch, syms in by.items():
                        await self._change(ch, syms, add)
                self.error = None
            except MarketpipeError as exc:
                self.error = exc
                self.failures += 1
                log.warning(f"{self.kind}_upstream_unavailable", lane=self.lane, code=exc.code, error=exc.message)
                if self._retry is None or self._retry.done():
                    self._retry = asyncio.create_task(self._retry_later(), name=f"{self.kind}-retry-{self.lane}")

    async def _retry_later(self) -> None:
        attempt = 0
        while self.error is not None and not self._closed:
            await asyncio.sleep(random.uniform(0, min(self.max_backoff_s, self.base_backoff_s * 2**attempt)))
            attempt += 1
            await self._reconcile()  # a failure here finds this task running: no second retrier

    def _received(self, channel: str, now: datetime) -> None:
        self.by_channel[channel] += 1
        self.last_message_at[channel] = now

    async def _handle(self, out: list[StreamMessage]) -> None:
        """Hand a batch of records to every batch handler (the hub's); a handler's bug is logged."""
        self.messages += len(out)
        if not out:
            return
        for h in list(self._handlers):
            try:
                r = h(out)
                if r is not None and inspect.isawaitable(r):
                    await r
            except Exception as exc:  # noqa: BLE001 -- a consumer's bug must not stop the feed
                log.error(f"{self.kind}_handler_failed", error=repr(exc))

    async def _stop_tasks(self, *extra: asyncio.Task[Any]) -> None:
        """Mark closed and cancel the reader, the retrier and ``extra`` tasks (not the calling one)."""
        self._closed = True
        for t in (self._reader, self._retry, *extra):
            if t is not None and t is not asyncio.current_task():
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)


__all__ = ["LaneStream", "Ref"]
