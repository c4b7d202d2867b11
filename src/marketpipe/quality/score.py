"""Quality score 0–1 per (symbol, timeframe, session day), and per series.

Components, each 0–1 or None when it does not apply:

* **completeness** — held bars / bars the calendar expects (None when none are expected).
* **validity** — 1 − (quarantined rows + anomalous rows weighted by severity: high 1, medium 0.5,
  low 0.1) / (held + quarantined rows).
* **timeliness** — only for the most recent sessions: the lag from the end of the day's newest bar to
  its fetch; ``fresh_seconds`` or less scores 1, ``stale_seconds`` or more 0, linear between.
* **consistency** — share of bars compared with another vendor (``marketpipe reconcile``) that agree
  within 1 %; None when no comparison exists.

The score is the weighted mean of the components that apply (weights from ``[quality.weights]``,
default validity 0.4, completeness 0.3, timeliness 0.2, consistency 0.1), so a component that does
not apply neither helps nor hurts. A series' score is the mean of its days weighted by expected bars.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from marketpipe.core.config import QualityWeights
from marketpipe.quality.completeness import DAYS_SCHEMA

COMPONENTS = ("validity", "completeness", "timeliness", "consistency")

DAY_SCORE_SCHEMA: dict[str, pl.DataType] = {
    **DAYS_SCHEMA,
    "quarantined": pl.Int64(),
    "anomalies": pl.Int64(),
    **{c: pl.Float64() for c in ("completeness", "validity", "timeliness", "consistency", "score")},
}


def score_days(
    days: pl.DataFrame,
    *,
    quarantined: pl.DataFrame,
    anomalous: pl.DataFrame,
    timeliness: pl.DataFrame,
    consistency: pl.DataFrame,
    weights: QualityWeights,
) -> pl.DataFrame:
    """``days``: completeness counts per day (day, expected, present, confirmed_empty, gap).
    The others are per-day frames keyed by ``day``: ``quarantined`` (quarantined), ``anomalous``
    (anomalies: findings count, weighted: severity-weighted rows), ``timeliness`` (timeliness),
    ``consistency`` (consistency). Missing days count as zero / not applicable."""
    x = (
        days.join(quarantined, on="day", how="left")
        .join(anomalous, on="day", how="left")
        .join(timeliness, on="day", how="left")
        .join(consistency, on="day", how="left")
        .with_columns(
            pl.col("quarantined").fill_null(0).cast(pl.Int64),
            pl.col("anomalies").fill_null(0).cast(pl.Int64),
            pl.col("weighted").fill_null(0.0),
        )
    )
    seen = pl.col("present") + pl.col("quarantined")
    x = x.with_columns(
        completeness=pl.when(pl.col("expected") > 0).then(
            (pl.col("present") / pl.col("expected")).clip(upper_bound=1.0)
        ),
        validity=pl.when(seen > 0).then(
            (1 - (pl.col("quarantined") + pl.col("weighted")) / seen).clip(lower_bound=0.0)
        ),
    )
    w = {c: float(getattr(weights, c)) for c in COMPONENTS}
    num = pl.sum_horizontal([pl.col(c).fill_null(0.0) * w[c] for c in COMPONENTS])
    den = pl.sum_horizontal([pl.col(c).is_not_null().cast(pl.Float64) * w[c] for c in COMPONENTS])
    x = x.with_columns(score=pl.when(den > 0).then(num / den))
    return x.select(list(DAY_SCORE_SCHEMA)).cast(DAY_SCORE_SCHEMA)  # type: ignore[arg-type]


def summarize(scored: pl.DataFrame) -> dict[str, Any]:
    """Series-level numbers: sums of the counts, expected-weighted means of the components."""
    if not scored.height:
        return {
            "score": None,
            **dict.fromkeys(COMPONENTS),
            "expected": 0,
            "present": 0,
            "confirmed_empty": 0,
            "gap": 0,
            "quarantined": 0,
            "anomalies": 0,
        }
    weight = pl.col("expected").clip(lower_bound=1).cast(pl.Float64)

    def wmean(c: str) -> pl.Expr:
        has = pl.col(c).is_not_null()
        total = weight.filter(has).sum()
        return pl.when(total > 0).then((pl.col(c) * weight).filter(has).sum() / total)

    row = scored.select(
        *[pl.col(c).sum() for c in ("expected", "present", "confirmed_empty", "gap", "quarantined", "anomalies")],
        *[wmean(c).alias(c) for c in (*COMPONENTS, "score")],
    ).row(0, named=True)
    if row["expected"]:
        row["completeness"] = row["present"] / row["expected"]
    return row
