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
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from marketpipe.core.config import AnomalyConfig
from marketpipe.core.metrics import ANOMALIES
from marketpipe.core.schema import BAR_COLUMNS
from marketpipe.core.tables import FINDINGS_SCHEMA, QUARANTINE_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.validate import CheckResult

SEVERITIES = ("low", "medium", "high")
SEVERITY_WEIGHT = {"low": 0.1, "medium": 0.5, "high": 1.0}
SPLIT_RATIOS = (2.0, 3.0, 4.0, 5.0, 10.0, 1.5)

DAY_US = 86_400_000_000


def _pct(e: pl.Expr) -> pl.Expr:
    return (e * 100).round(2).cast(pl.String)


# US trading (04:00-20:00 New York) never crosses 03:00 UTC, so a session's bars share the UTC date of
# (ts - 3 h) in winter and summer alike: a day key without time-zone arithmetic.
SESSION_SHIFT_US = 3 * 3_600_000_000


def _prev(a: np.ndarray, first: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """``a`` shifted down by one within each symbol (``first`` marks each symbol's first row)."""
    out = np.empty_like(a, dtype=np.float64 if a.dtype.kind == "f" else a.dtype)
    out[1:] = a[:-1]
    out[first] = fill
    return out


class _AtHits:
    """A rule's severity or value computed at its hit indexes only (a rule hits a few rows of a
    million; a full-length array of severity strings costs more than the rule itself)."""

    __slots__ = ("f",)

    def __init__(self, f: Callable[[np.ndarray], np.ndarray]) -> None:
        self.f = f

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        return self.f(idx)


def _ewm(values: np.ndarray, groups: np.ndarray | None, *, alpha: float, min_samples: int, std: bool) -> np.ndarray:
    """EWMA (or EWM standard deviation) restarting per group; NaN in, NaN out (polars kernels)."""
    s = pl.Series("x", values).fill_nan(None)
    if groups is None:
        e = (
            s.ewm_std(alpha=alpha, adjust=False, min_samples=min_samples)
            if std
            else s.ewm_mean(alpha=alpha, adjust=False, min_samples=min_samples)
        )
        return e.fill_null(np.nan).to_numpy()  # no nulls left: a zero-copy view, not a masked copy
    x = pl.col("x")
    ex = (
        x.ewm_std(alpha=alpha, adjust=False, min_samples=min_samples)
        if std
        else x.ewm_mean(alpha=alpha, adjust=False, min_samples=min_samples)
    )
    return pl.DataFrame({"x": s, "g": groups}).select(ex.over("g")).to_series().fill_null(np.nan).to_numpy()


def detect(frame: pl.DataFrame, timeframe: Timeframe | str, cfg: AnomalyConfig | None = None) -> pl.DataFrame:
    """Findings for ``frame`` (canonical bars of one timeframe, any number of symbols).

    Columns are taken out as numpy arrays once; every rule is a few vectorized array operations,
    shifts respect symbol boundaries, and only the rows that hit a rule are turned into findings."""
    cfg = cfg or AnomalyConfig()
    tf = Timeframe.parse(timeframe)
    n = frame.height
    if n < 2:
        return pl.DataFrame(schema=FINDINGS_SCHEMA)
    sym = frame.get_column("symbol")
    multi = not (sym == sym[0]).all()  # a tenth of n_unique's cost on the one-symbol series
    if multi or not frame.get_column("ts").is_sorted():
        frame = frame.sort("symbol", "ts")
    codes = frame.get_column("symbol").rle_id().to_numpy() if multi else None
    first = np.zeros(n, dtype=bool)
    first[0] = True
    if codes is not None:
        first[1:] = codes[1:] != codes[:-1]
    last = np.roll(first, -1)

    def col(name: str) -> np.ndarray:
        return frame.get_column(name).cast(pl.Float64).fill_null(np.nan).to_numpy()

    o, h, lo, c, v = col("open"), col("high"), col("low"), col("close"), col("volume")
    ts_us = frame.get_column("ts").dt.epoch("us").to_numpy()
    prev_c = _prev(c, first)
    if tf.is_intraday:
        # Sessions restart at the open: the first bar's "return" is open-to-close, so the overnight
        # move (which is not minute volatility) never inflates z or triggers jumps.
        day = (ts_us - SESSION_SHIFT_US) // DAY_US
        new_day = first | (day != _prev(day, first, fill=-1))
        base = np.where(new_day, o, prev_c)
    else:
        base = prev_c
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(c / base)
        ratio = prev_c / o
        alpha = 2.0 / (cfg.vol_span + 1.0)
        sigma = _ewm(_prev(r, first), codes, alpha=alpha, min_samples=cfg.min_periods, std=True)
        vol_base = _ewm(_prev(v, first), codes, alpha=alpha, min_samples=5, std=False)
        z = np.abs(r / sigma)
        outlier = (z >= cfg.z_threshold) & (sigma > 0)
        big = np.abs(r) >= math.log1p(cfg.jump_pct / 100)
        # split-like needs a move of at least split_min_move_pct first: the ratio windows are tested on
        # those few candidates only, not on every bar
        split = np.zeros(n, dtype=bool)
        cand = np.flatnonzero(np.abs(np.log(ratio)) >= math.log1p(cfg.split_min_move_pct / 100))
        if len(cand):
            rc, tol = ratio[cand], cfg.split_tolerance
            hit = np.zeros(len(cand), dtype=bool)
            for k in SPLIT_RATIOS:
                hit |= (np.abs(rc / k - 1) <= tol) | (np.abs(rc * k - 1) <= tol)
            split[cand] = hit
        next_r = np.roll(r, -1)
        next_r[last] = np.nan
        spike = (outlier | big) & (np.abs(r + next_r) < 0.5 * np.abs(r)) & ~split
        vol_hit = (v >= cfg.min_volume) & (v >= cfg.volume_multiple * vol_base)
    reversal = _prev(spike, first, fill=False)
    plain = ~split & ~spike & ~reversal
    # A frozen run: consecutive single-price bars (open = high = low = close) at one price.
    flat = (h == lo) & (o == c)
    same = c == prev_c
    run_start = flat & ~(_prev(flat, first, fill=False) & same)
    run_id = np.cumsum(run_start)
    run_len = np.zeros(n, dtype=np.int64)
    if flat.any():
        lengths = np.bincount(run_id[flat])
        run_len[run_start] = lengths[run_id[run_start]]
    frozen_min = cfg.frozen_bars if tf.is_intraday else max(3, cfg.frozen_bars // 5)
    zero_move = (v == 0) & ~(flat & (same | first))

    rules: list[tuple[str, np.ndarray, Any, Any, np.ndarray | int, pl.Expr]] = [
        (
            "split_like",
            split & ~reversal,
            "high",
            ratio,
            1,
            (
                pl.lit("prev close / open = ")
                + pl.col("value").round(4).cast(pl.String)
                + pl.lit(": possible unadjusted split")
            ),
        ),
        (
            "spike",
            spike,
            _AtHits(lambda i: np.where(big[i], "high", "medium")),
            r,
            1,
            pl.lit("move ") + _pct(pl.col("value").exp() - 1) + pl.lit("% reversed by the next bar"),
        ),
        (
            "jump",
            big & plain,
            "high",
            r,
            1,
            pl.lit("bar-to-bar move ") + _pct(pl.col("value").exp() - 1) + pl.lit("%"),
        ),
        (
            "return_zscore",
            outlier & ~big & plain,
            _AtHits(lambda i: np.where(z[i] >= cfg.z_high, "high", "medium")),
            z,
            1,
            (pl.lit("return is ") + pl.col("value").round(1).cast(pl.String) + pl.lit(" sigma of the EWMA volatility")),
        ),
        (
            "frozen",
            run_start & (run_len >= frozen_min),
            "medium",
            run_len.astype(np.float64),
            run_len,
            pl.col("bars").cast(pl.String) + pl.lit(" bars at one price"),
        ),
        (
            "volume_outlier",
            vol_hit,
            "low",
            _AtHits(lambda i: v[i] / vol_base[i]),
            1,
            pl.lit("volume ") + pl.col("value").round(1).cast(pl.String) + pl.lit("x its recent average"),
        ),
        (
            "zero_volume_move",
            zero_move,
            "medium",
            _AtHits(lambda i: np.abs(np.expm1(r[i]))),
            1,
            (
                pl.lit("prices moved on zero volume (close ")
                + _pct(pl.col("value"))
                + pl.lit("% from the previous bar)")
            ),
        ),
    ]
    symbols, stamps = frame.get_column("symbol"), frame.get_column("ts")
    parts = []
    for kind, hit, severity, value, bars, detail in rules:
        idx = np.flatnonzero(hit)
        if not len(idx):
            continue
        part = pl.DataFrame(
            {
                "symbol": symbols.gather(idx),
                "timeframe": pl.Series([str(tf)] * len(idx), dtype=pl.String),
                "ts": stamps.gather(idx),
                "kind": pl.Series([kind] * len(idx), dtype=pl.String),
                "severity": severity(idx) if isinstance(severity, _AtHits) else [severity] * len(idx),
                "value": value(idx) if isinstance(value, _AtHits) else value[idx],
                "bars": bars[idx] if isinstance(bars, np.ndarray) else np.full(len(idx), bars, dtype=np.int64),
            }
        )
        parts.append(part.with_columns(detail=detail))
    if not parts:
        return pl.DataFrame(schema=FINDINGS_SCHEMA)
    out = pl.concat(parts).cast(FINDINGS_SCHEMA).sort("symbol", "ts", "kind")  # type: ignore[arg-type]
    for kind, sev, cnt in out.group_by("kind", "severity").len().iter_rows():
        ANOMALIES.labels(kind, sev).inc(cnt)
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
    ).cast({c: t for c, t in QUARANTINE_SCHEMA.items() if c != "volume"})  # type: ignore[arg-type]
    counts = dict(checked.counts)
    for reason, n in moved.group_by("reason").len().iter_rows():
        counts[reason] = counts.get(reason, 0) + n
    # volume keeps the bars' type (a crypto pair's is a float; an empty quarantine's is the stock integer)
    return CheckResult(good, pl.concat([checked.quarantine, moved], how="vertical_relaxed"), counts)
