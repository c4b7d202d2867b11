"""Rendering of quality reports: one self-contained HTML file (``--html FILE``) or PNG images (``--png DIR``).

The numbers are computed elsewhere and arrive as a :class:`QualityReport`; this module only draws them.
Each chart is built once as a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot, no global state)
and then either embedded in the HTML as inline SVG (or base64 PNG) or written to a PNG file:

* price: the close as a line — min/max per bucket above :data:`MAX_PRICE_POINTS` points, so a million
  bars draw in well under a second — with anomalies marked as points coloured by severity. The x axis
  counts bars in time order, so closed hours and weekends take no room;
* completeness: a calendar heat map, one column per week and one row per weekday, coloured by the day's
  completeness; days without a session stay blank;
* score: the daily score, with completeness and validity as thinner lines.

Everything taken from the report (symbols come from users) is HTML-escaped; the file references no URL.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from marketpipe.core.errors import InvalidTimeframe
from marketpipe.core.tables import DAY_SCORE_SCHEMA, FINDINGS_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.completeness import RANGES_SCHEMA

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ANOMALIES_SCHEMA",
    "DAYS_SCHEMA",
    "GAPS_SCHEMA",
    "MAX_ANOMALY_ROWS",
    "MAX_GAP_ROWS",
    "MAX_PRICE_POINTS",
    "PRICES_SCHEMA",
    "SEVERITY_COLORS",
    "WORST_DAYS",
    "QualityReport",
    "SeriesReport",
    "build_html",
    "completeness_figure",
    "downsample_minmax",
    "price_figure",
    "render_html",
    "render_png",
    "safe_filename",
    "score_figure",
]

_UTC_US = pl.Datetime("us", "UTC")
DAYS_SCHEMA = DAY_SCORE_SCHEMA
PRICES_SCHEMA: dict[str, pl.DataType] = {
    "ts": _UTC_US,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Int64(),
}
ANOMALIES_SCHEMA: dict[str, pl.DataType] = {
    k: FINDINGS_SCHEMA[k] for k in ("ts", "kind", "severity", "value", "detail")
}
GAPS_SCHEMA = RANGES_SCHEMA

MAX_PRICE_POINTS = 4000  # above this many bars the price line is drawn from min/max per bucket
WORST_DAYS = 20
MAX_ANOMALY_ROWS = 200
MAX_GAP_ROWS = 200

SEVERITIES = ("high", "medium", "low")
SEVERITY_COLORS: dict[str, str] = {"high": "#d62728", "medium": "#ff7f0e", "low": "#e3b505"}
_OTHER_SEVERITY_COLOR = "#7f7f7f"
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
_KIND_LABELS = {"gap": "gap", "confirmed_empty": "confirmed empty"}
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_US_PER_DAY = 86_400_000_000
_LINE_COLOR = "#1f77b4"
_DPI = 110
# No metadata block: matplotlib would otherwise write creator/type URLs and a timestamp into every SVG.
_SVG_METADATA: dict[str, Any] = {"Creator": None, "Date": None, "Format": None, "Type": None}

ImageFormat = Literal["svg", "png"]


@dataclass
class SeriesReport:
    symbol: str
    timeframe: str  # e.g. "1Min", "1Day"
    start: datetime  # UTC-aware
    end: datetime
    # keys: score, completeness, validity, timeliness, consistency (float | None each), expected, present,
    # confirmed_empty, gap (ints), quarantined, anomalies (ints), anomalies_by_severity: dict[str, int]
    summary: dict[str, Any]
    days: pl.DataFrame  # one row per session day: DAYS_SCHEMA
    prices: pl.DataFrame  # PRICES_SCHEMA; may be a million rows
    anomalies: pl.DataFrame  # ANOMALIES_SCHEMA; severity is low | medium | high
    gaps: pl.DataFrame  # GAPS_SCHEMA; kind is "gap" | "confirmed_empty"


@dataclass
class QualityReport:
    title: str
    generated_at: datetime
    calendar: str
    series: list[SeriesReport]


# --------------------------------------------------------------------------------------------------
# Data preparation
# --------------------------------------------------------------------------------------------------


def _conform(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """The frame with every column of ``schema``: an empty frame (even one without columns) becomes an
    empty frame of that schema, and a missing column becomes nulls. Present columns are left as they are."""
    if frame.height == 0:
        return pl.DataFrame(schema=dict(schema))
    missing = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in schema.items() if name not in frame.columns]
    return frame.with_columns(missing) if missing else frame


def _epoch_us(series: pl.Series) -> np.ndarray:
    """Microseconds since the epoch (UTC) for a datetime column of any time unit."""
    return series.dt.epoch("us").to_numpy().astype(np.int64, copy=False)


def _is_intraday(timeframe: str, ts_us: np.ndarray) -> bool:
    try:
        return Timeframe.parse(timeframe).is_intraday
    except InvalidTimeframe:
        return ts_us.size > 1 and int(np.median(np.diff(ts_us))) < _US_PER_DAY


def downsample_minmax(values: np.ndarray, max_points: int = MAX_PRICE_POINTS) -> np.ndarray:
    """Indices of the points to draw so the line keeps its shape: all of them when there are at most
    ``max_points``, else the first, the last, and the minimum and maximum of each of ``max_points // 2``
    consecutive, equally sized buckets, in order. ``values`` must be finite."""
    n = int(values.size)
    if n <= max_points:
        return np.arange(n)
    size = -(-n // max(1, max_points // 2))
    buckets = -(-n // size)
    pad = buckets * size - n
    lows = np.concatenate([values, np.full(pad, np.inf)]).reshape(buckets, size)
    highs = np.concatenate([values, np.full(pad, -np.inf)]).reshape(buckets, size)
    base = np.arange(buckets, dtype=np.int64) * size
    picked = np.concatenate([[0, n - 1], base + lows.argmin(axis=1), base + highs.argmax(axis=1)])
    return np.unique(picked)


@dataclass
class _Prices:
    ts_us: np.ndarray  # sorted
    close: np.ndarray  # finite


def _price_arrays(prices: pl.DataFrame) -> _Prices:
    frame = _conform(prices, PRICES_SCHEMA).select("ts", "close").drop_nulls()
    ts_us = _epoch_us(frame["ts"])
    close = frame["close"].cast(pl.Float64).to_numpy()
    keep = np.isfinite(close)
    if not keep.all():
        ts_us, close = ts_us[keep], close[keep]
    if ts_us.size > 1 and not bool(np.all(ts_us[1:] >= ts_us[:-1])):
        order = np.argsort(ts_us, kind="stable")
        ts_us, close = ts_us[order], close[order]
    return _Prices(ts_us, close)


def _days(series: SeriesReport) -> pl.DataFrame:
    return _conform(series.days, DAYS_SCHEMA).drop_nulls("day").sort("day")


def _nan_array(frame: pl.DataFrame, column: str) -> np.ndarray:
    return frame[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()


# --------------------------------------------------------------------------------------------------
# Charts (one Figure per chart; the HTML and PNG outputs share them)
# --------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float, layout: Literal["constrained", "compressed"] = "constrained") -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout=layout)


def _title(fig: Figure, series: SeriesReport, what: str) -> None:
    # parse_math=False: a "$" in a user-supplied symbol must not start mathtext.
    fig.suptitle(f"{series.symbol} · {series.timeframe} — {what}", parse_math=False, fontsize=11, x=0.01, ha="left")


def _plain(text: str) -> str:
    """Text for a matplotlib label that is drawn as written: no mathtext, not hidden by a leading underscore."""
    return ("\u2009" if text.startswith("_") else "") + text.replace("$", r"\$")


def _legend_above(ax: Axes) -> None:
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=6, frameon=False, fontsize=8, borderaxespad=0.2)


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)


def price_figure(series: SeriesReport) -> Figure | None:
    """Close price with anomalies marked by severity; None when the series has no prices."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    data = _price_arrays(series.prices)
    n = int(data.ts_us.size)
    if n == 0:
        return None
    idx = downsample_minmax(data.close)
    fig = _new_figure(11.0, 3.6)
    ax = fig.add_subplot()
    _style(ax)
    per_bucket = -(-n // (MAX_PRICE_POINTS // 2))
    label = "close" if idx.size == n else f"close (min/max per {per_bucket:,} bars)"
    if n == 1:
        ax.plot([0], data.close, marker="o", color=_LINE_COLOR, label=label)
    else:
        ax.plot(idx, data.close[idx], color=_LINE_COLOR, linewidth=0.9, label=label)

    anomalies = _conform(series.anomalies, ANOMALIES_SCHEMA).drop_nulls("ts")
    if anomalies.height:
        a_us = _epoch_us(anomalies["ts"])
        inside = (a_us >= data.ts_us[0]) & (a_us <= data.ts_us[-1])
        # An anomaly sits on the bar stamped at its time, or on the last bar before it.
        pos = np.clip(np.searchsorted(data.ts_us, a_us, side="right") - 1, 0, n - 1)
        severity = anomalies["severity"].fill_null("").str.to_lowercase().to_numpy()
        groups = [*SEVERITIES, *sorted(set(severity.tolist()) - set(SEVERITIES))]
        for sev in reversed(groups):  # high severity drawn last, on top
            mask = inside & (severity == sev)
            count = int(mask.sum())
            if not count:
                continue
            ax.scatter(
                pos[mask],
                data.close[pos[mask]],
                s=22,
                color=SEVERITY_COLORS.get(sev, _OTHER_SEVERITY_COLOR),
                edgecolors="#333333",
                linewidths=0.4,
                zorder=3,
                label=_plain(f"{sev or 'unknown'} ({count:,})"),
                rasterized=count > 5000,
            )

    intraday = _is_intraday(series.timeframe, data.ts_us)
    long_span = int(data.ts_us[-1] - data.ts_us[0]) > 20 * _US_PER_DAY
    fmt = "%m-%d %H:%M" if intraday and not long_span else "%Y-%m-%d"
    ts_us = data.ts_us

    def tick(x: float, _pos: int | None) -> str:
        i = round(x)
        if i < 0 or i >= n:
            return ""
        return np.datetime64(int(ts_us[i]), "us").item().strftime(fmt)

    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(tick))
    ax.set_xlim(-0.5 if n == 1 else 0, max(n - 1, 0.5))
    ax.set_xlabel("bars in time order (UTC; closed hours take no room)", fontsize=8)
    ax.set_ylabel("close", fontsize=9)
    _legend_above(ax)
    _title(fig, series, f"close, {n:,} bars")
    return fig


