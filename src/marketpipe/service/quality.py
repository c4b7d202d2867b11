"""Data-quality analysis of stored series: completeness, anomalies, scores — stored, reported,
and raised as events. Reads the store only; repairing is :mod:`marketpipe.service.maintain`'s job."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from marketpipe.core import events
from marketpipe.core.calendar import ExchangeCalendar
from marketpipe.core.config import QualityConfig
from marketpipe.core.errors import InvalidArgument, InvalidRange
from marketpipe.core.metrics import COMPLETENESS, QUALITY_SCORE
from marketpipe.core.schema import SPLIT_TYPES as SPLITS
from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.timeutil import utcnow
from marketpipe.quality.actions import explain_distributions, explain_splits, unexplained_split_days, unseen_splits
from marketpipe.quality.adjust import adjustment_date, current, factors
from marketpipe.quality.anomaly import SEVERITY_WEIGHT, detect
from marketpipe.quality.completeness import Completeness, assess_frames, expected_stamps
from marketpipe.quality.reconcile import MATCH, MINOR, MISMATCH, WARN
from marketpipe.quality.report import SeriesReport
from marketpipe.quality.score import EMPTY_SUMMARY, score_days, summarize_many
from marketpipe.service.actions import one_vendor
from marketpipe.service.frames import public
from marketpipe.store.base import ActionStore, QualityStore

OUTLIER_EVENT_SAMPLE = 5


@dataclass
class SeriesQuality:
    symbol: str
    timeframe: str
    start: datetime
    end: datetime
    completeness: Completeness
    findings: pl.DataFrame  # one row per anomaly: symbol, timestamp, kind, severity, value, detail
    days: pl.DataFrame
    summary: dict[str, Any]
    prices: pl.DataFrame = field(repr=False)

    def report(self) -> SeriesReport:
        summary = dict(self.summary)
        summary["anomalies_by_severity"] = (
            dict(self.findings.group_by("severity").len().iter_rows()) if self.findings.height else {}
        )
        return SeriesReport(
            symbol=self.symbol,
            timeframe=self.timeframe,
            start=self.start,
            end=self.end,
            summary=summary,
            days=self.days,
            prices=self.prices,
            anomalies=self.findings.select("timestamp", "kind", "severity", "value", "detail").rename(
                {"timestamp": "ts"}
            ),
            gaps=self.completeness.ranges,
        )


def period_expr(tf: Timeframe, tz: str) -> pl.Expr:
    """The period day of a bar stamp: its local session day, or its week / month bucket's first day."""
    local = pl.col("ts").dt.convert_time_zone(tz).dt.date()
    if tf.unit is Unit.WEEK:
        return local - pl.duration(days=local.dt.weekday() - 1)
    if tf.unit is Unit.MONTH:
        month0 = (local.dt.month() - 1) // tf.amount * tf.amount + 1
        return pl.date(local.dt.year(), month0, 1)
    return local


