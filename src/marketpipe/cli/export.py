"""``marketpipe export``: the store's bars to the Parquet cold tier (registered on the main app)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from marketpipe.cli.common import (
    ConfigOpt,
    Fields,
    StoreOpt,
    app,
    err,
    handle_errors,
    load_config,
    out,
    progress_bar,
    read_symbols,
)


def _fields(stats: Any) -> Fields:
    """An export's stats as the progress bar shows them: months done of months planned, rows/s, files."""
    return (
        max(stats.months_planned, 1),
        stats.months_done,
        f"{stats.rows_per_second:,.0f} rows/s",
        f"{stats.files_written} written  {stats.files_unchanged} unchanged",
    )


def _summary(stats: Any) -> tuple[Table, str]:
    """The per-symbol table and the one-line total under it."""
    table = Table(title=f"Export to {escape(stats.target)} ({stats.timeframe})")
    for col in ("symbol", "files written", "unchanged", "rows"):
        table.add_column(col, justify="left" if col == "symbol" else "right")
    for sym, row in stats.per_symbol.items():
        table.add_row(sym, f"{row['files_written']:,}", f"{row['files_unchanged']:,}", f"{row['rows']:,}")
    total = (
        f"{stats.files_written:,} files written ({stats.rows_written:,} rows, {stats.bytes_written:,} bytes), "
        f"{stats.files_unchanged:,} unchanged; {stats.rows_seen:,} rows in {stats.seconds:.2f}s "
        f"({stats.rows_per_second:,.0f} rows/s)"
    )
    return table, total


@app.command()
@handle_errors
def export(
    symbols: Annotated[list[str] | None, typer.Argument(help="Symbols, e.g. AAPL MSFT BRK.B")] = None,
    to: Annotated[str, typer.Option("--to", help="a directory, parquet://PATH or s3://BUCKET/prefix")] = "",
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    start: Annotated[str | None, typer.Option("--start", "-s", help="default: the first bar held")] = None,
    end: Annotated[str | None, typer.Option("--end", "-e", help="default: the last bar held")] = None,
    symbols_file: Annotated[Path | None, typer.Option("--symbols-file", help="one symbol per line")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Write the store's bars as Hive-partitioned Parquet (symbol=/year=/month=), one file per UTC month.

    Idempotent and resumable: a file whose content is unchanged is not rewritten, files are committed whole,
    and a rerun after an interruption writes only what is missing. Ranges are widened to whole months."""
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.core.timeutil import parse_time
    from marketpipe.core.validation import validate_range, validate_required
    from marketpipe.service.export import export_bars
    from marketpipe.store import open_store
    from marketpipe.store.parquet import open_dataset

    validate_required(to, "to", message="--to is required (a directory, parquet://PATH or s3://BUCKET/prefix)")
    syms = read_symbols(symbols or [], symbols_file)
    tf = Timeframe.parse(timeframe)
    s = parse_time(start, name="start") if start else None
    e = parse_time(end, name="end", end=True) if end else None
    if s is not None and e is not None:
        validate_range(s, e, "end", message="--end must be after --start (an end given as a day ends with that day)")
    cfg = load_config(config, store)
    dataset = open_dataset(to, cfg.export)  # a bad URL or missing S3 credentials fail before the store opens
    show = not no_progress and not as_json and sys.stderr.isatty()
    with open_store(cfg, create=False) as st, progress_bar("export", show, _fields) as progress:
        stats = export_bars(st, dataset, syms, tf, s, e, progress=progress)
    for sym in stats.empty_symbols:
        err.print(f"nothing held for {sym} ({tf}) in the range: not exported", highlight=False, markup=False)
    if stats.leftovers_removed:
        err.print(f"removed {stats.leftovers_removed} temporary file(s) of an interrupted run", markup=False)
    if as_json:
        sys.stdout.write(json.dumps(stats.to_dict()) + "\n")
    else:
        table, total = _summary(stats)
        out.print(table)
        out.print(total, highlight=False, markup=False, soft_wrap=True)
