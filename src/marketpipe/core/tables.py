"""Every stored table, declared once: its columns (in stored order), their types, which may not be
null, its key, and the schema version that added it.

A store backend derives its DDL from these declarations (DuckDB: ``store/duckdb.py``, PostgreSQL:
``store/pg_schema.py``; tests compare a fresh store's ``information_schema.columns`` with them), and
the domain modules that produce the frames a store writes (``quality/validate``, ``quality/anomaly``,
``quality/reconcile``, ``quality/score``) take their frame schemas from here, so a column is named and
typed in one place.

Types are polars types; a backend maps them to its own SQL types. Datetimes are UTC: a backend
without time zones stores them as naive UTC and hands them back UTC-aware.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl

from marketpipe.core.errors import InvalidArgument
from marketpipe.core.options import OPTION_SNAPSHOT_KEY, OPTION_SNAPSHOT_SCHEMA
from marketpipe.core.schema import ACTION_SCHEMA, BAR_SCHEMA, CRYPTO_BAR_SCHEMA, UTC_US, is_crypto

# Version of the set of tables below. A store opened with an older version gets the tables added
# since (every table is created if missing) and its version raised; a newer one is refused.
# v1 bars, quarantine, coverage, ingest log, reconciliation; v2 data quality (anomalies, scores,
# revisions, job runs); v3 live streaming (prev_close); v4 corporate actions (versions, ledger, quarantine);
# v5 the admin audit log; v6 crypto bars (their own bars, quarantine and revisions tables: fractional volume);
# v7 option chain history (option_snapshots: each snapshot row as received; option_quarantine).
SCHEMA_VERSION = 7


@dataclass(frozen=True, slots=True, eq=False)
class Table:
    """One stored table. ``serial`` names an auto-numbered column (insertion order, assigned by the
    store; writers leave it out). Columns of the primary key are never null."""

    name: str
    columns: Mapping[str, pl.DataType]
    not_null: tuple[str, ...] = ()
    primary_key: tuple[str, ...] = ()
    serial: str | None = None
    since: int = 1
    # A row's identity for idempotent writes: a write skips rows whose key is held. DuckDB checks it
    # with an anti-join (no index); a server backend makes it a unique index (with the partition column).
    key: tuple[str, ...] = ()
    # Rows may be stored again under their key as a newer version (a vendor revision): a backend
    # whose key is a unique index adds a version number to it.
    versioned: bool = False
    # The time column a backend that partitions large tables splits this one by (monthly ranges).
    partition_by: str | None = None

    def __post_init__(self) -> None:
        unknown = {
            *self.not_null,
            *self.primary_key,
            *self.key,
            *((self.serial,) if self.serial else ()),
            *((self.partition_by,) if self.partition_by else ()),
        } - set(self.columns)
        if unknown:
            raise ValueError(f"table {self.name}: {sorted(unknown)} are not among its columns")

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def written(self) -> list[str]:
        """The columns a writer supplies (all but the serial one), in stored order."""
        return [c for c in self.columns if c != self.serial]

    def nullable(self, column: str) -> bool:
        return column not in self.not_null and column not in self.primary_key


# --- frame schemas the domain produces and the store keeps ---------------------------------------

# A row that failed a check: the bar's values as received, plus why and from which request.
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    **BAR_SCHEMA,
    "raw_ts": pl.String(),
    "reason": pl.String(),
    "request_id": pl.String(),
}
QUARANTINE_COLUMNS = list(QUARANTINE_SCHEMA)

# An anomaly finding on stored bars (quality.anomaly.detect).
FINDINGS_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "ts": UTC_US,
    "kind": pl.String(),
    "severity": pl.String(),
    "value": pl.Float64(),
    "bars": pl.Int64(),  # rows the finding covers (a frozen run covers many)
    "detail": pl.String(),
}

# One bar compared between a reference vendor and another (quality.reconcile).
RECONCILE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "ts": UTC_US,
    "reference": pl.String(),
    "other": pl.String(),
    "status": pl.String(),
    "price_delta_pct": pl.Float64(),
    "worst_field": pl.String(),
    "volume_ratio": pl.Float64(),
    "volume_flag": pl.Boolean(),
    "reference_close": pl.Float64(),
    "other_close": pl.Float64(),
}

# Completeness counts per session day (quality.completeness) and the day's scores (quality.score).
DAYS_SCHEMA: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "expected": pl.Int64(),
    "present": pl.Int64(),
    "confirmed_empty": pl.Int64(),
    "gap": pl.Int64(),
}
DAY_SCORE_SCHEMA: dict[str, pl.DataType] = {
    **DAYS_SCHEMA,
    "quarantined": pl.Int64(),
    "anomalies": pl.Int64(),
    **{c: pl.Float64() for c in ("completeness", "validity", "timeliness", "consistency", "score")},
}

# A ledger entry: ``[start, end)`` of a symbol/timeframe was fetched from a provider (rows may be 0).
COVERAGE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "provider": pl.String(),
    "source": pl.String(),
    "feed": pl.String(),
    "start": UTC_US,
    "end": UTC_US,
    "rows": pl.Int64(),
    "request_id": pl.String(),
    "fetched_at": UTC_US,
}

# --- the tables ------------------------------------------------------------------------------------

META = Table("meta", {"key": pl.String(), "value": pl.String()}, primary_key=("key",))

BARS = Table(
    "bars",
    BAR_SCHEMA,
    not_null=("symbol", "timeframe", "ts", "source"),
    key=("symbol", "timeframe", "ts", "source", "feed"),
    versioned=True,
    partition_by="ts",
)

QUARANTINE = Table("quarantine", QUARANTINE_SCHEMA)

COVERAGE = Table("coverage", COVERAGE_SCHEMA, not_null=("symbol", "timeframe", "provider", "source", "start", "end"))

RECONCILIATION = Table("reconciliation", {"run_id": pl.String(), "created_at": UTC_US, **RECONCILE_SCHEMA})

INGEST_LOG = Table(
    "ingest_log",
    {
        "id": pl.Int64(),
        "provider": pl.String(),
        "source": pl.String(),
        "feed": pl.String(),
        "kind": pl.String(),
        "timeframe": pl.String(),
        "symbols": pl.String(),  # comma-separated
        "start": UTC_US,
        "end": UTC_US,
        "request_id": pl.String(),
        "page": pl.Int32(),
        "fetched_at": UTC_US,
        "rows_received": pl.Int64(),
        "rows_stored": pl.Int64(),
        "rows_rejected": pl.Int64(),
    },
    serial="id",
)

ANOMALIES = Table(
    "anomalies",
    {**FINDINGS_SCHEMA, "detected_at": UTC_US},
    not_null=("symbol", "timeframe", "ts", "kind"),
    key=("symbol", "timeframe", "ts", "kind"),
    since=2,
)

QUALITY_SCORES = Table(
    "quality_scores",
    {"symbol": pl.String(), "timeframe": pl.String(), **DAY_SCORE_SCHEMA, "computed_at": UTC_US},
    not_null=("symbol", "timeframe", "day"),
    since=2,
)

_OHLCV = ("open", "high", "low", "close", "volume")
REVISIONS = Table(
    "revisions",
    {
        "symbol": pl.String(),
        "timeframe": pl.String(),
        "ts": UTC_US,
        "source": pl.String(),
        "feed": pl.String(),
        **{f"old_{c}": BAR_SCHEMA[c] for c in _OHLCV},
        **{f"new_{c}": BAR_SCHEMA[c] for c in _OHLCV},
        "request_id": pl.String(),
        "revised_at": UTC_US,
    },
    since=2,
)

JOB_RUNS = Table(
    "job_runs",
    {
        "id": pl.Int64(),
        "job": pl.String(),
        "run_id": pl.String(),
        "symbol": pl.String(),
        "strategy": pl.String(),
        "started_at": UTC_US,
        "finished_at": UTC_US,
        "status": pl.String(),
        "code": pl.String(),
        "message": pl.String(),
        "bars_stored": pl.Int64(),
        "bars_rejected": pl.Int64(),
    },
    serial="id",
    since=2,
)

PREV_CLOSE = Table(
    "prev_close",
    {
        "symbol": pl.String(),
        "session": pl.Date(),
        "close": pl.Float64(),
        "source": pl.String(),
        "updated_at": UTC_US,
    },
    not_null=("session", "close"),
    primary_key=("symbol",),
    since=3,
)

# Corporate actions as received, versioned: a vendor correction (other values under the same
# action_id) is a new row with the next ``version``, never an edit; ``content_hash`` is what tells a
# correction from a repeat. Reads take the newest version per action_id.
CORPORATE_ACTIONS = Table(
    "corporate_actions",
    {**ACTION_SCHEMA, "version": pl.Int64(), "content_hash": pl.String(), "stored_at": UTC_US},
    not_null=("action_id", "provider", "type", "version", "content_hash"),
    since=4,
)

# The actions ledger: actions of ``symbol`` with adjustment dates in [start, end] (inclusive days)
# were fetched from ``provider`` (``rows`` of them; 0: the vendor confirmed there are none).
ACTION_COVERAGE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "provider": pl.String(),
    "source": pl.String(),
    "start": pl.Date(),
    "end": pl.Date(),
    "rows": pl.Int64(),
    "request_id": pl.String(),
    "fetched_at": UTC_US,
}
ACTION_COVERAGE = Table(
    "action_coverage", ACTION_COVERAGE_SCHEMA, not_null=("symbol", "provider", "start", "end"), since=4
)

# An action with impossible values (ratio <= 0, negative cash, a dividend >= the previous close, no
# date to adjust on): kept with why, never applied.
ACTION_QUARANTINE_SCHEMA: dict[str, pl.DataType] = {**ACTION_SCHEMA, "reason": pl.String(), "quarantined_at": UTC_US}
ACTION_QUARANTINE = Table("action_quarantine", ACTION_QUARANTINE_SCHEMA, since=4)

# One cross-vendor comparison of actions per row (quality.actions.reconcile_actions), runs kept side by side.
ACTION_RECONCILE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "family": pl.String(),
    "reference": pl.String(),
    "other": pl.String(),
    "status": pl.String(),
    "reference_date": pl.Date(),
    "other_date": pl.Date(),
    "reference_value": pl.Float64(),
    "other_value": pl.Float64(),
    "reference_id": pl.String(),
    "other_id": pl.String(),
}
ACTION_RECONCILIATION = Table(
    "action_reconciliation", {"run_id": pl.String(), "created_at": UTC_US, **ACTION_RECONCILE_SCHEMA}, since=4
)

# Every admin request to the gateway (who, what, when, and how it ended), kept in the store.
AUDIT_LOG = Table(
    "audit_log",
    {
        "id": pl.Int64(),
        "occurred_at": UTC_US,
        "actor": pl.String(),  # "admin" (the bearer token was right) or "anonymous" (refused)
        "address": pl.String(),  # the client's address
        "action": pl.String(),  # "POST /admin/failover"
        "params": pl.String(),  # the request's JSON body, as sent (bounded by [server] max_body_bytes)
        "status": pl.Int64(),  # the HTTP status answered
        "code": pl.String(),  # the error code when it failed
        "request_id": pl.String(),
    },
    not_null=("occurred_at", "actor", "action", "status"),
    serial="id",
    since=5,
)

# --- crypto pairs ----------------------------------------------------------------------------------
# A crypto volume is a fraction of a coin, so a pair's bars (and their quarantined rows and revisions)
# live in tables of their own whose ``volume`` is a float (CRYPTO_BAR_SCHEMA), declared exactly like
# the stock ones otherwise: same key, versions, partitioning. They share the coverage ledger and the
# ingest log (a pair's symbol, ``BTC/USD``, never collides with a stock's). Separate tables rather
# than a float ``volume`` in ``bars``: stock data stays exactly as stored (integer volumes, no rewrite
# of a large table on upgrade, which on PostgreSQL would lock every monthly partition), and a v5 store
# upgrades by creating three empty tables.
CRYPTO_BARS = Table(
    "crypto_bars",
    CRYPTO_BAR_SCHEMA,
    not_null=BARS.not_null,
    key=BARS.key,
    versioned=True,
    partition_by="ts",
    since=6,
)
CRYPTO_QUARANTINE = Table("crypto_quarantine", {**QUARANTINE_SCHEMA, "volume": pl.Float64()}, since=6)
CRYPTO_REVISIONS = Table(
    "crypto_revisions",
    {**REVISIONS.columns, "old_volume": pl.Float64(), "new_volume": pl.Float64()},
    since=6,
)

# --- options ---------------------------------------------------------------------------------------
# The history of option chains the vendor does not serve: every snapshot row as received (quotes,
# trades, the vendor's greeks and IV or null with ``greeks_missing``; never computed), keyed by
# (contract, as_of, source, feed) so writing one snapshot again stores nothing. Quote and trade times
# keep the vendor's nanoseconds (a backend without them stores nanoseconds since the epoch).
OPTION_SNAPSHOTS = Table(
    "option_snapshots",
    OPTION_SNAPSHOT_SCHEMA,
    not_null=("contract", "as_of", "source"),
    key=OPTION_SNAPSHOT_KEY,
    partition_by="as_of",
    since=7,
)
# A snapshot row that failed a check (quality/option_checks): as received, with why and from which request.
OPTION_QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    **OPTION_SNAPSHOT_SCHEMA,
    "reasons": pl.String(),
    "request_id": pl.String(),
}
OPTION_QUARANTINE = Table("option_quarantine", OPTION_QUARANTINE_SCHEMA, key=OPTION_SNAPSHOT_KEY, since=7)


@dataclass(frozen=True, slots=True)
class BarTables:
    """The tables one asset class's bars live in: the bars, their quarantined rows, their revisions."""

    bars: Table
    quarantine: Table
    revisions: Table

    @property
    def schema(self) -> dict[str, pl.DataType]:
        """The bar frame schema of this class (BAR_SCHEMA, or CRYPTO_BAR_SCHEMA with float volume)."""
        return dict(self.bars.columns)


