"""``marketpipe options chain|quote|bars|contracts|snapshot|history|quarantine`` (registered on the main app).

Every row names its ``source`` and ``feed``; greeks and IV are the vendor's, or empty with
``greeks_missing`` = ``not_sent_by_vendor`` — the CLI never computes them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer

from marketpipe.cli.common import ConfigOpt, StoreOpt, app, emit, err, handle_errors, load_config

options_app = typer.Typer(
    help="Options: chains, quotes, bars, contracts, stored chain snapshots.", no_args_is_help=True
)
app.add_typer(options_app, name="options")

FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o")]
FeedOpt = Annotated[str | None, typer.Option("--feed", help="opra or indicative (default: the vendor's rule)")]
CHAIN_VIEW = [
    "contract", "type", "strike", "expiration", "bid_price", "ask_price", "bid_size", "ask_size",
    "trade_price", "delta", "gamma", "theta", "vega", "rho", "implied_volatility", "greeks_missing",
    "quote_score", "source", "feed",
]  # fmt: skip


def _run(config: Path | None, call: Callable[[Any], Awaitable[pl.DataFrame]]) -> pl.DataFrame:
    from marketpipe.service.options import OptionsData

    svc = OptionsData(load_config(config))

    async def go() -> pl.DataFrame:
        try:
            return await call(svc)
        finally:
            await svc.aclose()

    return asyncio.run(go())


def _stored(config: Path | None, store: str | None, call: Callable[[Any], Awaitable[pl.DataFrame]]) -> pl.DataFrame:
    """``call`` on the options service over the configured store (``--store`` wins), opened for a read
    once the arguments are checked: no store there yet is STORE_ERROR, not an empty answer."""
    from marketpipe.service.options import OptionsData
    from marketpipe.store import open_store
    from marketpipe.store.base import Store

    cfg = load_config(config, store)
    opened: list[Store] = []

    def reading() -> Store:
        if not opened:
            opened.append(open_store(cfg, create=False))
        return opened[0]

    async def go() -> pl.DataFrame:
        try:
            return await call(OptionsData(cfg, store=reading))
        finally:
            for st in opened:
                st.close()

    return asyncio.run(go())


def _view(frame: pl.DataFrame, fmt: str) -> pl.DataFrame:
    """The table view keeps the columns a reader scans; every other format writes every column."""
    return frame.select([c for c in CHAIN_VIEW if c in frame.columns]) if fmt.lower() == "table" else frame


@options_app.command("chain")
@handle_errors
def chain(
    underlying: Annotated[str, typer.Argument(help="e.g. SPY")],
    expiration: Annotated[str | None, typer.Option("--expiration", help="YYYY-MM-DD")] = None,
    type: Annotated[str | None, typer.Option("--type", help="call or put")] = None,
    strike_gte: Annotated[float | None, typer.Option("--strike-gte")] = None,
    strike_lte: Annotated[float | None, typer.Option("--strike-lte")] = None,
    feed: FeedOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The option chain of an underlying: the vendor's quotes, trades, greeks and IV, checked."""
    frame = _run(
        config,
        lambda s: s.chain(
            underlying, expiration=expiration, type=type, strike_gte=strike_gte, strike_lte=strike_lte, feed=feed
        ),
    )
    emit(_view(frame, fmt), fmt, output)


