"""The ``marketpipe`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer._click import exceptions as click_errors  # typer 0.29 parses with its own copy of click
from typer.core import TyperGroup

from marketpipe.core.errors import InvalidArgument, MarketpipeError, OutputError
from marketpipe.core.log import configure as configure_logging
from marketpipe.core.metrics import ERRORS

err = Console(stderr=True)


def report_error(exc: MarketpipeError) -> int:
    """The one way a command fails: ``error[CODE]: message`` on stderr, counted; returns the exit status
    (2 for a bad argument, 1 otherwise)."""
    ERRORS.labels(exc.code).inc()
    # soft_wrap: one line however long, never folded at the console width
    err.print(f"[bold red]error[{exc.code}][/]: {escape(exc.message)}", highlight=False, markup=True, soft_wrap=True)
    return 2 if isinstance(exc, InvalidArgument) else 1


class Group(TyperGroup):
    """The root command. A value click refuses while parsing (``--port 99999``, ``--log-level loud``, an
    unknown option, a missing argument) ends like every other failure: one ``error[INVALID_ARGUMENT]``
    line and exit 2, instead of click's usage box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # the help is already printed
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            sys.exit(report_error(_usage_error(exc)))
        except click_errors.ClickException as exc:
            sys.exit(report_error(InvalidArgument(exc.format_message())))
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _usage_error(exc: click_errors.UsageError) -> InvalidArgument:
    param = getattr(exc, "param", None)
    name = getattr(param, "name", None)
    message = exc.format_message().rstrip(".")
    if exc.ctx is not None:
        message += f" (see {exc.ctx.command_path} --help)"
    return InvalidArgument(message, details={"parameter": name} if name else None)


