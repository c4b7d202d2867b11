"""Rendering of quality reports to HTML and PNG, from synthetic frames (this only draws what it is given)."""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from marketpipe.quality.report import (
    ANOMALIES_SCHEMA,
    DAYS_SCHEMA,
    GAPS_SCHEMA,
    MAX_ANOMALY_ROWS,
    PRICES_SCHEMA,
    QualityReport,
    SeriesReport,
    downsample_minmax,
    render_html,
    render_png,
    safe_filename,
)

GENERATED = datetime(2024, 4, 2, 21, 0, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SESSION_OPEN = timedelta(hours=13, minutes=30)  # 09:30 New York in summer time, close enough for drawing


def _utc(us: np.ndarray) -> pl.Series:
    return pl.Series("ts", us, dtype=pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _day_us(d: date) -> int:
    return (d - date(1970, 1, 1)).days * 86_400_000_000


def sessions(start: date, n: int, holidays: tuple[date, ...] = ()) -> list[date]:
    out: list[date] = []
    d = start
    while len(out) < n:
        if d.weekday() < 5 and d not in holidays:
            out.append(d)
        d += timedelta(days=1)
    return out


def make_series(
    symbol: str = "AAPL",
    *,
    timeframe: str = "1Min",
    n_days: int = 5,
    bars_per_day: int = 390,
    n_anomalies: int = 6,
    n_gaps: int = 3,
    score: float = 0.873,
    consistency: float | None = 0.95,
    start: date = date(2024, 3, 4),
    seed: int = 7,
) -> SeriesReport:
    rng = np.random.default_rng(seed)
    days = sessions(start, n_days, holidays=(date(2024, 3, 29),))
    step_us = 60_000_000 if timeframe.endswith("Min") else 86_400_000_000
    per_day = bars_per_day if timeframe.endswith("Min") else 1
    offset_us = int(SESSION_OPEN.total_seconds() * 1_000_000) if timeframe.endswith("Min") else 0
    ts_us = np.concatenate([_day_us(d) + offset_us + np.arange(per_day) * step_us for d in days]).astype(np.int64)
    n = ts_us.size
    close = 100.0 + np.cumsum(rng.normal(0, 0.05, n))
    prices = pl.DataFrame(
        {
            "ts": _utc(ts_us),
            "open": close,
            "high": close + 0.03,
            "low": close - 0.03,
            "close": close,
            "volume": rng.integers(100, 10_000, n),
        },
        schema=PRICES_SCHEMA,
    )
    completeness = np.clip(1.0 - rng.exponential(0.03, len(days)), 0, 1)
    if len(days) > 3:
        completeness[2] = 0.41  # one bad day to find among the worst
    validity = np.clip(1.0 - rng.exponential(0.01, len(days)), 0, 1)
    day_scores = 0.4 * validity + 0.3 * completeness + 0.2 + 0.1 * (consistency or 1.0)
    expected = np.full(len(days), per_day)
    present = np.round(expected * completeness).astype(np.int64)
    gap = (expected - present) // 2
    days_frame = pl.DataFrame(
        {
            "day": days,
            "expected": expected,
            "present": present,
            "confirmed_empty": expected - present - gap,
            "gap": gap,
            "quarantined": rng.integers(0, 3, len(days)),
            "anomalies": rng.integers(0, 4, len(days)),
            "completeness": completeness,
            "validity": validity,
            "timeliness": np.ones(len(days)),
            "consistency": [consistency] * len(days),
            "score": day_scores,
        },
        schema=DAYS_SCHEMA,
    )
    picks = np.sort(rng.choice(n, size=min(n_anomalies, n), replace=False))
    severities = ["low", "medium", "high"]
    anomalies = pl.DataFrame(
        {
            "ts": _utc(ts_us[picks]),
            "kind": ["return_zscore" if i % 2 else "frozen_price" for i in range(picks.size)],
            "severity": [severities[i % 3] for i in range(picks.size)],
            "value": rng.normal(6, 1, picks.size),
            "detail": [f"finding-{i}: |r| / sigma above threshold" for i in range(picks.size)],
        },
        schema=ANOMALIES_SCHEMA,
    )
    gap_starts = ts_us[np.linspace(0, n - 1, n_gaps, dtype=np.int64)] if n_gaps else np.array([], dtype=np.int64)
    gaps = pl.DataFrame(
        {
            "kind": ["gap" if i % 2 == 0 else "confirmed_empty" for i in range(n_gaps)],
            "start": _utc(gap_starts),
            "end": _utc(gap_starts + 5 * step_us),
            "bars": [5] * n_gaps,
        },
        schema=GAPS_SCHEMA,
    )
    summary: dict[str, Any] = {
        "score": score,
        "completeness": float(completeness.mean()),
        "validity": float(validity.mean()),
        "timeliness": 1.0,
        "consistency": consistency,
        "expected": int(expected.sum()),
        "present": int(present.sum()),
        "confirmed_empty": int((expected - present - gap).sum()),
        "gap": int(gap.sum()),
        "quarantined": 4,
        "anomalies": int(picks.size),
        "anomalies_by_severity": {s: severities[: picks.size].count(s) for s in severities},
    }
    return SeriesReport(
        symbol=symbol,
        timeframe=timeframe,
        start=datetime.combine(days[0], datetime.min.time(), UTC),
        end=datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), UTC),
        summary=summary,
        days=days_frame,
        prices=prices,
        anomalies=anomalies,
        gaps=gaps,
    )


