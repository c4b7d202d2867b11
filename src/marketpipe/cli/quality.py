"""``marketpipe quality | update | repair | schedule``: data-quality commands (registered on the main app)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from marketpipe.cli.common import (
    ConfigOpt,
    LimitOpt,
    StoreOpt,
    app,
    emit,
    err,
    error_line,
    handle_errors,
    load_config,
    out,
    progress_bar,
    read_symbols,
    store_app,
    store_table,
)
from marketpipe.core.errors import InvalidArgument, OutputError
from marketpipe.core.validation import validate_enum, validate_required

T = TypeVar("T")
SymbolsArg = Annotated[list[str] | None, typer.Argument(help="Symbols, e.g. AAPL MSFT BRK.B")]
SymbolsFile = Annotated[Path | None, typer.Option("--symbols-file", help="one symbol per line")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bar (none is shown off a terminal)")]


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v * 100:.1f}%" if pct else f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _run(data: Any, coro: Coroutine[Any, Any, T]) -> T:
    async def go() -> T:
        try:
            return await coro
        finally:
            await data.aclose()

    return asyncio.run(go())


def quality_table(results: list[Any], title: str) -> Table:
    """One row per series; "consist" is n/a until `marketpipe reconcile` has compared vendors."""
    table = Table(title=title, box=None, pad_edge=False, collapse_padding=True, padding=(0, 1), header_style="bold")
    heads = (
        "symbol",
        "score",
        "complete",
        "valid",
        "timely",
        "consist",
        "expected",
        "held",
        "gap",
        "empty",
        "quar",
        "anom",
    )
    for col in heads:
        table.add_column(col, justify="left" if col == "symbol" else "right", no_wrap=True)
    for r in results:
        s = r.summary
        table.add_row(
            r.symbol,
            _fmt(s["score"]),
            *(_fmt(s[c], True) for c in ("completeness", "validity", "timeliness", "consistency")),
            *(_fmt(s[c]) for c in ("expected", "present", "gap", "confirmed_empty", "quarantined", "anomalies")),
        )
    return table


@app.command()
@handle_errors
def quality(
    symbols: SymbolsArg = None,
    start: Annotated[str, typer.Option("--start", "-s", help="YYYY-MM-DD or RFC-3339")] = "",
    end: Annotated[str | None, typer.Option("--end", "-e", help="default: now")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    html: Annotated[Path | None, typer.Option("--html", help="write a self-contained HTML report")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="write PNG charts into this directory")] = None,
    days: Annotated[int, typer.Option("--days", min=0, help="worst days listed per symbol")] = 5,
    symbols_file: SymbolsFile = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Completeness against the exchange calendar, anomalies and quality scores of stored bars."""
    from datetime import UTC, datetime

    from marketpipe.quality.report import QualityReport, render_html, render_png
    from marketpipe.service.data import MarketData

    validate_required(start, "start", message="--start is required (YYYY-MM-DD or RFC-3339)")
    syms = read_symbols(symbols or [], symbols_file)
    cfg = load_config(config, store)
    data = MarketData(cfg)
    results = _run(data, data.quality(syms, start, end, timeframe=timeframe))
    out.print(
        quality_table(
            results,
            f"Data quality, {timeframe} ({data.calendar_of(syms).name}; gap = never fetched, empty = vendor had none)",
        )
    )
    for r in results:
        if r.completeness.ranges.height:
            gaps = r.completeness.ranges
            out.print(f"[bold]{r.symbol}[/] missing ranges ({gaps.height}; first 10):")
            emit(gaps.head(10), "table", None)
        if r.findings.height:
            out.print(f"[bold]{r.symbol}[/] anomalies ({r.findings.height}; first 10):")
            emit(r.findings.select("timestamp", "kind", "severity", "detail").head(10), "table", None)
        worst = r.days.filter(r.days["score"].is_not_null()).sort("score").head(days)
        if worst.height and worst["score"].min() < 1.0:  # type: ignore[operator]
            out.print(f"[bold]{r.symbol}[/] lowest-scoring days:")
            emit(
                worst.select("day", "score", "completeness", "validity", "gap", "confirmed_empty", "anomalies"),
                "table",
                None,
            )
    if html or png:
        report = QualityReport(
            title=f"marketpipe data quality: {', '.join(syms)} {timeframe}",
            generated_at=datetime.now(UTC),
            calendar=cfg.calendar,
            series=[r.report() for r in results],
        )
        if html:
            try:
                render_html(report, html)
            except OSError as exc:
                raise OutputError(
                    f"cannot write --html {html}: {exc.strerror or exc}",
                    details={"parameter": "html", "path": str(html)},
                ) from None
            err.print(f"wrote {html}")
        if png:
            try:
                written = render_png(report, png)
            except OSError as exc:
                raise OutputError(
                    f"cannot write --png {png}: {exc.strerror or exc}", details={"parameter": "png", "path": str(png)}
                ) from None
            for p in written:
                err.print(f"wrote {p}")