def _month_ticks(first_monday: int, first_day: int, n_weeks: int) -> tuple[list[float], list[str]]:
    """Month labels for the heat map's week columns (arguments in days since the epoch): a label at the left
    edge of the column holding each month's first day (or the first column's month);
    at most one label per three columns and fourteen in all, with the year on the first label, on each
    January, and on all of them when months had to be skipped."""
    epoch = date(1970, 1, 1).toordinal()
    marks: list[tuple[int, date]] = []
    for col in range(n_weeks):
        monday = date.fromordinal(epoch + first_monday + 7 * col)
        sunday = monday + timedelta(days=6)
        if monday.day == 1 or sunday.month != monday.month:  # the week holds the 1st of a month
            marks.append((col, sunday.replace(day=1)))
        elif col == 0:
            marks.append((0, date.fromordinal(epoch + first_day).replace(day=1)))
    kept: list[tuple[int, date]] = []
    for col, month in marks:
        if kept and col - kept[-1][0] < 3:
            if len(kept) == 1:  # too close to the first column's label: the full month wins
                kept[0] = (col, month)
            continue
        kept.append((col, month))
    step = max(1, math.ceil(len(kept) / 14))
    kept = kept[::step]
    labels = [m.strftime("%b %Y" if i == 0 or m.month == 1 or step > 1 else "%b") for i, (_, m) in enumerate(kept)]
    return [float(col) for col, _ in kept], labels


