"""The DuckDB store's L1 of bar reads (``store/hot.py``): a read asked again is answered from memory
until a bar write to the file, through any store object of this process, and never changes under a
caller that labels its frame."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest

from marketpipe.core import metrics
from marketpipe.core.errors import StoreError
from marketpipe.core.schema import actions_frame
from marketpipe.store.base import ActionCoverage
from marketpipe.store.duckdb import DuckDBStore
from marketpipe.store.hot import TIER
from tests.store.test_duckdb import T0, bars, page

END = T0 + timedelta(hours=1)


def hits() -> float:
    return metrics.CACHE_REQUESTS.labels(TIER, "bars", "hit")._value.get()


def test_a_repeated_read_is_answered_from_memory_until_a_write(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    store.write_pages([page(bars(30))])
    first = store.read_bars(["AAPL"], "1Min", T0, END)
    before = hits()
    again = store.read_bars(["AAPL"], "1Min", T0, END)
    assert hits() == before + 1 and again.equals(first) and again.height == 30
    # a write (here: ten later bars) is seen by the next read
    newer = bars(40, close=10.75).with_columns(pl.col("fetched_at") + timedelta(seconds=1))
    store.write_pages([page(newer.slice(30))])
    after = store.read_bars(["AAPL"], "1Min", T0, END)
    assert hits() == before + 1
    assert after.height == 40 and after["close"][35] == 10.75
    store.close()


def test_a_write_through_another_store_object_on_the_same_file_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    reader = DuckDBStore(path)
    writer = DuckDBStore(str(tmp_path / "." / "s.duckdb"))  # another spelling of the same file
    writer.write_pages([page(bars(10))])
    assert reader.read_bars(["AAPL"], "1Min", T0, END).height == 10
    writer.write_pages([page(bars(20))])
    assert reader.read_bars(["AAPL"], "1Min", T0, END).height == 20
    writer.close()
    reader.close()


def test_a_label_set_on_an_answer_is_not_kept(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    store.write_pages([page(bars(5))])
    one = store.read_bars(["AAPL"], "1Min", T0, END)
    one.marketpipe_label = "mine"  # type: ignore[attr-defined]  # what service.data does to adjusted frames
    two = store.read_bars(["AAPL"], "1Min", T0, END)
    assert not hasattr(two, "marketpipe_label") and two.equals(one)
    store.close()


def test_each_distinct_read_is_its_own_answer(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    store.write_pages([page(bars(30))])
    whole = store.read_bars(["AAPL"], "1Min", T0, END)
    part = store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(minutes=10))
    paged = store.read_bars(["AAPL"], "1Min", T0, END, limit=5, desc=True)
    scaled = store.read_bars_scaled("AAPL", "1Min", T0, END, [(T0 + timedelta(minutes=10), 0.5, 2.0)])
    assert (whole.height, part.height, paged.height) == (30, 10, 5)
    assert paged["ts"][0] == T0 + timedelta(minutes=29)
    assert scaled["close"][0] == 5.25 and scaled["close"][10] == 10.5 and scaled["volume"][3] == 6
    # and asked again, each the same
    assert store.read_bars(["AAPL"], "1Min", T0, T0 + timedelta(minutes=10)).equals(part)
    again = store.read_bars_scaled("AAPL", "1Min", T0, END, [(T0 + timedelta(minutes=10), 0.5, 2.0)])
    assert again.equals(scaled)
    store.close()


def test_a_failed_write_still_drops_what_was_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    store.write_pages([page(bars(5))])
    store.read_bars(["AAPL"], "1Min", T0, END)
    gen = store._hot.generation()

    def broken(*a: object, **k: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(store, "_write_side_tables", broken)
    with pytest.raises(StoreError):
        store.write_pages([page(bars(8))])
    assert store._hot.generation() == gen + 1
    assert store.read_bars(["AAPL"], "1Min", T0, END).height == 5  # rolled back, read again
    store.close()


def test_off_and_oversize_are_never_kept(tmp_path: Path) -> None:
    off = DuckDBStore(tmp_path / "off.duckdb", read_cache_bytes=0)
    off.write_pages([page(bars(5))])
    before = hits()
    off.read_bars(["AAPL"], "1Min", T0, END)
    off.read_bars(["AAPL"], "1Min", T0, END)
    assert hits() == before
    off.close()
    tiny = DuckDBStore(tmp_path / "tiny.duckdb", read_cache_bytes=1024)  # an answer > a quarter of it
    tiny.write_pages([page(bars(60))])
    tiny.read_bars(["AAPL"], "1Min", T0, END)
    tiny.read_bars(["AAPL"], "1Min", T0, END)
    assert hits() == before
    tiny.close()


def test_the_ledgers_are_kept_until_a_write_to_them(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    store.write_pages([page(bars(5), cover=(T0, T0 + timedelta(minutes=5)))])
    assert store.coverage(["AAPL"], "1Min", T0, END).height == 1
    store.write_pages([page(bars(10).slice(5), cover=(T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)))])
    assert store.coverage(["AAPL"], "1Min", T0, END).height == 2
    assert store.action_coverage(["AAPL"], date(2024, 1, 1), date(2024, 12, 31)).height == 0
    entry = ActionCoverage("AAPL", "alpaca", "sim:alpaca", date(2024, 1, 1), date(2024, 12, 31), 0, "r", T0)
    store.write_actions(actions_frame([]), [entry])
    assert store.action_coverage(["AAPL"], date(2024, 1, 1), date(2024, 12, 31)).height == 1
    store.close()
