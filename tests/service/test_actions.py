"""Adjust-on-read through MarketData against the three simulator faces: adjusted series equal the
vendor's own adjusted series to 1e-9 relative, raw bars stay raw in the store, every answer says what
it applied, point in time, failover, quarantine, and bad input refused before anything is read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest

import marketpipe as mp
from marketpipe.core import events
from marketpipe.core.config import config_from_dict
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import ACTION_COLUMNS
from marketpipe.core.tables import QUARANTINE_SCHEMA
from marketpipe.core.timeutil import utcnow
from marketpipe.service.actions import adjustment_of
from marketpipe.service.data import MarketData
from marketpipe.sim.actions import ActionFault
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.base import IngestRecord, PageWrite
from marketpipe.store.duckdb import DuckDBStore
from tests.service.vendors import ENV, FAST

pytestmark = pytest.mark.usefixtures("clean_vendors")


@pytest.fixture
async def md(vendors: dict[str, SimServer], tmp_path: Path) -> AsyncIterator[MarketData]:
    cfg = config_from_dict(
        {
            "store": {"path": str(tmp_path / "a.duckdb")},
            "providers": {
                "alpaca": {"base_url": vendors["alpaca"].url, "plan": "unlimited", **FAST},
                "polygon": {"base_url": vendors["polygon"].url, "plan": "unlimited", **FAST},
                "yahoo": {"base_url": vendors["yahoo"].url, "enabled": True, **FAST},
            },
        }
    )
    m = MarketData(cfg, env=ENV)
    yield m
    await m.aclose()
    vendors["alpaca"].market.actions.clear_faults()


def vendor_bars(vendors: dict[str, SimServer], symbol: str, tf: str, start: str, end: str, adj: str) -> dict:
    """What the vendor itself serves (the simulator's Alpaca face, as alpaca-py would get it)."""
    return vendors["alpaca"].market.bars_frame(symbol, tf, start, end, adjustment=adj)


@pytest.mark.parametrize(
    ("symbol", "tf", "start", "end"),
    [
        ("AAPL", "1Day", "2020-08-03", "2020-11-30"),  # the 4:1 split and the 0.205 dividend
        ("NVDA", "1Day", "2024-05-20", "2024-06-28"),  # 10:1
        ("TSLA", "1Day", "2022-08-15", "2022-09-02"),  # 3:1
        ("AAPL", "1Min", "2020-08-28", "2020-08-31"),  # minute bars across the split
    ],
)
@pytest.mark.parametrize("adjustment", ["split", "dividend", "all"])
async def test_adjusted_equals_the_vendors_adjusted(
    md: MarketData, vendors: dict[str, SimServer], symbol: str, tf: str, start: str, end: str, adjustment: str
) -> None:
    got = await md.bars(symbol, start, end, timeframe=tf, adjustment=adjustment)
    want = vendor_bars(vendors, symbol, tf, start, end + "T23:59:00Z", adjustment)
    assert got.height == len(want["t"]) > 0
    for ours, theirs in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c"), ("vwap", "vw")):
        np.testing.assert_allclose(got[ours].to_numpy(), want[theirs], rtol=1e-9, err_msg=ours)
    assert got["volume"].to_list() == want["v"].tolist()
    info = adjustment_of(got)
    assert info is not None and info.adjustment == adjustment
    assert set(info.applied["provider"]) <= {"alpaca"} and info.applied["action_id"].str.starts_with("alpaca:").all()
    # the store keeps raw bars: reading raw gives the vendor's raw series
    raw = await md.bars(symbol, start, end, timeframe=tf)
    want_raw = vendor_bars(vendors, symbol, tf, start, end + "T23:59:00Z", "raw")
    np.testing.assert_array_equal(raw["close"].to_numpy(), want_raw["c"])


async def test_what_was_applied_is_said(md: MarketData) -> None:
    got = await md.bars("AAPL", "2020-08-03", "2020-11-30", timeframe="1Day", adjustment="all")
    info = adjustment_of(got)
    assert info is not None
    split = info.applied.filter(pl.col("type") == "forward_split")
    assert split.select("ex_date", "price_factor", "volume_factor").rows() == [(date(2020, 8, 31), 0.25, 4.0)]
    div = info.applied.filter(pl.col("ex_date") == date(2020, 11, 6))
    raw = await md.bars("AAPL", "2020-11-05", "2020-11-05", timeframe="1Day")
    c_prev = raw["close"][0]
    assert div["price_factor"][0] == pytest.approx((c_prev - 0.205) / c_prev, rel=1e-12)
    assert info.applied["source"].to_list() == ["sim:alpaca"] * info.applied.height
    # every later AAPL dividend (to 2025-11-10) is applied too: a bar's factor is over all later actions
    assert info.applied.filter(pl.col("type") == "cash_dividend").height == 22
    assert "alpaca:" in info.header() and info.to_dict()["applied"][0]["ex_date"].startswith("20")


async def test_point_in_time(md: MarketData) -> None:
    before = await md.bars("AAPL", "2020-08-24", "2020-08-28", timeframe="1Day", adjustment="all", as_of="2020-08-28")
    raw = await md.bars("AAPL", "2020-08-24", "2020-08-28", timeframe="1Day")
    # on 2020-08-28 the split (ex 08-31) and the later dividends were not yet known
    assert before["close"].to_list() == raw["close"].to_list()
    assert adjustment_of(before).applied.height == 0  # type: ignore[union-attr]
    after = await md.bars("AAPL", "2020-08-24", "2020-08-28", timeframe="1Day", adjustment="split", as_of="2020-09-01")
    np.testing.assert_allclose(after["close"].to_numpy(), raw["close"].to_numpy() / 4, rtol=1e-12)
    with pytest.raises(InvalidArgument, match="future"):
        await md.bars("AAPL", "2020-08-24", "2020-08-28", timeframe="1Day", adjustment="all", as_of="2099-01-01")
    with pytest.raises(InvalidArgument, match="before the range"):
        await md.bars("AAPL", "2020-08-24", "2020-08-28", timeframe="1Day", adjustment="all", as_of="2020-08-01")


@pytest.mark.parametrize(
    ("tf", "start", "end"),
    [
        ("1Day", "2022-12-01", "2024-04-30"),  # both spin-offs: GEHC ex 2023-01-04, GEV ex 2024-04-02
        ("1Min", "2024-03-28", "2024-04-02"),  # minute bars across GEV's ex-date
    ],
)
@pytest.mark.parametrize("adjustment", ["spin-off", "all", "split,spin-off"])
async def test_spin_off_adjusted_ge_equals_the_vendors(
    md: MarketData, vendors: dict[str, SimServer], tf: str, start: str, end: str, adjustment: str
) -> None:
    """GE adjusted for its spin-offs on read (f = 1 - V_new / C_prev, V_new = new/source rate x the new
    line's raw close on the ex-date, read through the bars path like any bars) equals the simulator's
    Alpaca-adjusted GE to 1e-9 relative; the new line's closes were fetched for it."""
    got = await md.bars("GE", start, end, timeframe=tf, adjustment=adjustment)
    want = vendor_bars(vendors, "GE", tf, start, end + "T23:59:00Z", adjustment)
    assert got.height == len(want["t"]) > 0
    for ours, theirs in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c"), ("vwap", "vw")):
        np.testing.assert_allclose(got[ours].to_numpy(), want[theirs], rtol=1e-9, err_msg=ours)
    assert got["volume"].to_list() == want["v"].tolist()
    info = adjustment_of(got)
    assert info is not None and info.skipped.height == 0
    spins = info.applied.filter(pl.col("type") == "spin_off")
    assert spins["ex_date"].to_list() == [date(2023, 1, 4), date(2024, 4, 2)][2 - spins.height :] and spins.height
    raw = await md.bars("GE", start, end, timeframe=tf)
    assert (raw["close"] != got["close"]).any()  # raw bars stay raw
    gev = await md.bars("GEV", "2024-04-02", "2024-04-02", timeframe="1Day", fetch=False)
    assert gev.height == 1  # stored by the adjustment's read of the new line


async def test_spin_off_without_the_new_lines_price_is_skipped_with_its_reason(md: MarketData) -> None:
    """Offline (fetch=False) with GE's bars and actions held but not GE HealthCare's: that spin-off is left
    out and said so; GE Vernova's close is held, so its spin-off is applied."""
    await md.corporate_actions("GE", "2022-01-01", "2024-12-31")
    raw = await md.bars("GE", "2022-12-01", "2024-04-30", timeframe="1Day")
    await md.bars("GEV", "2024-04-02", "2024-04-02", timeframe="1Day")
    got = await md.bars("GE", "2022-12-01", "2024-04-30", timeframe="1Day", adjustment="all", fetch=False)
    info = adjustment_of(got)
    assert info is not None
    assert info.skipped.select("symbol", "type", "ex_date", "reason").rows() == [
        ("GE", "spin_off", date(2023, 1, 4), "no raw close of the new line GEHC on the ex-date")
    ]
    assert info.applied.select("type", "ex_date").rows() == [("spin_off", date(2024, 4, 2))]
    assert info.to_dict()["skipped"][0]["reason"].startswith("no raw close of the new line GEHC")
    # the notebook calls say the same of the frame
    assert mp.skipped(got).equals(info.skipped) and mp.applied(got).equals(info.applied)  # type: ignore[union-attr]
    assert mp.skipped(raw) is None and mp.applied(raw) is None
    day = got["ts"].dt.convert_time_zone("America/New_York").dt.date()
    ratio = (got["close"] / raw["close"]).to_numpy()
    gehc_era = (day < date(2023, 1, 4)).to_numpy()
    gev_era = ((day >= date(2023, 1, 4)) & (day < date(2024, 4, 2))).to_numpy()
    np.testing.assert_allclose(ratio[gehc_era], ratio[gev_era][0], rtol=1e-12)  # no step at GEHC's ex-date
    assert ratio[gev_era][0] < 1 and ratio[-1] == 1.0


async def test_kept_factor_tables_follow_every_write_to_what_they_came_from(
    md: MarketData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeated adjusted read reuses the factor tables (no actions read); a write by another writer on
    the same store file — a corrected dividend, a refreshed daily bar under it — is seen on the next read."""
    args = ("AAPL", "2020-10-26", "2020-11-30")
    first = await md.bars(*args, timeframe="1Day", adjustment="all")
    # that read fetched the closes under the dividends after taking its fingerprint: made again once
    await md.bars(*args, timeframe="1Day", adjustment="all")
    reads: list[object] = []
    real = md.store.read_actions
    monkeypatch.setattr(md.store, "read_actions", lambda *a, **k: reads.append(a) or real(*a, **k))
    again = await md.bars(*args, timeframe="1Day", adjustment="all", fetch=False)
    assert again.equals(first) and reads == []
    assert adjustment_of(again).applied.equals(adjustment_of(first).applied)  # type: ignore[union-attr]
    other = DuckDBStore(Path(md.config.store.path))  # another writer on the same file
    try:
        held = other.read_actions(["AAPL"], date(2020, 11, 6), date(2020, 11, 6))
        other.write_actions(held.select(ACTION_COLUMNS).with_columns(pl.lit(0.5).alias("cash_amount")), [])
        corrected = await md.bars(*args, timeframe="1Day", adjustment="all", fetch=False)
        div = adjustment_of(corrected).applied.filter(pl.col("ex_date") == date(2020, 11, 6))  # type: ignore[union-attr]
        assert div["version"].to_list() == [2] and len(reads) == 1
        raw = await md.bars(*args, timeframe="1Day")
        c_prev = raw.filter(pl.col("ts").dt.convert_time_zone("America/New_York").dt.date() == date(2020, 11, 5))
        assert div["price_factor"][0] == pytest.approx((c_prev["close"][0] - 0.5) / c_prev["close"][0], rel=1e-12)
        # a refreshed 2020-11-05 bar (a vendor revision: a newer version) moves that dividend's factor
        bar = c_prev.with_columns(pl.col("close") * 1.01, pl.col("high") * 1.01, pl.lit(utcnow()).alias("fetched_at"))
        lo, hi = bar["ts"][0], bar["ts"][0] + timedelta(days=1)
        ing = IngestRecord("alpaca", "sim:alpaca", "sip", "bars", "1Day", ["AAPL"], lo, hi, "t", 1, utcnow(), 1)
        other.write_pages([PageWrite(bar, pl.DataFrame(schema=QUARANTINE_SCHEMA), [], ing, refresh=True)])
        revised = await md.bars(*args, timeframe="1Day", adjustment="all", fetch=False)
        div2 = adjustment_of(revised).applied.filter(pl.col("ex_date") == date(2020, 11, 6))  # type: ignore[union-attr]
        c2 = bar["close"][0]
        assert div2["price_factor"][0] == pytest.approx((c2 - 0.5) / c2, rel=1e-12) != div["price_factor"][0]
    finally:
        other.close()


@pytest.mark.parametrize("bad", ["both", "", "split,split", "spinoff", "Split"])
async def test_bad_adjustment_is_refused_before_anything_is_read(md: MarketData, bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await md.bars("AAPL", "2020-08-24", "2020-08-28", timeframe="1Day", adjustment=bad)
    assert err.value.details["parameter"] == "adjustment"
    assert md.store.counts()["bars"] == 0


async def test_actions_fail_over_and_are_attributed(md: MarketData, vendors: dict[str, SimServer]) -> None:
    vendors["alpaca"].faults.add(FaultRule(kind="http_500", paths="corporate-actions"))
    acts = await md.corporate_actions(["AAPL", "NVDA"], "2020-01-01", "2024-12-31")
    assert set(acts["provider"]) == {"polygon"} and set(acts["source"]) == {"sim:polygon"}
    splits = acts.filter(pl.col("type") == "forward_split").select("symbol", "ex_date").rows()
    assert set(splits) == {("AAPL", date(2020, 8, 31)), ("NVDA", date(2024, 6, 10))}
    cov = md.store.action_coverage(["AAPL"], date(2020, 1, 1), date(2024, 12, 31))
    assert cov["provider"].to_list() == ["polygon"]
    vendors["alpaca"].faults.clear()
    again = await md.corporate_actions(["AAPL"], "2020-06-01", "2020-12-31")  # covered: nothing fetched
    assert set(again["provider"]) == {"polygon"}


async def test_corrections_are_versions_and_raise_events(md: MarketData, vendors: dict[str, SimServer]) -> None:
    seen: list[events.Event] = []
    off = events.hub.subscribe(lambda e: seen.append(e) if e.kind == events.CORPORATE_ACTION_APPLIED else None)
    try:
        await md.corporate_actions("TSLA", "2022-01-01", "2022-12-31", provider="yahoo")
        assert [e.details["action"] for e in seen] == ["forward_split"]
        vendors["yahoo"].market.actions.set_faults([ActionFault(vendor="yahoo", kind="wrong_ratio", symbol="TSLA")])
        await md.actions.ensure(["TSLA"], date(2023, 1, 1), date(2023, 1, 2), provider="yahoo")  # nothing new there
        md.store.action_coverage(["TSLA"], date(2022, 1, 1), date(2022, 12, 31))
        page = await md.router.get("yahoo").corporate_actions(["TSLA"], date(2022, 1, 1), date(2022, 12, 31))
        await md.actions._store_page(page, "yahoo")
        versions = md.store.read_actions(["TSLA"], date(2022, 1, 1), date(2022, 12, 31), all_versions=True)
        assert versions.select("version", "new_rate").rows() == [(1, 3.0), (2, 3.75)]
        assert seen[-1].details["version"] == 2
    finally:
        off()


async def test_impossible_dividend_is_quarantined_not_applied(md: MarketData, vendors: dict[str, SimServer]) -> None:
    """A vendor lists a dividend larger than the previous close: kept with its reason, never applied."""
    from marketpipe.core.schema import actions_frame
    from marketpipe.core.timeutil import utcnow
    from marketpipe.store.base import ActionCoverage

    base = {"provider": "alpaca", "source": "sim:alpaca", "symbol": "MSFT"}
    bogus = {**base, "action_id": "alpaca:bogus", "vendor_id": "bogus", "type": "cash_dividend",
             "ex_date": "2024-03-05", "cash_amount": 10_000.0, "process_date": "2024-03-12"}  # fmt: skip
    negative = {**base, "action_id": "alpaca:neg", "vendor_id": "neg", "type": "forward_split",
                "ex_date": "2024-03-06", "old_rate": 1.0, "new_rate": -2.0, "process_date": "2024-03-06"}  # fmt: skip
    # as if Alpaca had answered them for the window (a ledger entry): asked again, it would not list them (withdrawn)
    ledger = ActionCoverage("MSFT", "alpaca", "sim:alpaca", date(2024, 3, 1), date(2024, 3, 20), 2, "t", utcnow())
    md.store.write_actions(actions_frame([bogus, negative]), [ledger])
    got = await md.bars("MSFT", "2024-03-01", "2024-03-08", timeframe="1Day", adjustment="all", as_of="2024-03-20")
    raw = await md.bars("MSFT", "2024-03-01", "2024-03-08", timeframe="1Day")
    assert got["close"].to_list() == raw["close"].to_list()
    info = adjustment_of(got)
    assert info is not None and sorted(info.skipped.select("action_id", "reason").rows()) == [
        ("alpaca:bogus", "dividend >= previous close"),
        ("alpaca:neg", "split ratio <= 0"),
    ]
    assert md.store.action_quarantine("MSFT").select("action_id", "reason").rows() == [
        ("alpaca:bogus", "dividend >= previous close")
    ]


async def test_the_readme_worked_example(md: MarketData) -> None:
    """README, "Adjusted prices": the numbers shown there, word for word."""
    args = ("AAPL", "2020-08-27", "2020-09-01")
    raw = await md.bars(*args, timeframe="1Day")
    split = await md.bars(*args, timeframe="1Day", adjustment="split")
    adj = await md.bars(*args, timeframe="1Day", adjustment="all")
    then = await md.bars(*args, timeframe="1Day", adjustment="all", as_of="2020-08-31")
    assert raw["close"].to_list() == [817.66, 814.61, 203.76, 203.21]
    assert split["close"].round(4).to_list() == [204.415, 203.6525, 203.76, 203.21]
    assert adj["close"].round(4).to_list() == [200.1466, 199.4, 199.5052, 198.9667]
    assert then["close"].round(4).to_list() == split["close"].round(4).to_list()
    assert raw["volume"].to_list() == [522489, 528738, 536049, 511346]
    assert split["volume"].to_list() == [2089956, 2114952, 536049, 511346]
    applied = adjustment_of(adj).applied  # type: ignore[union-attr]
    assert applied.height == 22 and applied.filter(pl.col("type") == "cash_dividend").height == 21
    assert applied.head(4).select("type", "ex_date", pl.col("price_factor").round(6)).rows() == [
        ("forward_split", date(2020, 8, 31), 0.25),
        ("cash_dividend", date(2020, 11, 6), 0.998981),
        ("cash_dividend", date(2021, 2, 5), 0.999024),
        ("cash_dividend", date(2021, 5, 7), 0.998641),
    ]
    nov5 = await md.bars("AAPL", "2020-11-05", "2020-11-05", timeframe="1Day")
    assert nov5["close"][0] == 201.13
    acts = await md.corporate_actions("AAPL", "2020-08-01", "2020-11-30")
    assert acts.select("type", "ex_date", "process_date", "new_rate", "cash_amount").rows() == [
        ("cash_dividend", date(2020, 8, 7), date(2020, 8, 14), None, 0.82),
        ("forward_split", date(2020, 8, 31), date(2020, 8, 31), 4.0, None),
        ("cash_dividend", date(2020, 11, 6), date(2020, 11, 13), None, 0.205),
    ]


async def test_the_readme_spin_off_example(md: MarketData) -> None:
    """README, "Adjusted prices": GE's spin-off numbers shown there."""
    raw = await md.bars("GE", "2022-12-29", "2023-01-06", timeframe="1Day")
    ge = await md.bars("GE", "2022-12-29", "2023-01-06", timeframe="1Day", adjustment="spin-off")
    assert raw["close"].to_list()[1:5] == [623.87, 624.52, 533.48, 532.92]
    assert ge["close"].round(4).to_list()[1:5] == [511.0782, 511.6107, 514.4781, 513.938]
    applied = adjustment_of(ge).applied  # type: ignore[union-attr]
    assert applied.select("type", "ex_date", pl.col("price_factor").round(6)).rows() == [
        ("spin_off", date(2023, 1, 4), 0.849463),
        ("spin_off", date(2024, 4, 2), 0.964381),
    ]
    gehc = await md.bars("GEHC", "2023-01-04", "2023-01-04", timeframe="1Day", fetch=False)
    assert gehc["close"].to_list() == [282.04] and round(1 - 282.04 / 3 / 624.52, 6) == 0.849463


async def test_quality_explains_a_real_split_and_counts_an_unexplained_one(
    md: MarketData, vendors: dict[str, SimServer]
) -> None:
    # the real 4:1 split in raw daily bars: the jump is found, explained by the stored action, not counted
    await md.corporate_actions("AAPL", "2020-08-01", "2020-09-30")
    await md.bars("AAPL", "2020-08-03", "2020-09-30", timeframe="1Day")
    (real,) = await md.quality("AAPL", "2020-08-03", "2020-09-30", timeframe="1Day")
    split = real.findings.filter(pl.col("kind") == "split_like")
    assert split.select("severity").rows() == [("info",)]
    assert split["detail"][0].startswith("explained by split 4.0:1 (alpaca:")
    assert real.summary["score"] == 1.0
    # an injected unadjusted 4x split (no action behind it): every bar before it counts as invalid
    vendors["alpaca"].faults.set([FaultRule(kind="bad_data", defect="split", at=["2024-03-13"], factor=4.0,
                                            symbols=["MSFT"])])  # fmt: skip
    await md.bars("MSFT", "2024-03-04", "2024-03-22", timeframe="1Day")
    (fake,) = await md.quality("MSFT", "2024-03-04", "2024-03-22", timeframe="1Day")
    assert fake.findings.filter(pl.col("kind") == "split_like")["severity"].to_list() == ["high"]
    assert fake.summary["score"] < 0.9  # was 1.000 before: one finding among many bars
    before = fake.days.filter(pl.col("day") < date(2024, 3, 13))
    assert before.height == 7 and (before["validity"] == 0.0).all()


async def test_quality_explains_a_spin_off_drop_once_the_new_line_is_priced(md: MarketData) -> None:
    """GE's raw close drops 14.6 % on the GEHC spin-off's ex-date (2023-01-04): a finding of the daily
    series until the drop is explained. Without GEHC's close in the store its factor is unknown, so the
    finding stays and says why; with it, the drop less ln f is an ordinary day: shown as info, not counted."""
    await md.corporate_actions("GE", "2022-10-01", "2023-02-28")
    await md.bars("GE", "2022-10-03", "2023-02-28", timeframe="1Day")
    (before,) = await md.quality("GE", "2022-10-03", "2023-02-28", timeframe="1Day")
    day = pl.col("timestamp").dt.convert_time_zone("America/New_York").dt.date() == date(2023, 1, 4)
    drop = before.findings.filter(day)
    assert drop.height == 1 and drop["severity"][0] in ("medium", "high")
    assert "a spin-off (alpaca:" in drop["detail"][0] and "no raw close of the new line GEHC" in drop["detail"][0]
    await md.bars("GEHC", "2023-01-04", "2023-01-04", timeframe="1Day")
    (after,) = await md.quality("GE", "2022-10-03", "2023-02-28", timeframe="1Day")
    explained = after.findings.filter(day)
    assert explained["severity"].to_list() == ["info"]
    assert "explained by the spin-off (alpaca:" in explained["detail"][0] and "0.849463" in explained["detail"][0]
    assert after.summary["score"] > before.summary["score"]


async def test_a_stored_action_drops_the_cached_bars_of_its_symbol(md: MarketData) -> None:
    """The gateway subscribes the cache to corporate_action_applied: cached (adjusted) bars of the
    symbol and multi-symbol answers go, other symbols' stay. The event comes from the store write's
    worker thread."""
    import asyncio

    from marketpipe.cache import make_key
    from marketpipe.cache.memory import MemoryCache
    from marketpipe.cache.tiered import TieredCache
    from marketpipe.service.actions import invalidate_cached_bars

    cache = TieredCache(MemoryCache(1 << 20))
    keys = [make_key("bars", "TSLA", "all"), make_key("bars", "_multi", "TSLA,KO"), make_key("bars", "KO", "all")]
    for k in keys:
        await cache.set(k, b"x", 60)
    off = invalidate_cached_bars(cache, asyncio.get_running_loop())
    try:
        await md.corporate_actions("TSLA", "2022-01-01", "2022-12-31")  # new: one event, from a worker thread
        for _ in range(100):
            if await cache.get(keys[0]) is None:
                break
            await asyncio.sleep(0.01)
        assert [await cache.get(k) is None for k in keys] == [True, True, False]
    finally:
        off()
        await cache.aclose()


async def test_reconcile_finds_a_doubled_split_and_nothing_on_clean_vendors(
    md: MarketData, vendors: dict[str, SimServer]
) -> None:
    clean = await md.actions.reconcile("NVDA", date(2024, 1, 1), date(2024, 12, 31))
    assert clean.reference == "alpaca" and set(clean.counts) == {"alpaca", "polygon", "yahoo"}
    assert clean.disagreements.height == 0 and clean.rows.height > 0
    vendors["alpaca"].market.actions.set_faults([ActionFault(vendor="yahoo", kind="doubled_split", symbol="TSLA")])
    report = await md.actions.reconcile("TSLA", date(2022, 1, 1), date(2022, 12, 31))
    assert report.disagreements.select("family", "other", "status", "other_date").rows() == [
        ("split", "yahoo", "extra", date(2022, 8, 25))
    ]
    stored = md.store.action_reconciliation("TSLA", report.run_id)
    assert stored.filter(pl.col("status") != "match").height == 1


def _fail_bars_except_yahoo(vendors: dict[str, SimServer]) -> None:
    vendors["alpaca"].faults.set([FaultRule(kind="http_500", paths="/bars")])
    vendors["polygon"].faults.set([FaultRule(kind="http_500", paths="/aggs/")])


async def test_failover_to_yahoo_across_a_split_stores_raw(md: MarketData, vendors: dict[str, SimServer]) -> None:
    """Yahoo sends AAPL's bars before 2020-08-31 divided by 4; what the store keeps from it is raw, equal
    to Alpaca's raw bars, so the split shows in the raw series (explained by the stored action) and
    adjusting it gives the vendor's adjusted series."""
    _fail_bars_except_yahoo(vendors)
    got = await md.bars("AAPL", "2020-08-17", "2020-09-11", timeframe="1Day")
    assert set(got["source"]) == {"sim:yahoo"}
    want = vendor_bars(vendors, "AAPL", "1Day", "2020-08-17", "2020-09-11T23:59:00Z", "raw")
    for ours, theirs in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c")):
        np.testing.assert_allclose(got[ours].to_numpy(), want[theirs], rtol=1e-9, err_msg=ours)
    assert got["volume"].to_list() == want["v"].tolist()
    await md.corporate_actions("AAPL", "2020-08-01", "2020-09-30")
    (q,) = await md.quality("AAPL", "2020-08-17", "2020-09-11", timeframe="1Day")
    assert q.findings.filter(pl.col("kind") == "split_like")["severity"].to_list() == ["info"]
    assert q.findings.filter(pl.col("kind") == "split_unseen").height == 0 and q.summary["score"] == 1.0
    adj = await md.bars("AAPL", "2020-08-17", "2020-09-11", timeframe="1Day", adjustment="split", fetch=False)
    want_adj = vendor_bars(vendors, "AAPL", "1Day", "2020-08-17", "2020-09-11T23:59:00Z", "split")
    np.testing.assert_allclose(adj["close"].to_numpy(), want_adj["c"], rtol=1e-9)


async def test_a_split_yahoo_applies_but_does_not_list_is_a_quality_finding(
    md: MarketData, vendors: dict[str, SimServer]
) -> None:
    """Yahoo pre-applies the 4:1 split without listing it (yfinance #2076): its answer alone cannot show
    it, so the bars before it reach the store on the post-split scale. Against Alpaca's stored split the
    quality check finds the missing jump (``split_unseen``, high) and counts every bar before it."""
    _fail_bars_except_yahoo(vendors)
    vendors["yahoo"].market.actions.set_faults([ActionFault(vendor="yahoo", kind="unlisted_split", symbol="AAPL")])
    got = await md.bars("AAPL", "2020-08-17", "2020-09-11", timeframe="1Day")
    want = vendor_bars(vendors, "AAPL", "1Day", "2020-08-17", "2020-09-11T23:59:00Z", "raw")
    assert got["close"][0] == pytest.approx(want["c"][0] / 4, rel=1e-6)  # what such a vendor makes of it
    acts = await md.corporate_actions("AAPL", "2020-08-01", "2020-09-30")
    assert set(acts["provider"]) == {"alpaca"}
    (q,) = await md.quality("AAPL", "2020-08-17", "2020-09-11", timeframe="1Day")
    unseen = q.findings.filter(pl.col("kind") == "split_unseen")
    assert unseen["severity"].to_list() == ["high"] and abs(unseen["value"][0] - 1) < 0.1  # no jump: ~1, not 4
    assert unseen["detail"][0].startswith("known split 4.0:1 on 2020-08-31 (alpaca:")
    assert q.summary["score"] < 0.9
    assert (q.days.filter(pl.col("day") < date(2020, 8, 31))["validity"] == 0.0).all()


async def test_an_action_the_vendor_no_longer_lists_is_withdrawn(md: MarketData, vendors: dict[str, SimServer]) -> None:
    """Alpaca listed TSLA's 3:1 split, then (asked again for the same window) no longer does: a new version
    marked withdrawn (never an edit), not applied any more, raised as an event, shown by reconcile; listed
    again, it is a version of its own and applied again."""
    seen: list[events.Event] = []
    off = events.hub.subscribe(lambda e: seen.append(e) if e.kind == events.CORPORATE_ACTION_APPLIED else None)
    window = ("2022-01-01", "2022-12-31")
    try:
        first = await md.corporate_actions("TSLA", *window)
        (split_id,) = first.filter(pl.col("type") == "forward_split")["action_id"].to_list()
        vendors["alpaca"].market.actions.set_faults([ActionFault(vendor="alpaca", kind="missing_split", symbol="TSLA")])
        cached = await md.corporate_actions("TSLA", *window)  # the ledger holds the window: not asked again
        assert split_id in cached["action_id"].to_list()
        again = await md.corporate_actions("TSLA", *window, refresh=True)
        assert again.filter(pl.col("type") == "forward_split").height == 0
        history = md.store.read_actions(["TSLA"], date(2022, 1, 1), date(2022, 12, 31), all_versions=True)
        split = history.filter(pl.col("action_id") == split_id)
        assert split.select("version", "new_rate").rows() == [(1, 3.0), (2, 3.0)]  # the content kept
        note = orjson.loads(split["raw"][1])["marketpipe_withdrawn"]
        assert note["window"] == ["2022-01-01", "2022-12-31"] and note["previous_version"] == 1
        assert seen[-1].details["withdrawn"] is True and seen[-1].severity == "warning"
        # no longer applied: split-adjusted bars before the ex-date are the raw ones
        adj = await md.bars("TSLA", "2022-08-22", "2022-08-26", timeframe="1Day", adjustment="split")
        raw = await md.bars("TSLA", "2022-08-22", "2022-08-26", timeframe="1Day")
        assert adj["close"].to_list() == raw["close"].to_list()
        assert adjustment_of(adj).applied.height == 0  # type: ignore[union-attr]
        report = await md.actions.reconcile("TSLA", date(2022, 1, 1), date(2022, 12, 31))
        gone = report.rows.filter(pl.col("status") == "withdrawn")
        assert gone.select("other", "reference_date", "reference_value", "reference_id").rows() == [
            ("alpaca", date(2022, 8, 25), 3.0, split_id)
        ]
        # listed again: version 3, applied again
        vendors["alpaca"].market.actions.clear_faults()
        back = await md.corporate_actions("TSLA", *window, refresh=True)
        assert split_id in back["action_id"].to_list() and seen[-1].details["withdrawn"] is False
        newest = md.store.read_actions(["TSLA"], date(2022, 8, 1), date(2022, 8, 31), providers=["alpaca"])
        assert newest["version"].to_list() == [3]
    finally:
        off()