def completeness_figure(series: SeriesReport) -> Figure | None:
    """Calendar heat map of daily completeness (columns = weeks, rows = weekdays); None without day rows."""
    from matplotlib.colors import Normalize

    days = _days(series)
    if days.height == 0 or days["completeness"].null_count() == days.height:
        return None
    day_n = days["day"].cast(pl.Int32).to_numpy().astype(np.int64)  # days since 1970-01-01, a Thursday
    weekday = (day_n + 3) % 7
    monday = day_n - weekday
    week = (monday - monday.min()) // 7
    n_weeks = int(week.max()) + 1
    n_rows = 7 if bool((weekday >= 5).any()) else 5
    grid = np.full((n_rows, n_weeks), np.nan)
    values = _nan_array(days, "completeness")
    keep = weekday < n_rows
    grid[weekday[keep], week[keep]] = values[keep]

    import matplotlib as mpl

    cmap = mpl.colormaps["RdYlGn"].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    width = min(11.0, max(4.0, 2.4 + 0.2 * n_weeks))
    cell = min(0.32, (width - 1.8) / n_weeks)  # inches per square day cell
    fig = _new_figure(width, max(1.8, n_rows * cell + 1.0), layout="compressed")  # compressed: square cells
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(grid), cmap=cmap, norm=Normalize(0.0, 1.0), edgecolors="white", linewidth=0.8
    )
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_yticks(np.arange(n_rows) + 0.5, _WEEKDAYS[:n_rows], fontsize=8)
    ticks, labels = _month_ticks(int(monday.min()), int(day_n.min()), n_weeks)
    ax.set_xticks(ticks, labels, fontsize=8, ha="left")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(mesh, ax=ax, shrink=1.0, pad=0.02, aspect=12).ax.tick_params(labelsize=7)
    _title(fig, series, "completeness by day")
    return fig


