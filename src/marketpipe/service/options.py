"""Options through one service: what ``mp.option_*``, ``marketpipe options`` and the gateway's option
routes (``/v1/options``, ``/v1beta1/options``) fetch through.

It decides what is fetched and checked: snapshot rows (chains, snapshots, latest quotes) pass the
vectorized checks of :mod:`marketpipe.quality.option_checks`; rows that fail are quarantined (kept in
the store's ``option_quarantine`` as received, with their reasons and request id; counted in
``marketpipe_option_quarantined_total`` and logged), never served and never edited. Greeks and IV are
the vendor's or null with ``greeks_missing``: nothing in this module (nor anywhere it calls) computes them.

Chain history: :func:`record_chains` (``marketpipe options snapshot``) stores each chain snapshot as
received in the store's ``option_snapshots`` (its rows and its quarantined rows in one transaction),
and :meth:`OptionsData.history` reads it back by (contract, as_of).

Alpaca is the one options vendor, so there is no failover; its client keeps the resilience policy
(retries, circuit, rate limit) of ``[providers.alpaca]``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import Counter

from marketpipe.core.config import Config
from marketpipe.core.errors import ConfigError, DatasetNotFound, StoreError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import REGISTRY, STORE_WRITE_FAILURES
from marketpipe.core.options import OPTION_SNAPSHOT_SCHEMA, parse_occs
from marketpipe.core.schema import normalize_symbol
from marketpipe.core.tables import OPTION_QUARANTINE_SCHEMA, OPTION_SNAPSHOTS
from marketpipe.core.timeutil import TimeInput, parse_range, parse_time
from marketpipe.core.validation import validate_enum
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_options import AlpacaOptionsProvider, parse_day
from marketpipe.quality.option_checks import quote_score, split_checked
from marketpipe.store.base import OptionFilter, OptionStore

log = get_logger("marketpipe.service.options")
QUARANTINED = Counter(
    "marketpipe_option_quarantined_total",
    "Option snapshot rows quarantined, by the check they failed",
    ["check"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class ChainSnapshot:
    """What one stored chain snapshot holds: ``contracts`` served rows (``stored`` of them new to the
    store: 0 when the same snapshot was written before), ``quarantined`` rows refused by the checks."""

    underlying: str
    as_of: datetime | None
    contracts: int
    stored: int
    quarantined: int
    parquet: Path | None = None  # the ``--parquet`` copy, when asked for


class OptionsData:
    """Async options service over the Alpaca options client (built from the config on first use).

    ``store``: where quarantined rows and chain history go (a callable, so the store is opened only
    when first needed); default: the configured store, opened by this service and closed by
    :meth:`aclose`. ``stored``: the store for calls that only read (history, quarantine), which should
    not create one (``MarketData._stored``); default: ``store``."""

    def __init__(
        self,
        config: Config,
        *,
        provider: AlpacaOptionsProvider | None = None,
        env: dict[str, str] | None = None,
        store: Callable[[], OptionStore] | None = None,
        stored: Callable[[], OptionStore] | None = None,
    ) -> None:
        self.config = config
        self._provider = provider
        self._env = env
        self._store_of = store
        self._stored_of = stored
        self._own_store: OptionStore | None = None

    @property
    def provider(self) -> AlpacaOptionsProvider:
        if self._provider is None:
            cfg = self.config.providers.get("alpaca")
            if not isinstance(cfg, AlpacaConfig):
                raise ConfigError("options need [providers.alpaca]: Alpaca is the options vendor")
            self._provider = AlpacaOptionsProvider.from_config(cfg, env=self._env)
        return self._provider

    @property
    def store(self) -> OptionStore:
        if self._store_of is not None:
            return self._store_of()
        if self._own_store is None:
            from marketpipe.store import open_store

            self._own_store = open_store(self.config)
        return self._own_store

    def _reading(self) -> OptionStore:
        return self._stored_of() if self._stored_of is not None else self.store

    def _split(self, frame: pl.DataFrame, what: str, request_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(rows that pass, scored; rows quarantined with reasons and ``request_id``), counted and logged."""
        ok, bad = split_checked(frame)
        if bad.height:
            for reasons, n in bad.group_by("reasons").len().iter_rows():
                for check in str(reasons).split(","):
                    QUARANTINED.labels(check).inc(n)
            log.warning(
                "option_rows_quarantined",
                what=what,
                rows=bad.height,
                reasons=bad["reasons"].unique().to_list(),
                request_id=request_id,
            )
        bad = bad.with_columns(pl.lit(request_id, pl.String).alias("request_id")).select(list(OPTION_QUARANTINE_SCHEMA))
        return quote_score(ok), bad

    async def _checked(self, frame: pl.DataFrame, what: str) -> pl.DataFrame:
        """The rows that pass, scored; the others go to the store's quarantine."""
        ok, bad = self._split(frame, what, uuid.uuid4().hex[:16])
        await self._keep_quarantine(bad, what)
        return ok

    async def _keep_quarantine(self, bad: pl.DataFrame, what: str) -> None:
        """Quarantined rows into the store. A quarantine the store cannot take is logged and counted
        (``marketpipe_store_write_failures_total{writer="option_quarantine"}``) and the answer is still
        served: those rows are not in it either way."""
        if not bad.height:
            return
        try:
            await asyncio.to_thread(self.store.write_option_snapshot, pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA), bad)
        except StoreError as exc:
            STORE_WRITE_FAILURES.labels("option_quarantine").inc()
            log.error("option_quarantine_not_stored", what=what, rows=bad.height, error=str(exc))

    async def _chain_pages(
        self, underlying: str, filters: dict[str, Any]
    ) -> AsyncIterator[tuple[pl.DataFrame, pl.DataFrame]]:
        """The chain's pages, each split into (served rows, quarantined rows)."""
        since = filters.pop("updated_since", None)
        async for page, rid in self.provider.chain_pages(
            underlying,
            feed=filters.pop("feed", None),
            type=filters.pop("type", None),
            strike_price_gte=filters.pop("strike_gte", None),
            strike_price_lte=filters.pop("strike_lte", None),
            expiration_date=filters.pop("expiration", None),
            expiration_date_gte=filters.pop("expiration_gte", None),
            expiration_date_lte=filters.pop("expiration_lte", None),
            root_symbol=filters.pop("root", None),
            updated_since=parse_time(since, name="updated_since") if since is not None else None,
            **filters,
        ):
            yield self._split(page, "option chain", rid)

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
        filters = {
            "expiration": expiration,
            "expiration_gte": expiration_gte,
            "expiration_lte": expiration_lte,
            "type": type,
            "strike_gte": strike_gte,
            "strike_lte": strike_lte,
            "root": root,
            "feed": feed,
            "updated_since": updated_since,
        }
        frames = []
        async for ok, bad in self._chain_pages(underlying, filters):
            await self._keep_quarantine(bad, "option chain")
            frames.append(ok)
        if not frames:
            return quote_score(pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA))
        return pl.concat(frames)

    async def snapshot_chain(
        self, underlying: str, *, parquet: str | Path | None = None, **filters: Any
    ) -> ChainSnapshot:
        """Fetch the chain and store it as received: every page's served rows and quarantined rows in ONE
        store transaction (a failed fetch or write stores nothing of this snapshot). Written again (the
        same rows), it stores nothing new. ``parquet``: also write the stored rows as one Parquet file
        under that directory (:func:`write_chain`)."""
        oks, bads = [], []
        async for ok, bad in self._chain_pages(underlying, dict(filters)):
            oks.append(ok)
            bads.append(bad)
        rows = pl.concat(oks).select(OPTION_SNAPSHOTS.names) if oks else pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA)
        held_out = pl.concat(bads) if bads else pl.DataFrame(schema=OPTION_QUARANTINE_SCHEMA)
        stored, quarantined = await asyncio.to_thread(self.store.write_option_snapshot, rows, held_out)
        und = normalize_symbol(underlying)
        as_of = pl.concat([rows["as_of"], held_out["as_of"]]).max()
        path = write_chain(rows, parquet, und) if parquet is not None else None
        log.info(
            "option_chain_snapshot_stored",
            underlying=und,
            contracts=rows.height,
            stored=stored,
            quarantined=quarantined,
        )
        return ChainSnapshot(
            und, as_of if isinstance(as_of, datetime) else None, rows.height, stored, quarantined, path
        )

    async def history(
        self,
        underlying: str | None = None,
        *,
        contracts: list[str] | str | None = None,
        start: TimeInput | None = None,
        end: TimeInput | None = None,
        type: str | None = None,
        expiration: date | str | None = None,
    ) -> pl.DataFrame:
        """The stored chain snapshots, by (contract, as_of): the history of the vendor's greeks and IV
        (which the vendor itself does not serve), every stored column as received plus ``quote_score``.
        Narrowed by ``underlying``, ``contracts`` (OCC symbols), ``as_of`` in ``[start, end)``, ``type``,
        ``expiration``. Nothing stored that matches: DATASET_NOT_FOUND."""
        where = option_filter(underlying, contracts, start, end, type, expiration)
        frame = await asyncio.to_thread(self._reading().read_option_snapshots, where)
        if not frame.height:
            raise DatasetNotFound(
                "no stored option chain snapshots match "
                + (", ".join(f"{k}={v}" for k, v in _described(where).items()) or "(any)")
                + " (store some with `marketpipe options snapshot UNDERLYING`)",
                details={"filters": {k: str(v) for k, v in _described(where).items()}},
            )
        return quote_score(frame)

    async def quarantined(self, underlying: str | None = None, *, limit: int = 1000) -> pl.DataFrame:
        """Quarantined option rows kept in the store (the row as received, ``reasons``, ``request_id``),
        newest first."""
        where = OptionFilter(underlying=normalize_symbol(underlying)) if underlying else None
        return await asyncio.to_thread(self._reading().option_quarantine, where, limit)

    async def snapshots(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        return await self._checked(await self.provider.snapshots(contracts, feed=feed), "option snapshots")

    async def latest_quotes(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        return await self._checked(await self.provider.latest_quotes(contracts, feed=feed), "option quotes")

    async def latest_trades(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        return await self._checked(await self.provider.latest_trades(contracts, feed=feed), "option trades")

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
        if self._own_store is not None:
            store, self._own_store = self._own_store, None
            close = getattr(store, "close", None)
            if close is not None:
                close()


# --- chain history ------------------------------------------------------------------------------------------


def option_filter(
    underlying: str | None = None,
    contracts: list[str] | str | None = None,
    start: TimeInput | None = None,
    end: TimeInput | None = None,
    type: str | None = None,
    expiration: date | str | None = None,
) -> OptionFilter:
    """The checked filter of a history read (INVALID_OPTION_SYMBOL, INVALID_ARGUMENT on bad values)."""
    s = parse_time(start, name="start") if start is not None else None
    e = parse_time(end, name="end") if end is not None else None
    if s is not None and e is not None:
        s, e = parse_range(s, e)
    return OptionFilter(
        underlying=normalize_symbol(underlying) if underlying else None,
        contracts=tuple(o.symbol for o in parse_occs(contracts)) if contracts else None,
        start=s,
        end=e,
        type=validate_enum(type.lower(), ("call", "put"), "type") if type else None,
        expiration=parse_day(expiration, "expiration") if expiration is not None else None,
    )


def _described(where: OptionFilter) -> dict[str, object]:
    fields = ("underlying", "contracts", "start", "end", "type", "expiration")
    return {f: getattr(where, f) for f in fields if getattr(where, f) is not None}


def history_path(directory: str | Path, underlying: str) -> Path:
    return Path(directory) / f"underlying={normalize_symbol(underlying)}"


def write_chain(frame: pl.DataFrame, directory: str | Path, underlying: str) -> Path:
    """One chain snapshot as one Parquet file ``DIR/underlying=SPY/<as_of>.parquet`` (the ``--parquet``
    export of ``options snapshot``), committed whole (written under a temporary name, then renamed): a
    killed run leaves no half file."""
    folder = history_path(directory, underlying)
    folder.mkdir(parents=True, exist_ok=True)
    as_of = frame["as_of"].max() if frame.height else None
    stamp = (as_of if isinstance(as_of, datetime) else datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{stamp}.parquet"
    tmp = folder / f".{stamp}.parquet.tmp"
    frame.write_parquet(tmp)
    os.replace(tmp, target)
    return target


async def record_chains(
    options: OptionsData,
    underlying: str,
    *,
    every_seconds: float,
    count: int | None = None,
    on_snapshot: Callable[[ChainSnapshot], None] | None = None,
    parquet: str | Path | None = None,
    **filters: Any,
) -> int:
    """Fetch and store the chain every ``every_seconds`` (``count`` times, or until cancelled); returns how
    many snapshots were stored. A failed fetch or write stores nothing for that round and ends the run
    with its error."""
    done = 0
    loop = asyncio.get_running_loop()
    while count is None or done < count:
        started = loop.time()
        snap = await options.snapshot_chain(underlying, parquet=parquet, **filters)
        done += 1
        if on_snapshot is not None:
            on_snapshot(snap)
        if count is not None and done >= count:
            break
        await asyncio.sleep(max(0.0, every_seconds - (loop.time() - started)))
    return done
