"""Completeness against the exchange calendar, per symbol: which bars the calendar expects, which
are held, and — for the missing ones — whether the range was never fetched (a *gap*, to be
repaired) or fetched with nothing there (*confirmed empty*: the vendor had no trades, common on IEX
for thin symbols). The coverage ledger tells the two apart.

Everything is numpy over int64 nanosecond stamps: the expected stamps come from the calendar's
session windows, held bars are matched with ``searchsorted``, coverage with an interval lookup.

Expected bars by timeframe:

* ``N Min`` / ``N Hour``: every bucket of the New York clock (bucket start = local midnight +
  floor(time since midnight / N) × N) that holds at least one minute of the session window —
  regular hours, or 04:00–20:00 local with ``extended``. Early closes, holidays and unscheduled
  closures come from exchange-calendars.
* ``1Day``: one bar per session, stamped at local midnight.
* ``1Week``: one bar per week holding a session, stamped at that week's Monday midnight.
* ``N Month``: one bar per N-month bucket (aligned to January) holding a session, stamped at the
  bucket's first day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

from marketpipe.core.calendar import NS_PER_MIN, ContinuousCalendar, ExchangeCalendar, local_midnights_ns
from marketpipe.core.tables import DAYS_SCHEMA
from marketpipe.core.timeframe import Timeframe, Unit

PRESENT, CONFIRMED_EMPTY, GAP = 0, 1, 2

RANGES_SCHEMA: dict[str, pl.DataType] = {
    "kind": pl.String(),
    "start": pl.Datetime("us", "UTC"),
    "end": pl.Datetime("us", "UTC"),
    "bars": pl.Int64(),
}


@dataclass
class Completeness:
    symbol: str
    timeframe: str
    start: datetime
    end: datetime
    extended: bool
    expected: int
    present: int
    confirmed_empty: int
    gap: int
    extra: int  # held bars the calendar does not expect (e.g. extended-hours bars in a regular check)
    days: pl.DataFrame  # per session day (per week / month bucket for those timeframes): DAYS_SCHEMA
    ranges: pl.DataFrame  # missing stamps merged into intervals: RANGES_SCHEMA

    @property
    def ratio(self) -> float | None:
        """Share of expected bars held; None when the calendar expects none in the range."""
        return self.present / self.expected if self.expected else None

    def gaps(self) -> list[tuple[datetime, datetime]]:
        return [(s, e) for k, s, e in self.ranges.select("kind", "start", "end").iter_rows() if k == "gap"]

    def empties(self) -> list[tuple[datetime, datetime]]:
        return [(s, e) for k, s, e in self.ranges.select("kind", "start", "end").iter_rows() if k == "confirmed_empty"]


class CompletenessSet(dict[str, Completeness]):
    """Per-symbol results, plus every symbol's per-day counts in one long frame (``symbol`` + DAYS_SCHEMA)."""

    days: pl.DataFrame


