"""Cross-vendor checks of corporate actions (vectorized polars, no I/O): one reference vendor's
splits and cash dividends against another's, per symbol.

Actions are matched by symbol, family (split: forward, reverse, stock dividend; dividend: cash) and
adjustment date, allowing ``date_days`` days of difference (a vendor dating a split by its payable
date, another by its ex-date). Outcomes (``status``):

* ``match``: same date, same ratio (or amount, within ``amount_tol`` relative);
* ``different_ratio`` / ``different_amount``: matched, values differ (a wrong ratio, a doubled split
  shows as two actions where the reference has one: ``extra``);
* ``different_date``: matched within the tolerance but not on the same day;
* ``missing``: the reference has it, the other vendor does not; ``extra``: the other way round.
"""

from __future__ import annotations

import math

import polars as pl

from marketpipe.core.tables import ACTION_RECONCILE_SCHEMA, FINDINGS_SCHEMA
from marketpipe.quality.adjust import adjustment_date

# withdrawn: a vendor listed the action and no longer does (service/actions.py stores it as a version)
STATUSES = ("match", "different_ratio", "different_amount", "different_date", "missing", "extra", "withdrawn")


def _keyed(actions: pl.DataFrame) -> pl.DataFrame:
    """symbol, family, day, value (split: new/old, stock dividend: 1 + rate, dividend: amount), id."""
    split = pl.col("type").is_in(["forward_split", "reverse_split", "stock_dividend"])
    value = (
        pl.when(pl.col("type") == "stock_dividend")
        .then(1.0 + pl.col("rate"))
        .when(split)
        .then(pl.col("new_rate") / pl.col("old_rate"))
        .otherwise(pl.col("cash_amount"))
    )
    return (
        actions.filter(split | (pl.col("type") == "cash_dividend"))
        .select(
            "symbol",
            pl.when(split).then(pl.lit("split")).otherwise(pl.lit("dividend")).alias("family"),
            adjustment_date().alias("day"),
            value.alias("value"),
            pl.col("action_id").alias("id"),
        )
        .sort("symbol", "family", "day")
    )


def reconcile_actions(
    reference: pl.DataFrame,
    other: pl.DataFrame,
    *,
    reference_name: str,
    other_name: str,
    date_days: int = 3,
    amount_tol: float = 0.005,
) -> pl.DataFrame:
    """Every action of either side with its outcome (``ACTION_RECONCILE_SCHEMA``), by symbol, date."""
    ref, oth = _keyed(reference), _keyed(other)
    ref = ref.with_columns(pl.int_range(pl.len()).alias("_r"))
    oth = oth.with_columns(pl.int_range(pl.len()).alias("_o"))
    # nearest action of the same family within the tolerance; each other-side action matches once
    right = oth.select(
        "symbol", "family", pl.col("day").alias("o_day"), "day", pl.col("value").alias("o_value"),
        pl.col("id").alias("o_id"), "_o",
    )  # fmt: skip
    near = ref.join_asof(
        right,
        on="day",
        by=["symbol", "family"],
        strategy="nearest",
        tolerance=f"{date_days}d",
        check_sortedness=False,  # both sides are sorted by symbol, family, day (_keyed)
    )
    first = pl.col("_r") == pl.col("_r").min().over("_o")
    near = near.with_columns(
        pl.when(pl.col("_o").is_duplicated() & pl.col("_o").is_not_null()).then(first).otherwise(True).alias("_first")
    )
    near = near.with_columns(
        [pl.when(pl.col("_first")).then(pl.col(c)).otherwise(None).alias(c) for c in ("o_day", "o_value", "o_id", "_o")]
    )
    close = (pl.col("o_value") - pl.col("value")).abs() <= amount_tol * pl.col("value").abs()
    status = (
        pl.when(pl.col("_o").is_null())
        .then(pl.lit("missing"))
        .when(~close)
        .then(
            pl.when(pl.col("family") == "split").then(pl.lit("different_ratio")).otherwise(pl.lit("different_amount"))
        )
        .when(pl.col("o_day") != pl.col("day"))
        .then(pl.lit("different_date"))
        .otherwise(pl.lit("match"))
    )
    matched = near.select(
        "symbol",
        "family",
        pl.lit(reference_name).alias("reference"),
        pl.lit(other_name).alias("other"),
        status.alias("status"),
        pl.col("day").alias("reference_date"),
        pl.col("o_day").alias("other_date"),
        pl.col("value").alias("reference_value"),
        pl.col("o_value").alias("other_value"),
        pl.col("id").alias("reference_id"),
        pl.col("o_id").alias("other_id"),
    )
    used = near["_o"].drop_nulls()
    extra = oth.filter(~pl.col("_o").is_in(used.implode())).select(
        "symbol",
        "family",
        pl.lit(reference_name).alias("reference"),
        pl.lit(other_name).alias("other"),
        pl.lit("extra").alias("status"),
        pl.lit(None, pl.Date()).alias("reference_date"),
        pl.col("day").alias("other_date"),
        pl.lit(None, pl.Float64()).alias("reference_value"),
        pl.col("value").alias("other_value"),
        pl.lit(None, pl.String()).alias("reference_id"),
        pl.col("id").alias("other_id"),
    )
    out = pl.concat([matched.cast(ACTION_RECONCILE_SCHEMA), extra.cast(ACTION_RECONCILE_SCHEMA)])  # type: ignore[arg-type]
    return out.sort("symbol", pl.coalesce("reference_date", "other_date"), "family")


