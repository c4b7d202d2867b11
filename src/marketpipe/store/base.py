"""The Store interface. DuckDB implements it now; a PostgreSQL backend will implement the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import polars as pl

COVERAGE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "provider": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "start": pl.Datetime("us", "UTC"),
    "end": pl.Datetime("us", "UTC"),
    "rows": pl.Int64(),
    "request_id": pl.String(),
    "fetched_at": pl.Datetime("us", "UTC"),
}


@dataclass(frozen=True, slots=True)
class Coverage:
    """``[start, end)`` of ``symbol``/``timeframe`` was fetched from ``provider`` (rows may be 0)."""

    symbol: str
    timeframe: str
    provider: str
    source: str
    feed: str
    start: datetime
    end: datetime
    rows: int
    request_id: str
    fetched_at: datetime


@dataclass(slots=True)
class IngestRecord:
    provider: str
    source: str
    feed: str
    kind: str
    timeframe: str
    symbols: list[str]
    start: datetime
    end: datetime
    request_id: str
    page: int
    fetched_at: datetime
    rows_received: int
    rows_stored: int = 0
    rows_rejected: int = 0


@dataclass(slots=True)
class PageWrite:
    """Everything one vendor page leaves behind, written in one transaction (all or nothing)."""

    bars: pl.DataFrame
    quarantine: pl.DataFrame
    coverage: list[Coverage]
    ingest: IngestRecord
    stored: int = field(default=0)
    anomalies: pl.DataFrame | None = None  # findings on this page's bars (quality.anomaly.FINDINGS_SCHEMA)
    # A refresh re-fetches held ranges: rows whose values differ from what is held are stored as a
    # newer version (reads prefer the newest fetch) and recorded in the revisions table.
    refresh: bool = False
    revised: int = field(default=0)


class Store(Protocol):
    path: str

    def write_pages(self, pages: list[PageWrite]) -> list[int]:
        """Write pages atomically (one transaction); returns rows newly stored per page."""

    def read_bars(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        *,
        source: str | None = None,
        feed: str | None = None,
    ) -> pl.DataFrame: ...

    def coverage(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        *,
        provider: str | None = None,
        feed: str | None = None,
    ) -> pl.DataFrame: ...

    def quarantine(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame: ...

    def ingest_log(self, limit: int = 100) -> pl.DataFrame: ...

    def close(self) -> None: ...
