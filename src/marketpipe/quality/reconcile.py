"""Cross-vendor reconciliation: compare overlapping bars from two sources, bar by bar.

For each (symbol, ts) the largest relative difference over open/high/low/close decides the level:
``match`` below 0.1 %, ``minor`` below 1 %, ``warn`` below the hard threshold (default 5 %),
``mismatch`` at or above it. Bars present in only one source are ``only_<side>``. The volume ratio
(other / reference) is reported for every matched bar and flagged outside [0.5, 2] — a free IEX
feed carries a few percent of consolidated volume, which this makes visible rather than an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from marketpipe.core.tables import RECONCILE_SCHEMA

MATCH, MINOR, WARN, MISMATCH = "match", "minor", "warn", "mismatch"
ONLY_REFERENCE, ONLY_OTHER = "only_reference", "only_other"
LEVELS = (MATCH, MINOR, WARN, MISMATCH, ONLY_REFERENCE, ONLY_OTHER)

_PRICES = ("open", "high", "low", "close")


@dataclass
class Thresholds:
    minor_pct: float = 0.1
    warn_pct: float = 1.0
    hard_pct: float = 5.0
    volume_low: float = 0.5
    volume_high: float = 2.0


@dataclass
class Reconciliation:
    rows: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def mismatches(self) -> pl.DataFrame:
        return self.rows.filter(pl.col("status") == MISMATCH)


def reconcile(
    reference: pl.DataFrame,
    other: pl.DataFrame,
    *,
    reference_name: str,
    other_name: str,
    timeframe: str,
    thresholds: Thresholds | None = None,
) -> Reconciliation:
    """Compare two canonical bar frames (one symbol or many) on (symbol, ts)."""
    t = thresholds or Thresholds()
    keep = ["symbol", "ts", *_PRICES, "volume"]
    ref = reference.select(keep).rename({c: f"{c}_r" for c in [*_PRICES, "volume"]})
    oth = other.select(keep).rename({c: f"{c}_o" for c in [*_PRICES, "volume"]})
    joined = ref.join(oth, on=["symbol", "ts"], how="full", coalesce=True)
    deltas = [
        ((pl.col(f"{c}_o") - pl.col(f"{c}_r")).abs() / pl.col(f"{c}_r").abs() * 100).alias(f"_d_{c}") for c in _PRICES
    ]
    joined = joined.with_columns(deltas)
    delta = pl.max_horizontal([pl.col(f"_d_{c}") for c in _PRICES])
    worst = pl.concat_list([pl.col(f"_d_{c}") for c in _PRICES]).list.arg_max().replace_strict(dict(enumerate(_PRICES)))
    in_ref, in_oth = pl.col("close_r").is_not_null(), pl.col("close_o").is_not_null()
    status = (
        pl.when(~in_oth)
        .then(pl.lit(ONLY_REFERENCE))
        .when(~in_ref)
        .then(pl.lit(ONLY_OTHER))
        .when(delta >= t.hard_pct)
        .then(pl.lit(MISMATCH))
        .when(delta >= t.warn_pct)
        .then(pl.lit(WARN))
        .when(delta >= t.minor_pct)
        .then(pl.lit(MINOR))
        .otherwise(pl.lit(MATCH))
    )
    ratio = pl.when(pl.col("volume_r") > 0).then(pl.col("volume_o") / pl.col("volume_r"))
    rows = joined.select(
        pl.col("symbol"),
        pl.lit(timeframe, pl.String).alias("timeframe"),
        pl.col("ts"),
        pl.lit(reference_name, pl.String).alias("reference"),
        pl.lit(other_name, pl.String).alias("other"),
        status.alias("status"),
        delta.alias("price_delta_pct"),
        pl.when(in_ref & in_oth).then(worst).alias("worst_field"),
        ratio.alias("volume_ratio"),
        ((ratio < t.volume_low) | (ratio > t.volume_high)).fill_null(False).alias("volume_flag"),
        pl.col("close_r").alias("reference_close"),
        pl.col("close_o").alias("other_close"),
    ).sort("symbol", "ts")
    counts = dict.fromkeys(LEVELS, 0)
    counts.update(dict(rows.group_by("status").len().iter_rows()))
    counts["volume_flagged"] = int(rows.get_column("volume_flag").sum())
    return Reconciliation(rows.cast(RECONCILE_SCHEMA), counts)  # type: ignore[arg-type]
