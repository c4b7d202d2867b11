"""PostgreSQL store: the shared backend (``--store postgresql://...``), for many processes at once.

One ADBC connection (``adbc-driver-postgresql``) carries everything, so a page's bars, quarantine,
findings, ledger and ingest-log rows commit in one transaction. Bulk rows never become Python
objects: frames go to Arrow and through ``adbc_ingest`` (binary COPY) — straight into ``bars`` when
the batch's span holds nothing yet (the backfill's case), else into a session-local stage, moved by
``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. The unique key (``pg_schema``) is what makes
writes idempotent, also between concurrent writers: two backfills of one range store each bar once.
Reads come back as Arrow and become polars frames with the types ``DuckDBStore`` returns.

Synchronous, like the DuckDB store: services call it through ``asyncio.to_thread`` from one writer.
A lost connection (server restart) is re-opened; a page write that failed on it is retried for up to
``retry_seconds`` (it wrote nothing, and writing it again is idempotent), then ``STORE_ERROR``.
Reads reconnect once and otherwise fail at once (a gateway request or health probe must not wait).

Reading one symbol with both ``source`` and ``feed`` returns the newest revision of each ts (DuckDB
returns every stored version there); every other read is the same as DuckDB's, dtypes included.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import polars as pl
import pyarrow as pa

from marketpipe.core.config import url_without_password
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
    RECONCILIATION,
    SCHEMA_VERSION,
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
from marketpipe.store.pg_schema import (
    ACTIONS_LOCK,
    MIGRATION_LOCK,
    MIGRATIONS,
    PARTITION_LOCK,
    REVISION,
    SCHEMA_MIGRATIONS_DDL,
    column_list,
    month_start,
    next_month,
    partition_ddl,
    pg_type,
    q,
    stage_ddl,
)

log = get_logger("marketpipe.store")

SCHEMES = ("postgresql", "postgres")
# bars table -> the Arrow schema its reads are cast to (equities: integer volume; crypto: float)
_BAR_ARROW = {t.bars.name: pl.DataFrame(schema=t.schema).to_arrow().schema for t in BAR_TABLES}
_BAR_COLS = column_list(BAR_COLUMNS)
_FEED_PREFERENCE = "CASE feed WHEN 'sip' THEN 0 WHEN 'iex' THEN 2 ELSE 1 END"
_KEY = (
    "b.symbol = p.symbol AND b.timeframe = p.timeframe AND b.ts = p.ts AND b.source = p.source "
    "AND b.feed IS NOT DISTINCT FROM p.feed"
)
_VALUES_SAME = " AND ".join(
    f"b.{c} IS NOT DISTINCT FROM p.{c}" for c in ("open", "high", "low", "close", "volume", "trade_count", "vwap")
)
_ALL_BARS = " UNION ALL ".join(f"SELECT symbol, timeframe, source, feed, ts FROM {t.bars.name}" for t in BAR_TABLES)


def _stage(tables: BarTables) -> str:
    """The session-local staging table of an asset class's bars (its own column types)."""
    return f"_stage_{tables.bars.name}"


def is_postgres_url(target: str) -> bool:
    return urlsplit(target).scheme in SCHEMES


def connect_url(url: str, connect_timeout: float) -> str:
    """The libpq URL with a connect timeout (libpq waits forever by default) and an application name."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("connect_timeout", str(max(1, int(connect_timeout))))
    query.setdefault("application_name", "marketpipe")
    return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))


def _utc(value: object) -> object:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _typed(frame: pl.DataFrame, table: Table) -> pl.DataFrame:
    """The table's written columns with exactly its types (binary COPY takes no other)."""
    cols = table.written
    return frame.select(cols).cast({c: table.columns[c] for c in cols})  # type: ignore[arg-type]


