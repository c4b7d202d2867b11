"""The ``marketpipe`` command line."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from marketpipe.cli.common import (
    FORMAT_MESSAGE,
    OUTPUT_FORMATS,
    ConfigOpt,
    LimitOpt,
    StoreOpt,
    app,
    config_app,
    emit,
    err,
    handle_errors,
    load_config,
    out,
    read_symbols,
    store_app,
    store_table,
)
from marketpipe.core.validation import validate_enum, validate_number, validate_required

# --- backfill ----------------------------------------------------------------------------------


def _progress_printer(progress: Progress, task: Any) -> Callable[[Any], None]:
    def update(stats: Any) -> None:
        total = max(stats.est_rows, stats.bars_received, 1)
        progress.update(
            task,
            total=total,
            completed=min(stats.bars_received, total),
            rate=f"{stats.bars_per_second:,.0f} bars/s",
            info=f"req {stats.requests}  retries {stats.retries}  rejected {stats.bars_rejected}",
        )

    return update


def _summary(stats: Any, title: str = "Backfill summary") -> Table:
    table = Table(title=title)
    for col in ("symbol", "bars received ok", "rejected"):
        table.add_column(col, justify="right" if col != "symbol" else "left")
    for sym in sorted(stats.per_symbol):
        row = stats.per_symbol[sym]
        table.add_row(sym, f"{row.get('good', 0):,}", f"{row.get('rejected', 0):,}")
    table.caption = (
        f"{stats.bars_received:,} bars received, {stats.bars_stored:,} newly stored, {stats.bars_rejected:,} "
        f"quarantined; {stats.requests} requests, {stats.retries} retries; {stats.seconds:.2f}s "
        f"({stats.bars_per_second:,.0f} bars/s)"
    )
    return table


class _Terminated(BaseException):
    """SIGTERM arrived while no event loop was running (before or after the run)."""


@dataclass
class _Run:
    """What an interrupted backfill needs to say: the run's stats so far, and whether SIGTERM stopped it."""

    stats: Any = None
    sigterm: bool = False


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