def score_figure(series: SeriesReport) -> Figure | None:
    """Daily score, with completeness and validity as thinner lines; None without day rows."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    days = _days(series)
    lines = [
        ("score", 2.2, _LINE_COLOR),
        ("completeness", 1.0, "#2ca02c"),
        ("validity", 1.0, "#9467bd"),
    ]
    columns = {name: _nan_array(days, name) for name, _, _ in lines}
    if days.height == 0 or all(np.isnan(v).all() for v in columns.values()):
        return None
    x = days["day"].to_numpy().astype("datetime64[D]")
    fig = _new_figure(11.0, 3.0)
    ax = fig.add_subplot()
    _style(ax)
    marker = "o" if days.height <= 31 else None
    for name, width, color in lines:
        ax.plot(x, columns[name], linewidth=width, color=color, label=name, marker=marker, markersize=3 + width)
    finite = np.concatenate([v[np.isfinite(v)] for v in columns.values()])
    # Zoom in when every value is high, but always show at least 0.9 to 1 (and a line at 0 above the axis).
    ax.set_ylim(max(-0.03, min(0.9, math.floor((float(finite.min()) - 0.02) * 20) / 20)), 1.02)
    pad = max(np.timedelta64(1, "D"), (x[-1] - x[0]) // 50)  # a single day would otherwise span years
    ax.set_xlim(x[0] - pad, x[-1] + pad)
    locator = AutoDateLocator(minticks=3, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_ylabel("0 – 1", fontsize=9)
    _legend_above(ax)
    _title(fig, series, "score by day")
    return fig


def _placeholder_figure(series: SeriesReport, what: str, message: str) -> Figure:
    fig = _new_figure(6.0, 1.6)
    fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=11, color="#666666", parse_math=False)
    _title(fig, series, what)
    return fig


@dataclass(frozen=True)
class _Chart:
    name: str  # file suffix
    heading: str
    draw: Callable[[SeriesReport], Figure | None]


CHARTS: tuple[_Chart, ...] = (
    _Chart("price", "Price and anomalies", price_figure),
    _Chart("completeness", "Completeness by day", completeness_figure),
    _Chart("score", "Score over time", score_figure),
)


def _no_data_message(series: SeriesReport, chart: _Chart) -> str:
    if chart.name == "price":
        return "no data: no price bars in this range"
    if series.days.height == 0:
        return f"no data: no per-day rows for {series.timeframe} in this range"
    return "no data: no per-day values in this range"


def _figure_bytes(fig: Figure, fmt: ImageFormat) -> bytes:
    buf = io.BytesIO()
    if fmt == "svg":
        fig.savefig(buf, format="svg", metadata=_SVG_METADATA)
    else:
        fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _discard(fig: Figure) -> None:
    fig.clear()


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ratio(value: object) -> str:
    if _is_missing(value):
        return "n/a"
    try:
        return f"{float(value):.3f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def _count(value: object) -> str:
    if _is_missing(value):
        return "n/a"
    try:
        return f"{int(value):,}"  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(value)


def _number(value: object) -> str:
    if _is_missing(value):
        return "n/a"
    try:
        return f"{float(value):.4g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def _when(value: object) -> str:
    if _is_missing(value):
        return "n/a"
    if isinstance(value, datetime):
        utc = value.astimezone(UTC) if value.tzinfo else value
        return utc.strftime("%Y-%m-%d %H:%M:%S" if utc.second else "%Y-%m-%d %H:%M") + " UTC"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _score_class(value: object) -> str:
    if _is_missing(value):
        return "na"
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "na"
    return "good" if score >= 0.95 else "warn" if score >= 0.8 else "bad"


def safe_filename(text: str) -> str:
    """``text`` reduced to letters, digits, ``.``, ``_`` and ``-`` (BRK/B -> BRK_B), never hidden or empty."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return cleaned or "_"


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #e3e3e6; --bg: #ffffff; --panel: #f7f7f9;
  --good: #1a7f37; --warn: #b26b00; --bad: #c62828; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; color: var(--fg); background: var(--bg); max-width: 1240px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 0; }
