"""``marketpipe actions``: corporate actions (registered on the main app).

``marketpipe actions SYMBOLS... --start [--end] [--type T]...`` lists them (fetched first where the
actions ledger lacks them); ``marketpipe actions reconcile SYMBOL --start [--end]`` compares every
vendor's actions with the reference vendor's and stores the run (``reconcile`` as the first word is
the sub-command: no symbol is spelled that way in lower case)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from marketpipe.cli.common import ConfigOpt, StoreOpt, app, emit, handle_errors, load_config, out
from marketpipe.core.validation import validate_enum

COLUMNS = ["symbol", "type", "ex_date", "process_date", "old_rate", "new_rate", "cash_amount", "rate",
           "new_symbol", "provider", "source", "vendor_id", "version", "fetched_at"]  # fmt: skip
FORMATS = ("table", "csv", "json", "parquet")


@app.command()
@handle_errors
def actions(
    symbols: Annotated[list[str], typer.Argument(help="Symbols, or: reconcile SYMBOL")],
    start: Annotated[str, typer.Option("--start", "-s", help="adjustment dates from (YYYY-MM-DD)")],
    end: Annotated[str | None, typer.Option("--end", "-e", help="to (default today)")] = None,
    types: Annotated[list[str] | None, typer.Option("--type", help="e.g. forward_split, cash_dividend")] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="only actions known by this day")] = None,
    provider: Annotated[str | None, typer.Option("--provider", help="one vendor's actions only")] = None,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="ask the vendors again: corrections and withdrawn actions are stored")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Corporate actions (splits, dividends, mergers, ...) with source, vendor id and version."""
    from marketpipe.service.data import MarketData

    validate_enum(fmt, FORMATS, "format", casefold=True)
    data = MarketData(load_config(config, store))
    if symbols and symbols[0] == "reconcile":
        _reconcile(data, symbols[1:], start, end, refresh)
        return

    async def go() -> Any:
        try:
            return await data.corporate_actions(
                symbols, start, end, types=types, as_of=as_of, provider=provider, refresh=refresh
            )
        finally:
            await data.aclose()

    frame = asyncio.run(go())
    emit(frame.select([c for c in COLUMNS if c in frame.columns]), fmt, output)


def _reconcile(data: Any, rest: list[str], start: str, end: str | None, refresh: bool) -> None:
    from marketpipe.core.errors import InvalidArgument
    from marketpipe.core.schema import normalize_symbol
    from marketpipe.core.timeutil import NY, parse_time, utcnow

    if len(rest) != 1:
        raise InvalidArgument("actions reconcile takes one symbol", details={"parameter": "symbols"})
    sym = normalize_symbol(rest[0])
    s = parse_time(start, name="start").astimezone(NY).date()
    e = parse_time(end, name="end").astimezone(NY).date() if end else utcnow().astimezone(NY).date()

    async def go() -> Any:
        try:
            return await data.actions.reconcile(sym, s, e, refresh=refresh)
        finally:
            await data.aclose()

    report = asyncio.run(go())
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    table = Table(title=f"{sym} actions vs reference {report.reference} (run {report.run_id}; {counts})",
                  box=box.SIMPLE_HEAD)  # fmt: skip
    for col in ("family", "other", "status", "reference_date", "other_date", "reference_value", "other_value"):
        table.add_column(col)
    for r in report.rows.iter_rows(named=True):
        style = None if r["status"] == "match" else "bold red"
        table.add_row(*("" if r[c] is None else str(r[c]) for c in
                        ("family", "other", "status", "reference_date", "other_date", "reference_value",
                         "other_value")), style=style)  # fmt: skip
    out.print(table)
    for name, why in report.failed.items():
        out.print(f"[yellow]{name} failed: {why}[/yellow]")
    out.print(f"{report.disagreements.height} disagreement(s) stored (marketpipe store: action_reconciliation)")
