"""Adjust-on-read: factor tables from corporate actions and their application to raw bars,
vectorized (polars; one as-of join of a factor table per read, never per row in Python). Raw bars
are never rewritten: a correction to an action only changes the factor table.

The formula (next-capabilities §1.5), on raw data at every event:

* split (forward or reverse): price factor ``old_rate / new_rate``, volume factor its inverse;
  a stock dividend of rate r acts as a split with price factor ``1 / (1 + r)``;
* cash dividend D: price factor ``(C_prev - D) / C_prev`` on the raw close ``C_prev`` of the last
  session before the ex-date; left out (and said so) when ``C_prev`` is unknown or ``D >= C_prev``;
* spin-off (``new_rate`` shares of ``new_symbol`` per ``old_rate`` — Alpaca's ``source_rate`` —
  source shares): price factor ``1 - V_new / C_prev`` with ``V_new = new_rate / old_rate x P_new``,
  ``P_new`` the new line's raw close on the ex-date; left out (and said so) when the record lacks the
  ratio or the new symbol, when ``P_new`` or ``C_prev`` is unknown, or when ``V_new >= C_prev`` —
  marketpipe never guesses the new line's price;
* a bar dated t (its New York date) gets the product of the factors of every applied action with
  adjustment date > t; prices and vwap times the price factor, volume times the volume factor
  (rounded to whole shares).

Other types (mergers, name changes, ...) are kept and listed but not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import polars as pl

from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import ADJUSTMENTS, PRICE_COLUMNS, WITHDRAWN_PREFIX
from marketpipe.core.tables import ACTION_QUARANTINE_SCHEMA

SPLIT_LIKE = ("forward_split", "reverse_split", "stock_dividend")
DIVIDEND = "cash_dividend"
SPIN_OFF = "spin_off"
PARTS = ("split", "dividend", "spin-off")  # what ``all`` applies
TZ = "America/New_York"
APPLIED_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "action_id": pl.String(),
    "version": pl.Int64(),
    "provider": pl.String(),
    "source": pl.String(),
    "type": pl.String(),
    "ex_date": pl.Date(),
    "price_factor": pl.Float64(),
    "volume_factor": pl.Float64(),
}
NEW_CLOSES_SCHEMA: dict[str, pl.DataType] = {"symbol": pl.String(), "day": pl.Date(), "close": pl.Float64()}
TABLE_SCHEMA: dict[str, pl.DataType] = {"until": pl.Date(), "price_factor": pl.Float64(), "volume_factor": pl.Float64()}
SKIPPED_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "action_id": pl.String(),
    "type": pl.String(),
    "ex_date": pl.Date(),
    "reason": pl.String(),
}


def parse_adjustment(value: str | None, *, param: str = "adjustment") -> frozenset[str]:
    """``raw|split|dividend|spin-off|all``, or a comma list of them (Alpaca's form) -> the parts to
    apply (``{"split", "dividend", "spin-off"}`` for ``all``; empty for ``raw``, which adds nothing in
    a list, as at the vendor). Unknown, empty and repeated values
    are ``INVALID_ARGUMENT`` naming ``param`` (Alpaca answers them with a 400 since 2026-11-02)."""
    if value is None:
        return frozenset()
    parts = [p.strip() for p in str(value).split(",")]
    allowed = ", ".join(ADJUSTMENTS)
    if not all(parts) or len(set(parts)) != len(parts) or not set(parts) <= set(ADJUSTMENTS):
        raise InvalidArgument(
            f"invalid {param} {value!r}: one of {allowed}, or a comma list of them without repeats",
            details={"parameter": param, "value": value, "allowed": list(ADJUSTMENTS)},
        )
    out = set(PARTS) if "all" in parts else set(parts) - {"raw"}
    return frozenset(out)


def adjustment_date() -> pl.Expr:
    """An action's adjustment date: ex-date, else effective date, else process date."""
    return pl.coalesce("ex_date", "effective_date", "process_date")


def is_withdrawn() -> pl.Expr:
    """Whether an action row (its newest version) is a withdrawal (``core.schema.WITHDRAWN_KEY``)."""
    return pl.col("raw").str.starts_with(WITHDRAWN_PREFIX).fill_null(False)


def current(actions: pl.DataFrame) -> pl.DataFrame:
    """``actions`` (newest versions) without the withdrawn ones: what a vendor lists today."""
    return actions.filter(~is_withdrawn()) if actions.height else actions


def impossible(actions: pl.DataFrame) -> pl.DataFrame:
    """Actions with values no adjustment can use, with ``reason`` (``ACTION_QUARANTINE_SCHEMA``
    without ``quarantined_at``): split ratios <= 0 or missing, a stock-dividend rate <= -1, negative
    cash, a dividend without an amount, no date to adjust on."""
    split = pl.col("type").is_in(["forward_split", "reverse_split"])
    spin = pl.col("type") == SPIN_OFF
    reason = (
        pl.when(adjustment_date().is_null())
        .then(pl.lit("no ex, effective or process date"))
        .when(split & (pl.col("old_rate").is_null() | pl.col("new_rate").is_null()))
        .then(pl.lit("split without a ratio"))
        .when(split & ((pl.col("old_rate") <= 0) | (pl.col("new_rate") <= 0)))
        .then(pl.lit("split ratio <= 0"))
        .when(spin & ((pl.col("old_rate") <= 0) | (pl.col("new_rate") <= 0)))
        .then(pl.lit("spin-off ratio <= 0"))
        .when((pl.col("type") == "stock_dividend") & (pl.col("rate").is_null() | (pl.col("rate") <= -1)))
        .then(pl.lit("stock dividend rate missing or <= -1"))
        .when((pl.col("type") == DIVIDEND) & pl.col("cash_amount").is_null())
        .then(pl.lit("cash dividend without an amount"))
        .when(pl.col("cash_amount") < 0)
        .then(pl.lit("negative cash amount"))
    )
    return actions.with_columns(reason.alias("reason")).filter(pl.col("reason").is_not_null())


@dataclass(slots=True)
class Factors:
    """One symbol's factor table (``until``: factors apply to bars dated before it, back to the
    previous row's date) and what went into it."""

    table: pl.DataFrame  # until (Date), price_factor, volume_factor: cumulative
    applied: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=APPLIED_SCHEMA))
    skipped: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=SKIPPED_SCHEMA))


