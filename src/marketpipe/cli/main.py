"""The ``marketpipe`` command line."""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from marketpipe.cli.common import (
    FORMAT_MESSAGE,
    OUTPUT_FORMATS,
    ConfigOpt,
    LimitOpt,
    StoreOpt,
    app,
    cli_command,
    config_app,
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
from marketpipe.core.validation import validate_enum, validate_number, validate_required

# --- backfill ----------------------------------------------------------------------------------


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
        with progress_bar("backfill", show_progress) as show:

            def update(stats: Any) -> None:
                keep(stats)
                if show is not None:
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
    feed: Annotated[
        str | None, typer.Option("--feed", help="sip or iex (default from config); for pairs the location: us, eu-1")
    ] = None,
    symbols_file: Annotated[Path | None, typer.Option("--symbols-file", help="one symbol per line")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="enqueue work items on the bus for `marketpipe worker`s")
    ] = False,
) -> None:
    """Fetch bars into the local store: only ranges the coverage ledger lacks; resumable.

    Ctrl-C (exit 130) or SIGTERM (exit 143) stops it within moments, keeping every page committed.
    With --distributed the work goes to the workers on the bus, and this shows their progress."""
    from marketpipe.service.data import MarketData

    validate_required(start, "start", message="--start is required (YYYY-MM-DD or RFC-3339)")
    syms = read_symbols(symbols or [], symbols_file)
    if distributed:
        from marketpipe.cli.bus import run_distributed

        cfg = load_config(config, store)
        run_distributed(cfg, syms, start, end, timeframe, feed, not no_progress and sys.stderr.isatty())
        return
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
            error_line(str(e["code"]), f"{where}: {e['message']}")
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
    source: Annotated[
        str | None, typer.Option("--source", help="parquet://PATH or s3://BUCKET/prefix: read the cold tier")
    ] = None,
    adjustment: Annotated[
        str, typer.Option("--adjustment", "-a", help="raw, split, dividend, spin-off or all (adjusted on read)")
    ] = "raw",
    as_of: Annotated[str | None, typer.Option("--as-of", help="adjust with the actions known by this day")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Print bars: from the store where covered, otherwise fetched, checked and stored first (or, with
    ``--source``, from a Parquet dataset ``marketpipe export`` wrote). With --adjustment, adjusted for
    corporate actions (the applied actions are listed on stderr)."""
    from marketpipe.service.data import MarketData

    validate_enum(fmt, OUTPUT_FORMATS, "format", casefold=True, message=FORMAT_MESSAGE)
    data = MarketData(load_config(config, store))

    async def go() -> Any:
        try:
            return await data.bars(
                symbols,
                start,
                end,
                timeframe=timeframe,
                feed=feed,
                fetch=not no_fetch,
                source=source,
                adjustment=adjustment,
                as_of=as_of,
            )
        finally:
            await data.aclose()

    from marketpipe.service.actions import adjustment_of

    frame = asyncio.run(go())
    emit(frame, fmt, output)
    info = adjustment_of(frame)
    if info is not None:
        for r in info.applied.iter_rows(named=True):
            what = f"{r['type']} {r['symbol']} ex {r['ex_date']} x{r['price_factor']:.6g}"
            err.print(f"applied {what} ({r['action_id']}, {r['source']})", highlight=False)
        for r in info.skipped.iter_rows(named=True):
            err.print(f"[yellow]not applied {r['type']} {r['symbol']} ex {r['ex_date']}: {r['reason']}[/yellow]")


def _records_table(title: str, records: dict[str, Any]) -> Table:
    """One column per record (symbol or part), one row per field: fits a terminal however many fields."""
    import msgspec

    from marketpipe.service.frames import public_name

    table = Table(title=title)
    table.add_column("field")
    docs = {name: msgspec.structs.asdict(r) for name, r in records.items()}
    for name in docs:
        table.add_column(name, overflow="fold")
    fields: list[str] = []
    for doc in docs.values():
        fields += [f for f in doc if f not in fields]
    for f in fields:
        table.add_row(public_name(f), *(_cell(doc.get(f)) for doc in docs.values()))
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


SIM_ENV_KEYS = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "POLYGON_API_KEY": "POLYKEY"}


def sim_setup(urls: dict[str, str], store: Path) -> tuple[str, list[str]]:
    """What points marketpipe at a running ``marketpipe sim``: the TOML of its providers (every vendor the
    simulator plays, the plans its keys have, its own store so simulated prices never mix with real ones)
    and the ``export`` lines (the keys, ``APCA_API_DATA_URL`` for Alpaca's tools, ``MARKETPIPE_CONFIG``
    added by the caller once the file is written)."""
    toml = ["# marketpipe against the simulator (written by `marketpipe sim`)", "[store]", f"path = {_toml_str(store)}"]
    if "alpaca" in urls:  # REST and the live stream (same port; the stream host follows base_url)
        toml += ["", "[providers.alpaca]", f"base_url = {_toml_str(urls['alpaca'])}", 'plan = "unlimited"']
        toml += ["rate_limit_per_min = 10000"]
    if "polygon" in urls:
        toml += ["", "[providers.polygon]", f"base_url = {_toml_str(urls['polygon'])}", 'plan = "unlimited"']
        toml += ["rate_limit_per_min = 10000"]
    if "yahoo" in urls:
        toml += ["", "[providers.yahoo]", "enabled = true", f"base_url = {_toml_str(urls['yahoo'])}"]
        toml += ["rate_limit_per_min = 10000"]
    exports = []
    if "alpaca" in urls:
        exports += [
            f"export ALPACA_API_KEY={SIM_ENV_KEYS['ALPACA_API_KEY']} "
            f"ALPACA_SECRET_KEY={SIM_ENV_KEYS['ALPACA_SECRET_KEY']}",
            f"export APCA_API_DATA_URL={shlex.quote(urls['alpaca'])}",
        ]
    if "polygon" in urls:
        exports.append(f"export POLYGON_API_KEY={SIM_ENV_KEYS['POLYGON_API_KEY']}")
    return "\n".join(toml) + "\n", exports


def _toml_str(value: object) -> str:
    """A TOML basic string (JSON's escaping is valid TOML)."""
    import json

    return json.dumps(str(value))


@app.command()
@handle_errors
def sim(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Alpaca's port (REST and stream); 0: any free port")
    ] = 8765,
    polygon_port: Annotated[
        int | None, typer.Option("--polygon-port", min=0, max=65535, help="default: --port + 1 (0: any free port)")
    ] = None,
    yahoo_port: Annotated[
        int | None, typer.Option("--yahoo-port", min=0, max=65535, help="default: --port + 2 (0: any free port)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    write_config: Annotated[
        Path | None,
        typer.Option("--write-config", help="where the config to use it is written (default: a temp dir)"),
    ] = None,
) -> None:
    """Run the vendor simulator until interrupted: Alpaca (REST and stream), Polygon and Yahoo faces over one
    market, one port each. Prints the exports to paste and writes a config file that points REST, streams,
    reconcile and the gateway at it. Keys: SIMKEY / SIMSECRET (Alpaca), POLYKEY (Polygon)."""
    from marketpipe.core.errors import InvalidArgument, OutputError
    from marketpipe.sim.server import SimServer, serve_vendors_forever

    ports = {
        "alpaca": port,
        "polygon": polygon_port if polygon_port is not None else (port + 1 if port else 0),
        "yahoo": yahoo_port if yahoo_port is not None else (port + 2 if port else 0),
    }
    for vendor, p in ports.items():
        if p > 65535:
            raise InvalidArgument(
                f"--{vendor}-port: --port {port} + {p - port} is past 65535; give --{vendor}-port",
                details={"parameter": f"{vendor}-port"},
            )

    def announce(servers: dict[str, SimServer]) -> None:  # once listening: a port in use never gets announced
        urls = {vendor: server.url for vendor, server in servers.items()}
        where = write_config or Path(tempfile.gettempdir()) / f"marketpipe-sim-{servers['alpaca'].port}" / "sim.toml"
        toml, exports = sim_setup(urls, where.parent / f"sim-seed{seed}.duckdb")
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            part = where.with_name(where.name + ".part")
            part.write_text(toml, encoding="utf-8")
            part.replace(where)  # whole or not at all
        except OSError as exc:
            raise OutputError(f"cannot write {where}: {exc.strerror or exc}", details={"path": str(where)}) from None
        exports.append(f"export MARKETPIPE_CONFIG={shlex.quote(str(where.resolve()))}")
        a = servers["alpaca"]
        err.print(
            f"simulator on {a.url}  (Alpaca REST and stream {a.ws_url('iex')}; polygon {urls['polygon']}, "
            f"yahoo {urls['yahoo']}; keys SIMKEY/SIMSECRET, free plan FREEKEY/FREESECRET, POLYKEY; "
            "faults at /_sim/faults on each port)",
            soft_wrap=True,
        )
        lines = [
            f"# config written to {where} (REST, streams, reconcile and `marketpipe serve` use it):",
            toml.rstrip("\n"),
            "",
            "# paste into the shell that runs marketpipe:",
            *exports,
        ]
        print("\n".join(lines), flush=True)  # plain print: no wrapping, so every line pastes as printed

    serve_vendors_forever(host, ports, seed=seed, on_ready=announce)


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
    mp = cli_command()
    out.print(f"\nread them again: {mp} bars {syms[0]} --start {done[-1].day} --store {store_path} --no-fetch")
    out.print(
        f"quality report:  {mp} quality {' '.join(syms)} --start {done[0].day} --end {done[-1].day} "
        f"--store {store_path} --html report.html"
    )


def pl_head_tail(frame: Any, n: int = 5) -> Any:
    import polars as pl

    part = frame if frame.height <= 2 * n else pl.concat([frame.head(n), frame.tail(n)])
    cols = ["open", "high", "low", "close", "volume", "trade_count", "vwap"]
    return part.select(pl.col("ts").dt.strftime("%m-%d %H:%M").alias("timestamp UTC"), *cols)


# --- config and store ----------------------------------------------------------------------------


@config_app.command("show")
@handle_errors
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration; secrets masked."""
    import os

    import msgspec

    from marketpipe.core.config import ALPACA_KEY_VARS, ALPACA_SECRET_VARS, mask, url_without_password
    from marketpipe.store.parquet import KEY_VARS as S3_KEY_VARS

    cfg = load_config(config)
    doc = msgspec.to_builtins(cfg)
    if cfg.store_is_server():
        doc["store"] = {"path": None, "url": url_without_password(cfg.store_target())}
    else:
        doc["store"]["path"] = str(cfg.store_path())
    doc["source_path"] = cfg.source_path or "(defaults; no config file found)"
    doc["credentials"] = {
        v: mask(os.environ.get(v)) for v in (*ALPACA_KEY_VARS, *ALPACA_SECRET_VARS, "POLYGON_API_KEY", *S3_KEY_VARS)
    }
    # the alert sinks' secrets: the file names their variables, the values are masked like the others
    for sink in doc["alerts"]["sinks"].values():
        for key, var in sink.items():
            if key.endswith("_env"):
                doc["credentials"][var] = mask(os.environ.get(var))
    if not cfg.export.endpoint_url and os.environ.get("AWS_ENDPOINT_URL"):
        doc["export"]["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
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
from marketpipe.cli import actions, alerts, bus, cluster, export, options, quality, serve, stream  # noqa: E402

__all__ = ["actions", "alerts", "app", "bus", "cluster", "export", "options", "quality", "serve", "stream"]

if __name__ == "__main__":  # pragma: no cover
    app()
