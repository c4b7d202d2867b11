"""Row checks for bars, vectorized over polars frames (no per-row Python).

A row that fails any check is not stored with the good rows: it goes to quarantine with every
reason it failed, its values, source and request id. Nothing is filled, repaired or dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from marketpipe.core.metrics import ROWS_QUARANTINED
from marketpipe.core.schema import _SYMBOL, BAR_COLUMNS, PRICE_COLUMNS
from marketpipe.core.tables import QUARANTINE_SCHEMA
from marketpipe.core.timeframe import Timeframe, Unit

# Reason codes (stable: they are stored and counted).
MISSING_FIELD = "missing_field"
BAD_TIMESTAMP = "bad_timestamp"
NONPOSITIVE_PRICE = "nonpositive_price"
OHLC_INCONSISTENT = "ohlc_inconsistent"
NEGATIVE_VOLUME = "negative_volume"
NEGATIVE_TRADE_COUNT = "negative_trade_count"
VWAP_OUT_OF_RANGE = "vwap_out_of_range"
MISALIGNED_TS = "misaligned_ts"
OUT_OF_RANGE = "out_of_range"
IN_FUTURE = "in_future"
DUPLICATE = "duplicate"
DUPLICATE_CONFLICT = "duplicate_conflict"
BAD_SYMBOL = "bad_symbol"

_SYMBOL_RE = _SYMBOL.pattern
_VWAP_TOLERANCE = 1e-4  # vwap is sent with 4 decimals, prices with 2


@dataclass
class CheckResult:
    good: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.quarantine.height


def _aligned(tf: Timeframe, day_tz: str = "America/New_York") -> pl.Expr:
    ts = pl.col("ts")
    if tf.unit is Unit.MINUTE:
        # Integer arithmetic on the epoch is several times cheaper than calendar field extraction.
        step = tf.amount if 60 % tf.amount == 0 else 1
        return ts.dt.epoch("us") % (step * 60_000_000) == 0
    if tf.unit is Unit.HOUR:
        return ts.dt.epoch("us") % 3_600_000_000 == 0
    # Daily and longer bars are stamped at midnight New York time (a crypto calendar's zone for crypto).
    local = ts.dt.convert_time_zone(day_tz)
    midnight = (local.dt.hour() == 0) & (local.dt.minute() == 0) & (local.dt.second() == 0)
    if tf.unit is Unit.WEEK:
        return midnight & (local.dt.weekday() == 1)
    if tf.unit is Unit.MONTH:
        return midnight & (local.dt.day() == 1)
    return midnight


def check_bars(
    frame: pl.DataFrame,
    *,
    timeframe: Timeframe,
    start: datetime | None = None,
    end: datetime | None = None,
    now: datetime | None = None,
    request_id: str = "",
    day_tz: str = "America/New_York",
) -> CheckResult:
    """Split ``frame`` into rows that pass every check and quarantined rows with reasons. ``day_tz``:
    the zone whose midnight stamps daily and longer bars (the calendar's)."""
    if "raw_ts" not in frame.columns:
        frame = frame.with_columns(raw_ts=pl.col("ts").cast(pl.String))
    if frame.height == 0:
        return CheckResult(frame.select(BAR_COLUMNS), pl.DataFrame(schema=QUARANTINE_SCHEMA), {})

    ts = pl.col("ts")
    rules: list[tuple[str, pl.Expr]] = [
        (BAD_TIMESTAMP, ts.is_null()),
        (MISSING_FIELD, pl.any_horizontal([pl.col(c).is_null() for c in [*PRICE_COLUMNS, "volume"]])),
        (NONPOSITIVE_PRICE, pl.any_horizontal([pl.col(c) <= 0 for c in PRICE_COLUMNS])),
        (
            OHLC_INCONSISTENT,
            (pl.col("high") < pl.max_horizontal("open", "close", "low"))
            | (pl.col("low") > pl.min_horizontal("open", "close", "high")),
        ),
        (NEGATIVE_VOLUME, pl.col("volume") < 0),
        (NEGATIVE_TRADE_COUNT, pl.col("trade_count") < 0),
        (
            VWAP_OUT_OF_RANGE,
            pl.col("vwap").is_not_null()
            & (
                (pl.col("vwap") < pl.col("low") - _VWAP_TOLERANCE) | (pl.col("vwap") > pl.col("high") + _VWAP_TOLERANCE)
            ),
        ),
        (MISALIGNED_TS, ~_aligned(timeframe, day_tz)),
    ]
    # Symbol format: a page holds few distinct symbols, so test those, not every row.
    symbols = frame.get_column("symbol").unique()
    bad_symbols = symbols.filter(~symbols.str.contains(_SYMBOL_RE).fill_null(True))
    if bad_symbols.len() or symbols.null_count():
        rules.append((BAD_SYMBOL, pl.col("symbol").is_in(bad_symbols.implode()) | pl.col("symbol").is_null()))
    if start is not None:
        rules.append((OUT_OF_RANGE, ts < pl.lit(start)))
    if end is not None:
        rules.append((OUT_OF_RANGE, ts >= pl.lit(end)))
    if now is not None:
        rules.append((IN_FUTURE, ts > pl.lit(now)))

    # Vendor pages come ordered by symbol then time; when that order is strict there can be no
    # duplicate key and the (costlier) window checks are skipped.
    strictly_ordered = frame.select(
        ((ts.diff() > 0) | (pl.col("symbol") != pl.col("symbol").shift())).fill_null(True).all()
        & (pl.col("timeframe").n_unique() == 1)
    ).item()
    if not strictly_ordered:
        key = ["symbol", "timeframe", "ts"]
        values = ["open", "high", "low", "close", "volume", "trade_count", "vwap"]
        dup_any = pl.len().over(key) > 1
        # Exact copies: the first is kept, the rest quarantined. Copies that disagree on values
        # cannot be told apart, so all of them are quarantined.
        versions = pl.struct(values).n_unique().over(key)
        rules.append((DUPLICATE_CONFLICT, ts.is_not_null() & dup_any & (versions > 1)))
        rules.append((DUPLICATE, ts.is_not_null() & dup_any & (versions == 1) & (pl.int_range(pl.len()).over(key) > 0)))

    flags = frame.select([cond.fill_null(False).alias(f"_r{i}") for i, (_, cond) in enumerate(rules)])
    bad_mask = flags.select(pl.any_horizontal(pl.all())).to_series()
    if not bad_mask.any():
        return CheckResult(frame.select(BAR_COLUMNS), pl.DataFrame(schema=QUARANTINE_SCHEMA), {})

    good = frame.filter(~bad_mask).select(BAR_COLUMNS)
    bad_flags = flags.filter(bad_mask)
    reason = bad_flags.select(
        pl.concat_str(
            [pl.when(pl.col(f"_r{i}")).then(pl.lit(name)) for i, (name, _) in enumerate(rules)],
            separator=",",
            ignore_nulls=True,
        )
    ).to_series()
    quarantine = frame.filter(bad_mask).select(
        *BAR_COLUMNS,
        pl.col("raw_ts"),
        reason.alias("reason"),
        pl.lit(request_id, pl.String).alias("request_id"),
    )
    counts: dict[str, int] = {}
    if quarantine.height:
        for reason, n in (
            quarantine.select(pl.col("reason").str.split(",").explode()).to_series().value_counts().iter_rows()
        ):
            counts[reason] = n
            ROWS_QUARANTINED.labels(reason).inc(n)
    return CheckResult(good, quarantine, counts)
