"""marketpipe: market data fetched, checked, kept and served.

    import marketpipe as mp
    df = mp.bars("AAPL", "2024-01-02", "2024-03-01", timeframe="1Min")   # polars DataFrame

Bars come from the local store where it already holds them; missing ranges are fetched from the
vendor, checked and stored first. Configuration: ``marketpipe.toml`` / env (see the README).
"""

from __future__ import annotations

import threading
from datetime import date
from typing import TYPE_CHECKING, Any, Literal, overload

# The library's root binds each vendor's config class (declared beside its adapter) to core's config
# loader, which cannot import providers/ itself: importing marketpipe.providers registers them, and every
# ``marketpipe.*`` import runs this file first. Only the small config modules load here.
import marketpipe.providers

# ``mp.quality`` is a function, and ``marketpipe.quality`` is also a subpackage. Python sets a package's
# attribute to its subpackage when that subpackage is first imported (``import marketpipe.quality.x`` or
# any module that does, such as the services behind ``mp.bars``), which would replace the function with
# a module. Importing the (empty) subpackage here, before the function below is defined, makes that
# first import happen now: later imports find it in ``sys.modules`` and leave the attribute alone.
import marketpipe.quality  # noqa: F401  (re-bound to the function below, on purpose)
from marketpipe.core.timeutil import TimeInput

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl

    from marketpipe.core.schema import Quote, Snapshot, Trade
    from marketpipe.core.timeframe import TimeframeLike
    from marketpipe.service.backfill import BackfillStats
    from marketpipe.service.data import SyncMarketData
    from marketpipe.service.remote import GatewayClient

__version__ = "0.1.0"
__all__ = [
    "actions",
    "applied",
    "backfill",
    "bars",
    "client",
    "latest_quote",
    "latest_trade",
    "option_bars",
    "option_chain",
    "option_chain_history",
    "option_contracts",
    "option_quarantine",
    "option_quotes",
    "option_snapshots",
    "option_trades",
    "quality",
    "skipped",
    "snapshots",
]

_default: SyncMarketData | None = None
_lock = threading.Lock()
TimeLike = TimeInput  # a day (date, 'YYYY-MM-DD', naive midnight) or an aware instant: core/timeutil.py


@overload
def client(*, gateway: str, api_key: str | None = None, timeout: float = 60.0) -> GatewayClient: ...


@overload
def client(**kw: Any) -> SyncMarketData: ...


def client(*, gateway: str | None = None, **kw: Any) -> SyncMarketData | GatewayClient:
    """A synchronous client with its own store and provider (``config=``, ``store=``, ``provider=``), or,
    with ``gateway="http://127.0.0.1:8000"``, one that reads bars through a running ``marketpipe serve``
    (which holds the store file while it runs; ``api_key=`` when the gateway has client keys)."""
    if gateway is not None:
        from marketpipe.service.remote import GatewayClient

        return GatewayClient(gateway, **kw)
    from marketpipe.service.data import SyncMarketData

    return SyncMarketData(**kw)


def _client() -> SyncMarketData:
    global _default
    with _lock:
        if _default is None:
            _default = client()
        return _default


@overload
def bars(
    symbols: str | list[str],
    start: TimeLike,
    end: TimeLike | None = None,
    *,
    timeframe: TimeframeLike = "1Min",
    feed: str | None = None,
    fetch: bool = True,
    source: str | None = None,
    tz: str | None = None,
    shape: Literal["long"] = "long",
    adjustment: str = "raw",
    as_of: TimeLike | None = None,
) -> pl.DataFrame: ...


@overload
def bars(
    symbols: str | list[str],
    start: TimeLike,
    end: TimeLike | None = None,
    *,
    timeframe: TimeframeLike = "1Min",
    feed: str | None = None,
    fetch: bool = True,
    source: str | None = None,
    tz: str | None = None,
    shape: Literal["alpaca", "wide"],
    adjustment: str = "raw",
    as_of: TimeLike | None = None,
) -> pd.DataFrame: ...