def explain_splits(findings: pl.DataFrame, actions: pl.DataFrame, tz: str, *, tolerance: float = 0.1) -> pl.DataFrame:
    """``split_like`` findings (``FINDINGS_SCHEMA``) on the ex-date of a known split of the same
    symbol with a ratio within ``tolerance`` of the jump become severity ``info`` (shown, not counted
    against the score), their detail naming the action; the others are left as they are."""
    if not findings.height or not actions.height:
        return findings
    splits = actions.filter(pl.col("type").is_in(["forward_split", "reverse_split"])).select(
        "symbol",
        adjustment_date().alias("_day"),
        (pl.col("new_rate") / pl.col("old_rate")).alias("_ratio"),
        pl.col("action_id").alias("_id"),
    )
    if not splits.height:
        return findings
    f = findings.with_columns(
        pl.int_range(pl.len()).alias("_row"), pl.col("ts").dt.convert_time_zone(tz).dt.date().alias("_day")
    )
    hit = (
        f.filter(pl.col("kind") == "split_like")
        .join(splits, on=["symbol", "_day"], how="inner")
        .filter(((pl.col("value") / pl.col("_ratio")) - 1).abs() <= tolerance)
        .unique("_row", keep="first")
        .select("_row", "_id", "_ratio")
    )
    f = f.join(hit, on="_row", how="left")
    known = pl.col("_id").is_not_null()
    return (
        f.with_columns(
            pl.when(known).then(pl.lit("info")).otherwise(pl.col("severity")).alias("severity"),
            pl.when(known)
            .then(pl.format("explained by split {}:1 ({})", pl.col("_ratio").round(4), pl.col("_id")))
            .otherwise(pl.col("detail"))
            .alias("detail"),
        )
        .sort("_row")
        .select(findings.columns)
    )