def empty_series(symbol: str = "EMPTY", timeframe: str = "1Min", *, typed: bool = True) -> SeriesReport:
    def frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
        return pl.DataFrame(schema=schema) if typed else pl.DataFrame()

    return SeriesReport(
        symbol=symbol,
        timeframe=timeframe,
        start=datetime(2024, 3, 4, tzinfo=UTC),
        end=datetime(2024, 3, 9, tzinfo=UTC),
        summary={"score": None, "completeness": None, "validity": None, "timeliness": None, "consistency": None},
        days=frame(DAYS_SCHEMA),
        prices=frame(PRICES_SCHEMA),
        anomalies=frame(ANOMALIES_SCHEMA),
        gaps=frame(GAPS_SCHEMA),
    )


def report_of(*series: SeriesReport, title: str = "Data quality") -> QualityReport:
    return QualityReport(title=title, generated_at=GENERATED, calendar="XNYS", series=list(series))


def assert_self_contained(text: str) -> None:
    lowered = text.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", lowered)
    assert "<script" not in lowered
    assert "<link" not in lowered
    assert "@import" not in lowered
    assert not re.search(r"""url\(\s*["']?(?!#)""", lowered), "only in-document url(#id) references"
    assert "http://" not in lowered.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', ""
    )


def test_html_is_self_contained_with_summary_charts_and_tables(tmp_path: Path) -> None:
    series = make_series("AAPL", n_anomalies=6, n_gaps=3)
    out = render_html(report_of(series), tmp_path / "sub" / "report.html")
    assert out == tmp_path / "sub" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert_self_contained(text)
    assert "AAPL" in text and "1Min" in text
    assert "0.873" in text  # the score
    assert text.count("<svg") == 3  # price, completeness, score
    assert "no data" not in text
    for detail in series.anomalies["detail"]:
        assert detail in text
    assert text.count("<tr>") >= 1 + 5 + 1 + 6 + 1 + 3  # header + rows of worst days, anomalies, gaps
    assert "confirmed empty" in text and "0.410" in text  # the bad day in the worst-days table
    assert "truncated" not in text
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_html_embeds_png_on_request(tmp_path: Path) -> None:
    text = render_html(report_of(make_series(n_days=2)), tmp_path / "r.html", image_format="png").read_text()
    assert text.count("data:image/png;base64,") == 3
    assert "<svg" not in text
    assert_self_contained(text)
    with pytest.raises(ValueError, match="image_format"):
        render_html(report_of(make_series(n_days=1)), tmp_path / "x.html", image_format="gif")  # type: ignore[arg-type]


def test_user_text_is_escaped(tmp_path: Path) -> None:
    series = make_series("<X>&$y$", n_days=2, n_anomalies=2)
    series.anomalies = series.anomalies.with_columns(
        pl.lit("<script>alert(1)</script>").alias("detail"),
        pl.Series(["$\\frac{$", "_x"]).alias("severity"),  # not mathtext, not a hidden legend entry
    )
    series.summary["anomalies_by_severity"] = {"<b>odd</b>": 1}
    text = render_html(report_of(series, title="<i>t</i>"), tmp_path / "r.html").read_text()
    assert "<X>" not in text
    assert "&lt;X&gt;&amp;$y$" in text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>odd</b>" not in text and "<i>t</i>" not in text
    assert text.count("<svg") == 3


@pytest.mark.parametrize("typed", [True, False])
def test_series_without_data_says_no_data(tmp_path: Path, typed: bool) -> None:
    text = render_html(report_of(empty_series(typed=typed)), tmp_path / "r.html").read_text()
    assert text.count('class="nodata"') >= 3
    assert "no data" in text
    assert "<svg" not in text
    assert "n/a" in text
    assert "No anomalies." in text and "No missing ranges." in text
    assert_self_contained(text)


def test_report_without_series(tmp_path: Path) -> None:
    text = render_html(report_of(), tmp_path / "r.html").read_text()
    assert "no data" in text
    assert render_png(report_of(), tmp_path / "png") == []