def expected_stamps(
    cal: ExchangeCalendar, tf: Timeframe, start: datetime, end: datetime, *, extended: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(stamps, period)``: the bar stamps the calendar expects in ``[start, end)`` (int64 ns UTC,
    ascending) and each stamp's period day (``datetime64[D]``: the session day, or the week /
    month bucket's first day)."""
    idx, lo, hi = cal.windows(start, end, extended=extended)
    if tf.is_intraday:
        if len(idx) == 0:
            return np.empty(0, np.int64), np.empty(0, "datetime64[D]")
        first = lo + (-lo) % NS_PER_MIN  # the first whole minute inside the window
        counts = np.maximum(0, -(-(hi - first) // NS_PER_MIN))
        total = int(counts.sum())
        # the k-th minute of the whole range lies in window w at first[w] + (k - minutes before w) minutes
        minutes = np.arange(total, dtype=np.int64) * NS_PER_MIN
        minutes += np.repeat(first - (np.cumsum(counts) - counts) * NS_PER_MIN, counts)
        width = tf.seconds * 1_000_000_000
        if width == NS_PER_MIN:  # 1-minute bars: every minute is a bucket of its own
            return minutes, np.repeat(cal.days[idx], counts)
        midnight = np.repeat(cal.midnights[idx], counts)
        buckets = midnight + (minutes - midnight) // width * width
        keep = np.ones(total, dtype=bool)
        keep[1:] = buckets[1:] != buckets[:-1]
        return buckets[keep], np.repeat(cal.days[idx], counts)[keep]
    # Daily and longer: a bar stamps local midnight, so a session counts when its window meets the range;
    # on a continuous calendar the midnight opens the session, so the stamp itself must be in the range.
    if isinstance(cal, ContinuousCalendar):
        idx = idx[cal.midnights[idx] >= int(start.timestamp() * 1_000_000) * 1000]
    days = cal.days[idx]
    if tf.unit is Unit.DAY:
        return cal.midnights[idx], days
    if tf.unit is Unit.WEEK:
        weekday = (days.astype(np.int64) - 4) % 7  # 1970-01-01 was a Thursday; Monday = 0
        periods = np.unique(days - weekday.astype("timedelta64[D]"))
    else:
        months = days.astype("datetime64[M]").astype(np.int64)
        periods = np.unique((months - months % tf.amount).astype("datetime64[M]").astype("datetime64[D]"))
    return local_midnights_ns(periods, cal.tz), periods


def _in_intervals(stamps: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which stamps fall inside the union of ``[starts, ends)`` (merged, ascending, disjoint)."""
    if len(starts) == 0:
        return np.zeros(len(stamps), dtype=bool)
    j = np.searchsorted(starts, stamps, side="right") - 1
    return (j >= 0) & (stamps < ends[np.maximum(j, 0)])


def merge_intervals(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of intervals as disjoint ascending ``(starts, ends)``."""
    if len(starts) == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    run_end = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > run_end[:-1]
    group = np.cumsum(new) - 1
    out_e = np.zeros(int(group[-1]) + 1, dtype=np.int64)
    np.maximum.at(out_e, group, e)
    return s[new], out_e


def _next_local_midnight_ns(stamp_ns: int, tz: str) -> int:
    """The local midnight after the one at ``stamp_ns`` (days are 23 or 25 hours across DST)."""
    from zoneinfo import ZoneInfo

    local = datetime.fromtimestamp(stamp_ns / 1e9, UTC).astimezone(ZoneInfo(tz))
    nxt = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), ZoneInfo(tz))
    return int(nxt.timestamp()) * 1_000_000_000


def assess(
    symbol: str,
    tf: Timeframe,
    cal: ExchangeCalendar,
    start: datetime,
    end: datetime,
    bar_ts: np.ndarray,
    covered: tuple[np.ndarray, np.ndarray],
    *,
    extended: bool = False,
    expected: tuple[np.ndarray, np.ndarray] | None = None,
) -> Completeness:
    """Completeness of one symbol's series. ``bar_ts``: held bar stamps (int64 ns UTC, ascending,
    unique); ``covered``: ledger intervals ``(starts, ends)`` in int64 ns UTC (any order);
    ``expected``: precomputed :func:`expected_stamps` (shared across symbols of one request)."""
    zeros = np.zeros
    return assess_arrays(
        [symbol],
        tf,
        cal,
        start,
        end,
        zeros(len(bar_ts), np.int64),
        np.asarray(bar_ts, np.int64),
        zeros(len(covered[0]), np.int64),
        np.asarray(covered[0], np.int64),
        np.asarray(covered[1], np.int64),
        extended=extended,
        expected=expected,
    )[symbol]


def assess_frames(
    symbols: list[str],
    tf: Timeframe,
    cal: ExchangeCalendar,
    start: datetime,
    end: datetime,
    bars: pl.DataFrame,
    coverage: pl.DataFrame,
    *,
    extended: bool = False,
    expected: tuple[np.ndarray, np.ndarray] | None = None,
) -> CompletenessSet:
    """:func:`assess` for many symbols at once, from a bars frame (symbol, ts) and ledger rows
    (symbol, start, end) — one pass of array operations, not one per symbol."""
    index = {sym: i for i, sym in enumerate(symbols)}

    def codes(frame: pl.DataFrame) -> np.ndarray:
        col = frame.get_column("symbol")
        if len(symbols) == 1 and col.len() and (col == symbols[0]).all():
            return np.zeros(col.len(), dtype=np.int64)
        return col.replace_strict(index, default=-1, return_dtype=pl.Int64).to_numpy()

    bars = bars.select("symbol", "ts")
    bc, cc = codes(bars), codes(coverage)
    keep_b, keep_c = bc >= 0, cc >= 0
    return assess_arrays(
        symbols,
        tf,
        cal,
        start,
        end,
        bc[keep_b],
        ns_array(bars.get_column("ts"))[keep_b],
        cc[keep_c],
        ns_array(coverage.get_column("start"))[keep_c],
        ns_array(coverage.get_column("end"))[keep_c],
        extended=extended,
        expected=expected,
    )


def assess_arrays(
    symbols: list[str],
    tf: Timeframe,
    cal: ExchangeCalendar,
    start: datetime,
    end: datetime,
    bar_sym: np.ndarray,
    bar_ts: np.ndarray,
    cov_sym: np.ndarray,
    cov_start: np.ndarray,
    cov_end: np.ndarray,
    *,
    extended: bool = False,
    expected: tuple[np.ndarray, np.ndarray] | None = None,
) -> CompletenessSet:
    """The vectorized core: a (symbols x expected stamps) grid of present / confirmed-empty / gap."""
    stamps, period = expected if expected is not None else expected_stamps(cal, tf, start, end, extended=extended)
    n, k_sym = len(stamps), len(symbols)
    size = n * k_sym
    # Held bars onto the grid (exact stamp match); bars off the grid are "extra".
    present = np.zeros(size, dtype=bool)
    s_ns, e_ns = int(start.timestamp()) * 1_000_000_000, int(end.timestamp()) * 1_000_000_000
    in_range = (bar_ts >= s_ns) & (bar_ts < e_ns)
    extra = np.bincount(bar_sym[in_range], minlength=k_sym).astype(np.int64)
    if n and k_sym == 1 and len(bar_ts) == n and np.array_equal(bar_ts, stamps):
        present[:] = True  # one symbol holding exactly the expected stamps (the common case): no search
    elif n and len(bar_ts):
        pos = np.searchsorted(stamps, bar_ts)
        hit = (pos < n) & (stamps[np.minimum(pos, n - 1)] == bar_ts)
        present[bar_sym[hit] * n + pos[hit]] = True
    # Ledger intervals onto the grid: +1 at each interval's first stamp, -1 after its last.
    covered = np.zeros(size, dtype=bool)
    if n and len(cov_start):
        lo = np.searchsorted(stamps, cov_start, side="left")
        hi = np.searchsorted(stamps, cov_end, side="left")
        ok = hi > lo
        delta = np.zeros(size + 1, dtype=np.int64)
        np.add.at(delta, cov_sym[ok] * n + lo[ok], 1)
        np.add.at(delta, cov_sym[ok] * n + hi[ok], -1)
        covered = np.cumsum(delta[:-1]) > 0
    complete = bool(present.all())
    empty_mask = np.zeros(size, dtype=bool) if complete else covered & ~present

    if n:
        new_period = np.ones(n, dtype=bool)
        new_period[1:] = period[1:] != period[:-1]
        k = int(new_period.sum())
        bounds = np.flatnonzero(new_period)
        per = np.diff(np.append(bounds, n))
        grid_empty = empty_mask.reshape(k_sym, n)
        grid_present = present.reshape(k_sym, n)
        # Sums over each period's stamps, for every symbol at once (periods are contiguous runs).
        n_present = np.add.reduceat(grid_present, bounds, axis=1, dtype=np.int64)
        n_empty = np.add.reduceat(grid_empty, bounds, axis=1, dtype=np.int64)
        counts = {
            "present": n_present.ravel(),
            "confirmed_empty": n_empty.ravel(),
            "gap": (per - n_present - n_empty).ravel(),
        }
        days_all = pl.DataFrame(
            {
                "_sym": np.repeat(np.arange(k_sym), k),
                "day": np.tile(period[new_period], k_sym),
                "expected": np.tile(per, k_sym),
                **{name: v.astype(np.int64) for name, v in counts.items()},
            }
        ).cast({**DAYS_SCHEMA, "_sym": pl.Int64()})  # type: ignore[arg-type,dict-item]
        days_by = {
            int(key[0]): part for key, part in days_all.partition_by("_sym", as_dict=True, include_key=False).items()
        }
        long_days = days_all.select(
            pl.col("_sym").replace_strict(dict(enumerate(symbols)), return_dtype=pl.String).alias("symbol"),
            pl.exclude("_sym"),
        )
        ranges_by: dict[int, pl.DataFrame] = {}
        if not complete:
            kind = np.where(present, PRESENT, np.where(empty_mask, CONFIRMED_EMPTY, GAP)).astype(np.int8)
            tiled = (stamps, period) if k_sym == 1 else (np.tile(stamps, k_sym), np.tile(period, k_sym))
            ranges_all = _ranges(kind, *tiled, n, tf, cal.tz)
            ranges_by = {
                int(key[0]): part
                for key, part in ranges_all.partition_by("_sym", as_dict=True, include_key=False).items()
            }
        held = n_present.sum(axis=1)
        empty = n_empty.sum(axis=1)
    else:
        days_by, ranges_by = {}, {}
        held = empty = np.zeros(k_sym, dtype=np.int64)
        long_days = pl.DataFrame(schema={"symbol": pl.String(), **DAYS_SCHEMA})
    out = CompletenessSet()
    out.days = long_days
    no_days, no_ranges = pl.DataFrame(schema=DAYS_SCHEMA), pl.DataFrame(schema=RANGES_SCHEMA)
    for i, sym in enumerate(symbols):
        out[sym] = Completeness(
            symbol=sym,
            timeframe=str(tf),
            start=start,
            end=end,
            extended=extended,
            expected=n,
            present=int(held[i]),
            confirmed_empty=int(empty[i]),
            gap=n - int(held[i]) - int(empty[i]),
            extra=int(extra[i]) - int(held[i]),
            days=days_by.get(i, no_days),
            ranges=ranges_by.get(i, no_ranges),
        )
    return out


def _ranges(kind: np.ndarray, stamps: np.ndarray, period: np.ndarray, n: int, tf: Timeframe, tz: str) -> pl.DataFrame:
    """Runs of missing stamps of one kind as ``[start, end)`` intervals, per symbol (the grid holds
    ``n`` stamps per symbol). Intraday runs stop at the session's end; daily and longer runs continue
    across weekends and holidays (nothing is expected there)."""
    schema = {**RANGES_SCHEMA, "_sym": pl.Int64()}
    missing = kind != PRESENT
    if not missing.any():
        return pl.DataFrame(schema=schema)
    brk = np.ones(len(kind), dtype=bool)
    brk[1:] = kind[1:] != kind[:-1]
    brk[::n] = True
    if tf.is_intraday:
        brk[1:] |= period[1:] != period[:-1]
    starts_i = np.flatnonzero(brk)
    ends_i = np.append(starts_i[1:], len(kind)) - 1
    sel = missing[starts_i]
    starts_i, ends_i = starts_i[sel], ends_i[sel]
    lengths = ends_i - starts_i + 1  # runs are contiguous
    last = stamps[ends_i]
    if tf.is_intraday:
        stop = last + tf.seconds * 1_000_000_000
    elif tf.unit is Unit.DAY:
        stop = np.array([_next_local_midnight_ns(int(t), tz) for t in last], dtype=np.int64)
    else:
        step = np.timedelta64(7, "D") if tf.unit is Unit.WEEK else None
        nxt = [(p + step) if step is not None else _add_months(p, tf.amount) for p in period[ends_i]]
        stop = local_midnights_ns(np.array(nxt, dtype="datetime64[D]"), tz)
    return pl.DataFrame(
        {
            "kind": np.where(kind[starts_i] == GAP, "gap", "confirmed_empty"),
            "start": stamps[starts_i] // 1000,
            "end": stop // 1000,
            "bars": lengths.astype(np.int64),
            "_sym": starts_i // n,
        }
    ).cast(schema)  # type: ignore[arg-type]


def _add_months(day: np.datetime64, n: int) -> np.datetime64:
    return (day.astype("datetime64[M]") + np.timedelta64(n, "M")).astype("datetime64[D]")


def ns_array(series: pl.Series) -> np.ndarray:
    """A UTC datetime column as int64 ns."""
    return series.dt.epoch("ns").to_numpy().astype(np.int64, copy=False)


def day_of(d: date) -> np.datetime64:
    return np.datetime64(d, "D")
