"""Options through one service: what ``mp.option_*``, ``marketpipe options`` and the gateway's option
routes (``/v1/options``, ``/v1beta1/options``) fetch through.

It decides what is fetched and checked: snapshot rows (chains, snapshots, latest quotes) pass the
vectorized checks of :mod:`marketpipe.quality.option_checks`; rows that fail are quarantined (held in
:attr:`OptionsData.quarantined` with their reasons, counted in ``marketpipe_option_quarantined_total``
and logged), never served and never edited. Greeks and IV are the vendor's or null with
``greeks_missing``: nothing in this module (nor anywhere it calls) computes them.

Alpaca is the one options vendor, so there is no failover; its client keeps the resilience policy
(retries, circuit, rate limit) of ``[providers.alpaca]``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import Counter

from marketpipe.core.config import Config
from marketpipe.core.errors import ConfigError, DatasetNotFound
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.options import OPTION_SNAPSHOT_SCHEMA
from marketpipe.core.schema import normalize_symbol
from marketpipe.core.timeutil import TimeInput, parse_range, parse_time
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_options import AlpacaOptionsProvider
from marketpipe.quality.option_checks import quote_score, split_checked

log = get_logger("marketpipe.service.options")
QUARANTINED = Counter(
    "marketpipe_option_quarantined_total",
    "Option snapshot rows quarantined, by the check they failed",
    ["check"],
    registry=REGISTRY,
)
MAX_QUARANTINE_ROWS = 10_000  # what :attr:`OptionsData.quarantined` keeps (the newest rows)


class OptionsData:
    """Async options service over the Alpaca options client (built from the config on first use)."""

    def __init__(
        self,
        config: Config,
        *,
        provider: AlpacaOptionsProvider | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self._provider = provider
        self._env = env
        self.quarantined: pl.DataFrame = pl.DataFrame(schema={**OPTION_SNAPSHOT_SCHEMA, "reasons": pl.String()})

    @property
    def provider(self) -> AlpacaOptionsProvider:
        if self._provider is None:
            cfg = self.config.providers.get("alpaca")
            if not isinstance(cfg, AlpacaConfig):
                raise ConfigError("options need [providers.alpaca]: Alpaca is the options vendor")
            self._provider = AlpacaOptionsProvider.from_config(cfg, env=self._env)
        return self._provider

    def _checked(self, frame: pl.DataFrame, what: str) -> pl.DataFrame:
        ok, bad = split_checked(frame)
        if bad.height:
            for reasons, n in bad.group_by("reasons").len().iter_rows():
                for check in str(reasons).split(","):
                    QUARANTINED.labels(check).inc(n)
            log.warning(
                "option_rows_quarantined", what=what, rows=bad.height, reasons=bad["reasons"].unique().to_list()
            )
            self.quarantined = pl.concat([self.quarantined, bad]).tail(MAX_QUARANTINE_ROWS)
        return quote_score(ok)

    async def chain(
        self,
        underlying: str,
        *,
        expiration: Any = None,
        expiration_gte: Any = None,
        expiration_lte: Any = None,
        type: str | None = None,
        strike_gte: float | None = None,
        strike_lte: float | None = None,
        root: str | None = None,
        feed: str | None = None,
        updated_since: TimeInput | None = None,
    ) -> pl.DataFrame:
        """The chain of ``underlying`` (every page), checked, with ``quote_score``."""
        since = parse_time(updated_since, name="updated_since") if updated_since is not None else None
        frames = []
        async for page in self.provider.iter_chain(
            underlying,
            feed=feed,
            type=type,
            strike_price_gte=strike_gte,
            strike_price_lte=strike_lte,
            expiration_date=expiration,
            expiration_date_gte=expiration_gte,
            expiration_date_lte=expiration_lte,
            root_symbol=root,
            updated_since=since,
        ):
            frames.append(self._checked(page, "option chain"))
        if not frames:
            return quote_score(pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA))
        return pl.concat(frames)

    async def snapshots(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        return self._checked(await self.provider.snapshots(contracts, feed=feed), "option snapshots")

    async def latest_quotes(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        return self._checked(await self.provider.latest_quotes(contracts, feed=feed), "option quotes")

    async def latest_trades(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        return self._checked(await self.provider.latest_trades(contracts, feed=feed), "option trades")

    async def bars(
        self,
        contracts: list[str] | str,
        start: TimeInput,
        end: TimeInput | None = None,
        *,
        timeframe: str = "1Min",
        limit: int = 10_000,
    ) -> pl.DataFrame:
        s, e = parse_range(start, end)
        return await self.provider.bars(contracts, timeframe, s, e, limit=limit)

    async def trades(
        self, contracts: list[str] | str, start: TimeInput, end: TimeInput | None = None, *, limit: int = 10_000
    ) -> pl.DataFrame:
        s, e = parse_range(start, end)
        return await self.provider.trades(contracts, s, e, limit=limit)

    async def contracts(self, underlyings: list[str] | str, **kw: Any) -> pl.DataFrame:
        return await self.provider.contracts(underlyings, **kw)

    async def aclose(self) -> None:
        if self._provider is not None:
            await self._provider.aclose()
            self._provider = None


# --- chain history: each snapshot stored as received ------------------------------------------------------


def history_path(directory: str | Path, underlying: str) -> Path:
    return Path(directory) / f"underlying={normalize_symbol(underlying)}"


def write_chain(frame: pl.DataFrame, directory: str | Path, underlying: str) -> Path:
    """One chain snapshot as one Parquet file ``DIR/underlying=SPY/<as_of>.parquet``, committed whole
    (written under a temporary name, then renamed): a killed run leaves no half file."""
    folder = history_path(directory, underlying)
    folder.mkdir(parents=True, exist_ok=True)
    as_of = frame["as_of"].max() if frame.height else None
    stamp = (as_of if isinstance(as_of, datetime) else datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{stamp}.parquet"
    tmp = folder / f".{stamp}.parquet.tmp"
    frame.write_parquet(tmp)
    os.replace(tmp, target)
    return target


def read_chain_history(directory: str | Path, underlying: str) -> pl.DataFrame:
    """Every stored snapshot of an underlying's chain, by (contract, as_of): the history of the vendor's
    greeks and IV (which the vendor itself does not serve)."""
    folder = history_path(directory, underlying)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise DatasetNotFound(
            f"no stored option chain snapshots of {normalize_symbol(underlying)} under {directory}",
            details={"path": str(folder)},
        )
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort("contract", "as_of")


async def record_chains(
    options: OptionsData,
    underlying: str,
    directory: str | Path,
    *,
    every_seconds: float,
    count: int | None = None,
    on_snapshot: Callable[[Path, int], None] | None = None,
    **filters: Any,
) -> int:
    """Fetch and store the chain every ``every_seconds`` (``count`` times, or until cancelled); returns how
    many snapshots were stored. A failed fetch stores nothing for that round and ends the run with its error."""
    done = 0
    loop = asyncio.get_running_loop()
    while count is None or done < count:
        started = loop.time()
        frame = await options.chain(underlying, **filters)
        path = write_chain(frame, directory, underlying)
        done += 1
        if on_snapshot is not None:
            on_snapshot(path, frame.height)
        if count is not None and done >= count:
            break
        await asyncio.sleep(max(0.0, every_seconds - (loop.time() - started)))
    return done
