"""L1 of a store's bar reads: the answers of recent reads, whole frames, kept in-process.

Only for a store no other process can write while this one has it open — a DuckDB file (DuckDB locks
it: one process that reads and writes, or several that only read). Every bar write through any store
object of this process on the same file bumps that file's *generation* (:meth:`HotRanges.bump`; the
path is resolved, so two spellings of one file share it). An answer is given again only while the
generation it was read under is current, so a write is seen by the next read from every store object
on the file, whichever wrote it. A store server (PostgreSQL: many writers, other machines) has no L1.

Frames are returned as shallow clones (polars shares the column buffers): a caller setting an
attribute on its frame — ``service.data`` labels adjusted frames — never changes what is kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager

import polars as pl

from marketpipe.core import metrics

TIER = "store_l1"
DEFAULT_READ_CACHE_BYTES = 64 * 1024 * 1024

_generations: dict[tuple[str, str], int] = {}  # (resolved path, kind) -> writes seen
_generations_lock = threading.Lock()


class HotRanges:
    """LRU of read answers bounded by ``max_bytes`` (polars' ``estimated_size``). An answer larger than
    a quarter of the budget is not kept: one 10-year read must not push out every hot day."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path if path == ":memory:" else os.path.realpath(path)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[int, pl.DataFrame, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def generation(self, kind: str = "bars") -> int:
        """The store's write generation of ``kind`` now: ``bars`` (any bar write: what the L1 checks; taken
        before a read and given to :meth:`put` with its answer), or what a caller bumps for itself
        (``store.duckdb``: ``actions``, and ``1Day`` per symbol, for ``adjust_fingerprint``)."""
        return _generations.get((self.path, kind), 0)

    def bump(self, kind: str = "bars") -> None:
        """A write of ``kind`` to this store (for ``bars``: called inside the write's lock, after its commit or
        its rollback; a spurious bump only costs a re-read)."""
        with _generations_lock:
            _generations[(self.path, kind)] = _generations.get((self.path, kind), 0) + 1

    def answer(
        self,
        what: str,
        key: Hashable,
        kind: str,
        lock: AbstractContextManager[object],
        load: Callable[[], pl.DataFrame],
    ) -> pl.DataFrame:
        """The answer to the read ``(what, key)``: kept, while the generation of ``kind`` (the writes that
        change it) is the one it was read under; else ``load()``-ed under the store's ``lock``, with the
        generation taken first (a write committed during the read makes the answer stale, never kept
        fresh), and kept."""
        held = self._get((what, key), kind)
        if held is not None:
            metrics.CACHE_REQUESTS.labels(TIER, what, "hit").inc()
            return held
        if self.max_bytes > 0:
            metrics.CACHE_REQUESTS.labels(TIER, what, "miss").inc()
        with lock:
            gen = self.generation(kind)
            frame = load()
        return self._put((what, key), kind, gen, frame)

    def _get(self, key: Hashable, kind: str) -> pl.DataFrame | None:
        if self.max_bytes <= 0:
            return None
        gen = self.generation(kind)
        with self._lock:
            held = self._entries.get(key)
            if held is not None and held[0] == gen:
                self._entries.move_to_end(key)
                return held[1].clone()
            if held is not None:  # read before a write: dropped
                self._drop(key)
        return None

    def _put(self, key: Hashable, kind: str, gen: int, frame: pl.DataFrame) -> pl.DataFrame:
        # kept with the generation it was read under; the caller gets its own clone
        if self.max_bytes <= 0:
            return frame
        size = int(frame.estimated_size())
        if size > self.max_bytes // 4:
            metrics.CACHE_EVICTIONS.labels(TIER, "oversize").inc()
            return frame
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (gen, frame, size)
            self._bytes += size
            metrics.CACHE_BYTES.labels(TIER).inc(size)
            metrics.CACHE_ENTRIES.labels(TIER).inc()
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                metrics.CACHE_EVICTIONS.labels(TIER, "lru").inc()
        return frame.clone()

    def clear(self) -> None:
        """Everything dropped (the store is closing)."""
        with self._lock:
            while self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: Hashable) -> None:
        # the gauges are the process's totals over every store object's L1
        _, _, size = self._entries.pop(key)
        self._bytes -= size
        metrics.CACHE_BYTES.labels(TIER).dec(size)
        metrics.CACHE_ENTRIES.labels(TIER).dec()
