"""The ActionStore contract on both engines (``store`` from tests/store/conftest.py): actions as
received, a correction is a new version (never an
edit), the same answer twice is stored once, point-in-time reads, the ledger and the quarantine."""

from __future__ import annotations

from datetime import UTC, date, datetime

import polars as pl

from marketpipe.core.schema import actions_frame
from marketpipe.core.tables import ACTION_QUARANTINE_SCHEMA, ACTION_RECONCILE_SCHEMA, QUARANTINE_SCHEMA
from marketpipe.sim.data import SimMarket
from marketpipe.store.base import ActionCoverage, ActionStore, AdjustFingerprintStore, IngestRecord, PageWrite, Store
from marketpipe.store.duckdb import DuckDBStore

T0 = datetime(2026, 1, 5, tzinfo=UTC)
T1 = datetime(2026, 2, 5, tzinfo=UTC)


def split(ratio: float = 4.0, fetched: datetime = T0) -> dict[str, object]:
    return {"action_id": "alpaca:s1", "provider": "alpaca", "source": "sim:alpaca", "vendor_id": "s1",
            "type": "forward_split", "symbol": "AAPL", "ex_date": "2020-08-31", "process_date": "2020-08-31",
            "old_rate": 1.0, "new_rate": ratio, "fetched_at": fetched, "raw": "{}"}  # fmt: skip


def dividend(amount: float = 0.205, fetched: datetime = T0) -> dict[str, object]:
    return {"action_id": "alpaca:d1", "provider": "alpaca", "source": "sim:alpaca", "vendor_id": "d1",
            "type": "cash_dividend", "symbol": "AAPL", "ex_date": "2020-11-06", "process_date": "2020-11-13",
            "cash_amount": amount, "currency": "USD", "fetched_at": fetched, "raw": "{}"}  # fmt: skip


def test_the_store_is_an_action_store(store: Store) -> None:
    assert isinstance(store, ActionStore) and isinstance(store, Store)


def test_versions_and_idempotence(store: Store) -> None:
    cov = ActionCoverage("AAPL", "alpaca", "sim:alpaca", date(2020, 1, 1), date(2020, 12, 31), 2, "r1", T0)
    assert store.write_actions(actions_frame([split(), dividend()]), [cov]) == 2
    assert store.write_actions(actions_frame([split(fetched=T1), dividend(fetched=T1)]), []) == 0  # same content
    # the vendor corrects the split's ratio: a second version, the first is kept
    assert store.write_actions(actions_frame([split(5.0, T1)]), []) == 1
    newest = store.read_actions(["AAPL"], date(2020, 1, 1), date(2020, 12, 31))
    assert newest.select("action_id", "version", "new_rate", "cash_amount").rows() == [
        ("alpaca:s1", 2, 5.0, None),
        ("alpaca:d1", 1, None, 0.205),
    ]
    every = store.read_actions(["AAPL"], date(2020, 1, 1), date(2020, 12, 31), all_versions=True)
    assert every.filter(pl.col("action_id") == "alpaca:s1")["new_rate"].to_list() == [4.0, 5.0]
    assert every["stored_at"].is_not_null().all() and every["content_hash"].n_unique() == 3
    assert store.action_coverage(["AAPL"], date(2020, 6, 1), date(2020, 6, 2))["rows"].to_list() == [2]
    assert store.action_coverage(["AAPL"], date(2021, 1, 1), date(2021, 6, 2)).height == 0


def test_filters_and_point_in_time(store: Store) -> None:
    store.write_actions(actions_frame([split(), dividend()]), [])
    window = (["AAPL"], date(2020, 1, 1), date(2020, 12, 31))
    assert store.read_actions(*window, types=["cash_dividend"])["action_id"].to_list() == ["alpaca:d1"]
    assert store.read_actions(*window, providers=["polygon"]).height == 0
    assert store.read_actions(["AAPL"], date(2020, 9, 1), date(2020, 12, 31))["action_id"].to_list() == ["alpaca:d1"]
    # known on 2020-09-15: the split (ex 2020-08-31), not yet the dividend (ex 2020-11-06)
    assert store.read_actions(*window, known_by=date(2020, 9, 15))["action_id"].to_list() == ["alpaca:s1"]
    assert store.read_actions(*window, known_by=date(2020, 8, 30)).height == 0


def test_quarantine_is_kept_once(store: Store) -> None:
    bad = (
        actions_frame([split(-1.0)])
        .with_columns(pl.lit("ratio <= 0").alias("reason"), pl.lit(T0).alias("quarantined_at"))
        .cast(ACTION_QUARANTINE_SCHEMA)
    )  # type: ignore[arg-type]
    store.write_actions(actions_frame([]), [], bad)
    store.write_actions(actions_frame([]), [], bad)
    q = store.action_quarantine("AAPL")
    assert q.select("action_id", "reason").rows() == [("alpaca:s1", "ratio <= 0")]
    assert store.read_actions(["AAPL"], date(2020, 1, 1), date(2020, 12, 31)).height == 0