app = typer.Typer(
    name="marketpipe",
    help="Market data: fetched (Alpaca first), checked, stored, served.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Group,
)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
store_app = typer.Typer(help="Look inside the local store.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(store_app, name="store")

out = Console()
if not out.is_terminal:  # piped or captured: nobody's window to fit, so never cut columns at 80
    out = Console(width=max(out.width, 200))
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
StoreOpt = Annotated[Path | None, typer.Option("--store", help="DuckDB store file (overrides the config).")]
LimitOpt = typer.Option("--limit", min=0, help="at most this many rows")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def handle_errors(fn: F) -> F:
    """One line on stderr with the stable code, a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MarketpipeError as exc:
            raise typer.Exit(report_error(exc)) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _config(path: Path | None, store: Path | None = None) -> Any:
    from marketpipe.core.config import load_config

    cfg = load_config(path)
    if store is not None:
        cfg.store.path = str(store)
    return cfg


def _symbols(symbols: list[str], symbols_file: Path | None) -> list[str]:
    from marketpipe.core.schema import normalize_symbols

    items = list(symbols)
    if symbols_file is not None:
        if not symbols_file.is_file():
            raise InvalidArgument(f"symbols file not found: {symbols_file}", details={"parameter": "symbols-file"})
        try:
            text = symbols_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"symbols file {symbols_file} is not UTF-8 text (byte {exc.start}): one symbol per line expected",
                details={"parameter": "symbols-file", "path": str(symbols_file)},
            ) from None
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read symbols file {symbols_file}: {exc.strerror or exc}",
                details={"parameter": "symbols-file", "path": str(symbols_file)},
            ) from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            items += [p for p in line.replace(",", " ").split() if p]
    return normalize_symbols(items)


@app.callback()
def main(
    log_level: Annotated[LogLevel, typer.Option("--log-level", case_sensitive=False)] = "warning",
    log_json: Annotated[bool, typer.Option("--log-json", help="Log lines as JSON.")] = False,
) -> None:
    configure_logging(log_level, json=log_json)


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

    if not start:
        raise InvalidArgument("--start is required (YYYY-MM-DD or RFC-3339)", details={"parameter": "start"})
    syms = _symbols(symbols or [], symbols_file)
    seen = _Run()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        data = MarketData(_config(config, store))
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


def write_output(path: Path, write: Callable[[Any], object], *, parameter: str = "output") -> None:
    """Write a file the user named: ``write`` gets a binary file object for a temporary file beside
    ``path``, which replaces ``path`` only once complete. A path that cannot be written (no such
    directory, a directory, permission, disk full) is OUTPUT_ERROR naming it; nothing partial is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(
            f"cannot write --{parameter} {path}: {exc.strerror or exc}",
            details={"parameter": parameter, "path": str(path)},
        ) from None


def _emit(frame: Any, fmt: str, output: Path | None) -> None:
    fmt = fmt.lower()
    if fmt == "parquet":
        if output is None:
            raise InvalidArgument("--format parquet needs --output FILE", details={"parameter": "output"})
        write_output(output, frame.write_parquet)
        err.print(f"wrote {frame.height} rows to {output}")
        return
    if fmt == "csv":
        text = frame.write_csv()
    elif fmt == "json":
        text = frame.write_json()
    elif fmt == "table":
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in frame.columns:
            # Fold long cells rather than let rich squeeze whole columns out of a narrow terminal.
            table.add_column(col, overflow="fold", min_width=min(len(col), 10))
        for row in frame.iter_rows():
            table.add_row(*("" if v is None else str(v) for v in row))
        out.print(table)
        return
    else:
        raise InvalidArgument(
            f"unknown format {fmt!r}; use table, csv, json or parquet", details={"parameter": "format"}
        )
    if output:
        write_output(output, lambda fh: fh.write(text.encode()))
        err.print(f"wrote {frame.height} rows to {output}")
    else:
        sys.stdout.write(text)


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

    if fmt.lower() not in ("table", "csv", "json", "parquet"):
        raise InvalidArgument(
            f"unknown format {fmt!r}; use table, csv, json or parquet", details={"parameter": "format"}
        )
    data = MarketData(_config(config, store))

    async def go() -> Any:
        try:
            return await data.bars(symbols, start, end, timeframe=timeframe, feed=feed, fetch=not no_fetch)
        finally:
            await data.aclose()

    _emit(asyncio.run(go()), fmt, output)


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
    data = MarketData(_config(config))

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

    data = MarketData(_config(config))

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

    if not 0 < hard_pct <= 100:
        raise InvalidArgument(f"--hard-pct must be in (0, 100], got {hard_pct}", details={"parameter": "hard-pct"})
    sym = normalize_symbol(symbol)
    tf = Timeframe.parse(timeframe)
    s, e = parse_range(start, end)
    data = MarketData(_config(config, store))

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
            _emit(worst.select("ts", "price_delta_pct", "worst_field", "reference_close", "other_close"), "table", None)
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

    syms = _symbols(symbols or ["AAPL", "MSFT", "SPY"], None)
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
    _emit(pl_head_tail(frame), "table", None)
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

    cfg = _config(config)
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

    from marketpipe.store.duckdb import DuckDBStore

    cfg = _config(config, store)
    with DuckDBStore(cfg.store_path()) as st:
        out.print(f"store: {st.path}")
        out.print(st.counts())
        summary = st.summary().with_columns(
            pl.col("first").dt.strftime("%Y-%m-%d %H:%M"), pl.col("last").dt.strftime("%Y-%m-%d %H:%M")
        )
        _emit(summary, "table", None)


@store_app.command("quarantine")
@handle_errors
def store_quarantine(
    symbol: Annotated[str | None, typer.Argument()] = None,
    limit: Annotated[int, LimitOpt] = 50,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Rows that failed a check, with reasons."""
    from marketpipe.store.duckdb import DuckDBStore

    with DuckDBStore(_config(config, store).store_path()) as st:
        _emit(st.quarantine(symbol, limit), "table", None)


@store_app.command("log")
@handle_errors
def store_log(limit: Annotated[int, LimitOpt] = 20, config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """The ingest log: one row per vendor page."""
    from marketpipe.store.duckdb import DuckDBStore

    with DuckDBStore(_config(config, store).store_path()) as st:
        _emit(st.ingest_log(limit).drop("symbols"), "table", None)


# The data-quality commands live in their own module and register themselves on ``app``.
from marketpipe.cli import quality as _quality  # noqa: E402, F401
from marketpipe.cli import serve as _serve  # noqa: E402, F401
from marketpipe.cli import stream as _stream  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    # Run as ``python -m``: this module is ``__main__``, so take the app from the imported module,
    # which is the one the quality commands registered on.
    from marketpipe.cli.main import app as _app

    _app()