def bars(
    symbols: str | list[str],
    start: TimeLike,
    end: TimeLike | None = None,
    *,
    timeframe: TimeframeLike = "1Min",
    feed: str | None = None,
    fetch: bool = True,
    source: str | None = None,
    tz: str | None = None,
    shape: Literal["long", "alpaca", "wide"] = "long",
    adjustment: str = "raw",
    as_of: TimeLike | None = None,
) -> pl.DataFrame | pd.DataFrame:
    """Bars for ``[start, end)`` as a polars DataFrame (``.to_pandas()`` for pandas), times in UTC.

    ``tz="exchange"`` (the calendar's zone, America/New_York for XNYS) or any IANA name converts ``ts``.
    ``shape="alpaca"``: alpaca-py's ``BarSet.df`` (pandas, index (symbol, timestamp), UTC unless ``tz``);
    ``shape="wide"``: ``yfinance.download``'s frame (columns (Price, Ticker), exchange time unless ``tz``),
    NaN where a symbol has no bar at a time another has one (pandas' outer alignment; nothing is filled).
    ``source="parquet://PATH"`` / ``"s3://BUCKET/prefix"``: read the Parquet cold tier that ``marketpipe export``
    wrote (nothing fetched, the store not opened), the same frame as from the store.

    ``adjustment="split"|"dividend"|"spin-off"|"all"`` (Alpaca's values): raw bars adjusted on read for
    corporate actions (a spin-off with its new line's raw close on the ex-date; without one it is left
    out and listed as skipped); ``as_of="YYYY-MM-DD"``: only with the actions known by that day. What was applied:
    :func:`applied` (``mp.applied(df)``); what was left out and why: :func:`skipped`."""
    out: pl.DataFrame | pd.DataFrame = _client().bars(
        symbols,
        start,
        end,
        timeframe=timeframe,
        feed=feed,
        fetch=fetch,
        source=source,
        tz=tz,
        shape=shape,
        adjustment=adjustment,
        as_of=as_of,
    )
    return out


def actions(
    symbols: str | list[str],
    start: TimeLike,
    end: TimeLike | None = None,
    *,
    types: str | list[str] | None = None,
    as_of: TimeLike | None = None,
    provider: str | None = None,
    refresh: bool = False,
) -> pl.DataFrame:
    """Corporate actions (splits, dividends, mergers, ...) with adjustment dates in ``[start, end]``
    (days; end default today): one canonical frame with source, vendor id and fetch time, fetched first
    where the store's actions ledger lacks them (``refresh=True``: asked again, so a vendor's corrections
    and withdrawals are stored; withdrawn actions are left out)."""
    return _client().corporate_actions(
        symbols, start, end, types=types, as_of=as_of, provider=provider, refresh=refresh
    )


def applied(frame: Any) -> pl.DataFrame | None:
    """The actions an adjusted frame from :func:`bars` was adjusted with (symbol, action id, version,
    provider, source, type, ex-date, price and volume factor), or None for a raw frame."""
    from marketpipe.service.actions import adjustment_of

    info = adjustment_of(frame)
    return info.applied if info is not None else None


def skipped(frame: Any) -> pl.DataFrame | None:
    """The actions an adjusted frame from :func:`bars` was NOT adjusted with, each with its reason (symbol,
    action id, type, ex-date, reason: a spin-off whose new line has no price, a dividend at or above the
    previous close, an action without a usable ratio ...), or None for a raw frame."""
    from marketpipe.service.actions import adjustment_of

    info = adjustment_of(frame)
    return info.skipped if info is not None else None


def backfill(
    symbols: str | list[str],
    start: TimeLike,
    end: TimeLike | None = None,
    *,
    timeframe: TimeframeLike = "1Min",
    feed: str | None = None,
) -> BackfillStats:
    return _client().backfill(symbols, start, end, timeframe=timeframe, feed=feed)


