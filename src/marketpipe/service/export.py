"""The Parquet cold tier: ``marketpipe export`` (store → Hive-partitioned Parquet) and reading it back
(``mp.bars(..., source="parquet://…" | "s3://…")``).

The store is read through the protocols of ``store/base.py`` only (``BarStore.read_bars``), so an
export works from any backend. What is exported is what a read returns: the current version of each bar
(one row per symbol and time, the store's feed and source preference), with ``source``, ``feed`` and
``fetched_at`` kept.

Resumable and idempotent, without a manifest: each file is one (symbol, timeframe, UTC month) and holds that
whole month as the store has it, so a file is a function of the store alone; the range asked for is widened
to whole months. Every file records the SHA-256 of its content in its Parquet metadata. A run computes each
month's content, compares its digest with the one in the file's footer and writes only what differs — a rerun
with nothing changed reads footers and writes nothing; a run killed at any point has committed whole files
only (``store/parquet.py`` writes under a temporary name and renames), and the next run skips the months
already written, removes the leftover temporary file and writes the rest. The dataset then equals what one
uninterrupted run writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from marketpipe.core.config import Config
from marketpipe.core.errors import MarketpipeError, NothingToExport
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import EXPORT_FILES, EXPORT_ROWS
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import MAX_TIME, MIN_TIME
from marketpipe.store.base import BarStore
from marketpipe.store.parquet import (
    Month,
    ParquetDataset,
    content_hash,
    file_table,
    month_of,
    month_start,
    months,
    next_month,
    open_dataset,
)

log = get_logger("marketpipe.export")


@dataclass
class ExportStats:
    """What one export did. ``files_total`` counts the months that hold bars (known once each is read)."""

    target: str
    timeframe: str
    symbols: list[str] = field(default_factory=list)
    months_planned: int = 0  # upper bound, for a progress bar: months in the widened range of each symbol
    months_done: int = 0
    files_written: int = 0
    files_unchanged: int = 0
    rows_written: int = 0
    rows_seen: int = 0
    bytes_written: int = 0
    leftovers_removed: int = 0  # temporary files of an interrupted run, removed
    empty_symbols: list[str] = field(default_factory=list)  # nothing held in the range
    per_symbol: dict[str, dict[str, int]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def rows_per_second(self) -> float:
        return self.rows_seen / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["started"], doc["finished"]
        doc["seconds"] = round(self.seconds, 3)
        doc["rows_per_second"] = round(self.rows_per_second, 1)
        return doc


ProgressFn = Callable[[ExportStats], None]


def held_spans(
    store: BarStore, symbols: list[str], timeframe: str, start: datetime | None, end: datetime | None
) -> dict[str, tuple[datetime, datetime]]:
    """Per symbol that has bars of ``timeframe`` in ``[start, end)`` (an open side: all it holds), the widened
    range to export: from the first month its bars touch to the end of the last. Symbols without are left
    out. Two one-row reads per symbol (its first and last bar in the range), whatever the store holds."""
    lo, hi = start or MIN_TIME, end or MAX_TIME
    out: dict[str, tuple[datetime, datetime]] = {}
    for sym in symbols:
        first = store.read_bars([sym], timeframe, lo, hi, limit=1)
        if first.is_empty():
            continue
        last = store.read_bars([sym], timeframe, lo, hi, limit=1, desc=True)
        a, b = first["ts"][0], last["ts"][0]
        out[sym] = (month_start(month_of(a)), month_start(next_month(month_of(b))))
    return out


def export_bars(
    store: BarStore,
    dataset: ParquetDataset,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    progress: ProgressFn | None = None,
) -> ExportStats:
    """Write the store's bars of ``symbols`` to ``dataset`` (see the module doc). Raises NOTHING_TO_EXPORT,
    before anything is written, when no symbol has bars in the range; the dataset's typed errors
    (unreachable, missing bucket, denied, OUTPUT_ERROR) otherwise, with whole files only left behind."""
    tf = str(timeframe)
    stats = ExportStats(target=dataset.url, timeframe=tf, symbols=list(symbols))
    try:
        spans = held_spans(store, symbols, tf, start, end)
        stats.empty_symbols = [s for s in symbols if s not in spans]
        if not spans:
            raise NothingToExport(_nothing(symbols, tf, start, end), details={"symbols": symbols, "timeframe": tf})
        dataset.check(create=True)
        stats.months_planned = sum(len(months(a, b)) for a, b in spans.values())
        for sym, (a, b) in spans.items():
            _export_symbol(store, dataset, sym, tf, a, b, stats, progress)
    except MarketpipeError as exc:
        log.info("export_failed", code=exc.code, target=dataset.url, error=exc.message)
        raise
    stats.finished = time.perf_counter()
    log.info(
        "export_done",
        target=dataset.url,
        timeframe=tf,
        written=stats.files_written,
        unchanged=stats.files_unchanged,
        rows=stats.rows_seen,
        seconds=round(stats.seconds, 3),
    )
    return stats


def _export_symbol(
    store: BarStore,
    dataset: ParquetDataset,
    sym: str,
    tf: str,
    start: datetime,
    end: datetime,
    stats: ExportStats,
    progress: ProgressFn | None,
) -> None:
    found, leftovers = dataset.files(sym, tf)
    if leftovers:
        dataset.remove(leftovers)
        stats.leftovers_removed += len(leftovers)
        log.info("export_leftovers_removed", symbol=sym, files=len(leftovers))
    mine = stats.per_symbol.setdefault(sym, {"files_written": 0, "files_unchanged": 0, "rows": 0})
    # one store read per year of months keeps memory bounded (a year of minute bars is ~100k rows)
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(end, datetime(chunk_start.year + 1, 1, 1, tzinfo=UTC))
        frame = store.read_bars([sym], tf, chunk_start, chunk_end)
        parts = _by_month(frame)
        for m in months(chunk_start, chunk_end):
            stats.months_done += 1
            part = parts.get(m)
            if part is not None:
                _export_month(dataset, sym, tf, m, part, m in found, stats, mine)
            if progress is not None:
                progress(stats)
        chunk_start = chunk_end


def _by_month(frame: pl.DataFrame) -> dict[Month, pl.DataFrame]:
    if frame.is_empty():
        return {}
    keyed = frame.with_columns(_y=pl.col("ts").dt.year(), _m=pl.col("ts").dt.month())
    return {
        (int(y), int(m)): part.drop("_y", "_m")
        for (y, m), part in keyed.partition_by("_y", "_m", as_dict=True, maintain_order=True).items()
    }


def _export_month(
    dataset: ParquetDataset,
    sym: str,
    tf: str,
    m: Month,
    part: pl.DataFrame,
    exists: bool,
    stats: ExportStats,
    mine: dict[str, int],
) -> None:
    table = file_table(sym, part)
    digest = content_hash(table)
    path = dataset.path(sym, tf, m)
    stats.rows_seen += table.num_rows
    mine["rows"] += table.num_rows
    if exists and dataset.stored_hash(path) == digest:
        stats.files_unchanged += 1
        mine["files_unchanged"] += 1
        EXPORT_FILES.labels("unchanged").inc()
        return
    stats.bytes_written += dataset.write(path, table, digest)
    stats.files_written += 1
    stats.rows_written += table.num_rows
    mine["files_written"] += 1
    EXPORT_FILES.labels("written").inc()
    EXPORT_ROWS.labels(tf).inc(table.num_rows)


def _nothing(symbols: list[str], tf: str, start: datetime | None, end: datetime | None) -> str:
    when = f" in [{start.isoformat() if start else '…'}, {end.isoformat() if end else '…'})" if start or end else ""
    return (
        f"the store holds no {tf} bars of {', '.join(symbols)}{when}: nothing to export "
        "(`marketpipe store info` lists what it holds)"
    )


def read_dataset(
    url: str,
    config: Config,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    env: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Bars of ``symbols`` in ``[start, end)`` from the cold tier at ``url`` (``parquet://PATH``, a path or
    ``s3://BUCKET/prefix``): the frame a store read returns (``BAR_SCHEMA``, ordered by symbol then ts).
    DATASET_NOT_FOUND when nothing is there; a symbol the dataset lacks gives no rows, as from a store."""
    dataset = open_dataset(url, config.export, env=env, parameter="source")
    try:
        dataset.check(create=False)
        return dataset.read_bars(symbols, str(timeframe), start, end)
    except MarketpipeError as exc:
        log.warning("cold_read_failed", code=exc.code, source=dataset.url, error=exc.message)
        raise