async def _run_backfill(
    data: Any,
    symbols: list[str],
    start: str,
    end: str | None,
    timeframe: str,
    feed: str | None,
    show_progress: bool,
    seen: _Run,
) -> Any:
    """``seen`` gets the run's stats as soon as there are any, so an interrupted run can say what it
    kept. SIGTERM cancels the run the way Ctrl-C does (asyncio.run turns the first SIGINT into a
    cancellation of this task): workers stop, the pages already checked are committed, then it ends."""
    loop = asyncio.get_running_loop()
    run = asyncio.current_task()
    assert run is not None

    def on_sigterm() -> None:
        seen.sigterm = True
        run.cancel()

    def keep(stats: Any) -> None:
        seen.stats = stats

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        if not show_progress:
            return await data.backfill(symbols, start, end, timeframe=timeframe, feed=feed, progress=keep)
        columns = (
            TextColumn("[bold]backfill"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("backfill", total=None, rate="", info="planning")
            show = _progress_printer(progress, task)

            def update(stats: Any) -> None:
                keep(stats)
                show(stats)

            return await data.backfill(symbols, start, end, timeframe=timeframe, feed=feed, progress=update)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_terminated)
        await data.aclose()


def _interrupted(seen: _Run, how: str, code: int) -> typer.Exit:
    kept = seen.stats.bars_stored if seen.stats is not None else 0
    err.print(f"{how}: {kept:,} bars kept, run the same command to resume", highlight=False, markup=False)
    return typer.Exit(code)


@app.command()
@handle_errors
def backfill(
    symbols: Annotated[list[str] | None, typer.Argument(help="Symbols, e.g. AAPL MSFT BRK.B")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    start: Annotated[str, typer.Option("--start", "-s", help="YYYY-MM-DD or RFC-3339")] = "",
    end: Annotated[str | None, typer.Option("--end", "-e", help="default: now")] = None,
    feed: Annotated[str | None, typer.Option("--feed", help="sip or iex (default from config)")] = None,
    symbols_file: Annotated[Path | None, typer.Option("--symbols-file", help="one symbol per line")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Fetch bars into the local store: only ranges the coverage ledger lacks; resumable.

    Ctrl-C (exit 130) or SIGTERM (exit 143) stops it within moments, keeping every page committed."""
    from marketpipe.service.data import MarketData

    validate_required(start, "start", message="--start is required (YYYY-MM-DD or RFC-3339)")
    syms = read_symbols(symbols or [], symbols_file)
    seen = _Run()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        data = MarketData(load_config(config, store))
        show = not no_progress and sys.stderr.isatty()
        stats = asyncio.run(_run_backfill(data, syms, start, end, timeframe, feed, show, seen))
    except KeyboardInterrupt:
        raise _interrupted(seen, "interrupted", 130) from None
    except (_Terminated, asyncio.CancelledError):
        if not isinstance(sys.exc_info()[1], _Terminated) and not seen.sigterm:
            raise
        raise _interrupted(seen, "terminated (SIGTERM)", 143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.print(_summary(stats))
    if stats.skipped_symbols:
        out.print(f"already covered, nothing fetched: {', '.join(stats.skipped_symbols)}")
    if stats.errors:
        for e in stats.errors:
            where = f"{','.join(e['symbols'])} {e['start']}..{e['end']}"
            err.print(f"[red]error[{e['code']}][/]: {where}: {escape(str(e['message']))}")
        raise typer.Exit(1)


# --- read side ---------------------------------------------------------------------------------


@app.command()
@handle_errors
def bars(
    symbols: Annotated[list[str], typer.Argument(help="Symbols")],
    start: Annotated[str, typer.Option("--start", "-s")],
    end: Annotated[str | None, typer.Option("--end", "-e")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    feed: Annotated[str | None, typer.Option("--feed")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    no_fetch: Annotated[bool, typer.Option("--no-fetch", help="Only what the store holds.")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Print bars: from the store where covered, otherwise fetched, checked and stored first."""
    from marketpipe.service.data import MarketData

    validate_enum(fmt, OUTPUT_FORMATS, "format", casefold=True, message=FORMAT_MESSAGE)
    data = MarketData(load_config(config, store))

    async def go() -> Any:
        try:
            return await data.bars(symbols, start, end, timeframe=timeframe, feed=feed, fetch=not no_fetch)
        finally:
            await data.aclose()

    emit(asyncio.run(go()), fmt, output)


def _records_table(title: str, records: dict[str, Any]) -> Table:
    """One column per record (symbol or part), one row per field: fits a terminal however many fields."""
    import msgspec

    table = Table(title=title)
    table.add_column("field")
    docs = {name: msgspec.structs.asdict(r) for name, r in records.items()}
    for name in docs:
        table.add_column(name, overflow="fold")
    fields: list[str] = []
    for doc in docs.values():
        fields += [f for f in doc if f not in fields]
    for f in fields:
        table.add_row(f, *(_cell(doc.get(f)) for doc in docs.values()))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


@app.command()
@handle_errors
def quote(
    symbols: Annotated[list[str], typer.Argument()],
    feed: Annotated[str | None, typer.Option("--feed")] = None,
    config: ConfigOpt = None,
) -> None:
    """Latest quote(s)."""
    _latest("quotes", symbols, feed, config)


@app.command()
@handle_errors
def trade(
    symbols: Annotated[list[str], typer.Argument()],
    feed: Annotated[str | None, typer.Option("--feed")] = None,
    config: ConfigOpt = None,
) -> None:
    """Latest trade(s)."""
    _latest("trades", symbols, feed, config)


@app.command()
@handle_errors
def snapshot(
    symbols: Annotated[list[str], typer.Argument()],
    feed: Annotated[str | None, typer.Option("--feed")] = None,
    config: ConfigOpt = None,
) -> None:
    """Snapshot(s): latest trade, latest quote, minute bar, daily bar, previous daily bar."""
    _latest("snapshots", symbols, feed, config)


def _latest(kind: str, symbols: list[str], feed: str | None, config: Path | None) -> None:
    from marketpipe.core.schema import normalize_symbols
    from marketpipe.service.data import MarketData

    syms = normalize_symbols(symbols)
    data = MarketData(load_config(config))

    async def go() -> Any:
        try:
            if kind == "quotes":
                return await data.latest_quotes(syms, feed=feed)
            if kind == "trades":
                return await data.latest_trades(syms, feed=feed)
            return await data.snapshots(syms, feed=feed)
        finally:
            await data.aclose()

    result = asyncio.run(go())
    missing = [s for s in syms if s not in result]
    if kind == "snapshots":
        for sym, snap in result.items():
            parts = {
                k: v
                for k, v in (
                    ("trade", snap.latest_trade),
                    ("quote", snap.latest_quote),
                    ("minute bar", snap.minute_bar),
                    ("daily bar", snap.daily_bar),
                    ("prev daily bar", snap.prev_daily_bar),
                )
                if v is not None
            }
            out.print(_records_table(f"{sym} snapshot (source {snap.source})", parts))
    else:
        out.print(_records_table(f"latest {kind}", result))
    if missing:
        err.print(f"no data for: {', '.join(missing)}")
        raise typer.Exit(1)


# --- providers and reconciliation ------------------------------------------------------------------


@app.command()
@handle_errors
def providers(
    config: ConfigOpt = None,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Run one active probe each.")] = True,
) -> None:
    """Provider health: state, circuit, latency, error rate, rate-limit headroom."""
    from marketpipe.service.data import MarketData
    from marketpipe.service.providers import provider_table

    data = MarketData(load_config(config))

    async def go() -> Any:
        try:
            return await provider_table(data.router, probe=probe)
        finally:
            await data.aclose()

    rows = asyncio.run(go())
    cols = ("provider", "state", "circuit", "latency_ms", "error_rate", "ratelimit_headroom")
    table = Table(title="providers", box=box.SIMPLE_HEAD)
    for col in cols:
        table.add_column(col.replace("ratelimit_", ""), no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in cols))
    out.print(table)
    for row in rows:
        if row.get("note"):
            out.print(f"{row['provider']}: {row['note']}")


@app.command()
@handle_errors
def reconcile(
    symbol: Annotated[str, typer.Argument()],
    start: Annotated[str, typer.Option("--start", "-s")],
    end: Annotated[str | None, typer.Option("--end", "-e")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Day",
    hard_pct: Annotated[float, typer.Option("--hard-pct", help="price difference that is a hard flag")] = 5.0,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Compare one symbol's bars across every provider that serves them; results stored per bar."""
    import polars as pl

    from marketpipe.core.schema import normalize_symbol
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.core.timeutil import parse_range
    from marketpipe.quality.reconcile import LEVELS, Thresholds
    from marketpipe.service.data import MarketData
    from marketpipe.service.reconcile import reconcile_symbol

    validate_number(hard_pct, "hard-pct", gt=0, le=100, message="--hard-pct must be in (0, 100], got {value}")
    sym = normalize_symbol(symbol)
    tf = Timeframe.parse(timeframe)
    s, e = parse_range(start, end)
    data = MarketData(load_config(config, store))

    async def go() -> Any:
        try:
            return await reconcile_symbol(
                data.router, data.store, sym, tf, s, e, thresholds=Thresholds(hard_pct=hard_pct)
            )
        finally:
            await data.aclose()

    report = asyncio.run(go())
    table = Table(title=f"{sym} {tf} vs reference {report.reference} (run {report.run_id})", box=box.SIMPLE_HEAD)
    table.add_column("")
    for other in report.comparisons:
        table.add_column(other, justify="right", no_wrap=True)
    table.add_row("bars", *(str(report.bars.get(o, 0)) for o in report.comparisons))
    for level in (*LEVELS, "volume_flagged"):
        table.add_row(level, *(str(r.counts.get(level, 0)) for r in report.comparisons.values()))
    out.print(table)
    for other, result in report.comparisons.items():
        worst = result.rows.filter(pl.col("status") == "mismatch").sort("price_delta_pct", descending=True).head(5)
        if worst.height:
            out.print(f"largest disagreements with {other}:")
            emit(worst.select("ts", "price_delta_pct", "worst_field", "reference_close", "other_close"), "table", None)
    for a in report.skipped:
        err.print(f"skipped {a.provider}: {a.code} {a.message}")


# --- simulator and demo ------------------------------------------------------------------------


@app.command()
@handle_errors
def sim(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port")] = 8765,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Run the vendor simulator (Alpaca wire format) until interrupted. Keys: SIMKEY / SIMSECRET."""
    from marketpipe.sim.server import SimServer, serve_forever

    def announce(server: SimServer) -> None:  # once listening: a port in use never gets announced
        err.print(
            f"simulator on {server.url}  (keys SIMKEY/SIMSECRET, free plan FREEKEY/FREESECRET; faults at /_sim/faults)"
        )

    serve_forever(host, port, seed=seed, on_ready=announce)


@app.command()
@handle_errors
def demo(
    symbols: Annotated[list[str] | None, typer.Argument(help="default: AAPL MSFT SPY")] = None,
    days: Annotated[int, typer.Option("--days", min=1, max=250, help="sessions to backfill")] = 5,
    store: StoreOpt = None,
) -> None:
    """Offline tour: start the simulator, backfill a few symbols, show the summary and some bars."""
    from marketpipe.core.calendar import get_calendar
    from marketpipe.core.config import Config
    from marketpipe.core.timeutil import utcnow
    from marketpipe.providers.alpaca_config import AlpacaConfig
    from marketpipe.service.data import MarketData
    from marketpipe.sim.server import SimServer

    syms = read_symbols(symbols or ["AAPL", "MSFT", "SPY"], None)
    cal = get_calendar("XNYS")
    now = utcnow()
    sessions = cal.sessions(now - timedelta(days=days * 2 + 10), now)
    done = [s for s in sessions if s.close <= now][-days:]
    start, end = done[0].open - timedelta(hours=6), done[-1].close
    # Simulator data lives in its own (fresh) store so it is never mixed with real data.
    store_path = store or Path(tempfile.mkdtemp(prefix="marketpipe-demo-")) / "demo.duckdb"
    with SimServer() as server:
        err.print(f"simulator listening on {server.url}")
        cfg = Config()
        cfg.store.path = str(store_path)
        cfg.providers["alpaca"] = AlpacaConfig(
            priority=1, base_url=server.url, plan="unlimited", rate_limit_per_min=10_000
        )
        data = MarketData(cfg, env={"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"})
        out.print(f"backfilling {', '.join(syms)} 1Min from {done[0].day} to {done[-1].day} into {store_path}")

        async def go() -> Any:
            try:
                stats = await data.backfill(syms, start, end, timeframe="1Min")
                again = await data.backfill(syms, start, end, timeframe="1Min")
                frame = await data.bars(syms[0], done[-1].open, done[-1].close, timeframe="1Min", fetch=False)
                quotes = await data.latest_quotes(syms)
                checked = await data.quality(syms, start, end, timeframe="1Min")
                return stats, again, frame, quotes, checked
            finally:
                await data.aclose()

        stats, again, frame, quotes, checked = asyncio.run(go())
    out.print(_summary(stats, "Demo backfill (source: sim)"))
    out.print(
        f"the same backfill again: {again.requests} requests, {again.bars_stored} bars stored "
        "(the coverage ledger already holds the range)"
    )
    out.print(f"\n{syms[0]} on {done[-1].day}: {frame.height} minute bars (source sim, feed sip); first and last five:")
    emit(pl_head_tail(frame), "table", None)
    out.print(_records_table("latest quotes (simulator)", quotes))
    from marketpipe.cli.quality import quality_table

    out.print(quality_table(checked, "Data quality of what was stored (exchange calendar, anomaly rules, score)"))
    out.print(f"\nread them again: marketpipe bars {syms[0]} --start {done[-1].day} --store {store_path} --no-fetch")
    out.print(
        f"quality report:  marketpipe quality {' '.join(syms)} --start {done[0].day} --end {done[-1].day} "
        f"--store {store_path} --html report.html"
    )


def pl_head_tail(frame: Any, n: int = 5) -> Any:
    import polars as pl

    part = frame if frame.height <= 2 * n else pl.concat([frame.head(n), frame.tail(n)])
    cols = ["open", "high", "low", "close", "volume", "trade_count", "vwap"]
    return part.select(pl.col("ts").dt.strftime("%m-%d %H:%M").alias("ts UTC"), *cols)


# --- config and store ----------------------------------------------------------------------------


@config_app.command("show")
@handle_errors
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration; secrets masked."""
    import os

    import msgspec

    from marketpipe.core.config import ALPACA_KEY_VARS, ALPACA_SECRET_VARS, mask

    cfg = load_config(config)
    doc = msgspec.to_builtins(cfg)
    doc["store"]["path"] = str(cfg.store_path())
    doc["source_path"] = cfg.source_path or "(defaults; no config file found)"
    doc["credentials"] = {
        v: mask(os.environ.get(v)) for v in (*ALPACA_KEY_VARS, *ALPACA_SECRET_VARS, "POLYGON_API_KEY")
    }
    import json

    out.print_json(json.dumps(doc))


@store_app.command("info")
@handle_errors
def store_info(config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """Row counts and what the store holds per symbol/timeframe/source."""
    import polars as pl

    from marketpipe.store import open_store

    cfg = load_config(config, store)
    with open_store(cfg, create=False) as st:
        out.print(f"store: {st.path}")
        out.print(st.counts())
        summary = st.summary().with_columns(
            pl.col("first").dt.strftime("%Y-%m-%d %H:%M"), pl.col("last").dt.strftime("%Y-%m-%d %H:%M")
        )
        emit(summary, "table", None)


@store_app.command("quarantine")
@handle_errors
def store_quarantine(
    symbol: Annotated[str | None, typer.Argument()] = None,
    limit: Annotated[int, LimitOpt] = 50,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Rows that failed a check, with reasons."""
    store_table(config, store, lambda st: st.quarantine(symbol, limit))


@store_app.command("log")
@handle_errors
def store_log(limit: Annotated[int, LimitOpt] = 20, config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """The ingest log: one row per vendor page."""
    store_table(config, store, lambda st: st.ingest_log(limit).drop("symbols"))


# The other commands live in modules of their own and register on the shared ``app`` when imported
# (after the ones above, so ``--help`` lists them in this order).
from marketpipe.cli import quality, serve, stream  # noqa: E402

__all__ = ["app", "quality", "serve", "stream"]

if __name__ == "__main__":  # pragma: no cover
    app()