EQUITY_TABLES = BarTables(BARS, QUARANTINE, REVISIONS)
CRYPTO_TABLES = BarTables(CRYPTO_BARS, CRYPTO_QUARANTINE, CRYPTO_REVISIONS)
BAR_TABLES: tuple[BarTables, ...] = (EQUITY_TABLES, CRYPTO_TABLES)


def bar_tables(symbols: Iterable[str]) -> BarTables:
    """The tables ``symbols``' bars live in: crypto pairs' or equities'. One call about stored bars
    holds one asset class (INVALID_ARGUMENT otherwise); no symbols: the equities'."""
    kinds = {is_crypto(s) for s in symbols}
    if len(kinds) > 1:
        raise InvalidArgument(
            "crypto pairs and equities in one request: ask for them separately", details={"param": "symbols"}
        )
    return CRYPTO_TABLES if kinds == {True} else EQUITY_TABLES


# In creation order.
TABLES: tuple[Table, ...] = (
    META,
    BARS,
    QUARANTINE,
    COVERAGE,
    RECONCILIATION,
    INGEST_LOG,
    ANOMALIES,
    QUALITY_SCORES,
    REVISIONS,
    JOB_RUNS,
    PREV_CLOSE,
    CORPORATE_ACTIONS,
    ACTION_COVERAGE,
    ACTION_QUARANTINE,
    ACTION_RECONCILIATION,
    AUDIT_LOG,
    CRYPTO_BARS,
    CRYPTO_QUARANTINE,
    CRYPTO_REVISIONS,
    OPTION_SNAPSHOTS,
    OPTION_QUARANTINE,
)