def factors(
    actions: pl.DataFrame, closes: pl.DataFrame, parts: frozenset[str], new_closes: pl.DataFrame | None = None
) -> Factors:
    """The factor table of ONE symbol's actions (``corporate_actions`` or ``ACTION_SCHEMA`` rows, the ones to use)
    for the adjustment ``parts``; ``closes``: that symbol's raw daily closes (``day`` Date, ``close``),
    covering the session before each cash dividend's and spin-off's ex-date; ``new_closes``: the raw
    daily closes of the spin-offs' new lines (``symbol``, ``day``, ``close``), on their ex-dates."""
    if "version" not in actions.columns:  # actions not (yet) stored: no version
        actions = actions.with_columns(pl.lit(None, pl.Int64).alias("version"))
    a = actions.with_columns(adjustment_date().alias("_d"))
    bad = impossible(a)  # a missing date among the reasons: checked before anything is dropped
    a = a.filter(~pl.col("action_id").is_in(bad["action_id"].implode()) & pl.col("_d").is_not_null())
    pieces = []
    skipped = [bad.select("symbol", "action_id", "type", pl.col("_d").alias("ex_date"), "reason")]
    if "split" in parts:
        s = a.filter(pl.col("type").is_in(SPLIT_LIKE)).with_columns(
            pl.when(pl.col("type") == "stock_dividend")
            .then(1.0 / (1.0 + pl.col("rate")))
            .otherwise(pl.col("old_rate") / pl.col("new_rate"))
            .alias("price_factor")
        )
        pieces.append(s.with_columns((1.0 / pl.col("price_factor")).alias("volume_factor")))
    if "dividend" in parts:
        d = a.filter(pl.col("type") == DIVIDEND).sort("_d")
        c = closes.select(pl.col("day").alias("_d"), pl.col("close").alias("_prev")).sort("_d")
        d = d.join_asof(c, on="_d", strategy="backward", allow_exact_matches=False)
        ok = pl.col("_prev").is_not_null() & (pl.col("cash_amount") < pl.col("_prev"))
        skipped.append(
            d.filter(~ok).select(
                "symbol",
                "action_id",
                "type",
                pl.col("_d").alias("ex_date"),
                pl.when(pl.col("_prev").is_null())
                .then(pl.lit("no raw close before the ex-date"))
                .otherwise(pl.lit("dividend >= previous close"))
                .alias("reason"),
            )
        )
        d = d.filter(ok).with_columns(
            ((pl.col("_prev") - pl.col("cash_amount")) / pl.col("_prev")).alias("price_factor"),
            pl.lit(1.0).alias("volume_factor"),
        )
        pieces.append(d.drop("_prev"))
    if "spin-off" in parts:
        pieces.append(_spin_offs(a, closes, new_closes, skipped))
    if not pieces:
        skip0 = pl.concat([x.cast(SKIPPED_SCHEMA) for x in skipped])  # type: ignore[arg-type]
        return Factors(pl.DataFrame(schema=TABLE_SCHEMA), skipped=skip0)
    used = pl.concat([p.select(*APPLIED_SCHEMA.keys() - {"ex_date"}, pl.col("_d").alias("ex_date")) for p in pieces])
    used = used.select(list(APPLIED_SCHEMA)).cast(APPLIED_SCHEMA).sort("ex_date", "action_id")  # type: ignore[arg-type]
    # one row per date: the product of that date's factors; then the product of it and every later one
    table = (
        used.group_by("ex_date")
        .agg(pl.col("price_factor").product(), pl.col("volume_factor").product())
        .sort("ex_date", descending=True)
        .select(
            pl.col("ex_date").alias("until"),
            pl.col("price_factor").cum_prod(),
            pl.col("volume_factor").cum_prod(),
        )
        .sort("until")
    )
    skip = pl.concat([x.cast(SKIPPED_SCHEMA) for x in skipped])  # type: ignore[arg-type]
    return Factors(table, used, skip)