@options_app.command("quote")
@handle_errors
def quote(
    contracts: Annotated[list[str], typer.Argument(help="OCC symbols, e.g. SPY250321C00575500")],
    feed: FeedOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Snapshots of contracts (latest quote and trade, greeks and IV as the vendor sends them)."""
    emit(_view(_run(config, lambda s: s.snapshots(contracts, feed=feed)), fmt), fmt, output)


@options_app.command("bars")
@handle_errors
def bars(
    contracts: Annotated[list[str], typer.Argument(help="OCC symbols")],
    start: Annotated[str, typer.Option("--start", "-s")],
    end: Annotated[str | None, typer.Option("--end", "-e")] = None,
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")] = "1Min",
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Bars of option contracts (history from February 2024)."""
    emit(_run(config, lambda s: s.bars(contracts, start, end, timeframe=timeframe)), fmt, output)


@options_app.command("contracts")
@handle_errors
def contracts(
    underlyings: Annotated[list[str], typer.Argument(help="e.g. SPY AAPL")],
    expiration_lte: Annotated[str | None, typer.Option("--expiration-lte", help="default: next weekend")] = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Contracts from the Trading API, with open interest and its date."""
    frame = _run(config, lambda s: s.contracts(underlyings, expiration_date_lte=expiration_lte))
    emit(frame, fmt, output)


def _seconds(text: str) -> float:
    from marketpipe.core.errors import InvalidArgument

    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidArgument(
            f"--every must be a duration such as 30s, 5m or 1h, got {text!r}", details={"parameter": "every"}
        )
    return value


@options_app.command("snapshot")
@handle_errors
def snapshot(
    underlying: Annotated[str, typer.Argument(help="e.g. SPY")],
    every: Annotated[str, typer.Option("--every", help="e.g. 30s, 5m, 1h")] = "5m",
    count: Annotated[int | None, typer.Option("--count", help="stop after N snapshots (default: until Ctrl-C)")] = None,
    feed: FeedOpt = None,
    parquet: Annotated[
        Path | None, typer.Option("--parquet", help="also write each snapshot as DIR/underlying=X/<as_of>.parquet")
    ] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Store the chain as received every ``--every`` in the store: the history of greeks and IV the vendor does
    not serve. Read it back with ``marketpipe options history`` or ``mp.option_chain_history``."""
    from marketpipe.core.config import url_without_password
    from marketpipe.service.options import ChainSnapshot, OptionsData, record_chains

    period = _seconds(every)
    cfg = load_config(config, store)
    svc = OptionsData(cfg)

    def told(snap: ChainSnapshot) -> None:
        where = f" (and {snap.parquet})" if snap.parquet else ""
        err.print(
            f"{snap.underlying} as of {snap.as_of:%Y-%m-%d %H:%M:%S}Z: {snap.contracts} contracts, {snap.stored} "
            f"stored, {snap.quarantined} quarantined{where}"
            if snap.as_of
            else f"{snap.underlying}: the vendor sent no contracts"
        )

    async def go() -> int:
        try:
            return await record_chains(
                svc, underlying, every_seconds=period, count=count, on_snapshot=told, feed=feed, parquet=parquet
            )
        finally:
            await svc.aclose()

    try:
        n = asyncio.run(go())
    except KeyboardInterrupt:
        return
    err.print(f"{n} snapshots stored in {url_without_password(cfg.store_target())}")


@options_app.command("history")
@handle_errors
def history(
    underlying: Annotated[str | None, typer.Argument(help="e.g. SPY (default: every stored underlying)")] = None,
    contract: Annotated[list[str] | None, typer.Option("--contract", help="OCC symbol (repeatable)")] = None,
    start: Annotated[str | None, typer.Option("--start", "-s", help="as_of from")] = None,
    end: Annotated[str | None, typer.Option("--end", "-e", help="as_of before")] = None,
    type: Annotated[str | None, typer.Option("--type", help="call or put")] = None,
    expiration: Annotated[str | None, typer.Option("--expiration", help="YYYY-MM-DD")] = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """The stored chain snapshots, by (contract, as_of), from the store."""
    frame = _stored(
        config,
        store,
        lambda s: s.history(underlying, contracts=contract, start=start, end=end, type=type, expiration=expiration),
    )
    emit(_view(frame, fmt).with_columns(frame["as_of"]) if fmt.lower() == "table" else frame, fmt, output)


@options_app.command("quarantine")
@handle_errors
def quarantine(
    underlying: Annotated[str | None, typer.Argument(help="e.g. SPY (default: all)")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 1000,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Option rows the checks refused, as received, with their reasons and request id (newest first)."""
    frame = _stored(config, store, lambda s: s.quarantined(underlying, limit=limit))
    view = ["contract", "as_of", "reasons", "bid_price", "ask_price", "delta", "request_id", "source", "feed"]
    emit(frame.select(view) if fmt.lower() == "table" else frame, fmt, output)