def _update_table(results: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("symbol", "did", "from", "stored", "revised", "anomalies", "status"):
        table.add_column(col, justify="left" if col in ("symbol", "did", "from", "status") else "right")
    for sym, r in results.items():
        st = r.stats
        status = "ok" if r.ok else f"[red]{(r.error or (st.errors[0] if st and st.errors else {})).get('code')}[/]"
        table.add_row(
            sym,
            r.strategy,
            r.start.strftime("%Y-%m-%d %H:%M") if r.start else "-",
            _fmt(st.bars_stored if st else 0),
            _fmt(st.revised if st else 0),
            _fmt(st.anomalies if st else 0),
            status,
        )
    stats = [r.stats for r in results.values() if r.stats is not None]
    shared = next((st.unattributed for st in stats if any(st.unattributed.values())), None)
    if shared:
        table.caption = (
            f"{shared.get('stored', 0):,} stored and {shared.get('revised', 0):,} revised rows came on pages shared "
            "by several symbols and are not in any row"
        )
    return table


@app.command()
@handle_errors
def update(
    symbols: SymbolsArg = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    full: Annotated[bool, typer.Option("--full", help="refresh: re-fetch the range whatever is held")] = False,
    strategy: Annotated[str, typer.Option("--strategy", help="incremental, full or smart")] = "smart",
    start: Annotated[str | None, typer.Option("--start", "-s", help="for symbols with no history, or --full")] = None,
    end: Annotated[str | None, typer.Option("--end", "-e")] = None,
    feed: Annotated[str | None, typer.Option("--feed")] = None,
    symbols_file: SymbolsFile = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    no_progress: NoProgress = False,
) -> None:
    """Bring stored series up to now: incremental from the newest covered point, a full refresh, or smart."""
    from marketpipe.service.data import MarketData

    syms = read_symbols(symbols or [], symbols_file)
    data = MarketData(load_config(config, store))
    strat = "full" if full else strategy
    with progress_bar("update", not no_progress and sys.stderr.isatty()) as show:
        results = _run(
            data,
            data.update(syms, timeframe=timeframe, strategy=strat, start=start, end=end, feed=feed, progress=show),  # type: ignore[arg-type]
        )
    out.print(_update_table(results, f"Update ({strat})"))
    failed = [r for r in results.values() if not r.ok]
    for r in failed:
        e = r.error or (r.stats.errors[0] if r.stats and r.stats.errors else {})
        error_line(str(e.get("code")), f"{r.symbol}: {e.get('message')}")
    if failed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def repair(
    symbols: SymbolsArg = None,
    start: Annotated[str, typer.Option("--start", "-s")] = "",
    end: Annotated[str | None, typer.Option("--end", "-e")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    gaps_only: Annotated[
        bool, typer.Option("--gaps-only", help="do not ask fallback vendors for bars the primary had none of")
    ] = False,
    feed: Annotated[str | None, typer.Option("--feed")] = None,
    symbols_file: SymbolsFile = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    no_progress: NoProgress = False,
) -> None:
    """Fetch exactly what completeness says is missing: gaps through the router, then empty ranges from
    the vendors not yet asked. Never fills anything in; a second run fetches nothing."""
    from marketpipe.service.data import MarketData

    validate_required(start, "start", message="--start is required (YYYY-MM-DD or RFC-3339)")
    syms = read_symbols(symbols or [], symbols_file)
    data = MarketData(load_config(config, store))
    with progress_bar("repair", not no_progress and sys.stderr.isatty()) as show:
        res = _run(
            data,
            data.repair(syms, start, end, timeframe=timeframe, empties=not gaps_only, feed=feed, progress=show),
        )
    table = Table(title=f"Repair {timeframe}")
    for col in ("symbol", "gap before", "gap after", "empty before", "empty after", "complete before", "after"):
        table.add_column(col, justify="left" if col == "symbol" else "right")
    for sym in syms:
        b, a = res.before[sym], res.after[sym]
        table.add_row(
            sym,
            _fmt(b.gap),
            _fmt(a.gap),
            _fmt(b.confirmed_empty),
            _fmt(a.confirmed_empty),
            _fmt(b.ratio, True),
            _fmt(a.ratio, True),
        )
    table.caption = f"{res.requests} requests, {res.stored:,} bars stored; rows by provider: " + (
        ", ".join(f"{k} {v:,}" for k, v in res.rows_by_provider.items()) or "none"
    )
    out.print(table)
    for e in res.errors:
        error_line(str(e.get("code")), f"{','.join(e.get('symbols', []))}: {e.get('message')}")  # type: ignore[arg-type]
    if res.errors:
        raise typer.Exit(1)


@app.command()
@handle_errors
def schedule(
    symbols: SymbolsArg = None,
    every: Annotated[str, typer.Option("--every", help="30s, 1m, 15m, 1h, 1d")] = "1m",
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    strategy: Annotated[str, typer.Option("--strategy", help="incremental, full or smart")] = "smart",
    job: Annotated[list[str] | None, typer.Option("--job", help="run these \\[\\[jobs]] from the config")] = None,
    runs: Annotated[int | None, typer.Option("--runs", min=1, help="stop after this many runs of each job")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="symbols updating at once")] = None,
    symbols_file: SymbolsFile = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Recurring updates: SYMBOLS every --every, or the config's \\[\\[jobs]]. Each run is logged per symbol
    (`marketpipe store runs`); one symbol failing never stops the others."""
    from marketpipe.core.schema import normalize_symbols
    from marketpipe.core.timeframe import Timeframe
    from marketpipe.service.data import MarketData
    from marketpipe.service.maintain import STRATEGIES
    from marketpipe.service.scheduler import Job, parse_every

    cfg = load_config(config, store)
    jobs: list[Job] = []
    validate_enum(strategy, STRATEGIES, "strategy", message="unknown update strategy {value!r}; use one of {allowed}")
    if symbols or symbols_file:
        jobs.append(
            Job(
                "cli",
                tuple(read_symbols(symbols or [], symbols_file)),
                parse_every(every),
                Timeframe.parse(timeframe),
                strategy,
            )
        )
    wanted = set(job or [])
    unknown = wanted - {j.name for j in cfg.jobs}
    if unknown:
        raise InvalidArgument(f"no such job in the config: {', '.join(sorted(unknown))}", details={"parameter": "job"})
    jobs += [
        Job.from_config(j) for j in cfg.jobs if not symbols and not symbols_file and (not wanted or j.name in wanted)
    ]
    for j in jobs:
        normalize_symbols(list(j.symbols))
    data = MarketData(cfg)
    sched = data.scheduler(jobs, concurrency=concurrency)

    def report(run: Any) -> None:
        ok = len(run.results) - len(run.failed)
        line = f"{run.finished_at:%H:%M:%S} job {run.job}: {ok}/{len(run.results)} symbols ok"
        stored = sum(r.stats.bars_stored for r in run.results.values() if r.stats)
        err.print(line + f", {stored:,} bars stored" + (f"; failed: {', '.join(run.failed)}" if run.failed else ""))

    sched._on_run = report
    err.print(
        f"scheduling {len(jobs)} job(s): "
        + "; ".join(f"{j.name} every {j.every:g}s {','.join(j.symbols)}" for j in jobs)
    )
    try:
        _run(data, sched.run(runs=runs))
    except KeyboardInterrupt:
        err.print("stopped")
    if sched.history and any(r.failed for r in sched.history):
        raise typer.Exit(1)


@store_app.command("runs")
@handle_errors
def store_runs(
    job: Annotated[str | None, typer.Option("--job")] = None,
    limit: Annotated[int, LimitOpt] = 50,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Scheduled update runs, one row per symbol."""
    store_table(config, store, lambda st: st.job_runs(job, limit))


@store_app.command("anomalies")
@handle_errors
def store_anomalies(
    symbol: Annotated[str, typer.Argument()],
    start: Annotated[str, typer.Option("--start", "-s")],
    end: Annotated[str | None, typer.Option("--end", "-e")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Stored anomaly findings (from ingest and from `marketpipe quality`)."""
    from marketpipe.core.schema import normalize_symbols
    from marketpipe.core.timeutil import parse_range

    s, e = parse_range(start, end)
    store_table(config, store, lambda st: st.findings(normalize_symbols(symbol), timeframe, s, e))