def latest_trade(symbol: str, *, feed: str | None = None) -> Trade | None:
    return _client().latest_trade(symbol, feed=feed)


def latest_quote(symbol: str, *, feed: str | None = None) -> Quote | None:
    return _client().latest_quote(symbol, feed=feed)


def snapshots(symbols: str | list[str], *, feed: str | None = None) -> dict[str, Snapshot]:
    return _client().snapshots(symbols, feed=feed)


def quality(
    symbols: str | list[str], start: TimeLike, end: TimeLike | None = None, *, timeframe: TimeframeLike = "1Min"
) -> Any:
    """Completeness, anomalies and quality scores of stored bars (nothing is fetched): one result per
    symbol with ``.summary``, ``.days``, ``.findings`` and ``.completeness``."""
    return _client().quality(symbols, start, end, timeframe=timeframe)


# --- options (Alpaca's; greeks and IV only as the vendor sends them, else null with greeks_missing) ---------


def option_chain(
    underlying: str,
    *,
    expiration: TimeLike | None = None,
    type: Literal["call", "put"] | None = None,
    strike_gte: float | None = None,
    strike_lte: float | None = None,
    feed: str | None = None,
    **kw: Any,
) -> pl.DataFrame:
    """The option chain of ``underlying`` as a polars frame, one row per contract (the vendor's quote, trade,
    greeks and IV, each row naming ``source`` and ``feed``), checked (failing rows quarantined), with
    ``quote_score``. More filters: ``expiration_gte``, ``expiration_lte``, ``root``, ``updated_since``."""
    return _client().option_chain(
        underlying, expiration=expiration, type=type, strike_gte=strike_gte, strike_lte=strike_lte, feed=feed, **kw
    )


def option_snapshots(contracts: str | list[str], *, feed: str | None = None) -> pl.DataFrame:
    return _client().option_snapshots(contracts, feed=feed)


def option_quotes(contracts: str | list[str], *, feed: str | None = None) -> pl.DataFrame:
    """The latest quote of each contract (OCC symbols)."""
    return _client().option_quotes(contracts, feed=feed)


def option_bars(
    contracts: str | list[str], start: TimeLike, end: TimeLike | None = None, *, timeframe: str = "1Min"
) -> pl.DataFrame:
    """Bars of option contracts (the bar schema, the contract as ``symbol``); history from February 2024."""
    return _client().option_bars(contracts, start, end, timeframe=timeframe)


def option_trades(contracts: str | list[str], start: TimeLike, end: TimeLike | None = None) -> pl.DataFrame:
    return _client().option_trades(contracts, start, end)


def option_contracts(underlyings: str | list[str], **kw: Any) -> pl.DataFrame:
    """Contracts from Alpaca's Trading API, with open interest and its date."""
    return _client().option_contracts(underlyings, **kw)


def option_chain_history(
    underlying: str | None = None,
    *,
    contracts: str | list[str] | None = None,
    start: TimeLike | None = None,
    end: TimeLike | None = None,
    type: Literal["call", "put"] | None = None,
    expiration: str | date | None = None,
) -> pl.DataFrame:
    """The chain snapshots ``marketpipe options snapshot`` stored, from the store, by (contract, as_of):
    every column as received (the vendor's greeks and IV, or null with ``greeks_missing``) plus
    ``quote_score``. ``start``/``end`` bound ``as_of``; ``contracts`` are OCC symbols."""
    return _client().option_chain_history(
        underlying, contracts=contracts, start=start, end=end, type=type, expiration=expiration
    )


def option_quarantine(underlying: str | None = None, *, limit: int = 1000) -> pl.DataFrame:
    """Option rows the checks refused, kept in the store as received with ``reasons`` and ``request_id``."""
    return _client().option_quarantine(underlying, limit=limit)
