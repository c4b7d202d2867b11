"""Data quality end to end: simulator faces inject defects and gaps over real HTTP, the pipeline
stores what they serve, and completeness / anomalies / scores / repair / update find exactly that."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from marketpipe.core import events
from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import Config, config_from_dict
from marketpipe.core.errors import InvalidArgument, InvalidRange
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.service.backfill import run_backfill
from marketpipe.service.maintain import repair, update
from marketpipe.service.quality import analyze
from marketpipe.service.router import ProviderRouter, build_router
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore

CAL = get_calendar()
TF = Timeframe.parse("1Min")
ENV = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET", "POLYGON_API_KEY": "POLYKEY"}
FAST = {
    "rate_limit_per_min": 100_000,
    "connect_timeout": 2.0,
    "read_timeout": 5.0,
    "retry": {"attempts": 2, "base_seconds": 0.01, "max_seconds": 0.02},
}
MON, TUE, WED, THU, FRI = "2024-03-04", "2024-03-05", "2024-03-06", "2024-03-07", "2024-03-08"
AFTER_FRI = parse_time(FRI, end=True) + timedelta(hours=2)  # a pinned "now": the week is history


def day(d: str) -> tuple[datetime, datetime]:
    return parse_time(d), parse_time(d, end=True)


def span(a: str, b: str) -> tuple[datetime, datetime]:
    return parse_time(a), parse_time(b, end=True)


@pytest.fixture(scope="module")
def vendors() -> Iterator[dict[str, SimServer]]:
    market = SimMarket()
    with SimServer(market, vendor="alpaca") as a, SimServer(market, vendor="polygon") as p:
        yield {"alpaca": a, "polygon": p}


@pytest.fixture(autouse=True)
def _reset(vendors: dict[str, SimServer]) -> Iterator[None]:
    yield
    for s in vendors.values():
        s.faults.clear()


def config(vendors: dict[str, SimServer], *, polygon: bool = True, **extra: object) -> Config:
    return config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": vendors["alpaca"].url, "plan": "unlimited", **FAST},
                "polygon": {"base_url": vendors["polygon"].url, "enabled": polygon, **FAST},
            },
            **extra,
        }
    )


@pytest.fixture
async def router(vendors: dict[str, SimServer]) -> AsyncIterator[ProviderRouter]:
    r = build_router(config(vendors), env=ENV)
    yield r
    await r.aclose()


@pytest.fixture
async def alpaca_only(vendors: dict[str, SimServer]) -> AsyncIterator[ProviderRouter]:
    r = build_router(config(vendors, polygon=False), env=ENV)
    yield r
    await r.aclose()


def pinned() -> datetime:
    return AFTER_FRI


async def fill(source: ProviderRouter, store: DuckDBStore, syms: list[str], s: datetime, e: datetime) -> None:
    src = source if len(source.providers) > 1 else source.providers[0]
    stats = await run_backfill(src, store, CAL, syms, TF, s, e, page_limit=1000, now=pinned)  # type: ignore[arg-type]
    assert stats.ok, stats.errors


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- golden cases: one per defect the simulator injects ---------------------------------------------

GOLDEN = [
    # (defect rule, expected finding kind, severity, stamp of the finding, rows it covers)
    ({"defect": "spike", "at": ["2024-03-05T17:00:00Z"], "factor": 1.5}, "spike", "high", "2024-03-05T17:00:00Z", 1),
    ({"defect": "split", "at": [TUE], "factor": 4.0}, "split_like", "high", "2024-03-05T14:30:00Z", 1),
    ({"defect": "frozen", "at": ["2024-03-05T16:00:00Z"], "run": 25}, "frozen", "medium", "2024-03-05T16:00:00Z", 25),
    (
        {"defect": "volume_spike", "at": ["2024-03-05T17:30:00Z"], "factor": 80.0},
        "volume_outlier",
        "low",
        "2024-03-05T17:30:00Z",
        1,
    ),
    (
        {"defect": "zero_volume_move", "at": ["2024-03-05T18:00:00Z"]},
        "zero_volume_move",
        "medium",
        "2024-03-05T18:00:00Z",
        1,
    ),
]


@pytest.mark.parametrize(("rule", "kind", "severity", "at", "rows"), GOLDEN, ids=[g[1] for g in GOLDEN])
async def test_each_injected_anomaly_is_found_exactly_once(
    vendors: dict[str, SimServer],
    alpaca_only: ProviderRouter,
    store: DuckDBStore,
    rule: dict[str, object],
    kind: str,
    severity: str,
    at: str,
    rows: int,
) -> None:
    vendors["alpaca"].faults.set([FaultRule(kind="bad_data", symbols=["AAPL"], **rule)])  # type: ignore[arg-type]
    await fill(alpaca_only, store, ["AAPL", "MSFT"], *span(MON, WED))
    results = analyze(store, CAL, ["AAPL", "MSFT"], TF, *span(MON, WED), now=AFTER_FRI)
    aapl, msft = results
    found = aapl.findings.select("timestamp", "kind", "severity", "bars").rows()
    assert found == [(ts(at), kind, severity, rows)]
    assert msft.findings.height == 0  # the clean series: no false positives
    stored = store.findings(["AAPL"], "1Min", *span(MON, WED))
    assert stored.select("kind").to_series().to_list() == [kind]
    day_row = aapl.days.filter(pl.col("day") == ts(at).date())
    assert day_row["anomalies"].item() == 1 and day_row["validity"].item() < 1.0
    assert aapl.summary["completeness"] == 1.0 and aapl.summary["score"] < msft.summary["score"] == 1.0


async def test_anomaly_findings_are_recorded_at_ingest_and_high_ones_quarantined_when_configured(
    vendors: dict[str, SimServer], store: DuckDBStore
) -> None:
    cfg = config(vendors, polygon=False, quality={"anomaly": {"on_high": "quarantine"}})
    r = build_router(cfg, env=ENV)
    vendors["alpaca"].faults.set([FaultRule(kind="bad_data", defect="spike", at=["2024-03-05T17:00:00Z"])])
    stats = await run_backfill(
        r.providers[0], store, CAL, ["AAPL"], TF, *day(TUE), page_limit=1000, now=pinned, anomaly=cfg.quality.anomaly
    )
    await r.aclose()
    assert stats.anomalies == 1
    q = store.quarantine("AAPL")
    assert q.select("ts", "reason").rows() == [(ts("2024-03-05T17:00:00Z"), "anomaly:spike")]
    assert store.read_bars(["AAPL"], "1Min", *day(TUE)).height == 389
    assert store.findings(["AAPL"], "1Min", *day(TUE))["kind"].to_list() == ["spike"]


async def test_invalid_rows_lower_validity_by_exactly_the_quarantined_share(
    vendors: dict[str, SimServer], alpaca_only: ProviderRouter, store: DuckDBStore
) -> None:
    vendors["alpaca"].faults.set([FaultRule(kind="invalid_rows", row_ratio=0.02, row_kinds=["negative_volume"])])
    await fill(alpaca_only, store, ["AAPL"], *day(TUE))
    (res,) = analyze(store, CAL, ["AAPL"], TF, *day(TUE), now=AFTER_FRI)
    bad = store.quarantine("AAPL").height
    assert bad > 0
    d = res.days.row(0, named=True)
    assert d["quarantined"] == bad and d["present"] == 390 - bad and d["gap"] == 0
    # The quarantined minutes were fetched, so they are confirmed empty in the store, not gaps.
    assert d["confirmed_empty"] == bad
    assert d["validity"] == pytest.approx(1 - bad / 390)
    assert d["completeness"] == pytest.approx((390 - bad) / 390)
    w = Config().quality.weights
    assert d["score"] == pytest.approx(
        (w.validity * d["validity"] + w.completeness * d["completeness"]) / (w.validity + w.completeness)
    )


# --- completeness: gaps vs confirmed empty ----------------------------------------------------------


async def test_gap_and_confirmed_empty_are_told_apart(
    vendors: dict[str, SimServer], alpaca_only: ProviderRouter, store: DuckDBStore
) -> None:
    vendors["alpaca"].faults.set(
        [FaultRule(kind="bad_data", defect="drop", at=["2024-03-05T15:00:00Z", "2024-03-05T15:01:00Z"])]
    )
    await fill(alpaca_only, store, ["AAPL"], *span(MON, TUE))
    await fill(alpaca_only, store, ["AAPL"], *day(THU))  # Wednesday never fetched
    (res,) = analyze(store, CAL, ["AAPL"], TF, *span(MON, THU), now=AFTER_FRI)
    c = res.completeness
    assert (c.expected, c.present, c.confirmed_empty, c.gap) == (4 * 390, 3 * 390 - 2, 2, 390)
    assert c.ranges.select("kind", "start", "end", "bars").rows() == [
        ("confirmed_empty", ts("2024-03-05T15:00:00Z"), ts("2024-03-05T15:02:00Z"), 2),
        ("gap", ts("2024-03-06T14:30:00Z"), ts("2024-03-06T21:00:00Z"), 390),
    ]
    assert res.days.filter(pl.col("day") == parse_time(WED).astimezone(UTC).date())["score"].item() == 0.0


async def test_repair_fetches_gaps_then_empties_from_the_fallback_and_a_second_run_fetches_nothing(
    vendors: dict[str, SimServer], router: ProviderRouter, store: DuckDBStore
) -> None:
    cfg = config(vendors)
    vendors["alpaca"].faults.set([FaultRule(kind="bad_data", defect="drop", at=[TUE], symbols=["AAPL"])])
    await fill(router, store, ["AAPL", "MSFT"], *day(MON))
    await fill(router, store, ["AAPL", "MSFT"], *day(TUE))  # Alpaca has nothing for AAPL on Tuesday
    await fill(router, store, ["AAPL", "MSFT"], *day(THU))  # Wednesday is a gap for both
    res = await repair(router, store, CAL, cfg, ["AAPL", "MSFT"], TF, *span(MON, THU), now=pinned)
    assert res.ok, res.errors
    assert (res.before["AAPL"].gap, res.before["AAPL"].confirmed_empty) == (390, 390)
    assert (res.before["MSFT"].gap, res.before["MSFT"].confirmed_empty) == (390, 0)
    for sym in ("AAPL", "MSFT"):
        after = res.after[sym]
        assert (after.present, after.gap, after.confirmed_empty) == (4 * 390, 0, 0)
    # Wednesday came through the router (Alpaca first); AAPL's Tuesday from Polygon, labelled so.
    tue = store.read_bars(["AAPL"], "1Min", *day(TUE))
    assert tue["source"].unique().to_list() == ["sim:polygon"] and tue.height == 390
    wed = store.read_bars(["AAPL", "MSFT"], "1Min", *day(WED))
    assert wed["source"].unique().to_list() == ["sim:alpaca"] and wed.height == 780
    again = await repair(router, store, CAL, cfg, ["AAPL", "MSFT"], TF, *span(MON, THU), now=pinned)
    assert again.requests == 0 and again.stored == 0 and again.asked == []


async def test_repair_never_invents_what_no_vendor_has(
    vendors: dict[str, SimServer], router: ProviderRouter, store: DuckDBStore
) -> None:
    for v in vendors.values():
        v.faults.set([FaultRule(kind="bad_data", defect="drop", at=["2024-03-05T15:00:00Z"])])
    await fill(router, store, ["AAPL"], *day(TUE))
    res = await repair(router, store, CAL, config(vendors), ["AAPL"], TF, *day(TUE), now=pinned)
    assert res.after["AAPL"].confirmed_empty == 1 and res.after["AAPL"].present == 389
    assert [a["provider"] for a in res.asked] == ["polygon"]  # Alpaca had already answered
    again = await repair(router, store, CAL, config(vendors), ["AAPL"], TF, *day(TUE), now=pinned)
    assert again.requests == 0 and again.asked == []


# --- update strategies ------------------------------------------------------------------------------


async def test_update_incremental_smart_and_full_refresh(
    vendors: dict[str, SimServer], alpaca_only: ProviderRouter, store: DuckDBStore
) -> None:
    cfg = config(vendors, polygon=False, update={"smart_max_gap_hours": 30, "refresh_days": 1})
    src = alpaca_only.providers[0]
    await fill(alpaca_only, store, ["AAPL", "MSFT"], *span(MON, TUE))

    def at(text: str):  # type: ignore[no-untyped-def]
        return lambda: parse_time(text, end=True)

    res = await update(src, store, CAL, cfg, ["AAPL", "MSFT"], TF, strategy="incremental", now=at(WED))
    assert all(r.ok and r.strategy == "incremental" for r in res.values())
    for sym in ("AAPL", "MSFT"):  # Wednesday: each symbol's own 390 (issue 13 item 7: not the pair's 780)
        got = res[sym].stats
        assert got is not None and got.bars_stored == 390 and got.bars_received == 390, sym
        assert got.per_symbol.keys() == {sym}
    # smart, newest point a day old (< 30 h): incremental; nothing new to store when nothing changed.
    res = await update(src, store, CAL, cfg, ["AAPL"], TF, strategy="smart", now=at(THU))
    assert res["AAPL"].strategy == "incremental" and res["AAPL"].stats.bars_stored == 390  # type: ignore[union-attr]
    # A vendor correction: a full refresh stores the changed bar as a newer version and records it.
    vendors["alpaca"].faults.set([FaultRule(kind="bad_data", defect="volume_spike", at=["2024-03-07T18:00:00Z"])])
    res = await update(src, store, CAL, cfg, ["AAPL"], TF, strategy="full", start=parse_time(THU), now=at(THU))
    assert res["AAPL"].strategy == "full" and res["AAPL"].stats.revised == 1  # type: ignore[union-attr]
    rev = store.revisions("AAPL")
    assert rev.select("ts").to_series().to_list() == [ts("2024-03-07T18:00:00Z")]
    assert rev["new_volume"].item() == rev["old_volume"].item() * 50
    bar = store.read_bars(["AAPL"], "1Min", ts("2024-03-07T18:00:00Z"), ts("2024-03-07T18:01:00Z"))
    assert bar.height == 1 and bar["volume"].item() == rev["new_volume"].item()  # the newest version is read
    assert store.read_bars(["AAPL"], "1Min", *day(THU)).height == 390  # no duplicate rows on read
    # smart, newest point far behind: a refresh from refresh_days before it
    res = await update(src, store, CAL, cfg, ["MSFT"], TF, strategy="smart", now=at(FRI))
    assert res["MSFT"].strategy == "full" and res["MSFT"].start == parse_time(THU) - timedelta(days=1)


async def test_update_one_symbol_failing_never_stops_the_others(
    vendors: dict[str, SimServer], alpaca_only: ProviderRouter, store: DuckDBStore
) -> None:
    await fill(alpaca_only, store, ["AAPL"], *day(MON))
    res = await update(
        alpaca_only.providers[0],
        store,
        CAL,
        config(vendors),
        ["AAPL", "MSFT"],
        TF,
        strategy="incremental",
        now=lambda: parse_time(TUE, end=True),
    )
    assert res["AAPL"].ok and res["AAPL"].stats.bars_stored == 390  # type: ignore[union-attr]
    assert not res["MSFT"].ok and res["MSFT"].error["code"] == "INVALID_ARGUMENT"  # type: ignore[index]
    with pytest.raises(InvalidArgument):
        await update(alpaca_only.providers[0], store, CAL, config(vendors), ["AAPL"], TF, strategy="sometimes")  # type: ignore[arg-type]


# --- events -------------------------------------------------------------------------------------------


async def test_quality_findings_and_failover_raise_events(
    vendors: dict[str, SimServer], router: ProviderRouter, store: DuckDBStore
) -> None:
    seen: list[events.Event] = []
    unsubscribe = events.hub.subscribe(seen.append)
    try:
        vendors["alpaca"].faults.set([FaultRule(kind="http_503")])
        await fill(router, store, ["AAPL"], *day(MON))
        vendors["alpaca"].faults.set([FaultRule(kind="bad_data", defect="spike", at=["2024-03-07T17:00:00Z"])])
        await fill(router, store, ["AAPL"], *day(THU))
        analyze(store, CAL, ["AAPL"], TF, *span(MON, THU), now=AFTER_FRI)
    finally:
        unsubscribe()
    kinds = {e.kind for e in seen}
    assert {"source_unavailable", "missing_data", "outlier"} <= kinds
    missing = next(e for e in seen if e.kind == "missing_data")
    assert missing.symbol == "AAPL" and missing.details["gap_bars"] == 2 * 390


def test_a_failing_subscriber_never_breaks_the_producer() -> None:
    got: list[str] = []

    def broken(event: events.Event) -> None:
        raise RuntimeError("boom")

    off1, off2 = events.hub.subscribe(broken), events.hub.subscribe(lambda e: got.append(e.message))
    try:
        events.emit("stale_data", "warning", "AAPL is stale", symbol="AAPL")
    finally:
        off1()
        off2()
    assert got == ["AAPL is stale"]


# --- bad input --------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_or_a_defined_result(store: DuckDBStore) -> None:
    with pytest.raises(InvalidArgument, match="unknown exchange calendar"):
        get_calendar("NOPE")
    with pytest.raises(InvalidRange, match="outside the XNYS calendar"):
        analyze(store, CAL, ["AAPL"], TF, parse_time("1990-01-02"), parse_time("1990-01-05"), now=AFTER_FRI)
    with pytest.raises(InvalidRange):
        analyze(store, CAL, ["AAPL"], TF, parse_time(WED), parse_time(MON), now=AFTER_FRI)
    # A symbol with no data at all: everything expected is a gap, the score is 0, nothing crashes.
    (res,) = analyze(store, CAL, ["ZZZZ"], TF, *span(MON, FRI), now=AFTER_FRI)
    assert (res.completeness.expected, res.completeness.gap, res.summary["score"]) == (5 * 390, 5 * 390, 0.0)
    # Weekly and monthly bars: one expected bar per week / month that holds a session.
    for tf, n in (("1Week", 1), ("1Month", 1), ("1Day", 5)):
        (res,) = analyze(store, CAL, ["ZZZZ"], Timeframe.parse(tf), *span(MON, FRI), now=AFTER_FRI)
        assert res.completeness.expected == n


def test_timeliness_scores_the_lag_of_recent_data_only(store: DuckDBStore) -> None:
    from marketpipe.store.base import Coverage, IngestRecord, PageWrite
    from tests.quality.test_anomaly import frame as sim_bars

    bars = sim_bars("AAPL", "1Min", TUE, WED)
    noon = ts("2024-03-05T17:00:00Z")  # 12:00 New York
    held = bars.filter(pl.col("ts") < noon).with_columns(fetched_at=pl.lit(noon + timedelta(minutes=10)))
    s, e = day(TUE)
    store.write_pages(
        [
            PageWrite(
                bars=held,
                quarantine=pl.DataFrame(),
                coverage=[Coverage("AAPL", "1Min", "alpaca", "sim:alpaca", "sip", s, noon, held.height, "r", noon)],
                ingest=IngestRecord(
                    "alpaca", "sim:alpaca", "sip", "bars", "1Min", ["AAPL"], s, noon, "r", 1, noon, 150
                ),
            )
        ]
    )
    during = noon + timedelta(minutes=20)
    (res,) = analyze(store, CAL, ["AAPL"], TF, s, e, now=during)
    d = res.days.row(0, named=True)
    lag = 10 * 60  # the newest bar (11:59) ended at noon and was fetched ten minutes later
    assert d["timeliness"] == pytest.approx(1 - (lag - 120) / (3600 - 120))
    # 12:00-12:20 is expected by now (not the rest of the afternoon) and was never fetched: a gap.
    assert (d["expected"], d["present"], d["gap"]) == (170, 150, 20)
    # Days before the most recent session: timeliness does not apply.
    (old,) = analyze(store, CAL, ["AAPL"], TF, s, e, now=AFTER_FRI)
    assert old.days["timeliness"].to_list() == [None]


async def test_a_failed_fetch_is_a_gap_that_repair_closes(
    vendors: dict[str, SimServer], alpaca_only: ProviderRouter, store: DuckDBStore
) -> None:
    cfg = config(vendors, polygon=False)
    # Every request for Wednesday fails (both tries): the backfill records the error and moves on.
    vendors["alpaca"].faults.set([FaultRule(kind="http_500", paths=r"/v2/stocks/.*bars", times=2)])
    src = alpaca_only.providers[0]
    stats = await run_backfill(src, store, CAL, ["AAPL"], TF, *day(WED), page_limit=1000, now=pinned)
    assert not stats.ok and stats.errors[0]["code"] == "PROVIDER_UNAVAILABLE"
    await fill(alpaca_only, store, ["AAPL"], *span(THU, FRI))
    (res,) = analyze(store, CAL, ["AAPL"], TF, *span(WED, FRI), now=AFTER_FRI)
    assert (res.completeness.gap, res.completeness.confirmed_empty) == (390, 0)
    assert res.completeness.gaps() == [(ts("2024-03-06T14:30:00Z"), ts("2024-03-06T21:00:00Z"))]
    fixed = await repair(alpaca_only, store, CAL, cfg, ["AAPL"], TF, *span(WED, FRI), now=pinned)
    assert fixed.ok and fixed.requests == 1 and fixed.after["AAPL"].gap == 0
    assert fixed.after["AAPL"].present == 3 * 390
    again = await repair(alpaca_only, store, CAL, cfg, ["AAPL"], TF, *span(WED, FRI), now=pinned)
    assert again.requests == 0


def test_the_synchronous_api_reports_quality(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from marketpipe.service.data import SyncMarketData

    cfg = Config()
    cfg.store.path = str(tmp_path / "sync.duckdb")
    with SyncMarketData(config=cfg) as client:
        (res,) = client.quality("ZZZZ", MON, FRI, timeframe="1Day")
    assert (res.completeness.expected, res.completeness.gap, res.summary["score"]) == (5, 5, 0.0)