def explain_distributions(
    findings: pl.DataFrame,
    bars: pl.DataFrame,
    applied: pl.DataFrame,
    skipped: pl.DataFrame,
    tz: str,
    *,
    jump_pct: float,
    z_threshold: float,
) -> pl.DataFrame:
    """``jump``, ``spike`` and ``return_zscore`` findings of daily ``bars`` on the ex-date of a known cash
    dividend or spin-off of the same symbol: the raw close drops there by the distribution. ``applied``
    (``quality.adjust.factors``' ``applied``) holds each one's price factor f. A finding whose close-to-close
    return r, less ``ln f``, is neither a jump (``jump_pct``) nor a z-score outlier on the volatility the
    finding measured (``z_threshold``) becomes severity ``info`` (shown, not counted), the action named. A
    spin-off in ``skipped`` (no price for its new line, so no factor) explains nothing: its finding stays and
    says the spin-off is there and why its drop is unknown."""
    if not findings.height or not (applied.height or skipped.height):
        return findings
    f = findings.with_columns(
        pl.int_range(pl.len()).alias("_row"), pl.col("ts").dt.convert_time_zone(tz).dt.date().alias("_day")
    )
    returns = bars.sort("symbol", "ts").select(
        "symbol", "ts", (pl.col("close") / pl.col("close").shift().over("symbol")).log().alias("_r")
    )
    moves = f.filter(pl.col("kind").is_in(["jump", "spike", "return_zscore"])).join(
        returns, on=["symbol", "ts"], how="inner"
    )
    dist = applied.filter(pl.col("type").is_in(["cash_dividend", "spin_off"])).select(
        "symbol",
        pl.col("ex_date").alias("_day"),
        pl.col("price_factor").alias("_f"),
        pl.col("action_id").alias("_id"),
        pl.col("type").alias("_type"),
    )
    rest = pl.col("_r") - pl.col("_f").log()  # the move the distribution does not explain
    # return_zscore's value is |r| / sigma: the residual's z on the same sigma is |rest| * value / |r|
    rest_z = pl.when(pl.col("kind") == "return_zscore").then(rest.abs() * pl.col("value") / pl.col("_r").abs())
    hit = (
        moves.join(dist, on=["symbol", "_day"], how="inner")
        .group_by("_row")  # two distributions on one day: their factors multiply
        .agg(
            pl.col("_f").product(),
            pl.col("_id").str.join(", "),
            pl.col("_type").first(),
            pl.col("_r").first(),
            pl.col("kind").first(),
            pl.col("value").first(),
        )
        .filter((rest.abs() < math.log1p(jump_pct / 100)) & (rest_z.fill_null(0.0) < z_threshold))
        .select("_row", "_id", "_f", "_type", "_r")
    )
    unknown = (
        moves.join(
            skipped.filter(pl.col("type") == "spin_off").select(
                "symbol",
                pl.col("ex_date").alias("_day"),
                pl.col("action_id").alias("_sid"),
                pl.col("reason").alias("_why"),
            ),
            on=["symbol", "_day"],
            how="inner",
        )
        .unique("_row", keep="first")
        .select("_row", "_sid", "_why")
    )
    f = f.join(hit, on="_row", how="left").join(unknown, on="_row", how="left")
    known = pl.col("_id").is_not_null()
    return (
        f.with_columns(
            pl.when(known).then(pl.lit("info")).otherwise(pl.col("severity")).alias("severity"),
            pl.when(known)
            .then(
                pl.format(
                    "{}; close to close {}%: explained by the {} ({}), price factor {}",
                    pl.col("detail"),
                    ((pl.col("_r").exp() - 1) * 100).round(2),
                    pl.col("_type").str.replace("_", "-"),
                    pl.col("_id"),
                    pl.col("_f").round(6),
                )
            )
            .when(pl.col("_sid").is_not_null())
            .then(
                pl.format(
                    "{}; a spin-off ({}) has its ex-date here, its drop unknown: {}",
                    pl.col("detail"),
                    pl.col("_sid"),
                    pl.col("_why"),
                )
            )
            .otherwise(pl.col("detail"))
            .alias("detail"),
        )
        .sort("_row")
        .select(findings.columns)
    )