class PostgresStore:
    """Not thread-safe beyond its lock: one thread at a time (services call it via ``to_thread``)."""

    def __init__(
        self,
        url: str,
        *,
        read_only: bool = False,
        create: bool = True,
        connect_timeout: float = 5.0,
        retry_seconds: float = 20.0,
    ) -> None:
        try:
            import adbc_driver_postgresql.dbapi as pgdb
        except ImportError as exc:  # the optional extra is not installed
            raise StoreError(
                "the PostgreSQL store needs the 'postgres' extra: pip install 'marketpipe[postgres]'",
                details={"path": url_without_password(url)},
            ) from exc
        self._pgdb = pgdb
        self.path = url_without_password(url)
        self._url = connect_url(url, connect_timeout)
        self._read_only = read_only
        self._retry_seconds = retry_seconds
        self._lock = threading.RLock()
        self._con: Any = None
        self._partitions: set[tuple[str, datetime]] = set()  # (partitioned table, month) created
        # A store never closed (``mp.bars``' default client lives until exit) is closed at exit, before
        # the interpreter tears the driver down under the connection's finalizer.
        atexit.register(_close_at_exit, weakref.ref(self))
        self._connect()
        if read_only or not create:
            if not self._migrated():
                self.close()
                log.warning("store_missing", path=self.path)
                raise StoreError(
                    f"no store at {self.path}: nothing has been stored there yet (check --store / "
                    "MARKETPIPE_STORE_URL / [store] url, or fetch first)",
                    details={"path": self.path},
                )
            self._check_version()
        if not read_only:
            self._migrate()
            today = datetime.now(UTC).date()
            for tables in BAR_TABLES:
                self._ensure_partitions(tables.bars.name, {month_start(today), next_month(month_start(today))})

    # --- connection ---------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            con = self._pgdb.connect(self._url)
        except self._pgdb.Error as exc:
            log.error("store_open_failed", path=self.path, error=str(exc).splitlines()[0])
            raise StoreError(
                f"cannot connect to PostgreSQL store {self.path}: {str(exc).splitlines()[0]} "
                "(is the server running, and are host, port, user and database right?)",
                details={"path": self.path, "reason": "connect"},
            ) from exc
        cur = con.cursor()
        cur.execute("SET TIME ZONE 'UTC'")
        if self._read_only:
            cur.execute("SET default_transaction_read_only = on")
        con.commit()
        self._con = con
        self._cur = cur

    def _drop_connection(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            _close_quietly(self._cur, con)

    def _lost(self, exc: BaseException) -> bool:
        """The connection is gone (server restart or crash), as opposed to an error in a statement."""
        return isinstance(exc, self._pgdb.OperationalError) or self._con is None

    def _run(self, what: str, work: Any, *, retry: bool = False) -> Any:
        """Run ``work(cursor)`` in one transaction: commit on success; on failure roll back and raise
        ``StoreError`` (nothing written). A connection found lost (the server restarted) is re-opened
        once at once; with ``retry`` (idempotent writes: a backfill's pages) the work is tried again
        until ``retry_seconds`` have passed, so a run rides out a restart. Reads fail fast instead:
        a health probe or a gateway request must not wait for a server that is down."""
        deadline = time.monotonic() + self._retry_seconds
        attempt = 0
        with self._lock:
            while True:
                attempt += 1
                try:
                    if self._con is None:
                        self._connect()
                    out = work(self._cur)
                    self._con.commit()
                    return out
                except _Staged:
                    self._rollback(False)  # the work knows to take the staged way this time
                    continue
                except StoreError:
                    if not retry or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.25)
                except self._pgdb.Error as exc:
                    lost = self._lost(exc)
                    self._rollback(lost)
                    if lost and (attempt == 1 or (retry and time.monotonic() < deadline)):
                        log.warning("store_connection_lost", path=self.path, retrying=what)
                        if attempt > 1:
                            time.sleep(0.25)
                        continue
                    first = str(exc).splitlines()[0]
                    log.error("store_failed", path=self.path, op=what, error=first)
                    raise StoreError(
                        f"store {what} failed{'' if what == 'read' else ', nothing written'}: {first}",
                        details={"path": self.path, **({"reason": "connection"} if lost else {})},
                    ) from exc
                except BaseException:
                    self._rollback(False)
                    raise

    def _rollback(self, lost: bool) -> None:
        if lost:
            self._drop_connection()
            return
        try:
            self._con.rollback()
        except self._pgdb.Error:
            log.warning("rollback_failed", path=self.path)
            self._drop_connection()

    def _arrow(self, sql: str, params: tuple[object, ...] = ()) -> pa.Table:
        def work(cur: Any) -> pa.Table:
            cur.execute(sql, tuple(_utc(p) for p in params) or None)
            return cur.fetch_arrow_table()

        return self._run("read", work)

    def _frame(self, sql: str, params: tuple[object, ...] = ()) -> pl.DataFrame:
        return pl.from_arrow(self._arrow(sql, params))  # type: ignore[return-value]

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        def work(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(sql, tuple(_utc(p) for p in params) or None)
            return list(cur.fetchall())

        return self._run("read", work)  # type: ignore[no-any-return]

    # --- schema ---------------------------------------------------------------------------------

    def _migrated(self) -> bool:
        rows = self._rows("SELECT to_regclass('schema_migrations') IS NOT NULL")
        return bool(rows[0][0])

    def _check_version(self) -> None:
        rows = self._rows("SELECT coalesce(max(version), 0) FROM schema_migrations")
        if int(rows[0][0]) > len(MIGRATIONS):
            raise StoreError(
                f"store {self.path} has schema version {rows[0][0]}, newer than this marketpipe ({len(MIGRATIONS)})",
                details={"path": self.path},
            )

    def _migrate(self) -> None:
        def work(cur: Any) -> None:
            cur.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            cur.execute(SCHEMA_MIGRATIONS_DDL)
            cur.execute("SELECT version FROM schema_migrations")
            done = {int(r[0]) for r in cur.fetchall()}
            if done and max(done) > len(MIGRATIONS):
                raise StoreError(
                    f"store {self.path} has schema version {max(done)}, newer than this marketpipe ({len(MIGRATIONS)})",
                    details={"path": self.path},
                )
            for m in MIGRATIONS:
                if m.version in done:
                    continue
                for stmt in m.statements:
                    cur.execute(stmt)
                cur.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)", (m.version, m.description)
                )
                log.info("store_migrated", path=self.path, version=m.version, what=m.description)
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

        self._run("migration", work)

    def migrations(self) -> list[tuple[int, str]]:
        """The applied migrations (version, description), in order."""
        return [(int(v), d) for v, d in self._rows("SELECT version, description FROM schema_migrations ORDER BY 1")]

    def _ensure_partitions(self, table: str, months: set[datetime]) -> None:
        """Create the monthly partitions of a partitioned table (``bars``, ``option_snapshots``, ...)
        a write needs, each in a short
        transaction of its own before the write (creating one locks the parent: inside a write
        transaction two writers would deadlock)."""
        missing = {(table, m) for m in months} - self._partitions
        if not missing:
            return

        def work(cur: Any) -> None:
            cur.execute(f"SELECT pg_advisory_xact_lock({PARTITION_LOCK})")
            for name, start in sorted(missing):
                cur.execute(partition_ddl(name, start))

        self._run("partition", work, retry=True)
        self._partitions |= missing

    # --- writes ---------------------------------------------------------------------------------

    def write_pages(self, pages: list[PageWrite]) -> list[int]:
        classes = by_asset_class(pages)
        tables_of = {i: tables for tables, idx in classes for i in idx}
        frames = [_typed(p.bars, tables_of[i].bars) for i, p in enumerate(pages)]
        for tables, idx in classes:
            months: set[datetime] = set()
            for f in (frames[i] for i in idx):
                if f.height:
                    months |= {month_start(d) for d in f["ts"].dt.date().dt.truncate("1mo").unique().to_list()}
            self._ensure_partitions(tables.bars.name, months)
        quarantines = [
            _typed(p.quarantine, tables_of[i].quarantine) if p.quarantine.height else None for i, p in enumerate(pages)
        ]
        findings = [
            _typed(p.anomalies.with_columns(detected_at=pl.lit(p.ingest.fetched_at)), ANOMALIES)
            if p.anomalies is not None and p.anomalies.height
            else None
            for p in pages
        ]

        direct = [True]

        def work(cur: Any) -> list[int]:
            stored = [0] * len(pages)
            try:
                for tables, idx in classes:
                    sub = self._insert_bars(
                        cur, tables, [pages[i] for i in idx], [frames[i] for i in idx], direct=direct[0]
                    )
                    for i, n in zip(idx, sub, strict=True):
                        stored[i] = n
            except _Staged:
                direct[0] = False
                raise
            for i, (page, n, quar, found) in enumerate(zip(pages, stored, quarantines, findings, strict=True)):
                self._write_side_tables(cur, tables_of[i], page, n, quar, found)
            return stored

        stored: list[int] = self._run("write", work, retry=True)
        for page, n in zip(pages, stored, strict=True):
            page.stored = n
            if n:
                ROWS_STORED.labels(
                    bar_tables(page.ingest.symbols).bars.name, page.ingest.source, page.ingest.timeframe
                ).inc(n)
        return stored

    def _insert_bars(
        self, cur: Any, tables: BarTables, pages: list[PageWrite], frames: list[pl.DataFrame], *, direct: bool = True
    ) -> list[int]:
        """Insert the pages' bars into their asset class's ``tables`` (one class per call)."""
        heights = [f.height for f in frames]
        for p in pages:
            p.revised = 0
        if not any(heights):
            return heights
        refresh = any(p.refresh for p in pages)
        batch = pl.concat([f for f in frames if f.height])
        bars, stage = tables.bars.name, _stage(tables)
        if direct and not refresh and not self._overlaps(cur, bars, batch):
            # Nothing held in the batch's span: one binary COPY into the table. When the key refuses
            # it (a concurrent writer committed the same rows first, or two pages of the batch share
            # a bar) the transaction is rolled back and run again the staged way (``_Staged``).
            try:
                cur.adbc_ingest(bars, batch.to_arrow(), mode="append")
            except self._pgdb.IntegrityError as exc:
                raise _Staged from exc
            return heights
        cur.execute(stage_ddl(tables.bars, stage, "page int4 NOT NULL"))
        staged = pl.concat([f.with_columns(page=pl.lit(i, pl.Int32)) for i, f in enumerate(frames) if f.height])
        cur.adbc_ingest(stage, staged.to_arrow(), mode="append", temporary=True)
        out = []
        for i, (page, n) in enumerate(zip(pages, heights, strict=True)):
            if not n:
                out.append(0)
            elif page.refresh:
                out.append(self._refresh(cur, tables, page, i))
            else:
                out.append(
                    _inserted(
                        cur,
                        f"INSERT INTO {bars} ({_BAR_COLS}) SELECT {_BAR_COLS} FROM {stage} WHERE page = $1 "
                        "ON CONFLICT DO NOTHING",
                        (i,),
                    )
                )
        return out

    def _overlaps(self, cur: Any, bars: str, batch: pl.DataFrame) -> bool:
        """Whether any row is held (in table ``bars``) inside a (symbol, timeframe)'s own time span in ``batch``."""
        bounds = batch.group_by("symbol", "timeframe").agg(lo=pl.col("ts").min(), hi=pl.col("ts").max())
        for sym, tf, lo, hi in bounds.iter_rows():
            cur.execute(
                f"SELECT EXISTS (SELECT 1 FROM {bars} WHERE symbol = $1 AND timeframe = $2 AND ts BETWEEN $3 AND $4)",
                (sym, tf, lo, hi),
            )
            if cur.fetchall()[0][0]:
                return True
        return False

    def _refresh(self, cur: Any, tables: BarTables, page: PageWrite, index: int) -> int:
        """Rows not held with exactly these values are stored; those whose key is held with other
        values are vendor revisions: recorded, and stored as the next revision (nothing edited)."""
        bars = tables.bars.name
        cur.execute(
            f"""CREATE TEMP TABLE _new ON COMMIT DROP AS SELECT p.* FROM {_stage(tables)} p
                WHERE p.page = $1 AND NOT EXISTS (SELECT 1 FROM {bars} b WHERE {_KEY} AND {_VALUES_SAME})""",
            (index,),
        )
        ohlcv = ("open", "high", "low", "close", "volume")
        page.revised = _inserted(
            cur,
            f"""INSERT INTO {tables.revisions.name} SELECT DISTINCT ON (p.symbol, p.ts) p.symbol, p.timeframe,
                   p.ts, p.source, p.feed, {", ".join(f"b.{c}" for c in ohlcv)},
                   {", ".join(f"p.{c}" for c in ohlcv)}, $1, $2
                FROM _new p JOIN {bars} b ON {_KEY}
                ORDER BY p.symbol, p.ts, b.fetched_at DESC NULLS LAST""",
            (page.ingest.request_id, _utc(page.ingest.fetched_at)),
        )
        stored = _inserted(
            cur,
            f"""INSERT INTO {bars} ({_BAR_COLS}, {q(REVISION)})
                SELECT {column_list(BAR_COLUMNS, "p.")},
                       coalesce((SELECT max(b.{REVISION}) + 1 FROM {bars} b WHERE {_KEY}), 0)
                FROM _new p ON CONFLICT DO NOTHING""",
        )
        cur.execute("DROP TABLE _new")
        return stored

    def _write_side_tables(
        self,
        cur: Any,
        tables: BarTables,
        page: PageWrite,
        stored: int,
        quarantine: pl.DataFrame | None,
        findings: pl.DataFrame | None,
    ) -> None:
        if quarantine is not None:
            cur.adbc_ingest(tables.quarantine.name, quarantine.to_arrow(), mode="append")
        if findings is not None:
            self._insert_findings(cur, findings)
        if page.coverage:
            cov = pl.DataFrame(
                [{c: getattr(e, c) for c in COVERAGE.names} for e in page.coverage], schema=COVERAGE_SCHEMA
            )
            cur.adbc_ingest(COVERAGE.name, cov.to_arrow(), mode="append")
        ing = page.ingest
        values = {**{c: getattr(ing, c) for c in INGEST_LOG.written if c != "symbols"}, "rows_stored": stored}
        values["symbols"] = ",".join(ing.symbols)
        cols = INGEST_LOG.written
        cur.execute(
            f"INSERT INTO ingest_log ({column_list(cols)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))})",
            tuple(_utc(values[c]) for c in cols),
        )

    def _insert_findings(self, cur: Any, findings: pl.DataFrame) -> None:
        """Append findings not already recorded (same symbol, timeframe, ts and kind)."""
        cur.execute(stage_ddl(ANOMALIES, "_stage_anomalies"))
        cur.adbc_ingest("_stage_anomalies", findings.to_arrow(), mode="append", temporary=True)
        cols = column_list(ANOMALIES.names)
        cur.execute(f"INSERT INTO anomalies ({cols}) SELECT {cols} FROM _stage_anomalies ON CONFLICT DO NOTHING")
        cur.execute("TRUNCATE _stage_anomalies")

    # --- reads ----------------------------------------------------------------------------------

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
        params: list[object] = [timeframe, start, end]
        where = ["timeframe = $1", "ts >= $2", "ts < $3"]

        def bind(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        if len(symbols) == 1:
            where.append(f"symbol = {bind(symbols[0])}")
        else:
            where.append(f"symbol = ANY({bind(list(symbols))})")
        if source is not None:
            where.append(f"source = {bind(source)}")
        if feed is not None:
            where.append(f"feed = {bind(feed)}")
        if sources is not None:
            where.append(f"source = ANY({bind(list(sources))})")
        bars = bar_tables(symbols).bars.name
        sql = f"SELECT {_BAR_COLS} FROM {bars} WHERE {' AND '.join(where)}"
        if source is None or feed is None:
            sql = (
                f"SELECT DISTINCT ON (symbol, ts) {_BAR_COLS} FROM ({sql}) v ORDER BY symbol, ts, "
                f"{_FEED_PREFERENCE}, starts_with(source, 'sim'), fetched_at DESC NULLS LAST"
            )
        elif len(symbols) == 1:
            # One symbol, one source and feed: the newest revision of each ts (usually the only one).
            sql = (
                f"SELECT DISTINCT ON (ts) {_BAR_COLS} FROM ({sql.replace(_BAR_COLS, f'{_BAR_COLS}, {REVISION}', 1)}) v "
                f"ORDER BY ts, {REVISION} DESC"
            )
        else:
            sql = (
                f"SELECT DISTINCT ON (symbol, ts) {_BAR_COLS} FROM "
                f"({sql.replace(_BAR_COLS, f'{_BAR_COLS}, {REVISION}', 1)}) v ORDER BY symbol, ts, {REVISION} DESC"
            )
        outer = []
        if after is not None:
            cmp = "<" if desc else ">"
            a_sym, a_ts = bind(after[0]), bind(after[1])
            outer.append(f"(symbol > {a_sym} OR (symbol = {a_sym} AND ts {cmp} {a_ts}))")
        sql = f"SELECT * FROM ({sql}) r" + (f" WHERE {' AND '.join(outer)}" if outer else "")
        sql += f" ORDER BY symbol, ts {'DESC' if desc else 'ASC'}"
        if limit is not None:
            sql += f" LIMIT {bind(int(limit))}"
        table = self._arrow(sql, tuple(params))
        return pl.from_arrow(table.cast(_BAR_ARROW[bars]))  # type: ignore[return-value]

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
        where = ["timeframe = $1", "start < $2", '"end" > $3', "symbol = ANY($4)"]
        params: list[object] = [timeframe, end, start, list(symbols)]
        if provider is not None:
            params.append(provider)
            where.append(f"provider = ${len(params)}")
        if feed is not None:
            params.append(feed)
            where.append(f"feed = ${len(params)}")
        frame = self._frame(f"SELECT * FROM coverage WHERE {' AND '.join(where)} ORDER BY symbol, start", tuple(params))
        return frame.cast(COVERAGE_SCHEMA)  # type: ignore[arg-type]

    def covered_until(self, symbols: list[str], timeframe: str) -> dict[str, datetime]:
        rows = self._rows(
            'SELECT symbol, max("end") FROM coverage WHERE timeframe = $1 AND symbol = ANY($2) GROUP BY symbol',
            (timeframe, list(symbols)),
        )
        return {sym: end.astimezone(UTC) for sym, end in rows}

    def quarantine(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame:
        held = bar_tables([symbol] if symbol else []).quarantine
        if symbol:
            frame = self._frame(f"SELECT * FROM {held.name} WHERE symbol = $1 ORDER BY ts LIMIT $2", (symbol, limit))
        else:
            frame = self._frame(f"SELECT * FROM {held.name} ORDER BY ts LIMIT $1", (limit,))
        return frame.cast(dict(held.columns))  # type: ignore[arg-type]

    def quarantined_at(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        return self._frame(
            f"SELECT symbol, ts FROM {bar_tables(symbols).quarantine.name} WHERE timeframe = $1 AND ts >= $2 "
            "AND ts < $3 AND symbol = ANY($4)",
            (timeframe, start, end, list(symbols)),
        )

    def ingest_log(self, limit: int = 100) -> pl.DataFrame:
        return self._frame("SELECT * FROM ingest_log ORDER BY id DESC LIMIT $1", (limit,))

    def revisions(self, symbol: str | None = None, limit: int = 1000) -> pl.DataFrame:
        held = bar_tables([symbol] if symbol else []).revisions.name
        if symbol:
            return self._frame(f"SELECT * FROM {held} WHERE symbol = $1 ORDER BY ts LIMIT $2", (symbol, limit))
        return self._frame(f"SELECT * FROM {held} ORDER BY ts LIMIT $1", (limit,))

    def summary(self) -> pl.DataFrame:
        return self._frame(
            f"""SELECT symbol, timeframe, source, feed, count(*) AS bars, min(ts) AS first, max(ts) AS last
               FROM ({_ALL_BARS}) b GROUP BY symbol, timeframe, source, feed ORDER BY symbol, timeframe, source, feed"""
        )

    def counts(self) -> dict[str, int]:
        rows = self._rows("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in COUNTED))
        return dict(zip(COUNTED, (int(v) for v in rows[0]), strict=True))

    # --- quality ---------------------------------------------------------------------------------

    def replace_findings(
        self,
        symbols: list[str],
        timeframe: str,
        start: datetime,
        end: datetime,
        findings: pl.DataFrame,
        detected_at: datetime,
    ) -> None:
        frame = _typed(findings.with_columns(detected_at=pl.lit(detected_at)), ANOMALIES) if findings.height else None

        def work(cur: Any) -> None:
            cur.execute(
                "DELETE FROM anomalies WHERE timeframe = $1 AND ts >= $2 AND ts < $3 AND symbol = ANY($4)",
                (timeframe, _utc(start), _utc(end), list(symbols)),
            )
            if frame is not None:
                self._insert_findings(cur, frame)

        self._run("write", work, retry=True)

    def findings(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        return self._frame(
            """SELECT * FROM anomalies WHERE timeframe = $1 AND ts >= $2 AND ts < $3 AND symbol = ANY($4)
               ORDER BY symbol, ts, kind""",
            (timeframe, start, end, list(symbols)),
        )

    def replace_scores(self, timeframe: str, days: pl.DataFrame) -> None:
        if not days.height:
            return
        frame = _typed(days, QUALITY_SCORES)

        def work(cur: Any) -> None:
            cur.execute(stage_ddl(QUALITY_SCORES, "_stage_scores"))
            cur.adbc_ingest("_stage_scores", frame.to_arrow(), mode="append", temporary=True)
            cur.execute(
                """DELETE FROM quality_scores WHERE timeframe = $1
                   AND (symbol, day) IN (SELECT symbol, day FROM _stage_scores)""",
                (timeframe,),
            )
            cols = column_list(QUALITY_SCORES.names)
            cur.execute(f"INSERT INTO quality_scores ({cols}) SELECT {cols} FROM _stage_scores")

        self._run("write", work, retry=True)

    def scores(self, symbol: str, timeframe: str) -> pl.DataFrame:
        return self._frame(
            "SELECT * FROM quality_scores WHERE symbol = $1 AND timeframe = $2 ORDER BY day", (symbol, timeframe)
        )

    def write_reconciliation(self, run_id: str, created_at: datetime, rows: pl.DataFrame) -> int:
        frame = _typed(
            rows.select(pl.lit(run_id).alias("run_id"), pl.lit(created_at).alias("created_at"), pl.all()),
            RECONCILIATION,
        )
        if frame.height:
            self._run("write", lambda cur: cur.adbc_ingest(RECONCILIATION.name, frame.to_arrow(), mode="append"))
        return frame.height

    def reconciliation(self, symbol: str, timeframe: str | None = None, run_id: str | None = None) -> pl.DataFrame:
        where, params = ["symbol = $1"], [symbol]
        if timeframe:
            params.append(timeframe)
            where.append(f"timeframe = ${len(params)}")
        if run_id:
            params.append(run_id)
            where.append(f"run_id = ${len(params)}")
        return self._frame(f"SELECT * FROM reconciliation WHERE {' AND '.join(where)} ORDER BY ts", tuple(params))

    def reconciliation_many(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        return self._frame(
            "SELECT * FROM reconciliation WHERE timeframe = $1 AND ts >= $2 AND ts < $3 AND symbol = ANY($4)",
            (timeframe, start, end, list(symbols)),
        )

    # --- operations --------------------------------------------------------------------------------

    def log_job_runs(self, rows: list[dict[str, object]]) -> None:
        self._append(JOB_RUNS, rows)

    def log_admin_action(self, row: dict[str, object]) -> None:
        self._append(AUDIT_LOG, [row])

    def admin_actions(self, limit: int = 100) -> pl.DataFrame:
        return _as(self._frame("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1", (limit,)), dict(AUDIT_LOG.columns))

    def _append(self, table: Table, rows: list[dict[str, object]]) -> None:
        """Rows (dicts of the table's written columns) appended to a table numbered by its serial."""
        if not rows:
            return
        frame = pl.DataFrame([{c: r[c] for c in table.written} for r in rows], schema=_written_schema(table))
        self._run("write", lambda cur: cur.adbc_ingest(table.name, frame.to_arrow(), mode="append"))

    def job_runs(self, job: str | None = None, limit: int = 100) -> pl.DataFrame:
        if job:
            return self._frame("SELECT * FROM job_runs WHERE job = $1 ORDER BY id DESC LIMIT $2", (job, limit))
        return self._frame("SELECT * FROM job_runs ORDER BY id DESC LIMIT $1", (limit,))

    def save_prev_closes(self, rows: list[tuple[str, date, float, str]]) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        frame = pl.DataFrame([(*r, now) for r in rows], schema=dict(PREV_CLOSE.columns), orient="row")
        cols = column_list(PREV_CLOSE.names)

        def work(cur: Any) -> None:
            cur.execute(stage_ddl(PREV_CLOSE, "_stage_prev_close"))
            cur.adbc_ingest("_stage_prev_close", frame.to_arrow(), mode="append", temporary=True)
            cur.execute(
                f"""INSERT INTO prev_close ({cols}) SELECT DISTINCT ON (symbol) {cols} FROM _stage_prev_close
                    ORDER BY symbol ON CONFLICT (symbol) DO UPDATE SET session = excluded.session,
                    close = excluded.close, source = excluded.source, updated_at = excluded.updated_at"""
            )

        self._run("write", work, retry=True)

    def prev_closes(self, symbols: list[str]) -> dict[str, tuple[date, float, str]]:
        if not symbols:
            return {}
        rows = self._rows(
            "SELECT symbol, session, close, source FROM prev_close WHERE symbol = ANY($1)", (list(symbols),)
        )
        return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}

    # --- corporate actions (ActionStore) -------------------------------------------------------

    def write_actions(
        self, actions: pl.DataFrame, coverage: list[ActionCoverage], quarantine: pl.DataFrame | None = None
    ) -> int:
        hashed = with_content_hash(actions.select(ACTION_COLUMNS)).unique(
            ["action_id", "content_hash"], keep="first", maintain_order=True
        )
        staged = hashed.cast({c: t for c, t in CORPORATE_ACTIONS.columns.items() if c in hashed.columns})  # type: ignore[arg-type]
        cov = (
            pl.DataFrame(
                [{c: getattr(e, c) for c in ACTION_COVERAGE.names} for e in coverage], schema=ACTION_COVERAGE_SCHEMA
            )
            if coverage
            else None
        )
        held_out = (
            _typed(quarantine.select(ACTION_QUARANTINE.names), ACTION_QUARANTINE)
            if quarantine is not None and quarantine.height
            else None
        )
        cols = [*ACTION_COLUMNS, "version", "content_hash", "stored_at"]
        picked = column_list(ACTION_COLUMNS, "f.")

        def work(cur: Any) -> int:
            # one writer of versions at a time: "newest + 1" must not be taken twice
            cur.execute(f"SELECT pg_advisory_xact_lock({ACTIONS_LOCK})")
            stored = 0
            if staged.height:
                cur.execute(_stage_of(staged, "_stage_actions"))
                cur.adbc_ingest("_stage_actions", staged.to_arrow(), mode="append", temporary=True)
                stored = _inserted(
                    cur,
                    f"""WITH latest AS (
                            SELECT DISTINCT ON (action_id) action_id, version AS v, content_hash AS h
                            FROM corporate_actions WHERE action_id IN (SELECT action_id FROM _stage_actions)
                            ORDER BY action_id, version DESC),
                        fresh AS (
                            SELECT p.*, coalesce(l.v, 0) AS base FROM _stage_actions p
                            LEFT JOIN latest l USING (action_id) WHERE l.h IS DISTINCT FROM p.content_hash)
                        INSERT INTO corporate_actions ({column_list(cols)})
                        SELECT {picked}, f.base + row_number() OVER (PARTITION BY f.action_id ORDER BY f.fetched_at),
                               f.content_hash, now()
                        FROM fresh f""",
                )
            if cov is not None:
                cur.adbc_ingest(ACTION_COVERAGE.name, cov.to_arrow(), mode="append")
            if held_out is not None:
                cur.execute(stage_ddl(ACTION_QUARANTINE, "_stage_action_quarantine"))
                cur.adbc_ingest("_stage_action_quarantine", held_out.to_arrow(), mode="append", temporary=True)
                qcols = column_list(ACTION_QUARANTINE.names)
                cur.execute(
                    f"""INSERT INTO action_quarantine ({qcols}) SELECT {column_list(ACTION_QUARANTINE.names, "p.")}
                        FROM _stage_action_quarantine p WHERE NOT EXISTS (SELECT 1 FROM action_quarantine q
                        WHERE q.action_id = p.action_id AND q.reason = p.reason)"""
                )
            return stored

        stored: int = self._run("write", work, retry=True)
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
        params: list[object] = [list(symbols), start, end]
        where = ["symbol = ANY($1)", f"{ADJUST_DATE_SQL} BETWEEN $2 AND $3"]
        if types:
            params.append(list(types))
            where.append(f"type = ANY(${len(params)})")
        if providers:
            params.append(list(providers))
            where.append(f"provider = ANY(${len(params)})")
        if known_by is not None:
            params.append(known_by)
            where.append(f"{KNOWN_DATE_SQL} <= ${len(params)}")
        cols = column_list(CORPORATE_ACTIONS.names)
        inner = f"SELECT {cols}, max(version) OVER (PARTITION BY action_id) AS _newest FROM corporate_actions"
        sql = (
            f"SELECT {cols} FROM ({inner} WHERE {' AND '.join(where)}) a"
            + ("" if all_versions else " WHERE version = _newest")
            + f" ORDER BY symbol, {ADJUST_DATE_SQL}, action_id, version"
        )
        return _as(self._frame(sql, tuple(params)), dict(CORPORATE_ACTIONS.columns))

    def action_coverage(
        self, symbols: list[str], start: date, end: date, *, provider: str | None = None
    ) -> pl.DataFrame:
        params: list[object] = [list(symbols), start, end]
        where = ["symbol = ANY($1)", "start <= $3", '"end" >= $2']
        if provider is not None:
            params.append(provider)
            where.append(f"provider = ${len(params)}")
        sql = f"SELECT * FROM action_coverage WHERE {' AND '.join(where)} ORDER BY symbol, start"
        return _as(self._frame(sql, tuple(params)), ACTION_COVERAGE_SCHEMA)

    def adjust_fingerprint(
        self, symbols: list[str], daily: list[tuple[str, datetime, datetime]]
    ) -> tuple[tuple[object, ...], tuple[object, ...]]:
        parts: list[str] = []
        params: list[object] = []
        if symbols:
            params.append(list(symbols))
            parts += [
                "(SELECT count(*) FROM corporate_actions WHERE symbol = ANY($1))",
                "(SELECT max(stored_at) FROM corporate_actions WHERE symbol = ANY($1))",
                "(SELECT count(*) FROM action_coverage WHERE symbol = ANY($1))",
                "(SELECT max(fetched_at) FROM action_coverage WHERE symbol = ANY($1))",
            ]
        for sym, lo, hi in daily:
            params += [sym, lo, hi]
            n = len(params)
            held = (
                f"FROM {bar_tables([sym]).bars.name} WHERE symbol = ${n - 2} AND timeframe = '1Day' "
                f"AND ts >= ${n - 1} AND ts < ${n}"
            )
            parts += [f"(SELECT count(*) {held})", f"(SELECT max(fetched_at) {held})"]
        if not parts:
            return (), ()
        values = tuple(self._rows(f"SELECT {', '.join(parts)}", tuple(params))[0])
        k = 4 if symbols else 0
        return values[:k], values[k:]

    def action_quarantine(self, symbol: str | None = None) -> pl.DataFrame:
        sql = "SELECT * FROM action_quarantine" + (" WHERE symbol = $1" if symbol else "") + " ORDER BY ex_date"
        return _as(self._frame(sql, (symbol,) if symbol else ()), ACTION_QUARANTINE_SCHEMA)

    def write_action_reconciliation(self, run_id: str, created_at: datetime, rows: pl.DataFrame) -> int:
        frame = _typed(
            rows.select(pl.lit(run_id).alias("run_id"), pl.lit(created_at).alias("created_at"), pl.all()),
            ACTION_RECONCILIATION,
        )
        if frame.height:
            self._run("write", lambda cur: cur.adbc_ingest(ACTION_RECONCILIATION.name, frame.to_arrow(), mode="append"))
        return frame.height

    def action_reconciliation(self, symbol: str, run_id: str | None = None) -> pl.DataFrame:
        sql = "SELECT * FROM action_reconciliation WHERE symbol = $1" + (" AND run_id = $2" if run_id else "")
        sql += " ORDER BY created_at, coalesce(reference_date, other_date)"
        return _as(self._frame(sql, (symbol, run_id) if run_id else (symbol,)), dict(ACTION_RECONCILIATION.columns))

    # --- option chain history (OptionStore) -----------------------------------------------------

    def write_option_snapshot(self, rows: pl.DataFrame, quarantine: pl.DataFrame | None = None) -> tuple[int, int]:
        staged = [
            (table, _nanos_as_ints(option_rows(frame, table)))
            for table, frame in ((OPTION_QUARANTINE, quarantine), (OPTION_SNAPSHOTS, rows))
            if frame is not None and frame.height
        ]
        if rows.height:
            months = rows["as_of"].dt.date().dt.truncate("1mo").unique().to_list()
            self._ensure_partitions(OPTION_SNAPSHOTS.name, {month_start(d) for d in months})

        def work(cur: Any) -> dict[str, int]:
            out: dict[str, int] = {}
            for table, frame in staged:
                stage, cols = f"_stage_{table.name}", column_list(table.written)
                cur.execute(stage_ddl(table, stage))
                cur.adbc_ingest(stage, frame.to_arrow(), mode="append", temporary=True)
                out[table.name] = _inserted(
                    cur, f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {stage} ON CONFLICT DO NOTHING"
                )
            return out

        stored: dict[str, int] = self._run("write", work, retry=True) if staged else {}
        snapshots = stored.get(OPTION_SNAPSHOTS.name, 0)
        if snapshots:
            ROWS_STORED.labels(OPTION_SNAPSHOTS.name, str(rows["source"][0]), "").inc(snapshots)
        return snapshots, stored.get(OPTION_QUARANTINE.name, 0)

    def read_option_snapshots(self, where: OptionFilter | None = None) -> pl.DataFrame:
        return self._option_rows(OPTION_SNAPSHOTS, where, "ORDER BY contract, as_of, source, feed")

    def option_quarantine(self, where: OptionFilter | None = None, limit: int = 1000) -> pl.DataFrame:
        return self._option_rows(OPTION_QUARANTINE, where, f"ORDER BY as_of DESC, contract LIMIT {int(limit)}")

    def _option_rows(self, table: Table, where: OptionFilter | None, order: str) -> pl.DataFrame:
        params: list[object] = []

        def bind(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        clauses = (where or OptionFilter()).clauses(bind)
        sql = f"SELECT {column_list(table.names)} FROM {table.name}"
        sql += (f" WHERE {' AND '.join(clauses)}" if clauses else "") + f" {order}"
        return _as(self._frame(sql, tuple(params)), dict(table.columns))

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Staged(Exception):  # a signal inside the store, never raised out of it
    """The direct COPY met held rows: roll back and write the batch through the stage."""


def _close_quietly(*handles: Any) -> None:
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.close()


def _close_at_exit(ref: weakref.ref[PostgresStore]) -> None:
    store = ref()
    if store is not None:
        store.close()


def _inserted(cur: Any, insert: str, params: tuple[object, ...] | None = None) -> int:
    """Run an ``INSERT`` and return the rows it inserted (the driver reports no row count for it)."""
    cur.execute(f"WITH ins AS ({insert} RETURNING 1) SELECT count(*) FROM ins", params)
    return int(cur.fetchall()[0][0])


def _written_schema(table: Table) -> dict[str, pl.DataType]:
    return {c: table.columns[c] for c in table.written}


def _stage_of(frame: pl.DataFrame, name: str) -> str:
    """A session-local staging table with ``frame``'s columns, emptied at every commit."""
    cols = ", ".join(f"{q(c)} {pg_type(t)}" for c, t in frame.schema.items())
    return f"CREATE TEMP TABLE IF NOT EXISTS {name} ({cols}) ON COMMIT DELETE ROWS"


def _nanos_as_ints(frame: pl.DataFrame) -> pl.DataFrame:
    """Nanosecond times as the int8 nanoseconds since the epoch PostgreSQL keeps them in (``pg_schema``);
    ``_as`` turns them back."""
    return frame.with_columns(
        pl.col(c).dt.epoch("ns") for c, t in frame.schema.items() if isinstance(t, pl.Datetime) and t.time_unit == "ns"
    )


def _as(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """A read in exactly ``schema`` (an empty answer has the columns too)."""
    if not frame.height and not frame.width:
        return pl.DataFrame(schema=schema)
    return frame.select(list(schema)).cast(schema)  # type: ignore[arg-type]