h3 { font-size: 15px; margin: 22px 0 8px; }
.meta, .range, .note { color: var(--muted); }
.note { font-size: 12px; margin: 4px 0 0; }
.legend { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px;
  margin: 16px 0 24px; font-size: 13px; }
.legend ul { margin: 6px 0 0; padding-left: 18px; }
.series { border-top: 2px solid var(--line); padding-top: 20px; margin-top: 28px; }
.series-head { display: flex; align-items: baseline; gap: 12px; flex-wrap: wrap; }
.tf { font-size: 14px; color: var(--muted); font-weight: normal; }
.summary { display: flex; gap: 28px; flex-wrap: wrap; align-items: stretch; margin: 14px 0 8px; }
.scorebox { min-width: 140px; padding: 10px 16px; border-radius: 8px; background: var(--panel);
  border: 1px solid var(--line); text-align: center; }
.scorebox .big { display: block; font-size: 40px; font-weight: 700; line-height: 1.1; }
.scorebox .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.good .big, td.good { color: var(--good); } .warn .big, td.warn { color: var(--warn); }
.bad .big, td.bad { color: var(--bad); } .na .big, td.na { color: var(--muted); }
dl.kv { display: grid; grid-template-columns: auto auto; gap: 2px 14px; margin: 0; align-content: start; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; font-variant-numeric: tabular-nums; text-align: right; }
figure.chart { margin: 14px 0; }
figure.chart figcaption { font-weight: 600; margin-bottom: 4px; }
figure.chart svg, figure.chart img { max-width: 100%; height: auto; display: block; }
.nodata { padding: 18px; border: 1px dashed var(--line); border-radius: 8px; color: var(--muted);
  background: var(--panel); }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; } td.num, th.num { text-align: right; }