def expected_complete(
    cal: ExchangeCalendar, tf: Timeframe, start: datetime, end: datetime, now: datetime, extended: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Expected stamps of bars that are over by ``now`` (a bar still forming is not missing)."""
    stamps, period = expected_stamps(cal, tf, start, end, extended=extended)
    now_ns = int(now.timestamp() * 1e6) * 1000
    if tf.is_intraday:
        keep = stamps + tf.seconds * 1_000_000_000 <= now_ns
    else:
        # A daily-or-longer bar is complete once the last session it spans has closed.
        last_close = np.searchsorted(cal.days, period, side="left")
        if tf.unit is Unit.DAY:
            keep = cal.closes[np.minimum(last_close, len(cal.closes) - 1)] <= now_ns
        else:
            keep = stamps <= now_ns  # partial week / month bars count once their period started
    return stamps[keep], period[keep]


MOVES = ["jump", "spike", "return_zscore"]  # the findings a distribution's drop can explain


def _explain_distributions(
    store: Any,
    cal: ExchangeCalendar,
    symbols: list[str],
    days: tuple[date, date],
    bars: pl.DataFrame,
    findings: pl.DataFrame,
    cfg: QualityConfig,
) -> pl.DataFrame:
    """``quality.actions.explain_distributions`` with each symbol's dividend and spin-off factors, computed
    as the adjusted read computes them (``quality.adjust.factors``): from the symbol's own raw closes and
    the new lines' raw closes on their ex-dates, read from the store (never fetched or guessed here)."""
    tz = str(cal.tz)
    acts = current(store.read_actions(symbols, *days, types=["cash_dividend", "spin_off"]))
    if not acts.height:
        return findings
    cov = store.action_coverage(symbols, *days)  # the vendor the adjusted read would use (one_vendor)
    closes_of = bars.select(
        "symbol", pl.col("ts").dt.convert_time_zone(tz).dt.date().alias("day"), "close"
    ).partition_by("symbol", as_dict=True, include_key=False)
    applied, skipped = [], []
    for (sym,), held_actions in acts.partition_by("symbol", as_dict=True).items():
        mine = one_vendor(held_actions, cov.filter(pl.col("symbol") == sym)["provider"].to_list())
        spins = mine.filter((pl.col("type") == "spin_off") & pl.col("new_symbol").is_not_null())
        lines = spins["new_symbol"].unique().to_list()
        new_closes = None
        if lines:  # the new lines' closes on the ex-dates (a daily bar is stamped at the exchange's midnight)
            ex: list[date] = spins.select(adjustment_date()).to_series().drop_nulls().to_list()
            if not ex:
                ex = [days[0]]
            span = [datetime.combine(d, datetime.min.time(), UTC) for d in (min(ex), max(ex) + timedelta(days=2))]
            held = store.read_bars(lines, "1Day", *span)
            new_closes = held.select("symbol", pl.col("ts").dt.convert_time_zone(tz).dt.date().alias("day"), "close")
        closes = closes_of.get((sym,), pl.DataFrame(schema={"day": pl.Date(), "close": pl.Float64()}))
        f = factors(mine, closes, frozenset({"dividend", "spin-off"}), new_closes)
        applied.append(f.applied)
        skipped.append(f.skipped)
    return explain_distributions(
        findings,
        bars,
        pl.concat(applied),
        pl.concat(skipped),
        tz,
        jump_pct=cfg.anomaly.jump_pct,
        z_threshold=cfg.anomaly.z_threshold,
    )


def analyze(
    store: QualityStore,
    cal: ExchangeCalendar,
    symbols: list[str],
    timeframe: Timeframe | str,
    start: datetime,
    end: datetime,
    cfg: QualityConfig | None = None,
    *,
    now: datetime | None = None,
    save: bool = True,
    raise_events: bool = True,
    bars: pl.DataFrame | None = None,
) -> list[SeriesQuality]:
    """Completeness, anomalies and scores for each symbol over ``[start, end)``. With ``save`` the
    findings (replacing earlier ones in the range) and per-day scores are stored.

    ``bars``: the caller's own ``store.read_bars(symbols, timeframe, start, end)``, just read (the
    gateway scoring the page it answers with), so the store is not read for them a second time; they
    must be exactly that read (every source and feed, one row per timestamp, in time order)."""
    cfg = cfg or QualityConfig()
    tf = Timeframe.parse(timeframe)
    now = now or utcnow()
    if not symbols:
        raise InvalidArgument("no symbols given", details={"parameter": "symbols"})
    if end <= start:
        raise InvalidRange(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    cal.check_bounds(start, min(end, now) if start < now else end)
    expected = expected_complete(cal, tf, start, end, now, cfg.extended_hours)
    tfs = str(tf)
    if bars is None:
        bars = store.read_bars(symbols, tfs, start, end)
    coverage = store.coverage(symbols, tfs, start, end)
    quarantined = store.quarantined_at(symbols, tfs, start, end)
    findings = detect(bars, tf, cfg.anomaly)
    if isinstance(store, ActionStore):
        # a split-like jump on a known split's ex-date is the split itself (raw data): explained, not counted;
        # a known split the raw bars do not jump at is a finding (bars before it stored split-adjusted)
        zone = ZoneInfo(str(cal.tz))
        days = (start.astimezone(zone).date() - timedelta(days=1), end.astimezone(zone).date())
        splits = current(store.read_actions(symbols, *days, types=list(SPLITS)))
        if findings.height:
            findings = explain_splits(findings, splits, str(cal.tz))
        if tf.unit is Unit.DAY and tf.amount == 1 and findings.filter(pl.col("kind").is_in(MOVES)).height:
            # a daily close drops by a dividend or a spin-off on its ex-date: explained when that is the move
            findings = _explain_distributions(store, cal, symbols, days, bars, findings, cfg)
        unseen = unseen_splits(bars, splits, str(cal.tz))
        if unseen.height:
            findings = pl.concat([findings, unseen]).sort("symbol", "ts")
    if save:
        store.replace_findings(symbols, tfs, start, end, findings, now)
    comps = assess_frames(symbols, tf, cal, start, end, bars, coverage, extended=cfg.extended_hours, expected=expected)
    period = period_expr(tf, cal.tz)
    keys = ["symbol", "day"]
    q_days = quarantined.group_by("symbol", period.alias("day")).agg(quarantined=pl.len().cast(pl.Int64))
    a_days = findings.group_by("symbol", period.alias("day")).agg(
        anomalies=pl.len().cast(pl.Int64),
        weighted=(pl.col("bars") * pl.col("severity").replace_strict(SEVERITY_WEIGHT, default=0.0)).sum(),
    )
    before = unexplained_split_days(findings, comps.days, str(cal.tz))
    if before.height:  # every bar before an unexplained split-like jump counts as invalid
        a_days = (
            pl.concat(
                [a_days, before.with_columns(anomalies=pl.lit(0, pl.Int64), weighted=pl.lit(float(2**31)))],
                how="diagonal_relaxed",
            )
            .group_by("symbol", "day")
            .agg(pl.col("anomalies").sum(), pl.col("weighted").sum())
        )
    recent = _recent_days(cal, now, cfg.recent_sessions)
    t_days = _timeliness(bars, period, recent, tf, cal, cfg)
    c_days = _consistency(store, symbols, tfs, start, end, period)
    scored = score_days(
        comps.days,
        quarantined=q_days,
        anomalous=a_days.select(*keys, "anomalies", "weighted"),
        timeliness=t_days,
        consistency=c_days,
        weights=cfg.weights,
    )
    summaries = summarize_many(scored)
    if save and scored.height:
        store.replace_scores(tfs, scored.with_columns(timeframe=pl.lit(tfs), computed_at=pl.lit(now)))
    scored_by = {k[0]: v for k, v in scored.partition_by("symbol", as_dict=True, include_key=False).items()}
    findings_by = {k[0]: v for k, v in findings.partition_by("symbol", as_dict=True).items()}
    prices = bars.select("symbol", "ts", "open", "high", "low", "close", "volume")
    prices_by = {k[0]: v for k, v in prices.partition_by("symbol", as_dict=True, include_key=False).items()}

    no_findings, no_scores, no_prices = findings.clear(), scored.clear().drop("symbol"), prices.clear().drop("symbol")
    out: list[SeriesQuality] = []
    for sym in symbols:
        summary = summaries.get(sym) or EMPTY_SUMMARY.copy()
        if summary["score"] is not None:
            QUALITY_SCORE.labels(sym, tfs).set(summary["score"])
        if summary["completeness"] is not None:
            COMPLETENESS.labels(sym, tfs).set(summary["completeness"])
        result = SeriesQuality(
            sym,
            tfs,
            start,
            end,
            comps[sym],
            public(findings_by.get(sym, no_findings)),  # what users read: ``timestamp``
            scored_by.get(sym, no_scores),
            summary,
            prices_by.get(sym, no_prices),
        )
        if raise_events:
            _raise_events(result)
        out.append(result)
    return out


def _recent_days(cal: ExchangeCalendar, now: datetime, n: int) -> list[Any]:
    """The last ``n`` session days that have opened by ``now``."""
    now_ns = int(now.timestamp() * 1e6) * 1000
    i = int(np.searchsorted(cal.opens, now_ns, side="right"))
    return [d.astype("datetime64[D]").item() for d in cal.days[max(0, i - n) : i]]


def _timeliness(
    bars: pl.DataFrame, period: pl.Expr, recent: list[Any], tf: Timeframe, cal: ExchangeCalendar, cfg: QualityConfig
) -> pl.DataFrame:
    """Per symbol and recent day: lag from the end of the newest bar to its fetch (at most the
    session's close), scored 0–1."""
    schema = {"symbol": pl.String(), "day": pl.Date(), "timeliness": pl.Float64()}
    if not bars.height or not recent:
        return pl.DataFrame(schema=schema)
    since = datetime.combine(recent[0], datetime.min.time(), UTC) - timedelta(days=1)
    last = (
        bars.filter(pl.col("ts") >= since)
        .with_columns(day=period)
        .filter(pl.col("day").is_in(recent))
        .group_by("symbol", "day")
        .agg(pl.col("ts").max(), pl.col("fetched_at").sort_by("ts").last())
    )
    if not last.height:
        return pl.DataFrame(schema=schema)
    closes = pl.DataFrame({"day": cal.days.astype("datetime64[D]"), "close_ns": cal.closes}).with_columns(
        pl.col("day").cast(pl.Date)
    )
    last = last.join(closes, on="day", how="left")
    close = pl.from_epoch(pl.col("close_ns"), time_unit="ns").dt.replace_time_zone("UTC").dt.cast_time_unit("us")
    # A daily bar ends at the close. A fetch after the close could not have had anything newer than
    # the close, so a day fetched later (a backfill) is judged as of the close: complete means on time.
    bar_end = pl.col("ts") + pl.duration(seconds=tf.seconds) if tf.is_intraday else close
    lag = (pl.min_horizontal(pl.col("fetched_at"), close) - bar_end).dt.total_seconds(fractional=True)
    lag = lag.clip(lower_bound=0)
    score = (1 - (lag - cfg.fresh_seconds) / (cfg.stale_seconds - cfg.fresh_seconds)).clip(0.0, 1.0)
    return last.select("symbol", "day", score.alias("timeliness"))


def _consistency(
    store: QualityStore, symbols: list[str], timeframe: str, start: datetime, end: datetime, period: pl.Expr
) -> pl.DataFrame:
    """Per symbol and day: share of the bars compared with another vendor that agree within 1 %
    (the latest comparison of each bar)."""
    schema = {"symbol": pl.String(), "day": pl.Date(), "consistency": pl.Float64()}
    rec = store.reconciliation_many(symbols, timeframe, start, end)
    compared = rec.filter(pl.col("status").is_in([MATCH, MINOR, WARN, MISMATCH]))
    if not compared.height:
        return pl.DataFrame(schema=schema)
    compared = compared.sort("created_at").unique(subset=["symbol", "ts"], keep="last")
    return compared.group_by("symbol", period.alias("day")).agg(
        consistency=pl.col("status").is_in([MATCH, MINOR]).mean().cast(pl.Float64)
    )


def _raise_events(result: SeriesQuality) -> None:
    comp = result.completeness
    if comp.gap:
        events.emit(
            events.MISSING_DATA,
            "warning",
            f"{result.symbol} {result.timeframe}: {comp.gap} expected bars never fetched "
            f"({len(comp.gaps())} ranges); `marketpipe repair` fetches them",
            symbol=result.symbol,
            timeframe=result.timeframe,
            gap_bars=comp.gap,
            ranges=[(s.isoformat(), e.isoformat()) for s, e in comp.gaps()[:20]],
        )
    high = result.findings.filter(pl.col("severity") == "high")
    if high.height:
        events.emit(
            events.OUTLIER,
            "warning",
            f"{result.symbol} {result.timeframe}: {high.height} high-severity anomalies",
            symbol=result.symbol,
            timeframe=result.timeframe,
            count=high.height,
            sample=[
                {"ts": ts.isoformat(), "kind": k, "detail": d}
                for ts, k, d in high.select("timestamp", "kind", "detail").head(OUTLIER_EVENT_SAMPLE).iter_rows()
            ],
        )
