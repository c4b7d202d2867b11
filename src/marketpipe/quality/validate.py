"""Row checks for bars, vectorized over polars frames (no per-row Python).

A row that fails any check is not stored with the good rows: it goes to quarantine with every
reason it failed, its values, source and request id. Nothing is filled, repaired or dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime

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


@functools.lru_cache(maxsize=64)
def _row_rules(tf: Timeframe, day_tz: str) -> tuple[tuple[str, ...], pl.Expr]:
    """The checks that depend on the timeframe only, built once (expressions are immutable, and
    building them for every page cost more than evaluating them): their reason names, and one
    integer per row with bit ``i`` set when rule ``i`` fails."""
    ts = pl.col("ts")
    rules = [
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
        (MISALIGNED_TS, ~_aligned(tf, day_tz)),
    ]
    return tuple(name for name, _ in rules), _bits(rules, 0)


def _bits(rules: list[tuple[str, pl.Expr]], first: int) -> pl.Expr:
    """Bit ``first + i`` set where rule ``i`` fails (a null never fails a rule)."""
    return pl.sum_horizontal(
        [cond.fill_null(False).cast(pl.UInt32) * (1 << (first + i)) for i, (_, cond) in enumerate(rules)]
    )


def _all_bits(static: pl.Expr, rules: list[tuple[str, pl.Expr]], first: int) -> pl.Expr:
    return (pl.sum_horizontal(static, _bits(rules, first)) if rules else static).alias("_failed")


def _as_int(value: datetime, unit: str) -> int:
    """An aware datetime as an integer count of ``unit`` since the epoch (exact: whole microseconds)."""
    per = {"ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * per + delta.microseconds * per // 1_000_000


def _sides(frame: pl.DataFrame, value: datetime) -> tuple[pl.Expr, pl.Expr]:
    """``ts`` and ``value`` ready to compare: as integers in the column's own unit when both are
    time-zone aware (a datetime literal builds a Series each time it is used), else as they are."""
    dtype = frame.schema["ts"]
    if value.tzinfo is not None and isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        unit = dtype.time_unit or "us"
        return pl.col("ts").dt.epoch(unit), pl.lit(_as_int(value, unit), pl.Int64)  # type: ignore[arg-type]
    return pl.col("ts"), pl.lit(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EMPTY_QUARANTINE = pl.DataFrame(schema=QUARANTINE_SCHEMA)


# Vendor pages come ordered by symbol then time; when that order is strict there can be no
# duplicate key and the (costlier) window checks are skipped.
_STRICTLY_ORDERED = (
    ((pl.col("ts").diff() > 0) | (pl.col("symbol") != pl.col("symbol").shift())).fill_null(True).all()
    & (pl.col("timeframe").n_unique() == 1)
).alias("_ordered")


def _duplicate_rules() -> list[tuple[str, pl.Expr]]:
    ts = pl.col("ts")
    key = ["symbol", "timeframe", "ts"]
    values = ["open", "high", "low", "close", "volume", "trade_count", "vwap"]
    dup_any = pl.len().over(key) > 1
    # Exact copies: the first is kept, the rest quarantined. Copies that disagree on values
    # cannot be told apart, so all of them are quarantined.
    versions = pl.struct(values).n_unique().over(key)
    return [
        (DUPLICATE_CONFLICT, ts.is_not_null() & dup_any & (versions > 1)),
        (DUPLICATE, ts.is_not_null() & dup_any & (versions == 1) & (pl.int_range(pl.len()).over(key) > 0)),
    ]


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
    if frame.height == 0:
        return CheckResult(frame.select(BAR_COLUMNS), _EMPTY_QUARANTINE.clear(), {})

    names, static = _row_rules(timeframe, day_tz)
    rules: list[tuple[str, pl.Expr]] = []
    # Symbol format: a page holds few distinct symbols, so test those, not every row.
    symbols = frame.get_column("symbol").unique().to_list()
    bad_symbols = [s for s in symbols if s is None or not _SYMBOL.match(s)]
    if bad_symbols:
        listed = [s for s in bad_symbols if s is not None]
        rules.append((BAD_SYMBOL, pl.col("symbol").is_in(listed) | pl.col("symbol").is_null()))
    if start is not None:
        lhs, rhs = _sides(frame, start)
        rules.append((OUT_OF_RANGE, lhs < rhs))
    if end is not None:
        lhs, rhs = _sides(frame, end)
        rules.append((OUT_OF_RANGE, lhs >= rhs))
    if now is not None:
        lhs, rhs = _sides(frame, now)
        rules.append((IN_FUTURE, lhs > rhs))

    marks = frame.select(_all_bits(static, rules, len(names)), _STRICTLY_ORDERED)
    if not marks.get_column("_ordered")[0]:
        rules += _duplicate_rules()
        marks = frame.select(_all_bits(static, rules, len(names)))
    all_names = [*names, *(name for name, _ in rules)]
    failed = marks.get_column("_failed")
    if not failed.max():
        return CheckResult(frame.select(BAR_COLUMNS), _EMPTY_QUARANTINE.clear(), {})
    bad_mask = failed != 0

    if "raw_ts" not in frame.columns:
        frame = frame.with_columns(raw_ts=pl.col("ts").cast(pl.String))
    good = frame.filter(~bad_mask).select(BAR_COLUMNS)
    bits = pl.col("_failed")
    reason = (
        failed.filter(bad_mask)
        .to_frame()
        .select(
            pl.concat_str(
                [pl.when((bits & (1 << i)) != 0).then(pl.lit(name)) for i, name in enumerate(all_names)],
                separator=",",
                ignore_nulls=True,
            )
        )
        .to_series()
    )
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
