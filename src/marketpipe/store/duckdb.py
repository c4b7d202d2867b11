"""DuckDB store: the embedded default.

Times are stored as naive ``TIMESTAMP`` holding UTC (no time-zone arithmetic happens inside DuckDB,
so no ICU extension is needed) and come back as UTC-aware polars columns.

Idempotence without a primary key: a PK index costs DuckDB about half its bulk-insert speed, so
new rows are inserted through an anti-join against the rows already held for the same symbols and
time span. Every page (bars, quarantine, coverage, ingest-log row) is written in one transaction,
so a crash leaves either the whole page or none of it.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from marketpipe.core.errors import StoreError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import ROWS_STORED
from marketpipe.core.schema import ACTION_COLUMNS, BAR_COLUMNS
from marketpipe.core.tables import (
    ACTION_COVERAGE,
    ACTION_COVERAGE_SCHEMA,
    ACTION_QUARANTINE,
    ACTION_QUARANTINE_SCHEMA,
    ACTION_RECONCILIATION,
    ANOMALIES,
    AUDIT_LOG,
    BAR_TABLES,
    CORPORATE_ACTIONS,
    COVERAGE,
    COVERAGE_SCHEMA,
    INGEST_LOG,
    JOB_RUNS,
    OPTION_QUARANTINE,
    OPTION_SNAPSHOTS,
    PREV_CLOSE,
    QUALITY_SCORES,
    QUARANTINE_COLUMNS,
    SCHEMA_VERSION,
    TABLES,
    BarTables,
    Table,
    bar_tables,
)
from marketpipe.store.base import (
    ADJUST_DATE_SQL,
    COUNTED,
    KNOWN_DATE_SQL,
    ActionCoverage,
    OptionFilter,
    PageWrite,
    by_asset_class,
    option_rows,
    with_content_hash,
)
from marketpipe.store.hot import DEFAULT_READ_CACHE_BYTES, HotRanges

log = get_logger("marketpipe.store")

# polars type -> DuckDB column type. Times are naive TIMESTAMP holding UTC (see the module docstring).
_SQL_TYPES: dict[type[pl.DataType], str] = {
    pl.String: "VARCHAR",
    pl.Float64: "DOUBLE",
    pl.Int64: "BIGINT",
    pl.Int32: "INTEGER",
    pl.Boolean: "BOOLEAN",
    pl.Date: "DATE",
    pl.Datetime: "TIMESTAMP",
}
# The sequences behind serial columns (names kept from the first schema: existing files use them).
_SEQUENCES = {"ingest_log": "ingest_seq", "job_runs": "run_seq"}


def sql_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime) and dtype.time_unit == "ns":
        return "TIMESTAMP_NS"  # a vendor's nanosecond times (option quotes and trades), kept as sent
    try:
        return _SQL_TYPES[type(dtype)]
    except KeyError:
        raise StoreError(f"no DuckDB column type for {dtype}") from None


def table_ddl(table: Table) -> list[str]:
    """``CREATE ... IF NOT EXISTS`` statements for one declared table (its sequence first)."""
    out: list[str] = []
    cols: list[str] = []
    for name, dtype in table.columns.items():
        col = f'"{name}" {sql_type(dtype)}'
        if name == table.serial:
            seq = _SEQUENCES.get(table.name, f"{table.name}_seq")
            out.append(f"CREATE SEQUENCE IF NOT EXISTS {seq}")
            col += f" DEFAULT nextval('{seq}')"
        if name in table.primary_key and len(table.primary_key) == 1:
            col += " PRIMARY KEY"
        elif not table.nullable(name):
            col += " NOT NULL"
        cols.append(col)
    if len(table.primary_key) > 1:
        cols.append(f"PRIMARY KEY ({', '.join(table.primary_key)})")
    out.append(f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(cols)})")
    return out


_DDL = [stmt for table in TABLES for stmt in table_ddl(table)]
_VALUES_SAME = " AND ".join(
    f"b.{c} IS NOT DISTINCT FROM p.{c}" for c in ("open", "high", "low", "close", "volume", "trade_count", "vwap")
)

# bars table -> the Arrow schema its reads are cast to (equities: integer volume; crypto: float)
# (strings as Arrow ``string``, as DuckDB sends them: the cast then only relabels the UTC times, and polars
# reads ``string`` as cheaply as ``large_string``)
_BAR_ARROW = {
    t.bars.name: pa.schema(
        [
            pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f
            for f in pl.DataFrame(schema=t.schema).to_arrow().schema
        ]
    )
    for t in BAR_TABLES
}
_SCALED = {"open", "high", "low", "close", "vwap"}


def _arrow_schema(schema: dict[str, pl.DataType]) -> pa.Schema:
    """The Arrow schema a read of a declared table is cast to (strings as DuckDB sends them)."""
    return pa.schema(
        [
            pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f
            for f in pl.DataFrame(schema=schema).to_arrow().schema
        ]
    )


_COVERAGE_ARROW = _arrow_schema(COVERAGE_SCHEMA)


def _labelled(table: pa.Table, target: pa.Schema) -> pl.DataFrame:
    """:func:`_aware` done at the Arrow level for a read of a declared table: the naive UTC times
    labelled UTC and the columns cast to their declared types by name (metadata only where DuckDB's
    types already match) — on the small ledger reads every request makes, polars' ``replace_time_zone``
    and cast cost more than the query. A column the declaration lacks is kept as read."""
    fields = [target.field(f.name) if f.name in target.names else f for f in table.schema]
    return pl.from_arrow(table.cast(pa.schema(fields)))  # type: ignore[return-value]


def _runs(steps: list[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    """Steps without those whose factor equals the next one's (1 after the last): a bar they held takes
    the same factor from the next step. A volume factor changes only at splits, so its tree is short."""
    nxt = [f for _, f in steps[1:]] + [1.0]
    return [(e, f) for (e, f), n in zip(steps, nxt, strict=True) if f != n]


def _within(
    steps: list[tuple[datetime, float, float]], start: datetime, end: datetime
) -> list[tuple[datetime, float, float]]:
    """The steps a read of ``[start, end)`` can meet: those with an edge inside it and the first one after
    it (every bar past the last edge inside takes that one); an edge at or before ``start`` is after no
    bar's ``ts``. A day's read of a symbol with 30 actions becomes one constant factor, not a CASE tree."""
    inside = [s for s in steps if start < s[0] < end]
    after = next((s for s in steps if s[0] >= end), None)
    return [*inside, after] if after is not None else inside


def _scaled_sql(sql: str, steps: list[tuple[datetime, float, float]], params: dict[str, object]) -> str:
    """``sql`` (a bars select) with its prices times the price factor and its volume times the volume
    factor of each row's step, each found by a balanced tree of CASEs over the edges where it changes
    (log2(edges) comparisons a row, vectorized in the scan); no tree where nothing changes (volume, when
    only dividends are applied).

    The volume tree's leaves are the scaled volumes themselves, not factors: a row after the last split
    keeps its volume untouched, and a whole-number factor (every forward split) multiplies the integers
    — the value ``round_even(volume * f)`` gives, at a fraction of its cost (DuckDB's ``round_even`` over
    every row was the larger part of the adjusted read's extra time)."""

    def tree(lo: int, hi: int, edge: str, leaf: Callable[[int], str]) -> str:
        # a row past the edges < lo and before the edges >= hi
        if lo == hi:
            return leaf(lo)
        mid = (lo + hi) // 2
        return f"CASE WHEN ts < ${edge}{mid} THEN {tree(lo, mid, edge, leaf)} ELSE {tree(mid + 1, hi, edge, leaf)} END"

    prices = _runs([(e, float(p)) for e, p, _ in steps])
    volumes = _runs([(e, float(v)) for e, _, v in steps])
    for i, (edge, f) in enumerate(prices):
        params[f"p_e{i}"], params[f"p_f{i}"] = _n(edge), f
    for i, (edge, _) in enumerate(volumes):
        params[f"v_e{i}"] = _n(edge)

    def volume(i: int) -> str:
        if i == len(volumes):
            return "volume"
        f = volumes[i][1]
        if f.is_integer() and f > 0:
            params[f"v_n{i}"] = int(f)
            return f"volume * $v_n{i}"
        params[f"v_f{i}"] = f
        return f"CAST(round_even(volume * $v_f{i}, 0) AS BIGINT)"

    if not prices and not volumes:
        return sql
    out = [
        f"{c} * _pf AS {c}" if c in _SCALED and prices
        else f"{tree(0, len(volumes), 'v_e', volume)} AS volume" if c == "volume" and volumes
        else c
        for c in BAR_COLUMNS
    ]  # fmt: skip
    if not prices:
        return f"SELECT {', '.join(out)} FROM ({sql})"
    factor = tree(0, len(prices), "p_e", lambda i: f"$p_f{i}" if i < len(prices) else "1.0::DOUBLE")
    return f"SELECT {', '.join(out)} FROM (SELECT *, {factor} AS _pf FROM ({sql}))"


_FEED_PREFERENCE = "CASE feed WHEN 'sip' THEN 0 WHEN 'iex' THEN 2 ELSE 1 END"


def _naive(frame: pl.DataFrame) -> pl.DataFrame:
    """UTC-aware datetime columns to naive UTC for DuckDB TIMESTAMP columns."""
    return frame.with_columns(
        [
            pl.col(name).dt.replace_time_zone(None)
            for name, dtype in frame.schema.items()
            if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None
        ]
    )


def _aware(frame: pl.DataFrame, schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    frame = frame.with_columns(
        [
            (pl.col(name) if dtype.time_unit == "ns" else pl.col(name).dt.cast_time_unit("us")).dt.replace_time_zone(
                "UTC"
            )
            for name, dtype in frame.schema.items()
            if isinstance(dtype, pl.Datetime) and dtype.time_zone is None
        ]
    )
    if schema is not None:
        frame = frame.cast({k: v for k, v in schema.items() if k in frame.columns}, strict=False)  # type: ignore[arg-type]
    return frame


@dataclass(slots=True)
class _Variants:
    pairs: set[tuple[str, str | None]]  # (source, feed) held
    revised: bool  # a refresh stored newer versions of some rows


_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")


def _open_error(path: str, exc: duckdb.IOException) -> StoreError:
    """Why the file cannot be opened, and what to do. DuckDB lets one process hold a file (a running
    ``marketpipe serve``, ``backfill`` or ``schedule``), and its lock keeps every other process out, even
    read-only ones; the way to read while the gateway runs is through the gateway."""
    text = str(exc)
    held = _LOCK_HOLDER.search(text)
    if held is None and "lock" not in text.lower():
        log.error("store_open_failed", path=path, error=text)
        return StoreError(f"cannot open store {path}: {text}", details={"path": path})
    pid = int(held.group("pid")) if held else None
    who = f"process {pid} ({held.group('exe')})" if held else "another process"
    log.error("store_locked", path=path, pid=pid)
    return StoreError(
        f"store {path} is locked by {who}, such as a running `marketpipe serve`, `backfill` or `schedule`. "
        'Read through that gateway instead (Python: mp.client(gateway="http://127.0.0.1:8000"); '
        'shell: curl "http://127.0.0.1:8000/v1/bars?symbols=AAPL&start=...&format=csv"), '
        f"or stop it{f' (kill {pid})' if pid else ''} and try again, or point --store / MARKETPIPE_STORE at "
        "another file.",
        details={"path": path, "pid": pid, "reason": "locked"},
    )


_OPENINGS = itertools.count(1)


class DuckDBStore:
    """Not thread-safe: use from one thread at a time (the backfill writes from one writer task)."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        create: bool = True,
        read_cache_bytes: int = DEFAULT_READ_CACHE_BYTES,
    ) -> None:
        """``create=False`` (and ``read_only``): a missing file is a ``StoreError`` ("no store at PATH"),
        not a new empty store: a call that only reads must not answer "nothing" for a mistyped path.

        ``read_cache_bytes``: the L1 of bar reads (:class:`marketpipe.store.hot.HotRanges`; 0 turns it
        off): a read asked again before any bar write to this file is answered from memory."""
        self.path = str(path)
        if self.path != ":memory:" and (read_only or not create) and not Path(self.path).is_file():
            log.warning("store_missing", path=self.path)
            raise StoreError(
                f"no store at {self.path}: nothing has been stored there yet (check --store / "
                "MARKETPIPE_STORE / [store] path, or fetch first)",
                details={"path": self.path},
            )
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot open store {self.path}: its directory cannot be created: {exc.strerror or exc}",
                details={"path": self.path},
            ) from exc
        try:
            self.con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.IOException as exc:
            raise _open_error(self.path, exc) from exc
        self._lock = threading.RLock()
        self._hot = HotRanges(self.path, read_cache_bytes)
        self._opening = next(_OPENINGS)  # what adjust_fingerprint marks this opening of the file with
        # (symbol, timeframe) -> the (source, feed) variants held (and whether any were revised); lets the
        # common case of a single version per timestamp skip the de-duplication window on reads.
        self._variants: dict[tuple[str, str], _Variants] = {}
        # Checkpointing folds the WAL into the file; at the default 16 MB it runs every few pages of
        # a backfill and costs more than the inserts. The WAL is still replayed after a crash.
        self.con.execute("SET checkpoint_threshold = '256MB'")
        if not read_only:
            self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            for ddl in _DDL:
                self.con.execute(ddl)
            rows = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
            row = rows[0] if rows else None
            if row is None:
                self.con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            elif int(row[0]) < SCHEMA_VERSION:  # the new tables were created above (IF NOT EXISTS)
                self.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {row[0]}, newer than this marketpipe ({SCHEMA_VERSION})"
                )

    # --- writes --------------------------------------------------------------------------------

    def write_pages(self, pages: list[PageWrite]) -> list[int]:
        stored = [0] * len(pages)
        # the variant cache is brought up to date under the same lock as the commit: a reader in another
        # thread (the live writer runs in one) never sees a committed newer version the cache does not know
        # of, which would return both versions of a bar
        with self._lock:
            try:
                with self._transaction():
                    for tables, idx in by_asset_class(pages):
                        for i, n in zip(idx, self._insert_bars(tables, [pages[i] for i in idx]), strict=True):
                            stored[i] = n
                    self._write_side_tables(pages, stored)
            finally:  # committed or rolled back: the L1's answers from before are not given again
                self._hot.bump()
            for page, n in zip(pages, stored, strict=True):
                self._note_variants(page, n)
                if n and page.ingest.timeframe == "1Day":  # committed daily bars: adjust_fingerprint's marks
                    for sym in page.bars["symbol"].unique():
                        self._hot.bump(f"1Day:{sym}")
        for page, n in zip(pages, stored, strict=True):
            page.stored = n
            if n:
                table = bar_tables(page.ingest.symbols).bars.name
                ROWS_STORED.labels(table, page.ingest.source, page.ingest.timeframe).inc(n)
        return stored

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction under the lock: committed when the block ends, rolled back on any error
        (a DuckDB error becomes ``StoreError`` "nothing written")."""
        with self._lock:
            try:
                self.con.execute("BEGIN TRANSACTION")
                yield
                self.con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback()
                raise StoreError(f"store write failed, nothing written: {exc}", details={"path": self.path}) from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:
            log.warning("rollback_failed", path=self.path)

    def _insert_bars(self, tables: BarTables, pages: list[PageWrite]) -> list[int]:
        """Insert the pages' bars (one asset class: its ``tables``); rows already held (same symbol,
        timeframe, ts, source, feed) are skipped. A backfill writes ranges the ledger says are new,
        so the common case is one plain bulk insert for the whole batch after a cheap overlap probe;
        only when the probe finds rows already held does each page go through the anti-join."""
        frames = [_naive(p.bars.select(BAR_COLUMNS)) for p in pages]
        heights = [f.height for f in frames]
        if not any(heights):
            return heights
        if any(p.refresh for p in pages):
            return [self._refresh(tables, p, f) if f.height else 0 for p, f in zip(pages, frames, strict=True)]
        batch = pl.concat([f for f in frames if f.height])
        # one bulk insert only when nothing in the batch is held and no two pages carry the same bar;
        # otherwise page by page, each anti-joined against what the earlier ones just inserted
        bars = tables.bars.name
        if _distinct_keys(batch) and self._overlaps(bars, batch) == 0:
            self._insert(f"INSERT INTO {bars} SELECT * FROM _page", batch)
            return heights
        return [
            self._insert(
                f"""INSERT INTO {bars} SELECT p.* FROM _page p ANTI JOIN (
                       SELECT symbol, timeframe, ts, source, feed FROM {bars}
                       WHERE ts BETWEEN $lo AND $hi AND list_contains($syms, symbol)
                   ) b USING (symbol, timeframe, ts, source, feed)""",
                f,
                {"lo": f["ts"].min(), "hi": f["ts"].max(), "syms": f["symbol"].unique().to_list()},
            )
            if f.height
            else 0
            for f in frames
        ]

    def _refresh(self, tables: BarTables, page: PageWrite, frame: pl.DataFrame) -> int:
        """Store the rows not held with exactly these values; those whose key is held with other
        values are vendor revisions: recorded, and stored as the newer version (nothing is edited)."""
        params = {"lo": frame["ts"].min(), "hi": frame["ts"].max(), "syms": frame["symbol"].unique().to_list()}
        held = f"(SELECT * FROM {tables.bars.name} WHERE ts BETWEEN $lo AND $hi AND list_contains($syms, symbol))"
        key = (
            "b.symbol = p.symbol AND b.timeframe = p.timeframe AND b.ts = p.ts AND b.source = p.source "
            "AND b.feed IS NOT DISTINCT FROM p.feed"
        )
        self.con.register("_page", frame.to_arrow())
        try:
            self.con.execute(
                f"""CREATE OR REPLACE TEMP TABLE _new AS SELECT p.* FROM _page p
                    WHERE NOT EXISTS (SELECT 1 FROM {held} b WHERE {key} AND {_VALUES_SAME})""",
                params,
            ).fetchall()
            revised = self.con.execute(
                f"""INSERT INTO {tables.revisions.name} SELECT p.symbol, p.timeframe, p.ts, p.source, p.feed,
                       b.open, b.high, b.low, b.close, b.volume, p.open, p.high, p.low, p.close, p.volume,
                       $rid, $now
                    FROM _new p JOIN {held} b ON {key}
                    QUALIFY row_number() OVER (PARTITION BY p.symbol, p.ts ORDER BY b.fetched_at DESC) = 1""",
                {**params, "rid": page.ingest.request_id, "now": _n(page.ingest.fetched_at)},
            ).fetchall()
            stored = self.con.execute(f"INSERT INTO {tables.bars.name} SELECT * FROM _new").fetchall()
            self.con.execute("DROP TABLE _new")
        finally:
            self.con.unregister("_page")
        page.revised = int(revised[0][0]) if revised else 0
        return int(stored[0][0]) if stored else 0

    def _overlaps(self, bars: str, frame: pl.DataFrame) -> int:
        """Rows already held (in table ``bars``) inside each (symbol, timeframe)'s own time span in ``frame``."""
        bounds = frame.group_by("symbol", "timeframe").agg(lo=pl.col("ts").min(), hi=pl.col("ts").max())
        self.con.register("_bounds", bounds.to_arrow())
        try:
            # the constant span lets the scan skip row groups by their min/max instead of reading the
            # whole table for every batch (a backfill's later batches would cost ever more)
            rows = self.con.execute(
                f"""SELECT count(*) FROM {bars} b JOIN _bounds r
                   ON b.symbol = r.symbol AND b.timeframe = r.timeframe AND b.ts BETWEEN r.lo AND r.hi
                   WHERE b.ts BETWEEN $lo AND $hi""",
                {"lo": bounds["lo"].min(), "hi": bounds["hi"].max()},
            ).fetchall()
        finally:
            self.con.unregister("_bounds")
        return int(rows[0][0])

    def _insert(self, sql: str, frame: pl.DataFrame, params: dict[str, object] | None = None) -> int:
        self.con.register("_page", frame.to_arrow())
        try:
            rows = self.con.execute(sql, params or {}).fetchall()
        finally:
            self.con.unregister("_page")
        return int(rows[0][0]) if rows else 0

    def _write_side_tables(self, pages: list[PageWrite], stored: list[int]) -> None:
        """The pages' quarantined rows, findings, coverage and ingest-log rows: one statement per
        table for the whole batch (a statement per page cost about as much as the bars' insert)."""
        con = self.con
        quarantined: dict[str, list[pl.DataFrame]] = {}
        for page in pages:
            if page.quarantine.height:
                held = bar_tables(page.ingest.symbols).quarantine.name
                quarantined.setdefault(held, []).append(_naive(page.quarantine.select(QUARANTINE_COLUMNS)))
        for held, parts in quarantined.items():
            con.register("_q", pl.concat(parts).to_arrow())
            try:
                con.execute(f"INSERT INTO {held} SELECT * FROM _q").fetchall()
            finally:
                con.unregister("_q")
        for page in pages:
            if page.anomalies is not None and page.anomalies.height:
                self._insert_findings(page.anomalies, page.ingest.fetched_at)
        coverage = [[_param(getattr(c, col)) for col in COVERAGE.names] for page in pages for c in page.coverage]
        if coverage:
            con.executemany(f"INSERT INTO coverage VALUES ({', '.join('?' for _ in COVERAGE.names)})", coverage)
        cols = INGEST_LOG.written
        rows = []
        for page, n in zip(pages, stored, strict=True):
            ing = page.ingest
            values = {**{c: getattr(ing, c) for c in cols if c != "symbols"}, "rows_stored": n}
            values["symbols"] = ",".join(ing.symbols)
            rows.append([_param(values[c]) for c in cols])
        # One VALUES list: the ids come from the sequence in the pages' order.
        one = f"({', '.join('?' for _ in cols)})"
        con.execute(
            f"INSERT INTO ingest_log ({', '.join(_quote(c) for c in cols)}) VALUES {', '.join(one for _ in rows)}",
            [v for row in rows for v in row],
        ).fetchall()

    # --- reads ---------------------------------------------------------------------------------

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
        """Bars in ``[start, end)``, ordered by symbol then time, one row per timestamp: the newest
        version, and without ``source``/``feed`` SIP preferred over other feeds and real sources over
        the simulator.

        Paging (the gateway): at most ``limit`` rows that come after ``after`` = (symbol, ts) in
        (symbol, time) order — time descending within each symbol with ``desc``; ``sources``
        restricts to those source labels."""
        return self._read_bars(
            symbols, timeframe, start, end, None, source=source, feed=feed, sources=sources, limit=limit,
            after=after, desc=desc,
        )  # fmt: skip

    def read_bars_scaled(
        self, symbol: str, timeframe: str, start: datetime, end: datetime, steps: list[tuple[datetime, float, float]]
    ) -> pl.DataFrame:
        """:meth:`read_bars` of one symbol with prices (and vwap) times, and volume times (rounded half to
        even, whole shares), the factors of ``steps`` (``quality.adjust.scale_steps``: a bar takes the first
        step whose edge is after its ts, 1 after the last), computed in the query: no second pass over the
        bars in Python."""
        return self._read_bars([symbol], timeframe, start, end, _within(steps, start, end))

    def _read_bars(  # read_bars, with the factor steps of read_bars_scaled
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        steps: list[tuple[datetime, float, float]] | None,
        *,
        source: str | None = None,
        feed: str | None = None,
        sources: list[str] | None = None,
        limit: int | None = None,
        after: tuple[str, datetime] | None = None,
        desc: bool = False,
    ) -> pl.DataFrame:
        key = (
            tuple(symbols), timeframe, start, end, tuple(steps) if steps else None, source, feed,
            tuple(sources) if sources is not None else None, limit, after, desc,
        )  # fmt: skip

        def load() -> pl.DataFrame:
            where = ["timeframe = $tf", "ts >= $start", "ts < $end"]
            params: dict[str, object] = {"tf": timeframe, "start": _n(start), "end": _n(end)}
            if len(symbols) == 1:
                where.append("symbol = $sym")
                params["sym"] = symbols[0]
            else:
                where.append("list_contains($syms, symbol)")
                params["syms"] = list(symbols)
            if source is not None:
                where.append("source = $source")
                params["source"] = source
            if feed is not None:
                where.append("feed = $feed")
                params["feed"] = feed
            if sources is not None:
                where.append("list_contains($sources, source)")
                params["sources"] = list(sources)
            bars = bar_tables(symbols).bars.name
            cols = ", ".join(BAR_COLUMNS)
            sql = f"SELECT {cols} FROM {bars} WHERE {' AND '.join(where)}"
            if steps:
                sql = _scaled_sql(sql, steps, params)
            # one row per (symbol, ts) always: several (source, feed) pairs, or a refresh's newer versions
            # (which share source and feed, so naming both does not make the rows unique)
            if len(symbols) != 1 or self._variant_count(symbols[0], timeframe) > 1:
                sql = (
                    f"SELECT {cols} FROM ({sql}) QUALIFY row_number() OVER "
                    f"(PARTITION BY symbol, ts ORDER BY {_FEED_PREFERENCE}, starts_with(source, 'sim'), "
                    "fetched_at DESC) = 1"
                )
            if limit is not None or after is not None or desc:
                outer = []
                if after is not None:
                    cmp = "<" if desc else ">"
                    outer.append(f"(symbol > $asym OR (symbol = $asym AND ts {cmp} $ats))")
                    params["asym"], params["ats"] = after[0], _n(after[1])
                sql = f"SELECT * FROM ({sql})" + (f" WHERE {' AND '.join(outer)}" if outer else "")
                sql += f" ORDER BY symbol, ts {'DESC' if desc else 'ASC'}"
                if limit is not None:
                    sql += " LIMIT $limit"
                    params["limit"] = int(limit)
                with self._lock:
                    table = self._arrow(sql, params)
                return pl.from_arrow(table.cast(_BAR_ARROW[bars]))  # type: ignore[return-value]
            # No ORDER BY: rows come back in insertion order, which is already (symbol, ts) order for
            # each page; checking that in polars and sorting only when needed saves a third of a small read.
            with self._lock:
                table = self._arrow(sql, params)
            # Labelling the naive UTC columns as UTC at the Arrow level is metadata only; doing it in
            # polars (replace_time_zone + casts) costs more than the query on small reads.
            frame: pl.DataFrame = pl.from_arrow(table.cast(_BAR_ARROW[bars]))  # type: ignore[assignment]
            if len(symbols) == 1:  # one symbol: ordered when its times ascend (one pass, no expressions)
                return frame if frame.get_column("ts").is_sorted() else frame.sort("ts")
            ordered = frame.select(
                ((pl.col("symbol") > pl.col("symbol").shift()) | (pl.col("ts") > pl.col("ts").shift()))
                .fill_null(True)
                .all()
                & (pl.col("symbol") >= pl.col("symbol").shift()).fill_null(True).all()
            ).item()
            return frame if ordered else frame.sort("symbol", "ts")

        return self._hot.answer("bars", key, "bars", self._lock, load)

    def _arrow(self, sql: str, params: dict[str, object]) -> Any:
        rel = self.con.sql(sql, params=params or None)
        return rel.to_arrow_reader().read_all() if rel is not None else None

    def _variant_count(self, symbol: str, timeframe: str) -> int:
        """Versions a timestamp may have: distinct (source, feed) pairs held, plus one when a refresh
        stored newer versions. Read from the bars once per (symbol, timeframe) — not from the ledger,
        since the live stream stores bars without coverage — then kept current by every write."""
        key = (symbol, timeframe)
        held = self._variants.get(key)
        if held is None:
            tables = bar_tables([symbol])
            with self._lock:
                rows = self.con.execute(
                    f"SELECT DISTINCT source, feed FROM {tables.bars.name} WHERE symbol = ? AND timeframe = ?",
                    [symbol, timeframe],
                ).fetchall()
                rev = self.con.execute(
                    f"SELECT count(*) FROM {tables.revisions.name} WHERE symbol = ? AND timeframe = ?",
                    [symbol, timeframe],
                ).fetchall()
            held = self._variants[key] = _Variants({(r[0], r[1]) for r in rows}, bool(rev and rev[0][0]))
        return len(held.pairs) + int(held.revised and len(held.pairs) == 1)

    def _note_variants(self, page: PageWrite, stored: int) -> None:
        """Keep the cached variant sets current after a write (no re-reading)."""
        if not stored and not page.revised:
            return
        pairs = page.bars.select("symbol", "source", "feed").unique().iter_rows() if stored else ()
        for sym, source, feed in pairs:
            held = self._variants.get((sym, page.ingest.timeframe))
            if held is not None:
                held.pairs.add((source, feed))
        if page.revised:
            for sym in page.ingest.symbols:
                held = self._variants.get((sym, page.ingest.timeframe))
                if held is not None:
                    held.revised = True

    def read_bars_exact(
        self, symbol: str, timeframe: str, start: datetime, end: datetime, *, source: str, feed: str
    ) -> pl.DataFrame:
        """The hot read path: one symbol, one source and feed — no de-duplication window needed."""
        return self.read_bars([symbol], timeframe, start, end, source=source, feed=feed)

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
        where = ["timeframe = $tf", "start < $end", '"end" > $start', "list_contains($syms, symbol)"]
        params: dict[str, object] = {"tf": timeframe, "start": _n(start), "end": _n(end), "syms": list(symbols)}
        if provider is not None:
            where.append("provider = $provider")
            params["provider"] = provider
        if feed is not None:
            where.append("feed = $feed")
            params["feed"] = feed
        sql = f"SELECT * FROM coverage WHERE {' AND '.join(where)} ORDER BY symbol, start"

        def load() -> pl.DataFrame:
            return _labelled(self._arrow(sql, params), _COVERAGE_ARROW)

        # the ledger is written by write_pages only, which bumps the bars generation
        return self._hot.answer("coverage", (sql, tuple(map(repr, params.values()))), "bars", self._lock, load)

    def quarantine(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame:
        held = bar_tables([symbol] if symbol else []).quarantine
        sql = f"SELECT * FROM {held.name}" + (" WHERE symbol = $sym" if symbol else "") + " ORDER BY ts LIMIT $limit"
        params: dict[str, object] = {"limit": limit}
        if symbol:
            params["sym"] = symbol
        with self._lock:
            table = self._arrow(sql, params)
        return _aware(pl.from_arrow(table), dict(held.columns))  # type: ignore[arg-type]

    def ingest_log(self, limit: int = 100) -> pl.DataFrame:
        with self._lock:
            table = self._arrow("SELECT * FROM ingest_log ORDER BY id DESC LIMIT $limit", {"limit": limit})
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def write_reconciliation(self, run_id: str, created_at: datetime, rows: pl.DataFrame) -> int:
        """Store one reconciliation run's per-bar results (a run replaces nothing: runs are kept)."""
        frame = _naive(rows.select(pl.lit(run_id).alias("run_id"), pl.lit(created_at).alias("created_at"), pl.all()))
        with self._lock:
            self.con.register("_rec", frame.to_arrow())
            try:
                self.con.execute("INSERT INTO reconciliation SELECT * FROM _rec").fetchall()
            finally:
                self.con.unregister("_rec")
        return frame.height

    def reconciliation(self, symbol: str, timeframe: str | None = None, run_id: str | None = None) -> pl.DataFrame:
        where = ["symbol = $sym"]
        params: dict[str, object] = {"sym": symbol}
        if timeframe:
            where.append("timeframe = $tf")
            params["tf"] = timeframe
        if run_id:
            where.append("run_id = $run")
            params["run"] = run_id
        with self._lock:
            table = self._arrow(f"SELECT * FROM reconciliation WHERE {' AND '.join(where)} ORDER BY ts", params)
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    # --- data quality ----------------------------------------------------------------------------

    def _insert_findings(self, findings: pl.DataFrame, detected_at: datetime) -> None:
        """Append findings not already recorded (same symbol, timeframe, ts and kind)."""
        frame = _naive(findings.with_columns(detected_at=pl.lit(detected_at)).select(ANOMALIES.names))
        self.con.register("_f", frame.to_arrow())
        try:
            self.con.execute(
                """INSERT INTO anomalies SELECT f.* FROM _f f ANTI JOIN (
                       SELECT symbol, timeframe, ts, kind FROM anomalies
                       WHERE ts BETWEEN (SELECT min(ts) FROM _f) AND (SELECT max(ts) FROM _f)
                   ) a USING (symbol, timeframe, ts, kind)"""
            ).fetchall()
        finally:
            self.con.unregister("_f")

    def replace_findings(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        findings: pl.DataFrame,
        detected_at: datetime,
    ) -> None:
        """An analysis over ``[start, end)`` supersedes earlier findings there (they are derived data)."""
        with self._lock:
            try:
                self.con.execute("BEGIN TRANSACTION")
                self.con.execute(
                    """DELETE FROM anomalies WHERE timeframe = $tf AND ts >= $s AND ts < $e
                       AND list_contains($syms, symbol)""",
                    {"tf": timeframe, "s": _n(start), "e": _n(end), "syms": list(symbols)},
                ).fetchall()
                if findings.height:
                    self._insert_findings(findings, detected_at)
                self.con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback()
                raise StoreError(f"store write failed, nothing written: {exc}", details={"path": self.path}) from exc

    def findings(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        with self._lock:
            table = self._arrow(
                """SELECT * FROM anomalies WHERE timeframe = $tf AND ts >= $s AND ts < $e
                   AND list_contains($syms, symbol) ORDER BY symbol, ts, kind""",
                {"tf": timeframe, "s": _n(start), "e": _n(end), "syms": list(symbols)},
            )
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def quarantined_at(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        """``(symbol, ts)`` of quarantined rows in the range (one per row, not de-duplicated)."""
        with self._lock:
            table = self._arrow(
                f"""SELECT symbol, ts FROM {bar_tables(symbols).quarantine.name} WHERE timeframe = $tf
                   AND ts >= $s AND ts < $e AND list_contains($syms, symbol)""",
                {"tf": timeframe, "s": _n(start), "e": _n(end), "syms": list(symbols)},
            )
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def replace_scores(self, timeframe: str, days: pl.DataFrame) -> None:
        """Store per-day scores (a ``symbol`` column, many symbols at once), replacing earlier scores
        of the same symbols and days."""
        if not days.height:
            return
        frame = _naive(days.select(QUALITY_SCORES.names))
        with self._lock:
            try:
                self.con.execute("BEGIN TRANSACTION")
                self.con.register("_s", frame.to_arrow())
                self.con.execute(
                    """DELETE FROM quality_scores WHERE timeframe = $tf
                       AND (symbol, day) IN (SELECT (symbol, day) FROM _s)""",
                    {"tf": timeframe},
                ).fetchall()
                self.con.execute("INSERT INTO quality_scores SELECT * FROM _s").fetchall()
                self.con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback()
                raise StoreError(f"store write failed, nothing written: {exc}", details={"path": self.path}) from exc
            finally:
                self.con.unregister("_s")

    def scores(self, symbol: str, timeframe: str) -> pl.DataFrame:
        with self._lock:
            table = self._arrow(
                "SELECT * FROM quality_scores WHERE symbol = $sym AND timeframe = $tf ORDER BY day",
                {"sym": symbol, "tf": timeframe},
            )
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def covered_until(self, symbols: list[str], timeframe: str) -> dict[str, datetime]:
        """Per symbol, the end of the newest ledger entry (any provider)."""
        with self._lock:
            rows = self.con.execute(
                """SELECT symbol, max("end") FROM coverage WHERE timeframe = ? AND list_contains(?, symbol)
                   GROUP BY symbol""",
                [timeframe, list(symbols)],
            ).fetchall()
        return {sym: end.replace(tzinfo=UTC) for sym, end in rows}

    def revisions(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame:
        held = bar_tables([symbol] if symbol else []).revisions.name
        sql = f"SELECT * FROM {held}" + (" WHERE symbol = $sym" if symbol else "") + " ORDER BY ts LIMIT $limit"
        params: dict[str, object] = {"limit": limit, **({"sym": symbol} if symbol else {})}
        with self._lock:
            table = self._arrow(sql, params)
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def log_job_runs(self, rows: list[dict[str, object]]) -> None:
        """One row per symbol of a scheduled run."""
        self._append(JOB_RUNS, rows)

    def log_admin_action(self, row: dict[str, object]) -> None:
        self._append(AUDIT_LOG, [row])

    def admin_actions(self, limit: int = 100) -> pl.DataFrame:
        with self._lock:
            table = self._arrow("SELECT * FROM audit_log ORDER BY id DESC LIMIT $limit", {"limit": limit})
        return _aware(pl.from_arrow(table), dict(AUDIT_LOG.columns))  # type: ignore[arg-type]

    def _append(self, table: Table, rows: list[dict[str, object]]) -> None:
        """Rows (dicts of the table's written columns) appended to a table numbered by its serial."""
        if not rows:
            return
        cols = table.written
        with self._lock:
            try:
                self.con.executemany(
                    f"INSERT INTO {table.name} ({', '.join(_quote(c) for c in cols)}) "
                    f"VALUES ({', '.join('?' for _ in cols)})",
                    [[_param(r[c]) for c in cols] for r in rows],
                )
            except duckdb.Error as exc:
                raise StoreError(f"store write failed, nothing written: {exc}", details={"path": self.path}) from exc

    def job_runs(self, job: str | None = None, limit: int = 100) -> pl.DataFrame:
        sql = "SELECT * FROM job_runs" + (" WHERE job = $job" if job else "") + " ORDER BY id DESC LIMIT $limit"
        params: dict[str, object] = {"limit": limit, **({"job": job} if job else {})}
        with self._lock:
            table = self._arrow(sql, params)
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def reconciliation_many(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        with self._lock:
            table = self._arrow(
                """SELECT * FROM reconciliation WHERE timeframe = $tf AND ts >= $s AND ts < $e
                   AND list_contains($syms, symbol)""",
                {"tf": timeframe, "s": _n(start), "e": _n(end), "syms": list(symbols)},
            )
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def save_prev_closes(self, rows: list[tuple[str, date, float, str]]) -> None:
        """Keep (symbol, session, close, source): the close of the session before the current one."""
        if not rows:
            return
        now = datetime.now(UTC).replace(tzinfo=None)
        with self._lock:
            self.con.executemany(
                f"INSERT OR REPLACE INTO prev_close VALUES ({', '.join('?' for _ in PREV_CLOSE.names)})",
                [(*r, now) for r in rows],
            )

    def prev_closes(self, symbols: list[str]) -> dict[str, tuple[date, float, str]]:
        """Symbol -> (session, close, source) for the symbols held."""
        if not symbols:
            return {}
        with self._lock:
            rows = self.con.execute(
                "SELECT symbol, session, close, source FROM prev_close WHERE symbol IN (SELECT unnest(?))", [symbols]
            ).fetchall()
        return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}

    def summary(self) -> pl.DataFrame:
        """Per symbol/timeframe/source/feed: bar count and time span."""
        with self._lock:
            table = self._arrow(
                f"""SELECT symbol, timeframe, source, feed, count(*) AS bars, min(ts) AS first, max(ts) AS last
                   FROM ({_ALL_BARS}) GROUP BY ALL ORDER BY symbol, timeframe, source, feed""",
                {},
            )
        return _aware(pl.from_arrow(table))  # type: ignore[arg-type]

    def counts(self) -> dict[str, int]:
        with self._lock:
            try:
                return {t: int(self.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]) for t in COUNTED}
            except duckdb.Error as exc:  # the readiness probe: a store that cannot be read is a StoreError
                raise StoreError(f"cannot read store {self.path}: {exc}", details={"path": self.path}) from exc

    # --- corporate actions (ActionStore) -------------------------------------------------------

    def write_actions(
        self, actions: pl.DataFrame, coverage: list[ActionCoverage], quarantine: pl.DataFrame | None = None
    ) -> int:
        frame = _naive(
            with_content_hash(actions.select(ACTION_COLUMNS)).unique(
                ["action_id", "content_hash"], keep="first", maintain_order=True
            )
        )
        cols = ", ".join(_quote(c) for c in [*ACTION_COLUMNS, "version", "content_hash", "stored_at"])
        picked = ", ".join(f"f.{_quote(c)}" for c in ACTION_COLUMNS)
        now = datetime.now(UTC).replace(tzinfo=None)
        stored = 0
        with self._lock:
            with self._transaction():
                if frame.height:
                    stored = self._insert(_NEW_VERSIONS.format(cols=cols, picked=picked), frame, {"now": now})
                if coverage:
                    self.con.executemany(
                        f"INSERT INTO action_coverage VALUES ({', '.join('?' for _ in ACTION_COVERAGE.names)})",
                        [[_param(getattr(c, col)) for col in ACTION_COVERAGE.names] for c in coverage],
                    )
                if quarantine is not None and quarantine.height:
                    self._insert(_NEW_QUARANTINE, _naive(quarantine.select(ACTION_QUARANTINE.names)))
            if stored or coverage:  # committed: what adjust_fingerprint covers has changed
                self._hot.bump("actions")
        if stored:
            ROWS_STORED.labels("corporate_actions", "", "").inc(stored)
        return stored

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
        where = ["list_contains($syms, symbol)", f"{ADJUST_DATE_SQL} BETWEEN $start AND $end"]
        params: dict[str, object] = {"syms": list(symbols), "start": start, "end": end}
        if types:
            where.append("list_contains($types, type)")
            params["types"] = list(types)
        if providers:
            where.append("list_contains($providers, provider)")
            params["providers"] = list(providers)
        if known_by is not None:
            where.append(f"{KNOWN_DATE_SQL} <= $known")
            params["known"] = known_by
        newest = "" if all_versions else "QUALIFY version = max(version) OVER (PARTITION BY action_id)"
        sql = (
            f"SELECT * FROM corporate_actions WHERE {' AND '.join(where)} {newest} "
            f"ORDER BY symbol, {ADJUST_DATE_SQL}, action_id, version"
        )
        with self._lock:
            table = self._arrow(sql, params)
        return _aware(pl.from_arrow(table), dict(CORPORATE_ACTIONS.columns))  # type: ignore[arg-type]

    def action_coverage(
        self, symbols: list[str], start: date, end: date, *, provider: str | None = None
    ) -> pl.DataFrame:
        where = ["list_contains($syms, symbol)", "start <= $end", '"end" >= $start']
        params: dict[str, object] = {"syms": list(symbols), "start": start, "end": end}
        if provider is not None:
            where.append("provider = $provider")
            params["provider"] = provider
        sql = f"SELECT * FROM action_coverage WHERE {' AND '.join(where)} ORDER BY symbol, start"

        def load() -> pl.DataFrame:
            return _aware(pl.from_arrow(self._arrow(sql, params)), ACTION_COVERAGE_SCHEMA)  # type: ignore[arg-type]

        # the ledger is written by write_actions only, which bumps the actions generation
        return self._hot.answer(
            "action_coverage", (sql, tuple(map(repr, params.values()))), "actions", self._lock, load
        )

    def adjust_fingerprint(
        self, symbols: list[str], daily: list[tuple[str, datetime, datetime]]
    ) -> tuple[tuple[object, ...], tuple[object, ...]]:
        # No query: while this store has the file open DuckDB's lock keeps every other process from
        # writing it, and every write that stores what this covers through any store object of this
        # process bumps a generation of the file (``store/hot.py``): ``actions`` (``write_actions``: new
        # versions or ledger entries), ``1Day:SYMBOL`` (``write_pages``: that symbol's daily bars). So
        # (this opening, those generations) changes with any write the counts and newest times would
        # show (and with a daily write outside the windows too); a reopened store — another process
        # may have written in between — is another opening.
        acts = (self._opening, self._hot.generation("actions")) if symbols else ()
        days = (self._opening, *(self._hot.generation(f"1Day:{sym}") for sym in dict.fromkeys(s for s, _, _ in daily)))
        return acts, days if daily else ()

    def action_quarantine(self, symbol: str | None = None) -> pl.DataFrame:
        sql = "SELECT * FROM action_quarantine" + (" WHERE symbol = $sym" if symbol else "") + " ORDER BY ex_date"
        with self._lock:
            table = self._arrow(sql, {"sym": symbol} if symbol else {})
        return _aware(pl.from_arrow(table), ACTION_QUARANTINE_SCHEMA)  # type: ignore[arg-type]

    def write_action_reconciliation(self, run_id: str, created_at: datetime, rows: pl.DataFrame) -> int:
        frame = _naive(rows.select(pl.lit(run_id).alias("run_id"), pl.lit(created_at).alias("created_at"), pl.all()))
        with self._lock:
            try:
                return self._insert(
                    "INSERT INTO action_reconciliation SELECT * FROM _page; SELECT count(*) FROM _page", frame
                )
            except duckdb.Error as exc:
                raise StoreError(f"store write failed: {exc}", details={"path": self.path}) from exc

    def action_reconciliation(self, symbol: str, run_id: str | None = None) -> pl.DataFrame:
        sql = "SELECT * FROM action_reconciliation WHERE symbol = $sym" + (" AND run_id = $run" if run_id else "")
        params: dict[str, object] = {"sym": symbol, **({"run": run_id} if run_id else {})}
        with self._lock:
            table = self._arrow(sql + " ORDER BY created_at, coalesce(reference_date, other_date)", params)
        return _aware(pl.from_arrow(table), dict(ACTION_RECONCILIATION.columns))  # type: ignore[arg-type]

    # --- option chain history (OptionStore) -----------------------------------------------------

    def write_option_snapshot(self, rows: pl.DataFrame, quarantine: pl.DataFrame | None = None) -> tuple[int, int]:
        frames = [
            (table, _naive(option_rows(frame, table))) if frame is not None and frame.height else (table, None)
            for table, frame in ((OPTION_QUARANTINE, quarantine), (OPTION_SNAPSHOTS, rows))
        ]
        out = [0, 0]  # quarantined, stored
        with self._transaction():
            for i, (table, frame) in enumerate(frames):
                if frame is None:
                    continue
                out[i] = self._insert(
                    f"""INSERT INTO {table.name} SELECT p.* FROM _page p WHERE NOT EXISTS (
                           SELECT 1 FROM {table.name} h WHERE h.as_of BETWEEN $lo AND $hi AND {_SAME_OPTION_ROW})""",
                    frame,
                    {"lo": frame["as_of"].min(), "hi": frame["as_of"].max()},
                )
        if out[1]:
            ROWS_STORED.labels(OPTION_SNAPSHOTS.name, str(rows["source"][0]), "").inc(out[1])
        return out[1], out[0]

    def read_option_snapshots(self, where: OptionFilter | None = None) -> pl.DataFrame:
        return self._option_rows(OPTION_SNAPSHOTS, where, "ORDER BY contract, as_of, source, feed")

    def option_quarantine(self, where: OptionFilter | None = None, limit: int = 1000) -> pl.DataFrame:
        return self._option_rows(OPTION_QUARANTINE, where, f"ORDER BY as_of DESC, contract LIMIT {int(limit)}")

    def _option_rows(self, table: Table, where: OptionFilter | None, order: str) -> pl.DataFrame:
        params: dict[str, object] = {}

        def bind(value: object) -> str:
            params[f"p{len(params)}"] = _param(value)
            return f"$p{len(params) - 1}"

        clauses = (where or OptionFilter()).clauses(bind)
        sql = f"SELECT * FROM {table.name}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "") + f" {order}"
        with self._lock:
            arrow = self._arrow(sql, params)
        return _aware(pl.from_arrow(arrow), dict(table.columns))  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            self._hot.clear()
            self.con.close()

    def __enter__(self) -> DuckDBStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_KEY = ["symbol", "timeframe", "ts", "source", "feed"]  # what makes a stored bar the same bar
# Every asset class's bars, for what lists them all (the store summary).
_ALL_BARS = " UNION ALL ".join(f"SELECT symbol, timeframe, source, feed, ts FROM {t.bars.name}" for t in BAR_TABLES)

# A version per action whose content differs from its newest stored version (or that is new).
_NEW_VERSIONS = """
WITH latest AS (
    SELECT action_id, max(version) AS v, arg_max(content_hash, version) AS h FROM corporate_actions
    WHERE action_id IN (SELECT action_id FROM _page) GROUP BY action_id),
fresh AS (
    SELECT p.*, coalesce(l.v, 0) AS base FROM _page p LEFT JOIN latest l USING (action_id)
    WHERE l.h IS DISTINCT FROM p.content_hash)
INSERT INTO corporate_actions ({cols})
SELECT {picked}, f.base + row_number() OVER (PARTITION BY f.action_id ORDER BY f.fetched_at), f.content_hash, $now
FROM fresh f"""
_NEW_QUARANTINE = """
INSERT INTO action_quarantine SELECT * FROM _page p
WHERE NOT EXISTS (SELECT 1 FROM action_quarantine q WHERE q.action_id = p.action_id AND q.reason = p.reason)"""


# A held option row with the key of the staged one (``p``): contract, as_of, source, feed.
_SAME_OPTION_ROW = " AND ".join(f"h.{c} IS NOT DISTINCT FROM p.{c}" for c in OPTION_SNAPSHOTS.key)


_SERIES = ["symbol", "timeframe", "source", "feed"]  # the key without the time


def _distinct_keys(batch: pl.DataFrame) -> bool:
    """True when no two rows of ``batch`` share a key, shown without hashing every row's key: the rows
    come in runs of one series (``_SERIES``) with strictly rising times, and the runs of any one series
    span disjoint times. False means only "not shown" (the caller then tests the keys themselves)."""
    if batch.height < 2:
        return True
    new = pl.any_horizontal([pl.col(c).ne_missing(pl.col(c).shift()) for c in _SERIES]) | (pl.int_range(pl.len()) == 0)
    runs = batch.select(*_SERIES, "ts", new.alias("_new"))
    rising = runs.select(((pl.col("ts").diff() > 0) | pl.col("_new")).fill_null(False).all()).item()
    if not rising:
        return False
    spans = (
        runs.filter(pl.col("ts").is_not_null())
        .with_columns(_run=pl.col("_new").cum_sum())
        .group_by("_run")
        .agg(*[pl.col(c).first() for c in _SERIES], lo=pl.col("ts").first(), hi=pl.col("ts").last())
        .sort([*_SERIES, "lo"], nulls_last=True)
    )
    same = pl.all_horizontal([pl.col(c).eq_missing(pl.col(c).shift()) for c in _SERIES])
    return bool(spans.select((~same | (pl.col("lo") > pl.col("hi").shift())).fill_null(True).all()).item())


def _quote(column: str) -> str:
    return f'"{column}"'


def _param(value: object) -> object:
    """A Python value as a DuckDB parameter (aware datetimes to naive UTC)."""
    return _n(value) if isinstance(value, datetime) else value


def _n(ts: datetime) -> datetime:
    """Aware UTC datetime -> naive UTC for DuckDB TIMESTAMP parameters."""
    if ts.tzinfo is None:
        return ts
    return ts.astimezone(UTC).replace(tzinfo=None)
