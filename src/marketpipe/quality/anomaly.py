"""Anomaly detection on bar series, vectorized with polars (no per-row Python).

Anomalies are *suspicious* rows that passed the validity checks: they stay in the store unless the
configuration says high-severity findings are quarantined at ingest. Every finding names the rule,
a severity, the measured value and a readable detail; nothing is changed silently.

Rules (each per symbol, over bars ordered by time; ``r`` is the log return close-to-close):

``return_zscore``     ``|r| / σ`` over the EWMA volatility of the previous bars (``vol_span``,
                      ``min_periods`` warm-up) at or above ``z_threshold`` (medium) or
                      ``z_high`` (high). Intraday, the first bar of a session is compared with
                      the session's own open, not with last night's close.
``spike``             an outlier return immediately reversed by the next bar (a bad tick): the
                      reversal is not reported on its own.
``jump``              ``|r|`` at or above ``jump_pct`` that is neither a spike nor split-like (high).
``split_like``        the ratio of the previous close to this bar's open is within
                      ``split_tolerance`` of a common split ratio (2, 3, 4, 5, 10, 3/2, and their
                      inverses): a possible unadjusted split (high).
``frozen``            ``frozen_bars`` or more consecutive bars with open = high = low = close equal
                      to the previous close (medium; reported once, at the start of the run, with
                      the run length).
``volume_outlier``    volume at least ``volume_multiple`` × the EWMA of the previous volumes (low).
``zero_volume_move``  no volume, yet the bar has a price range or its close moved (medium).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from marketpipe.core.config import AnomalyConfig
from marketpipe.core.metrics import ANOMALIES
from marketpipe.core.schema import BAR_COLUMNS
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.validate import QUARANTINE_SCHEMA, CheckResult

SEVERITIES = ("low", "medium", "high")
SEVERITY_WEIGHT = {"low": 0.1, "medium": 0.5, "high": 1.0}
SPLIT_RATIOS = (2.0, 3.0, 4.0, 5.0, 10.0, 1.5)

FINDINGS_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "kind": pl.String(),
    "severity": pl.String(),
    "value": pl.Float64(),
    "bars": pl.Int64(),  # rows the finding covers (a frozen run covers many)
    "detail": pl.String(),
}


@dataclass(frozen=True)
class _Rule:
    kind: str
    severity: pl.Expr
    value: pl.Expr
    detail: pl.Expr
    bars: pl.Expr


def _pct(e: pl.Expr) -> pl.Expr:
    return (e * 100).round(2).cast(pl.String)


def detect(frame: pl.DataFrame, timeframe: Timeframe | str, cfg: AnomalyConfig | None = None) -> pl.DataFrame:
    """Findings for ``frame`` (canonical bars of one timeframe, any number of symbols)."""
    cfg = cfg or AnomalyConfig()
    tf = Timeframe.parse(timeframe)
    if frame.height < 2:
        return pl.DataFrame(schema=FINDINGS_SCHEMA)
    multi = frame.get_column("symbol").n_unique() > 1
    if multi or not frame.get_column("ts").is_sorted():
        frame = frame.sort("symbol", "ts")

    def over(e: pl.Expr) -> pl.Expr:
        return e.over("symbol") if multi else e

    close, open_ = pl.col("close"), pl.col("open")
    prev_close = over(close.shift())
    # Intraday sessions restart at the open: the first bar's "return" is open-to-close, so the
    # overnight move (which is not minute volatility) never inflates z or triggers jumps.
    if tf.is_intraday:
        day = pl.col("ts").dt.convert_time_zone("America/New_York").dt.date()
        first_of_day = over(day != day.shift()).fill_null(True)
        base = pl.when(first_of_day).then(open_).otherwise(prev_close)
    else:
        base = prev_close
    frozen_min = cfg.frozen_bars if tf.is_intraday else max(3, cfg.frozen_bars // 5)
    alpha = 2.0 / (cfg.vol_span + 1.0)

    x = frame.select(
        "symbol",
        "ts",
        "open",
        "close",
        "volume",
        r=(close / base).log(),
        gap_ratio=prev_close / open_,
        flat=(pl.col("high") == pl.col("low")) & (open_ == close),
        same=close == prev_close,
    ).with_columns(
        sigma=over(pl.col("r").shift().ewm_std(alpha=alpha, adjust=False, min_samples=cfg.min_periods)),
        vol_base=over(pl.col("volume").cast(pl.Float64).shift().ewm_mean(alpha=alpha, adjust=False, min_samples=5)),
        next_r=over(pl.col("r").shift(-1)),
    )
    r, z = pl.col("r"), (pl.col("r") / pl.col("sigma")).abs()
    ratio = pl.col("gap_ratio")
    near_split = pl.any_horizontal(
        [
            ((ratio / k - 1).abs() <= cfg.split_tolerance) | ((ratio * k - 1).abs() <= cfg.split_tolerance)
            for k in SPLIT_RATIOS
        ]
    ) & (ratio.log().abs() >= math.log1p(cfg.split_min_move_pct / 100))
    x = x.with_columns(
        z=z,
        split=near_split.fill_null(False),
        outlier=(z >= cfg.z_threshold).fill_null(False) & (pl.col("sigma") > 0),
        big=(r.abs() >= math.log1p(cfg.jump_pct / 100)).fill_null(False),
    ).with_columns(
        spike=(pl.col("outlier") | pl.col("big"))
        & ((r + pl.col("next_r")).abs() < 0.5 * r.abs()).fill_null(False)
        & ~pl.col("split"),
    )
    # A spike's reversal is part of the spike: drop the next bar's own return findings.
    x = x.with_columns(reversal=over(pl.col("spike").shift()).fill_null(False))
    plain = ~pl.col("split") & ~pl.col("spike") & ~pl.col("reversal")
    # A frozen run: consecutive single-price bars (open = high = low = close) at one price.
    run_start = pl.col("flat") & ~(over(pl.col("flat").shift()).fill_null(False) & pl.col("same").fill_null(False))
    x = x.with_columns(run_id=over(run_start.cum_sum()))
    x = x.with_columns(
        run_len=pl.when(pl.col("flat")).then(
            pl.col("flat").sum().over(["symbol", "run_id"] if multi else "run_id").cast(pl.Int64)
        ),
        run_start=run_start,
    )
    run_start = pl.col("run_start")
    move = (r.exp() - 1).abs()

    rules = [
        (
            "split_like",
            pl.col("split") & ~pl.col("reversal"),
            _Rule(
                "split_like",
                pl.lit("high"),
                ratio,
                pl.lit("prev close / open = ") + ratio.round(4).cast(pl.String) + pl.lit(": possible unadjusted split"),
                pl.lit(1),
            ),
        ),
        (
            "spike",
            pl.col("spike"),
            _Rule(
                "spike",
                pl.when(pl.col("big")).then(pl.lit("high")).otherwise(pl.lit("medium")),
                r,
                pl.lit("move ") + _pct(r.exp() - 1) + pl.lit("% reversed by the next bar"),
                pl.lit(1),
            ),
        ),
        (
            "jump",
            pl.col("big") & plain,
            _Rule("jump", pl.lit("high"), r, pl.lit("bar-to-bar move ") + _pct(r.exp() - 1) + pl.lit("%"), pl.lit(1)),
        ),
        (
            "return_zscore",
            pl.col("outlier") & ~pl.col("big") & plain,
            _Rule(
                "return_zscore",
                pl.when(z >= cfg.z_high).then(pl.lit("high")).otherwise(pl.lit("medium")),
                z,
                pl.lit("return ")
                + _pct(move)
                + pl.lit("% is ")
                + z.round(1).cast(pl.String)
                + pl.lit(" sigma of the EWMA volatility"),
                pl.lit(1),
            ),
        ),
        (
            "frozen",
            run_start & (pl.col("run_len") >= frozen_min),
            _Rule(
                "frozen",
                pl.lit("medium"),
                pl.col("run_len").cast(pl.Float64),
                pl.col("run_len").cast(pl.String) + pl.lit(" bars at one price"),
                pl.col("run_len"),
            ),
        ),
        (
            "volume_outlier",
            (pl.col("volume") >= cfg.min_volume)
            & (pl.col("volume") >= cfg.volume_multiple * pl.col("vol_base")).fill_null(False),
            _Rule(
                "volume_outlier",
                pl.lit("low"),
                pl.col("volume") / pl.col("vol_base"),
                pl.lit("volume ")
                + (pl.col("volume") / pl.col("vol_base")).round(1).cast(pl.String)
                + pl.lit("x its recent average"),
                pl.lit(1),
            ),
        ),
        (
            "zero_volume_move",
            (pl.col("volume") == 0) & ~(pl.col("flat") & pl.col("same").fill_null(True)),
            _Rule(
                "zero_volume_move",
                pl.lit("medium"),
                r,
                pl.lit("prices moved on zero volume (close ") + _pct(move) + pl.lit("% from the previous bar)"),
                pl.lit(1),
            ),
        ),
    ]
    parts = []
    for _name, cond, rule in rules:
        hit = x.filter(cond.fill_null(False))
        if hit.height:
            parts.append(
                hit.select(
                    "symbol",
                    pl.lit(str(tf)).alias("timeframe"),
                    "ts",
                    pl.lit(rule.kind).alias("kind"),
                    rule.severity.alias("severity"),
                    rule.value.cast(pl.Float64).alias("value"),
                    rule.bars.cast(pl.Int64).alias("bars"),
                    rule.detail.alias("detail"),
                )
            )
    if not parts:
        return pl.DataFrame(schema=FINDINGS_SCHEMA)
    out = pl.concat(parts).cast(FINDINGS_SCHEMA).sort("symbol", "ts", "kind")  # type: ignore[arg-type]
    for kind, sev, n in out.group_by("kind", "severity").len().iter_rows():
        ANOMALIES.labels(kind, sev).inc(n)
    return out


def quarantine_findings(checked: CheckResult, findings: pl.DataFrame, request_id: str) -> CheckResult:
    """Move the rows of high-severity findings from the good rows to quarantine, with reason
    ``anomaly:<kind>`` (the ``on_high = "quarantine"`` policy)."""
    high = findings.filter(pl.col("severity") == "high")
    if not high.height:
        return checked
    reasons = high.group_by("symbol", "ts").agg(reason=pl.concat_str(pl.lit("anomaly:") + pl.col("kind")).str.join(","))
    hit = checked.good.join(reasons, on=["symbol", "ts"], how="inner")
    if not hit.height:
        return checked
    good = checked.good.join(reasons, on=["symbol", "ts"], how="anti")
    moved = hit.select(
        *BAR_COLUMNS,
        pl.col("ts").cast(pl.String).alias("raw_ts"),
        "reason",
        pl.lit(request_id, pl.String).alias("request_id"),
    ).cast(QUARANTINE_SCHEMA)  # type: ignore[arg-type]
    counts = dict(checked.counts)
    for reason, n in moved.group_by("reason").len().iter_rows():
        counts[reason] = counts.get(reason, 0) + n
    return CheckResult(good, pl.concat([checked.quarantine, moved]), counts)