def _spin_offs(
    a: pl.DataFrame, closes: pl.DataFrame, new_closes: pl.DataFrame | None, skipped: list[pl.DataFrame]
) -> pl.DataFrame:
    """The spin-offs of ``a`` with their factor ``1 - V_new / C_prev``; those left out go to ``skipped``
    with their reason."""
    s = a.filter(pl.col("type") == SPIN_OFF).sort("_d")
    c = closes.select(pl.col("day").alias("_d"), pl.col("close").alias("_prev")).sort("_d")
    s = s.join_asof(c, on="_d", strategy="backward", allow_exact_matches=False)
    new = new_closes if new_closes is not None else pl.DataFrame(schema=NEW_CLOSES_SCHEMA)
    new = new.select(
        pl.col("symbol").alias("new_symbol"), pl.col("day").alias("_d"), pl.col("close").alias("_new")
    ).unique(["new_symbol", "_d"], keep="last")
    s = s.join(new, on=["new_symbol", "_d"], how="left").with_columns(
        (pl.col("new_rate") / pl.col("old_rate") * pl.col("_new")).alias("_value")
    )
    reason = (
        pl.when(pl.col("old_rate").is_null() | pl.col("new_rate").is_null() | pl.col("new_symbol").is_null())
        .then(pl.lit("spin-off without a ratio or a new symbol"))
        .when(pl.col("_new").is_null())
        .then(pl.concat_str(pl.lit("no raw close of the new line "), pl.col("new_symbol"), pl.lit(" on the ex-date")))
        .when(pl.col("_prev").is_null())
        .then(pl.lit("no raw close before the ex-date"))
        .when(pl.col("_value") >= pl.col("_prev"))
        .then(pl.lit("spin-off value >= previous close"))
    )
    s = s.with_columns(reason.alias("_why"))
    skipped.append(
        s.filter(pl.col("_why").is_not_null()).select(
            "symbol", "action_id", "type", pl.col("_d").alias("ex_date"), pl.col("_why").alias("reason")
        )
    )
    return (
        s.filter(pl.col("_why").is_null())
        .with_columns(
            (1.0 - pl.col("_value") / pl.col("_prev")).alias("price_factor"), pl.lit(1.0).alias("volume_factor")
        )
        .drop("_prev", "_new", "_value", "_why")
    )