def test_a_correction_read_back_whole_with_every_column(store: Store) -> None:
    """What is written is read back exactly (types included), on either engine."""
    frame = actions_frame([split(), dividend()])
    store.write_actions(frame, [])
    back = store.read_actions(["AAPL"], date(2020, 1, 1), date(2020, 12, 31))
    assert back.select(frame.columns).sort("action_id").equals(frame.sort("action_id"))
    rows = pl.DataFrame(
        [{"symbol": "AAPL", "family": "split", "reference": "alpaca", "other": "yahoo", "status": "different_ratio",
          "reference_date": date(2020, 8, 31), "other_date": date(2020, 8, 31), "reference_value": 4.0,
          "other_value": 2.0, "reference_id": "alpaca:s1", "other_id": "yahoo:s1"}],
        schema=ACTION_RECONCILE_SCHEMA,
    )  # fmt: skip
    assert store.write_action_reconciliation("run1", T0, rows) == 1
    assert store.write_action_reconciliation("run2", T1, rows) == 1  # runs are kept side by side
    got = store.action_reconciliation("AAPL")
    assert got["run_id"].to_list() == ["run1", "run2"] and got.drop("run_id", "created_at").row(0) == rows.row(0)
    assert store.action_reconciliation("AAPL", run_id="run2").height == 1


def test_adjust_fingerprint_changes_with_every_write_it_covers(store: Store) -> None:
    """What ``Actions.plan`` checks before reusing a factor table: any new action version, ledger entry or
    1Day bar in a window it names changes it; writing the same answer again, or other bars, does not."""
    assert isinstance(store, AdjustFingerprintStore)
    market = SimMarket()
    lo, hi = datetime(2020, 11, 1, tzinfo=UTC), datetime(2020, 11, 10, tzinfo=UTC)
    window = [("AAPL", lo, hi)]
    assert store.adjust_fingerprint([], []) == ((), ())
    empty = store.adjust_fingerprint(["AAPL"], window)
    counted = not isinstance(store, DuckDBStore)  # DuckDB marks its opening and write generations instead
    if counted:
        assert len(empty[0]) == 4 and len(empty[1]) == 2 and empty[0][0] == 0 and empty[1][0] == 0

    def page(tf: str, start: datetime, end: datetime) -> PageWrite:
        bars = market.canonical_bars("AAPL", tf, start, end, fetched_at=T1)
        ing = IngestRecord("alpaca", "sim:alpaca", "sip", "bars", tf, ["AAPL"], start, end, "r", 1, T1, bars.height)
        return PageWrite(bars, pl.DataFrame(schema=QUARANTINE_SCHEMA), [], ing)

    seen = [empty]
    for write in (
        lambda: store.write_actions(actions_frame([split()]), []),
        lambda: store.write_actions(actions_frame([split(5.0, T1)]), []),  # a correction: a new version
        lambda: store.write_actions(
            actions_frame([]),
            [ActionCoverage("AAPL", "alpaca", "sim:alpaca", date(2020, 1, 1), date(2020, 12, 31), 1, "r2", T1)],
        ),
        lambda: store.write_pages([page("1Day", lo, hi)]),
    ):
        write()
        now = store.adjust_fingerprint(["AAPL"], window)
        assert now != seen[-1]
        seen.append(now)
    store.write_actions(actions_frame([split(5.0, T1)]), [])  # the same answer again: nothing stored
    store.write_pages([page("1Day", lo, hi)])  # bars already held: skipped
    store.write_pages([page("1Min", datetime(2020, 11, 2, 14, tzinfo=UTC), datetime(2020, 11, 2, 15, tzinfo=UTC))])
    assert store.adjust_fingerprint(["AAPL"], window) == seen[-1]
    assert store.adjust_fingerprint(["AAPL"], []) == (seen[-1][0], ())
    assert store.adjust_fingerprint([], window) == ((), seen[-1][1])
    # daily bars outside the window: not counted where the store counts in windows; DuckDB's mark of AAPL's
    # daily bars moves (a factor table made again, never a stale one kept)
    store.write_pages([page("1Day", datetime(2020, 12, 1, tzinfo=UTC), datetime(2020, 12, 5, tzinfo=UTC))])
    assert (store.adjust_fingerprint(["AAPL"], window) == seen[-1]) is counted
    assert store.adjust_fingerprint(["AAPL"], [])[0] == seen[-1][0]
    if counted:
        assert store.adjust_fingerprint(["NVDA"], [("NVDA", lo, hi)])[0][0] == 0