.sev { display: inline-block; padding: 0 6px; border-radius: 4px; color: #fff; font-size: 11.5px; }
.kind-gap { color: var(--bad); } .kind-confirmed_empty { color: var(--muted); }
nav table { margin-top: 8px; } a { color: #0b5cad; text-decoration: none; } a:hover { text-decoration: underline; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

_LEGEND = """
<section class="legend">
<strong>How to read this report</strong>
<ul>
<li><strong>score</strong>: a weighted mean of <em>validity</em> (share of bars that pass the row checks),
<em>completeness</em> (share of the bars the exchange calendar expects that are held), <em>timeliness</em>
(how soon recent bars were fetched) and <em>consistency</em> (agreement with other sources; n/a when there
was nothing to compare). Components that are n/a are left out of the mean. All values run from 0 (worst)
to 1 (best); the weights come from the <code>quality.weights</code> configuration.</li>
<li><strong>gap</strong>: bars the calendar expects that were never fetched, or whose fetch failed — repairable by
fetching again.</li>
<li><strong>confirmed empty</strong>: the range was fetched and the vendor had no trades there (common on IEX for
thin symbols); nothing is missing that a new fetch would bring.</li>
<li><strong>quarantined</strong>: rows that failed a check and are kept apart from the good rows.
<strong>anomalies</strong>: suspicious but valid bars, coloured by severity:
<span class="sev" style="background:#e3b505">low</span>
<span class="sev" style="background:#ff7f0e">medium</span>
<span class="sev" style="background:#d62728">high</span>.</li>
</ul>
</section>
"""


def _table(headers: Iterable[tuple[str, bool]], rows: Iterable[Iterable[tuple[str, str]]]) -> str:
    """``headers``: (label, numeric); ``rows``: cells as (already escaped HTML, css class)."""
    head = "".join(f'<th class="num">{_esc(h)}</th>' if num else f"<th>{_esc(h)}</th>" for h, num in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>" for cell, cls in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(series: SeriesReport) -> str:
    s = series.summary or {}
    score = s.get("score")
    components = "".join(
        f"<dt>{name}</dt><dd>{_ratio(s.get(name))}</dd>"
        for name in ("completeness", "validity", "timeliness", "consistency")
    )
    by_sev: Mapping[str, Any] = s.get("anomalies_by_severity") or {}
    order = [*SEVERITIES, *sorted(k for k in by_sev if k not in SEVERITIES)]
    sev_text = " · ".join(f"{_esc(k)} {_count(by_sev[k])}" for k in order if k in by_sev)
    counts = [
        ("expected bars", s.get("expected")),
        ("present", s.get("present")),
        ("confirmed empty", s.get("confirmed_empty")),
        ("gap", s.get("gap")),
        ("quarantined", s.get("quarantined")),
        ("anomalies", s.get("anomalies")),
    ]
    count_html = "".join(f"<dt>{name}</dt><dd>{_count(v)}</dd>" for name, v in counts)
    if sev_text:
        count_html += f'<dt>by severity</dt><dd class="sevs">{sev_text}</dd>'
    return (
        f'<div class="summary"><div class="scorebox {_score_class(score)}"><span class="big">{_ratio(score)}</span>'
        f'<span class="label">score</span></div><dl class="kv">{components}</dl><dl class="kv">{count_html}</dl></div>'
    )


def _chart_html(series: SeriesReport, chart: _Chart, fmt: ImageFormat) -> str:
    fig = chart.draw(series)
    if fig is None:
        body = f'<div class="nodata">{_esc(_no_data_message(series, chart))}</div>'
    else:
        data = _figure_bytes(fig, fmt)
        _discard(fig)
        if fmt == "svg":
            text = data.decode("utf-8")
            body = text[text.index("<svg") :]
        else:
            alt = _esc(f"{series.symbol} {series.timeframe} {chart.heading}")
            body = f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
    return f'<figure class="chart chart-{chart.name}"><figcaption>{_esc(chart.heading)}</figcaption>{body}</figure>'


def _worst_days_html(series: SeriesReport) -> str:
    days = _days(series)
    if days.height == 0:
        return f'<p class="nodata">no data: no per-day rows for {_esc(series.timeframe)} in this range</p>'
    worst = days.sort("score", "day", nulls_last=True).head(WORST_DAYS)
    headers = [
        ("day", False),
        ("score", True),
        ("completeness", True),
        ("validity", True),
        ("timeliness", True),
        ("consistency", True),
        ("expected", True),
        ("present", True),
        ("confirmed empty", True),
        ("gap", True),
        ("quarantined", True),
        ("anomalies", True),
    ]
    rows = [
        [
            (_esc(_when(r["day"])), ""),
            (_ratio(r["score"]), f"num {_score_class(r['score'])}"),
            *((_ratio(r[c]), "num") for c in ("completeness", "validity", "timeliness", "consistency")),
            *((_count(r[c]), "num") for c in ("expected", "present", "confirmed_empty", "gap", "quarantined")),
            (_count(r["anomalies"]), "num"),
        ]
        for r in worst.iter_rows(named=True)
    ]
    note = f"{worst.height} of {days.height} days, lowest score first."
    return _table(headers, rows) + f'<p class="note">{note}</p>'


def _anomalies_html(series: SeriesReport) -> str:
    frame = _conform(series.anomalies, ANOMALIES_SCHEMA)
    total = frame.height
    if total == 0:
        return '<p class="note">No anomalies.</p>'
    shown = (
        frame.with_columns(
            pl.col("severity")
            .fill_null("")
            .str.to_lowercase()
            .replace_strict(_SEVERITY_RANK, default=len(SEVERITIES), return_dtype=pl.Int64)
            .alias("_rank")
        )
        .sort("_rank", "ts", nulls_last=True)
        .head(MAX_ANOMALY_ROWS)
    )

    def badge(sev: object) -> str:
        text = "" if sev is None else str(sev)
        color = SEVERITY_COLORS.get(text.lower(), _OTHER_SEVERITY_COLOR)
        return f'<span class="sev" style="background:{color}">{_esc(text or "unknown")}</span>'

    rows = [
        [
            (_esc(_when(r["ts"])), ""),
            (_esc(r["kind"] if r["kind"] is not None else ""), ""),
            (badge(r["severity"]), ""),
            (_number(r["value"]), "num"),
            (_esc(r["detail"] if r["detail"] is not None else ""), ""),
        ]
        for r in shown.iter_rows(named=True)
    ]
    table = _table([("time", False), ("kind", False), ("severity", False), ("value", True), ("detail", False)], rows)
    if total > shown.height:
        note = f"Showing {shown.height:,} of {total:,} anomalies (truncated), highest severity first, then by time."
    else:
        note = f"{total:,} {'anomaly' if total == 1 else 'anomalies'}, highest severity first, then by time."
    return table + f'<p class="note">{note}</p>'


def _gaps_html(series: SeriesReport) -> str:
    frame = _conform(series.gaps, GAPS_SCHEMA)
    total = frame.height
    if total == 0:
        return '<p class="note">No missing ranges.</p>'
    shown = frame.sort("start", nulls_last=True).head(MAX_GAP_ROWS)
    rows = []
    for r in shown.iter_rows(named=True):
        kind = "" if r["kind"] is None else str(r["kind"])
        rows.append(
            [
                (_esc(_KIND_LABELS.get(kind, kind)), f"kind-{safe_filename(kind)}"),
                (_esc(_when(r["start"])), ""),
                (_esc(_when(r["end"])), ""),
                (_count(r["bars"]), "num"),
            ]
        )
    table = _table([("kind", False), ("start", False), ("end", False), ("bars", True)], rows)
    n_gap = frame.filter(pl.col("kind") == "gap").height
    n_empty = frame.filter(pl.col("kind") == "confirmed_empty").height
    note = f"{_plural(n_gap, 'gap range')}, {_plural(n_empty, 'confirmed-empty range')}, by start time."
    if total > shown.height:
        note = f"Showing {shown.height:,} of {total:,} ranges (truncated). " + note
    return table + f'<p class="note">{note}</p>'


def _series_html(index: int, series: SeriesReport, fmt: ImageFormat) -> str:
    parts = [
        f'<section class="series" id="series-{index}">',
        f'<div class="series-head"><h2>{_esc(series.symbol)} <span class="tf">{_esc(series.timeframe)}</span></h2>',
        f'<span class="range">{_esc(_when(series.start))} → {_esc(_when(series.end))}</span></div>',
        _summary_html(series),
        *(_chart_html(series, chart, fmt) for chart in CHARTS),
        "<h3>Worst days</h3>",
        _worst_days_html(series),
        "<h3>Anomalies</h3>",
        _anomalies_html(series),
        "<h3>Gaps and missing ranges</h3>",
        _gaps_html(series),
        "</section>",
    ]
    return "\n".join(parts)


def _index_html(report: QualityReport) -> str:
    if len(report.series) < 2:
        return ""
    rows = [
        [
            (f'<a href="#series-{i}">{_esc(s.symbol)}</a>', ""),
            (_esc(s.timeframe), ""),
            (_ratio((s.summary or {}).get("score")), f"num {_score_class((s.summary or {}).get('score'))}"),
            (_ratio((s.summary or {}).get("completeness")), "num"),
            (_count((s.summary or {}).get("gap")), "num"),
            (_count((s.summary or {}).get("anomalies")), "num"),
        ]
        for i, s in enumerate(report.series)
    ]
    headers = [
        ("symbol", False),
        ("timeframe", False),
        ("score", True),
        ("completeness", True),
        ("gap", True),
        ("anomalies", True),
    ]
    return f"<nav>{_table(headers, rows)}</nav>"


def build_html(report: QualityReport, *, image_format: ImageFormat = "svg") -> str:
    """The report as one self-contained HTML document (inline CSS, charts inline; no URL is referenced)."""
    if image_format not in ("svg", "png"):
        raise ValueError(f"image_format must be 'svg' or 'png', got {image_format!r}")
    n = len(report.series)
    body = (
        "\n".join(_series_html(i, s, image_format) for i, s in enumerate(report.series))
        if n
        else '<p class="nodata">no data: the report holds no series.</p>'
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(report.title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>{_esc(report.title)}</h1>",
            f'<p class="meta">Generated {_esc(_when(report.generated_at))} · calendar {_esc(report.calendar)} · '
            f"{n} series</p></header>",
            _index_html(report),
            _LEGEND,
            body,
            "<footer>marketpipe quality report</footer>",
            "</body></html>",
            "",
        ]
    )


def render_html(report: QualityReport, path: Path, *, image_format: ImageFormat = "svg") -> Path:
    """Write the report to ``path`` as one self-contained HTML file and return the path.

    Charts are inline SVG by default; ``image_format="png"`` embeds them as base64 PNG instead."""
    path = Path(path)
    text = build_html(report, image_format=image_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------


def render_png(report: QualityReport, directory: Path) -> list[Path]:
    """Write ``{SYMBOL}_{timeframe}_{price,completeness,score}.png`` per series into ``directory`` and return
    the paths. Symbols are reduced to safe file names (BRK/B -> BRK_B); a chart without data is written as
    an image saying so, so every series yields the same three files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for series in report.series:
        stem = f"{safe_filename(series.symbol)}_{safe_filename(series.timeframe)}"
        base, k = stem, 2
        while stem.lower() in used:  # BRK/B and BRK_B, or a case-insensitive file system
            stem, k = f"{base}-{k}", k + 1
        used.add(stem.lower())
        for chart in CHARTS:
            fig = chart.draw(series) or _placeholder_figure(series, chart.heading, _no_data_message(series, chart))
            target = directory / f"{stem}_{chart.name}.png"
            target.write_bytes(_figure_bytes(fig, "png"))
            _discard(fig)
            written.append(target)
    return written