def apply(bars: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """``bars`` (``BAR_SCHEMA``, one symbol, any order) adjusted with a factor table. Each bar takes
    the factor of the first ``until`` day whose New York midnight is after its ``ts`` (a bar stamped
    before the midnight that begins an ex-date belongs to an earlier day); bars after the last one
    take 1. The table is a handful of rows: only it is converted, and the bars' factors come from one
    vectorized binary search over their timestamps (an as-of lookup, no per-row Python, no sort).
    Columns and row order are kept; volume stays whole shares."""
    if table.height == 0 or bars.height == 0:
        return bars
    edges = _edges(table)
    ts = bars["ts"].dt.cast_time_unit("us").to_physical().to_numpy()
    edge = edges["edge"].to_physical().to_numpy()
    pf = np.append(edges["price_factor"].to_numpy(), 1.0)
    vf = np.append(edges["volume_factor"].to_numpy(), 1.0)
    if bars["ts"].is_sorted():
        # bars in time order (as the store reads them): k searches cut them into runs of one factor each
        runs = np.diff(np.r_[0, np.searchsorted(ts, edge, side="left"), len(ts)])
        if runs[-1] == len(ts):
            return bars  # every bar is after the last action: nothing to adjust
        fp, fv = np.repeat(pf, runs), np.repeat(vf, runs)
    else:
        at = np.searchsorted(edge, ts, side="right")  # the first edge after each bar
        fp, fv = pf[at], vf[at]
    # numpy on the columns' buffers (nulls stay null through the mask): one pass per column
    cols = [_scaled(bars[c], fp) for c in (*PRICE_COLUMNS, "vwap")]
    volume = bars["volume"]
    v = np.rint(volume.fill_null(0).to_numpy() * fv).astype(np.int64)
    cols.append(pl.Series("volume", v, dtype=pl.Int64).set(volume.is_null(), None) if volume.null_count() else
                pl.Series("volume", v, dtype=pl.Int64))  # fmt: skip
    return bars.with_columns(cols)


def _edges(table: pl.DataFrame) -> pl.DataFrame:
    """A factor table as ``edge`` (the UTC instant of the New York midnight that begins ``until``: bars
    stamped before it, back to the previous edge, take its factors), ``price_factor``, ``volume_factor``."""
    return table.sort("until").select(
        pl.col("until").cast(pl.Datetime("us")).dt.replace_time_zone(TZ).dt.convert_time_zone("UTC").alias("edge"),
        "price_factor",
        "volume_factor",
    )


def scale_steps(table: pl.DataFrame) -> list[tuple[datetime, float, float]]:
    """A factor table as the steps a store applies while it reads (``BarStore.read_bars_scaled``):
    ``(edge, price factor, volume factor)`` in time order; a bar takes the first step whose edge is after
    its ``ts``, and 1 after the last. The same numbers :func:`apply` multiplies with."""
    return list(_edges(table).iter_rows()) if table.height else []


def _scaled(col: pl.Series, factor: np.ndarray) -> pl.Series:
    if col.null_count():
        return (col * pl.Series(factor)).alias(col.name)
    return pl.Series(col.name, col.to_numpy() * factor, dtype=pl.Float64)


def quarantine_rows(actions: pl.DataFrame, reasons: pl.DataFrame, at: object) -> pl.DataFrame:
    """``ACTION_QUARANTINE_SCHEMA`` rows for ``reasons`` (action_id, reason) of ``actions``."""
    if reasons.height == 0:
        return pl.DataFrame(schema=ACTION_QUARANTINE_SCHEMA)
    rows = actions.join(reasons.select("action_id", "reason"), on="action_id", how="inner")
    return (
        rows.with_columns(pl.lit(at).alias("quarantined_at"))
        .select(list(ACTION_QUARANTINE_SCHEMA))
        .cast(
            ACTION_QUARANTINE_SCHEMA  # type: ignore[arg-type]
        )
    )


def known_dates_ok(as_of: date | None, start: date, today: date) -> None:
    """``as_of`` must lie between the range's start and today."""
    if as_of is None:
        return
    if as_of > today:
        raise InvalidArgument(
            f"as_of {as_of} is in the future (today is {today})", details={"parameter": "as_of", "value": str(as_of)}
        )
    if as_of < start:
        raise InvalidArgument(
            f"as_of {as_of} is before the range's start {start}: nothing in the range was known then",
            details={"parameter": "as_of", "value": str(as_of)},
        )
