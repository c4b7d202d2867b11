"""Checks of option snapshot rows (:data:`marketpipe.core.options.OPTION_SNAPSHOT_SCHEMA`), vectorized, and
the per-quote quality score. No I/O.

A row that fails a check is quarantined with its reasons (``reasons``: the failed check names joined by
``,``), never edited or dropped silently: :func:`split_checked` returns the rows that pass and the rows
quarantined. The checks:

``crossed_quote``      bid > ask (both present)
``negative_size``      a bid, ask or trade size below zero
``bad_price``          a price below zero, or not finite
``bad_strike``         strike missing or <= 0
``expired_quote``      the quote (or trade) is stamped after the contract's expiration day
``occ_mismatch``       the symbol does not parse as OCC, or its fields disagree with the row's root /
                       expiration / type / strike
``underlying_mismatch`` the row's underlying is neither the OCC root nor the root without its digits
``greek_range``        |delta| > 1, gamma < 0, vega < 0 or IV < 0 (null greeks are not a failure: the
                       vendor sent none, which ``greeks_missing`` says)

Quote quality score (0-100, the seed's rule for stock quotes applied to option quotes): 100, minus 40 for a
missing side, minus 30 when the spread is above 5 % of the mid, minus a freshness penalty of 1 per minute
of quote age at ``as_of`` (at most 30).
"""

from __future__ import annotations

import polars as pl

from marketpipe.core.options import occ_fields
from marketpipe.core.timeutil import NY

SPREAD_LIMIT = 0.05
MISSING_SIDE_PENALTY = 40
WIDE_SPREAD_PENALTY = 30
MAX_FRESHNESS_PENALTY = 30


def _nonneg(col: str) -> pl.Expr:
    return pl.col(col).is_not_null() & (pl.col(col) < 0)


def _bad_price(col: str) -> pl.Expr:
    return pl.col(col).is_not_null() & ((pl.col(col) < 0) | pl.col(col).is_nan() | pl.col(col).is_infinite())


def option_failures(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with one boolean column per check (True = failed)."""
    day_after = (
        (pl.col("expiration").cast(pl.Datetime("ns")) + pl.duration(days=1))
        .dt.replace_time_zone(str(NY))
        .dt.convert_time_zone("UTC")
    )
    late = lambda c: pl.col(c).is_not_null() & (pl.col(c) >= day_after)  # noqa: E731
    root_plain = pl.col("occ_root").str.replace(r"\d+$", "")
    with_occ = frame.with_columns(occ_fields("contract"))
    return with_occ.with_columns(
        (
            pl.col("bid_price").is_not_null()
            & pl.col("ask_price").is_not_null()
            & (pl.col("bid_price") > pl.col("ask_price"))
        ).alias("crossed_quote"),
        (_nonneg("bid_size") | _nonneg("ask_size") | _nonneg("trade_size")).alias("negative_size"),
        (_bad_price("bid_price") | _bad_price("ask_price") | _bad_price("trade_price")).alias("bad_price"),
        (pl.col("strike").is_null() | (pl.col("strike") <= 0)).alias("bad_strike"),
        (late("quote_ts") | late("trade_ts")).alias("expired_quote"),
        (
            pl.col("occ_root").is_null()
            | (pl.col("occ_root") != pl.col("root")).fill_null(True)
            | (pl.col("occ_expiration") != pl.col("expiration")).fill_null(True)
            | (pl.col("occ_type") != pl.col("type")).fill_null(True)
            | ((pl.col("occ_strike") - pl.col("strike")).abs() > 1e-9).fill_null(True)
        ).alias("occ_mismatch"),
        (
            pl.col("underlying").is_null()
            | ((pl.col("underlying") != pl.col("occ_root")) & (pl.col("underlying") != root_plain)).fill_null(True)
        ).alias("underlying_mismatch"),
        (
            (pl.col("delta").abs() > 1).fill_null(False)
            | (pl.col("gamma") < 0).fill_null(False)
            | (pl.col("vega") < 0).fill_null(False)
            | (pl.col("implied_volatility") < 0).fill_null(False)
        ).alias("greek_range"),
    ).drop("occ_root", "occ_expiration", "occ_type", "occ_strike")


CHECKS = (
    "crossed_quote",
    "negative_size",
    "bad_price",
    "bad_strike",
    "expired_quote",
    "occ_mismatch",
    "underlying_mismatch",
    "greek_range",
)


def split_checked(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows that pass every check, rows quarantined with ``reasons``)."""
    failed = option_failures(frame)
    reasons = pl.concat_str([pl.when(pl.col(c)).then(pl.lit(c)) for c in CHECKS], separator=",", ignore_nulls=True)
    bad = pl.any_horizontal(*(pl.col(c) for c in CHECKS))
    ok = failed.filter(~bad).select(frame.columns)
    quarantined = failed.filter(bad).with_columns(reasons.alias("reasons")).select(*frame.columns, "reasons")
    return ok, quarantined


def quote_score(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with ``quote_score`` (0-100) per row, by the rule in the module docstring."""
    missing = (
        pl.col("bid_price").is_null()
        | pl.col("ask_price").is_null()
        | (pl.col("bid_price") <= 0)
        | (pl.col("ask_price") <= 0)
        | (pl.col("bid_size").fill_null(0) <= 0)
        | (pl.col("ask_size").fill_null(0) <= 0)
    )
    mid = (pl.col("bid_price") + pl.col("ask_price")) / 2
    wide = ((pl.col("ask_price") - pl.col("bid_price")) / mid > SPREAD_LIMIT).fill_null(False)
    age_min = ((pl.col("as_of").cast(pl.Datetime("ns", "UTC")) - pl.col("quote_ts")).dt.total_seconds() / 60).clip(0)
    fresh = age_min.fill_null(MAX_FRESHNESS_PENALTY).clip(0, MAX_FRESHNESS_PENALTY)
    score = (
        pl.lit(100.0)
        - pl.when(missing).then(MISSING_SIDE_PENALTY).otherwise(0)
        - pl.when(wide & ~missing).then(WIDE_SPREAD_PENALTY).otherwise(0)
        - fresh
    )
    return frame.with_columns(score.clip(0, 100).round(1).alias("quote_score"))