def test_single_day_and_null_consistency(tmp_path: Path) -> None:
    series = make_series("ONE", n_days=1, n_anomalies=0, n_gaps=0, consistency=None)
    text = render_html(report_of(series), tmp_path / "r.html").read_text()
    assert text.count("<svg") == 3
    assert "No anomalies." in text
    assert "n/a" in text  # consistency, in the summary and the worst-days table
    assert re.search(r"<dt>consistency</dt><dd>n/a</dd>", text)


def test_weekly_timeframe_without_day_rows(tmp_path: Path) -> None:
    series = make_series("SPY", timeframe="1Week", n_days=20)
    series.days = pl.DataFrame(schema=DAYS_SCHEMA)
    text = render_html(report_of(series), tmp_path / "r.html").read_text()
    assert text.count("<svg") == 1  # price only
    assert "no per-day rows for 1Week" in text
    paths = render_png(report_of(series), tmp_path / "png")
    assert [p.name for p in paths] == ["SPY_1Week_price.png", "SPY_1Week_completeness.png", "SPY_1Week_score.png"]


def test_tables_are_truncated_with_a_note(tmp_path: Path) -> None:
    series = make_series("MANY", n_days=2, n_anomalies=250, n_gaps=230)
    text = render_html(report_of(series), tmp_path / "r.html").read_text()
    assert f"Showing {MAX_ANOMALY_ROWS} of 250 anomalies (truncated)" in text
    assert "Showing 200 of 230 ranges (truncated)" in text
    # High severity first: every high finding precedes the first low one in the table.
    table = text.split("<h3>Anomalies</h3>", 1)[1].split("</table>", 1)[0]
    assert table.index(">high<") < table.index(">low<")


def test_png_files_per_series_with_safe_names(tmp_path: Path) -> None:
    report = report_of(make_series("BRK.B", n_days=3), make_series("BRK/B", n_days=3), empty_series("../etc"))
    paths = render_png(report, tmp_path / "png")
    names = [p.name for p in paths]
    assert names[:3] == ["BRK.B_1Min_price.png", "BRK.B_1Min_completeness.png", "BRK.B_1Min_score.png"]
    assert names[3] == "BRK_B_1Min_price.png"
    assert names[6] == "_etc_1Min_price.png"
    assert len(paths) == 9
    for p in paths:
        assert p.parent == tmp_path / "png"
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 2_000


def test_safe_filename() -> None:
    assert safe_filename("BRK.B") == "BRK.B"
    assert safe_filename("BRK/B") == "BRK_B"
    assert safe_filename("..") == "_"
    assert safe_filename("a b\\c") == "a_b_c"


def test_downsample_keeps_extremes_and_order() -> None:
    values = np.sin(np.linspace(0, 50, 1_000_000))
    values[123_457] = 9.0
    values[876_543] = -9.0
    idx = downsample_minmax(values, 4000)
    assert idx.size <= 4002
    assert np.all(np.diff(idx) > 0)
    assert {0, 999_999, 123_457, 876_543} <= set(idx.tolist())
    assert downsample_minmax(values[:10], 4000).tolist() == list(range(10))


def test_million_bars_render_quickly(tmp_path: Path) -> None:
    n = 1_000_000
    rng = np.random.default_rng(1)
    ts_us = _day_us(date(2020, 1, 2)) + np.arange(n, dtype=np.int64) * 60_000_000
    close = 100.0 + np.cumsum(rng.normal(0, 0.02, n))
    series = make_series("BIG", n_days=3, n_anomalies=3)
    series.prices = pl.DataFrame(
        {"ts": _utc(ts_us), "open": close, "high": close, "low": close, "close": close, "volume": np.ones(n, np.int64)},
        schema=PRICES_SCHEMA,
    )
    series.anomalies = series.anomalies.with_columns(_utc(ts_us[[10, 500_000, n - 1]]).alias("ts"))
    t0 = time.perf_counter()
    out = render_html(report_of(series), tmp_path / "big.html")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    assert out.stat().st_size < 3_000_000


def test_heat_map_month_labels() -> None:
    from marketpipe.quality.report import _month_ticks

    def days(d: date) -> int:
        return (d - date(1970, 1, 1)).days

    first = date(2024, 1, 30)  # a Tuesday; its week also holds February 1st
    ticks, labels = _month_ticks(days(first) - first.weekday(), days(first), 20)
    assert labels[:3] == ["Feb 2024", "Mar", "Apr"]
    assert ticks[:3] == [0.0, 4.0, 9.0]
    ticks, labels = _month_ticks(days(date(2015, 3, 2)), days(date(2015, 3, 2)), 520)
    assert len(labels) <= 14 and all(len(label) == 8 for label in labels)  # thinned: every label has its year
