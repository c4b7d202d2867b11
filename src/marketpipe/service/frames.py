"""The shapes ``mp.bars`` hands a notebook: ``tz=`` and ``shape=`` on the synchronous clients.

The store's long polars frame (UTC, one row per symbol and bar) is the source of every shape; a shape
only re-labels and re-arranges those rows. Nothing is filled in: no reindexing to a calendar grid, no
forward fill. pandas is imported only when a pandas shape is asked for.

One time-column name for users: the store and the code inside call it ``ts``; every frame or answer a
user sees calls it ``timestamp`` (``timestamp_ns`` for the exact nanoseconds), as REST v1, alpaca-py's
``.df`` and Alpaca's documentation do. :func:`public` is that renaming, applied at the edges: the
notebook shapes here, the CLI's output (``cli.common.emit``), the quality results users get.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import polars as pl

from marketpipe.core.errors import InvalidArgument
from marketpipe.core.log import get_logger
from marketpipe.core.schema import TIME_COLUMN
from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.validation import validate_enum, validate_time_zone

if TYPE_CHECKING:
    import pandas as pd

log = get_logger("marketpipe.frames")

Shape = Literal["long", "alpaca", "wide"]
SHAPES: tuple[Shape, ...] = ("long", "alpaca", "wide")
EXCHANGE = "exchange"
# alpaca-py's ``BarSet.df``: index (symbol, timestamp), these columns, all float (its pydantic model)
ALPACA_COLUMNS = ["open", "high", "low", "close", "volume", "trade_count", "vwap"]
# ``yfinance.download([...])``: columns (Price, Ticker), the fields in its (alphabetical) order
WIDE_FIELDS = {"close": "Close", "high": "High", "low": "Low", "open": "Open", "volume": "Volume"}
DAILY_UNITS = (Unit.DAY, Unit.WEEK, Unit.MONTH)
PUBLIC_NAMES = {"ts": TIME_COLUMN, "ts_ns": "timestamp_ns"}  # inside -> what users see


def public(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the names users see: ``ts`` -> ``timestamp``, ``ts_ns`` -> ``timestamp_ns``."""
    return frame.rename({k: v for k, v in PUBLIC_NAMES.items() if k in frame.columns})


def public_name(column: str) -> str:
    """The name users see for a record field or column."""
    return PUBLIC_NAMES.get(column, column)


def frame_options(tz: str | None, shape: str, exchange_tz: Callable[[], str]) -> tuple[str | None, Shape]:
    """The checked ``(zone, shape)`` before any work is done: ``zone`` is ``None`` (keep UTC) or an
    IANA name, ``"exchange"`` resolved through ``exchange_tz`` (the configured calendar's zone).
    "wide" without ``tz`` is in exchange time, as yfinance gives it; "alpaca" stays UTC unless asked."""
    try:
        sh = validate_enum(shape, SHAPES, "shape", message="shape must be {choices}, not {value!r}")
        if tz is not None and tz != EXCHANGE:
            tz = validate_time_zone(
                tz, "tz", message="tz must be None, 'exchange' or an IANA time zone name such as 'America/New_York', "
                "not {value!r}"
            )  # fmt: skip
    except InvalidArgument as exc:
        log.warning("bars_frame_refused", parameter=exc.details.get("parameter"), error=exc.message)
        raise
    if tz is None and sh == "wide":
        tz = EXCHANGE
    return (exchange_tz() if tz == EXCHANGE else tz), sh


def shaped(frame: pl.DataFrame, timeframe: Timeframe, tz: str | None, shape: Shape) -> pl.DataFrame | pd.DataFrame:
    """``frame`` (the store's long bars) as users see it (:func:`public`), ``timestamp`` in ``tz``, in ``shape``."""
    frame = public(frame)
    if tz is not None:
        frame = frame.with_columns(pl.col(TIME_COLUMN).dt.convert_time_zone(tz))
    if shape == "long":
        return frame
    if shape == "alpaca":
        return _alpaca(frame)
    return _wide(frame, timeframe)


def _alpaca(frame: pl.DataFrame) -> pd.DataFrame:
    """alpaca-py's ``BarSet.df``: a pandas frame indexed by (symbol, timestamp), one row per bar, in
    the order alpaca-py builds it (symbol, then time), every value column float as its model has it."""
    pdf = frame.select(
        pl.col("symbol"), pl.col(TIME_COLUMN), *[pl.col(c).cast(pl.Float64) for c in ALPACA_COLUMNS]
    ).to_pandas()
    return pdf.set_index(["symbol", TIME_COLUMN])


def _wide(frame: pl.DataFrame, timeframe: Timeframe) -> pd.DataFrame:
    """``yfinance.download``'s frame: one row per bar time, columns (Price, Ticker). Times at which a
    symbol has no bar are NaN — pandas' outer alignment of the symbols' rows, not a filled value."""
    import pandas as pd

    rows = frame.select(TIME_COLUMN, "symbol", *WIDE_FIELDS).rename(WIDE_FIELDS).to_pandas()
    # one pivot per field keeps each field's dtype (Volume stays int64 while no symbol lacks a bar)
    wide = pd.concat(
        {f: rows.pivot(index=TIME_COLUMN, columns="symbol", values=f) for f in WIDE_FIELDS.values()}, axis=1
    )
    wide.columns = wide.columns.set_names(["Price", "Ticker"])
    wide.index.name = "Date" if timeframe.unit in DAILY_UNITS else "Datetime"
    return wide.sort_index()
