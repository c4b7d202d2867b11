"""``marketpipe options chain|quote|bars|contracts|snapshot|history`` (registered on the main app).

Every row names its ``source`` and ``feed``; greeks and IV are the vendor's, or empty with
``greeks_missing`` = ``not_sent_by_vendor`` — the CLI never computes them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer

from marketpipe.cli.common import ConfigOpt, app, emit, err, handle_errors, load_config

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
    to: Annotated[Path, typer.Option("--to", help="directory of the stored snapshots")] = Path("option-chains"),
    every: Annotated[str, typer.Option("--every", help="e.g. 30s, 5m, 1h")] = "5m",
    count: Annotated[int | None, typer.Option("--count", help="stop after N snapshots (default: until Ctrl-C)")] = None,
    feed: FeedOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Store the chain as received every ``--every``: the history of greeks and IV the vendor does not serve.
    Read it back with ``marketpipe options history`` or ``mp.option_chain_history``."""
    from marketpipe.service.options import OptionsData, record_chains

    period = _seconds(every)
    svc = OptionsData(load_config(config))

    def told(path: Path, rows: int) -> None:
        err.print(f"stored {rows} contracts in {path}")

    async def go() -> int:
        try:
            return await record_chains(
                svc, underlying, to, every_seconds=period, count=count, on_snapshot=told, feed=feed
            )
        finally:
            await svc.aclose()

    try:
        n = asyncio.run(go())
    except KeyboardInterrupt:
        return
    err.print(f"{n} snapshots stored under {to}")


@options_app.command("history")
@handle_errors
def history(
    underlying: Annotated[str, typer.Argument(help="e.g. SPY")],
    to: Annotated[Path, typer.Option("--to", help="directory of the stored snapshots")] = Path("option-chains"),
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
) -> None:
    """The stored chain snapshots of an underlying, by (contract, as_of)."""
    from marketpipe.service.options import read_chain_history

    frame = read_chain_history(to, underlying)
    emit(_view(frame, fmt).with_columns(frame["as_of"]) if fmt.lower() == "table" else frame, fmt, output)