def unseen_splits(
    bars: pl.DataFrame, actions: pl.DataFrame, tz: str, *, tolerance: float = 0.1, within_days: int = 5
) -> pl.DataFrame:
    """``split_unseen`` findings (``FINDINGS_SCHEMA``, severity high): a known split whose adjustment
    date lies inside the raw series (a bar within ``within_days`` on each side) while the series does not
    jump there — the last close before the date over the first open on or after it is not within
    ``tolerance`` of any known split ratio of that day. The bars before it are then on the post-split
    scale: a vendor's split-adjusted bars stored as raw (Yahoo applies splits it does not always list).
    Vectorized: two as-of joins of the splits with the bars."""
    schema = FINDINGS_SCHEMA
    splits = actions.filter(pl.col("type").is_in(["forward_split", "reverse_split"]))
    if not bars.height or not splits.height:
        return pl.DataFrame(schema=schema)
    at = adjustment_date()
    ex = splits.select(
        "symbol",
        at.alias("_day"),
        (pl.col("new_rate") / pl.col("old_rate")).alias("_ratio"),
        pl.col("action_id").alias("_id"),
        at.cast(pl.Datetime("us")).dt.replace_time_zone(tz).dt.convert_time_zone("UTC").alias("_at"),
    ).drop_nulls(["_day", "_ratio", "_at"])
    b = bars.select("symbol", "timeframe", "ts", "open", "close").sort("symbol", "ts")
    probe = ex.with_columns((pl.col("_at") - pl.duration(microseconds=1)).alias("_before")).sort("_before")
    prev = probe.join_asof(
        b.select("symbol", pl.col("ts").alias("_before"), pl.col("ts").alias("_prev_ts"), pl.col("close").alias("_c")),
        on="_before",
        by="symbol",
        strategy="backward",
        check_sortedness=False,
    ).sort("_at")
    both = prev.join_asof(
        b.select(
            "symbol", "timeframe", pl.col("ts").alias("_at"), pl.col("ts").alias("_next_ts"), pl.col("open").alias("_o")
        ),
        on="_at",
        by="symbol",
        strategy="forward",
        check_sortedness=False,
    )
    near = pl.duration(days=within_days)
    seen = (
        both.filter(
            pl.col("_prev_ts").is_not_null()
            & pl.col("_next_ts").is_not_null()
            & (pl.col("_at") - pl.col("_prev_ts") <= near)
            & (pl.col("_next_ts") - pl.col("_at") <= near)
        )
        .with_columns((pl.col("_c") / pl.col("_o")).alias("_jump"))
        .with_columns((((pl.col("_jump") / pl.col("_ratio")) - 1).abs() <= tolerance).alias("_match"))
        .group_by("symbol", "_day")
        .agg(
            pl.col("_match").any(),
            pl.col("timeframe").first(),
            pl.col("_next_ts").first(),
            pl.col("_jump").first(),
            pl.col("_ratio").first(),
            pl.col("_id").first(),
        )
    )
    return (
        seen.filter(~pl.col("_match"))
        .select(
            "symbol",
            "timeframe",
            pl.col("_next_ts").alias("ts"),
            pl.lit("split_unseen").alias("kind"),
            pl.lit("high").alias("severity"),
            pl.col("_jump").alias("value"),
            pl.lit(1, pl.Int64).alias("bars"),
            pl.format(
                "known split {}:1 on {} ({}) not seen in the raw bars (close/open {}): the bars before it look "
                "split-adjusted",
                pl.col("_ratio").round(4),
                pl.col("_day"),
                pl.col("_id"),
                pl.col("_jump").round(4),
            ).alias("detail"),
        )
        .cast(schema)  # type: ignore[arg-type]
        .sort("symbol", "ts")
    )


def unexplained_split_days(findings: pl.DataFrame, days: pl.DataFrame, tz: str) -> pl.DataFrame:
    """``symbol, day`` of every day (of ``days``) before an unexplained high ``split_like`` finding of
    its symbol, or a ``split_unseen`` one: those bars are on another price scale than the ones after it,
    so they count as invalid (an injected unadjusted 4x split must not score 1.000)."""
    schema = {"symbol": pl.String(), "day": pl.Date()}
    jumps = findings.filter(pl.col("kind").is_in(["split_like", "split_unseen"]) & (pl.col("severity") == "high"))
    if not jumps.height or not days.height:
        return pl.DataFrame(schema=schema)
    last = jumps.group_by("symbol").agg(pl.col("ts").max().dt.convert_time_zone(tz).dt.date().alias("_until"))
    return (
        days.select("symbol", "day")
        .join(last, on="symbol")
        .filter(pl.col("day") < pl.col("_until"))
        .select("symbol", "day")
    )
