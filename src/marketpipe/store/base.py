"""What the services need from a store, as role protocols; DuckDB (``store/duckdb.py``) and
PostgreSQL (``store/postgres.py``) implement them (each is one reading of these contracts, not a
part of them; ``tests/store`` runs against both).

The roles, by who uses them:

* :class:`BarStore` — ingest and serving (backfill, maintenance, the gateway, the live bar writer):
  bars, the coverage ledger, and the page write that also leaves quarantine, ingest-log, anomaly
  and revision rows.
* :class:`QualityStore` — data quality (``service/quality``, ``service/reconcile``, the gateway's
  scores): findings, day scores and reconciliation results, over the bars it also reads.
* :class:`OpsStore` — operations: scheduled runs, the live stream's previous closes, and what the
  ``marketpipe store ...`` commands and the health check inspect.
* :class:`ActionStore` — corporate actions (``service/actions``, adjust-on-read): actions as
  received and versioned, their ledger, and the actions quarantined for impossible values.
* :class:`OptionStore` — option chain history (``service/options``): snapshot rows as received over
  time, and the option rows quarantined by the checks.
* :class:`Store` — all of them plus closing, for code that owns a store (``MarketData``, the CLI).

Rules common to every method:

* Times go in and come out UTC-aware (``datetime`` with ``tzinfo=UTC``; frame columns
  ``Datetime("us", "UTC")``). A backend without time zones stores naive UTC.
* Ranges are half-open: ``[start, end)`` holds rows with ``start <= ts < end``.
* Frames come back with the columns of the table they read (``core/tables.py``), in that order
  and with those types. Nothing found is an empty frame with those columns (or an empty dict),
  never an error and never ``None``.
* A failure of the backend is a ``StoreError`` (code ``STORE_ERROR``) with ``details["path"]``;
  a failed write has written nothing.
* A store is used from one thread at a time (services call it through ``asyncio.to_thread``
  from one writer); it need not be thread-safe beyond that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import orjson
import polars as pl

from marketpipe.core.schema import ACTION_COLUMNS, WITHDRAWN_PREFIX
from marketpipe.core.tables import BarTables, Table, bar_tables


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
    """One vendor page as received: becomes one ``ingest_log`` row (``rows_stored`` is set by the write)."""

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
    anomalies: pl.DataFrame | None = None  # findings on this page's bars (core.tables.FINDINGS_SCHEMA)
    # A refresh re-fetches held ranges: rows whose values differ from what is held are stored as a
    # newer version (reads prefer the newest fetch) and recorded in the revisions table.
    refresh: bool = False
    revised: int = field(default=0)


# The tables ``counts()`` reports (``marketpipe store info``), on every backend.
COUNTED = (
    "bars",
    "quarantine",
    "coverage",
    "ingest_log",
    "crypto_bars",
    "crypto_quarantine",
    "option_snapshots",
    "option_quarantine",
)


def by_asset_class(pages: list[PageWrite]) -> list[tuple[BarTables, list[int]]]:
    """The pages' indexes grouped by the tables their bars go to (a page holds one asset class:
    its request's symbols), in order of first appearance; what both backends' page writes use."""
    groups: dict[str, tuple[BarTables, list[int]]] = {}
    for i, page in enumerate(pages):
        tables = bar_tables(page.ingest.symbols)
        groups.setdefault(tables.bars.name, (tables, []))[1].append(i)
    return list(groups.values())


@runtime_checkable
class BarStore(Protocol):
    """Bars and the coverage ledger: what the backfill, maintenance, the gateway and the live bar
    writer use.

    The bars table's key is (symbol, timeframe, ts, source, feed). Rows are never edited or deleted:
    a refresh that finds other values stores a newer version and a revision row. Crypto pairs' bars
    live in tables of their own (``core/tables.CRYPTO_TABLES``: float volume) behind the same methods;
    which tables a call uses follows from its symbols (one asset class per call).
    """

    def write_pages(self, pages: list[PageWrite]) -> list[int]:
        """Write every page in ONE transaction: its bars, quarantine rows, anomaly findings, coverage
        entries and one ingest-log row per page. All pages or none: on any failure nothing is kept
        and ``StoreError`` is raised.

        Idempotent: a bar whose key is already held is skipped (not an error, not counted), so the
        same pages written twice store each bar once. Findings already held (same symbol,
        timeframe, ts, kind) are skipped likewise. With ``page.refresh`` a bar held under its key
        with other values is stored again as the newer version (reads prefer the newest fetch) and
        recorded in the revisions table; ``page.revised`` is set to how many.

        Returns the rows newly stored per page (same order) and sets ``page.stored`` to it; the
        ingest-log row records that number as ``rows_stored``. Counts ``ROWS_STORED`` per page.
        """

    def read_bars(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        *,
        source: str | None = None,
        feed: str | None = None,
        sources: list[str] | None = None,
        limit: int | None = None,
        after: tuple[str, datetime] | None = None,
        desc: bool = False,
    ) -> pl.DataFrame:
        """Bars of ``symbols`` in ``[start, end)`` (``BAR_SCHEMA`` columns), ordered by symbol, then
        ts (descending within each symbol with ``desc``).

        Without both ``source`` and ``feed`` one row per (symbol, ts) comes back when several are
        held: SIP before other feeds before IEX, a real source before one whose label starts with
        ``sim``, then the newest ``fetched_at``. ``source``/``feed`` restrict to that label;
        ``sources`` to any of those labels.

        Paging: ``after`` = (symbol, ts) keeps only rows past that position in the order above;
        ``limit`` caps the rows returned. Nothing held: an empty frame.
        """

    def coverage(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        *,
        provider: str | None = None,
        feed: str | None = None,
    ) -> pl.DataFrame:
        """Ledger entries (``COVERAGE_SCHEMA``) of ``symbols``/``timeframe`` that overlap
        ``[start, end)`` (``entry.start < end and entry.end > start``), ordered by symbol, start;
        optionally only those of one provider / feed. An entry says its range was fetched and
        holds ``rows`` bars (0: the vendor confirmed it empty). No entry: the range was never fetched."""

    def covered_until(self, symbols: list[str], timeframe: str) -> dict[str, datetime]:
        """Per symbol, the ``end`` of its newest ledger entry (any provider). Symbols never fetched
        are absent from the answer."""


@runtime_checkable
class QualityStore(BarStore, Protocol):
    """Derived quality data: anomaly findings, per-day scores and vendor reconciliation. Scoring
    reads the bars, the ledger and the quarantine it scores, so a quality store is a bar store too.

    Findings and scores are derived: re-running an analysis replaces them. Reconciliation runs are
    kept side by side (each has its ``run_id``)."""

    def quarantined_at(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        """``symbol``, ``ts`` of every quarantined row in ``[start, end)`` (one per row, not
        de-duplicated; rows whose time could not be read have a null ts and are not included)."""

    def findings(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Stored findings (the ``anomalies`` table's columns) in ``[start, end)``, ordered by
        symbol, ts, kind."""

    def replace_findings(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        findings: pl.DataFrame,
        detected_at: datetime,
    ) -> None:
        """In one transaction: delete the findings of ``symbols``/``timeframe`` in ``[start, end)``
        and store ``findings`` (``FINDINGS_SCHEMA``) stamped ``detected_at``. An empty ``findings``
        clears the range. Idempotent."""

    def scores(self, symbol: str, timeframe: str) -> pl.DataFrame:
        """Every stored day score of the symbol (the ``quality_scores`` table's columns), by day."""

    def replace_scores(self, timeframe: str, days: pl.DataFrame) -> None:
        """Store per-day scores (``quality_scores`` columns: a ``symbol`` column, many symbols at
        once) replacing, in one transaction, earlier scores of the same (symbol, day) in
        ``timeframe``. An empty frame writes nothing. Idempotent."""

    def write_reconciliation(self, run_id: str, created_at: datetime, rows: pl.DataFrame) -> int:
        """Append one reconciliation run's per-bar results (``RECONCILE_SCHEMA``) under ``run_id``
        and ``created_at``; earlier runs are kept. Returns the rows written."""

    def reconciliation(self, symbol: str, timeframe: str | None = None, run_id: str | None = None) -> pl.DataFrame:
        """Stored reconciliation rows of one symbol (all runs unless ``run_id``), ordered by ts."""

    def reconciliation_many(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Stored reconciliation rows (every run) of ``symbols`` in ``[start, end)``, in no set order."""


@runtime_checkable
class OpsStore(Protocol):
    """Operations: the scheduler's run log, the live stream's previous closes, and what the
    ``marketpipe store ...`` commands and the health check inspect."""

    path: str  # where the store lives, for messages (a file path; a server URL without password)

    def log_job_runs(self, rows: list[dict[str, object]]) -> None:
        """Append one row per symbol of a scheduled run: dicts with every ``job_runs`` column but
        ``id`` (which the store numbers in insertion order). No rows: nothing written."""

    def job_runs(self, job: str | None = None, limit: int = 100) -> pl.DataFrame:
        """The newest ``limit`` run rows (of one job, or all), newest first."""

    def log_admin_action(self, row: dict[str, object]) -> None:
        """Append one admin request to ``audit_log``: a dict with every column but ``id`` (which the
        store numbers in insertion order). Never edited or deleted."""

    def admin_actions(self, limit: int = 100) -> pl.DataFrame:
        """The newest ``limit`` audit rows, newest first."""

    def save_prev_closes(self, rows: list[tuple[str, date, float, str]]) -> None:
        """Keep (symbol, session, close, source), the close of the session before the current one;
        one row per symbol, a later save replaces it (stamped ``updated_at``)."""

    def prev_closes(self, symbols: list[str]) -> dict[str, tuple[date, float, str]]:
        """Symbol -> (session, close, source) for those of ``symbols`` held; others are absent."""

    def counts(self) -> dict[str, int]:
        """Row counts of the tables in ``COUNTED`` (bars, quarantine, coverage, ingest log, crypto bars and
        their quarantine, option snapshots and their quarantine). Also the health check's probe: raises
        ``StoreError`` when the store cannot be read."""

    def summary(self) -> pl.DataFrame:
        """Per symbol, timeframe, source, feed: ``bars`` (count), ``first`` and ``last`` ts, in that order."""

    def quarantine(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame:
        """Quarantined rows (``QUARANTINE_SCHEMA``: values as received, reasons, request id), of one
        symbol or all, ordered by ts, at most ``limit``."""

    def ingest_log(self, limit: int = 100) -> pl.DataFrame:
        """The newest ``limit`` ingest-log rows (one per vendor page written), newest first."""

    def revisions(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame:
        """Vendor revisions a refresh found (old and new values), of one symbol or all, by ts."""


# The columns whose values make an action's content (a change in any is a vendor correction).
_CONTENT = [c for c in ACTION_COLUMNS if c not in ("fetched_at", "raw")]


def with_content_hash(actions: pl.DataFrame) -> pl.DataFrame:
    """``actions`` plus ``content_hash``: SHA-256 of the content columns (stable across processes and
    versions, unlike polars' own hash; actions are few, so a per-row digest is fine). A withdrawn version
    (``raw`` is marketpipe's withdrawal note) hashes its content with the mark, so it is a new version."""
    marks = [(r or "").startswith(WITHDRAWN_PREFIX) for r in actions["raw"].to_list()]
    digests = [
        hashlib.sha256(orjson.dumps([*row, "withdrawn"] if gone else row, default=str)).hexdigest()
        for row, gone in zip(actions.select(_CONTENT).rows(), marks, strict=True)
    ]
    return actions.with_columns(pl.Series("content_hash", digests, dtype=pl.String))


# An action's adjustment date and its known date (ActionStore below), in SQL both engines speak.
ADJUST_DATE_SQL = "coalesce(ex_date, effective_date, process_date)"
KNOWN_DATE_SQL = (
    "least(coalesce(declaration_date, DATE '9999-12-31'), coalesce(ex_date, effective_date, DATE '9999-12-31'), "
    "coalesce(process_date, DATE '9999-12-31'))"
)


@dataclass(frozen=True, slots=True)
class ActionCoverage:
    """Actions of ``symbol`` with adjustment dates in ``[start, end]`` (inclusive days) were fetched
    from ``provider`` (``rows`` of them; 0: none there)."""

    symbol: str
    provider: str
    source: str
    start: date
    end: date
    rows: int
    request_id: str
    fetched_at: datetime


@runtime_checkable
class ScaledBarStore(Protocol):
    """A store that can multiply bars by factor steps while it reads them (an adjusted read in one
    pass; ``service.data.MarketData.bars`` uses it for one symbol when the store has it)."""

    def read_bars_scaled(
        self, symbol: str, timeframe: str, start: datetime, end: datetime, steps: list[tuple[datetime, float, float]]
    ) -> pl.DataFrame:
        """``read_bars`` of ``symbol`` with prices and vwap times, and volume times (rounded half to even),
        the factors of ``steps`` (``quality.adjust.scale_steps``)."""
        ...


@runtime_checkable
class AdjustFingerprintStore(Protocol):
    """A store that can say cheaply whether what an adjustment was computed from may have changed
    (``service.actions.Actions.plan`` keeps factor tables in-process and checks this on every read, so
    a write by another process to the same store is seen too)."""

    def adjust_fingerprint(
        self, symbols: list[str], daily: list[tuple[str, datetime, datetime]]
    ) -> tuple[tuple[object, ...], tuple[object, ...]]:
        """``(actions part, bars part)``: for ``symbols`` (empty: ``()``) the count and newest
        ``stored_at`` of their ``corporate_actions`` rows and the count and newest ``fetched_at`` of their
        ``action_coverage`` entries; for each ``(symbol, lo, hi)`` of ``daily`` (empty: ``()``) the count
        and newest ``fetched_at`` of its 1Day bars stamped in ``[lo, hi)``. Every one of these tables
        is append-only (a correction or a refreshed bar is a new row), so any write they see changes
        the answer. A store may give any other values that change whenever those would (DuckDB, which
        no other process can write while it is open here: this opening and its write generation)."""
        ...


@runtime_checkable
class ActionStore(Protocol):
    """Corporate actions (``core.schema.ACTION_SCHEMA`` frames), their ledger and their quarantine.

    Tables: ``corporate_actions``, ``action_coverage``, ``action_quarantine`` (``core/tables.py``).
    Actions are never edited or deleted: a vendor correction (other values under the same
    ``action_id``) is stored as the next ``version``. An action's *adjustment date* is its
    ``ex_date``, else ``effective_date``, else ``process_date``; its *known date* (point in time) is
    the earliest of ``declaration_date``, ``ex_date``/``effective_date`` and ``process_date`` it has.
    """

    def write_actions(
        self, actions: pl.DataFrame, coverage: list[ActionCoverage], quarantine: pl.DataFrame | None = None
    ) -> int:
        """In ONE transaction: store ``actions`` (``ACTION_SCHEMA``), the ledger entries and the
        quarantined rows (``ACTION_QUARANTINE_SCHEMA``). Per action: its content (every column but
        ``fetched_at`` and ``raw``) is hashed; if the newest stored version of its ``action_id``
        has the same hash it is skipped (idempotent: writing the same answer twice stores it once),
        else it is stored as version newest + 1 (1 when new), stamped ``stored_at``. Quarantine
        rows already held (same action_id and reason) are skipped. Returns the versions stored.
        On failure nothing is written and ``StoreError`` is raised."""

    def read_actions(
        self,
        symbols: list[str],
        start: date,
        end: date,
        *,
        types: list[str] | None = None,
        providers: list[str] | None = None,
        known_by: date | None = None,
        all_versions: bool = False,
    ) -> pl.DataFrame:
        """Actions of ``symbols`` whose adjustment date lies in ``[start, end]`` (inclusive), the
        ``corporate_actions`` columns, ordered by symbol, adjustment date, action_id, version.
        The newest version per action_id unless ``all_versions``; ``types`` / ``providers``
        narrow; ``known_by``: only actions whose known date is on or before it (point in time).
        Quarantined actions are not excluded here (the caller decides)."""

    def action_coverage(
        self, symbols: list[str], start: date, end: date, *, provider: str | None = None
    ) -> pl.DataFrame:
        """Ledger entries (``ACTION_COVERAGE_SCHEMA``) of ``symbols`` overlapping ``[start, end]``
        (``entry.start <= end and entry.end >= start``), ordered by symbol, start."""

    def action_quarantine(self, symbol: str | None = None) -> pl.DataFrame:
        """Quarantined actions (``ACTION_QUARANTINE_SCHEMA``) of one symbol or all, by ex_date."""

    def write_action_reconciliation(self, run_id: str, created_at: datetime, rows: pl.DataFrame) -> int:
        """Append one cross-vendor action comparison (``ACTION_RECONCILE_SCHEMA``) under ``run_id``;
        earlier runs are kept. Returns the rows written."""

    def action_reconciliation(self, symbol: str, run_id: str | None = None) -> pl.DataFrame:
        """Stored action comparisons of one symbol (every run unless ``run_id``), ordered by run, date."""


@dataclass(frozen=True, slots=True)
class OptionFilter:
    """Which stored option rows a read returns: each field set narrows (``None``: any).
    ``start``/``end``: ``as_of`` in ``[start, end)``; ``expiration``: that expiration day."""

    underlying: str | None = None
    contracts: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None
    type: str | None = None
    expiration: date | None = None

    def clauses(self, bind: Callable[[object], str]) -> list[str]:
        """SQL conditions both engines speak; ``bind(value)`` adds a parameter and returns its marker."""
        out = []
        for name, condition in _OPTION_CONDITIONS:
            value = getattr(self, name)
            if value is not None:
                out.append(condition.format(bind(list(value) if isinstance(value, tuple) else value)))
        return out


# OptionFilter field -> its SQL condition ({} is the bound value)
_OPTION_CONDITIONS = (
    ("underlying", "underlying = {}"),
    ("contracts", "contract IN (SELECT unnest({}))"),
    ("start", "as_of >= {}"),
    ("end", "as_of < {}"),
    ("type", "type = {}"),
    ("expiration", "expiration = {}"),
)


def option_rows(frame: pl.DataFrame, table: Table) -> pl.DataFrame:
    """``frame`` as ``table``'s rows (its columns, in order, with its types), each key once (the
    first): what both engines' option writes stage."""
    return (
        frame.select(table.names)
        .cast(dict(table.columns))  # type: ignore[arg-type]
        .unique(list(table.key), keep="first", maintain_order=True)
    )


@runtime_checkable
class OptionStore(Protocol):
    """Option chain history: snapshot rows (``core.options.OPTION_SNAPSHOT_SCHEMA``) as received, in
    ``option_snapshots``, and rows the checks refused, in ``option_quarantine`` (``core/tables.py``).

    Rows are never edited or deleted. Their key is (contract, as_of, source, feed): a row whose key
    is held is skipped, so writing one snapshot twice stores it once. Greeks and IV are stored as the
    vendor sent them (null with ``greeks_missing`` when it sent none) and come back the same."""

    def write_option_snapshot(self, rows: pl.DataFrame, quarantine: pl.DataFrame | None = None) -> tuple[int, int]:
        """In ONE transaction: store ``rows`` (``OPTION_SNAPSHOT_SCHEMA``) and the quarantined rows
        (``OPTION_QUARANTINE_SCHEMA``: the row as received, ``reasons``, ``request_id``), skipping
        rows whose key is held (or repeated in the call). Returns (snapshot rows stored, quarantined
        rows stored). On failure nothing is written and ``StoreError`` is raised."""

    def read_option_snapshots(self, where: OptionFilter | None = None) -> pl.DataFrame:
        """Stored snapshot rows (the ``option_snapshots`` columns) matching ``where``, ordered by
        contract, as_of, source, feed. Nothing held: an empty frame with those columns."""

    def option_quarantine(self, where: OptionFilter | None = None, limit: int = 1000) -> pl.DataFrame:
        """Quarantined option rows (``OPTION_QUARANTINE_SCHEMA``) matching ``where``, the newest
        ``as_of`` first, at most ``limit``."""


@runtime_checkable
class Store(QualityStore, OpsStore, ActionStore, OptionStore, Protocol):
    """Every role, plus the store's lifetime: for code that opens and owns a store."""

    def close(self) -> None:
        """Release the store (flush, close the connection); the object is not used afterwards."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
