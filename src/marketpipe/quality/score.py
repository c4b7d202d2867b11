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
from marketpipe.core.tables import DAY_SCORE_SCHEMA

COMPONENTS = ("validity", "completeness", "timeliness", "consistency")


def score_days(
    days: pl.DataFrame,
    *,
    quarantined: pl.DataFrame,
    anomalous: pl.DataFrame,
    timeliness: pl.DataFrame,
    consistency: pl.DataFrame,
    weights: QualityWeights,
) -> pl.DataFrame:
    """``days``: completeness counts per day (day, expected, present, confirmed_empty, gap), for one
    symbol or for many with a ``symbol`` column. The others are frames keyed the same way:
    ``quarantined`` (quarantined), ``anomalous`` (anomalies: findings count, weighted:
    severity-weighted rows), ``timeliness`` (timeliness), ``consistency`` (consistency). Missing days
    count as zero / not applicable."""
    keys = ["symbol", "day"] if "symbol" in days.columns else ["day"]
    x = days
    for other, cols in (
        (quarantined, {"quarantined": pl.Int64()}),
        (anomalous, {"anomalies": pl.Int64(), "weighted": pl.Float64()}),
        (timeliness, {"timeliness": pl.Float64()}),
        (consistency, {"consistency": pl.Float64()}),
    ):
        # Most of these are empty for most ranges (no quarantine, no reconciliation): skip the join.
        if other.height:
            x = x.join(other.select(*keys, *cols), on=keys, how="left")
        else:
            x = x.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in cols.items())
    x = x.with_columns(
        pl.col("quarantined").fill_null(0),
        pl.col("anomalies").fill_null(0),
        pl.col("weighted").fill_null(0.0),
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
    return x.select(*keys[:-1], *DAY_SCORE_SCHEMA).cast(DAY_SCORE_SCHEMA)  # type: ignore[arg-type]


_COUNTS = ("expected", "present", "confirmed_empty", "gap", "quarantined", "anomalies")
EMPTY_SUMMARY: dict[str, Any] = {"score": None, **dict.fromkeys(COMPONENTS), **dict.fromkeys(_COUNTS, 0)}


def _wmean(c: str) -> pl.Expr:
    weight = pl.col("expected").clip(lower_bound=1).cast(pl.Float64)
    has = pl.col(c).is_not_null()
    total = weight.filter(has).sum()
    return pl.when(total > 0).then((pl.col(c) * weight).filter(has).sum() / total).alias(c)


def _series_aggs() -> list[pl.Expr]:
    return [*(pl.col(c).sum() for c in _COUNTS), *(_wmean(c) for c in (*COMPONENTS, "score"))]


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    if row["expected"]:
        row["completeness"] = row["present"] / row["expected"]
    return row


def summarize_many(scored: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """:func:`summarize` per symbol of a long frame, in one group-by."""
    if not scored.height:
        return {}
    rows = scored.group_by("symbol").agg(_series_aggs()).iter_rows(named=True)
    return {row.pop("symbol"): _finish(row) for row in rows}


def summarize(scored: pl.DataFrame) -> dict[str, Any]:
    """Series-level numbers: sums of the counts, expected-weighted means of the components."""
    if not scored.height:
        return EMPTY_SUMMARY.copy()
    return _finish(scored.select(_series_aggs()).row(0, named=True))
