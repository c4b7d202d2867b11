"""Backfill against the simulator over real HTTP: plans, resumes, faults, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.errors import AuthFailed
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.service.backfill import run_backfill
from marketpipe.sim.faults import FaultRule
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV, provider_config

CAL = get_calendar()
TF = Timeframe.parse("1Min")
WEEK = (parse_time("2024-03-04"), parse_time("2024-03-06", end=True))  # 3 full sessions
SYMS = ["AAPL", "MSFT", "SPY"]


def provider(url: str, **kw: object) -> AlpacaProvider:
    return AlpacaProvider.from_config(provider_config(url, **kw), env=SIM_ENV)


async def backfill(url: str, store: DuckDBStore, symbols=SYMS, rng=WEEK, page_limit: int = 10_000, **kw: object):  # type: ignore[no-untyped-def]
    p = provider(url, **kw)
    try:
        return await run_backfill(p, store, CAL, list(symbols), TF, *rng, page_limit=page_limit, concurrency=3)
    finally:
        await p.aclose()


def values(store: DuckDBStore) -> pl.DataFrame:
    return store.read_bars(SYMS, "1Min", WEEK[0], WEEK[1]).drop("fetched_at")


async def test_backfill_stores_everything_once_and_second_run_fetches_nothing(sim, store) -> None:  # type: ignore[no-untyped-def]
    stats = await backfill(sim.url, store)
    assert stats.ok
    assert stats.bars_stored == 3 * 3 * 390
    assert stats.requests == 1  # 3 symbols x 1,170 bars packed into one 10,000-row request
    again = await backfill(sim.url, store)
    assert again.requests == 0 and sorted(again.skipped_symbols) == SYMS
    df = values(store)
    assert df.height == 3510 and df["source"].unique().to_list() == ["sim:alpaca"]
    assert store.quarantine().height == 0


async def test_only_the_missing_part_is_fetched(sim, store) -> None:  # type: ignore[no-untyped-def]
    await backfill(sim.url, store, rng=(WEEK[0], parse_time("2024-03-05", end=True)))
    before = sim.stats()["requests"] if hasattr(sim, "stats") else None
    stats = await backfill(sim.url, store)
    assert stats.bars_received == 3 * 390  # just the third day
    assert stats.bars_stored == 3 * 390
    if before is not None:
        assert sim.stats()["requests"] - before == stats.requests


async def test_holiday_range_is_recorded_and_never_fetched_twice(sim, store) -> None:  # type: ignore[no-untyped-def]
    good_friday = (parse_time("2024-03-29"), parse_time("2024-03-29", end=True))
    first = await backfill(sim.url, store, rng=good_friday)
    assert first.requests == 1 and first.bars_received == 0
    second = await backfill(sim.url, store, rng=good_friday)
    assert second.requests == 0


async def test_early_close_day(sim, store) -> None:  # type: ignore[no-untyped-def]
    day = (parse_time("2024-11-29"), parse_time("2024-11-29", end=True))
    stats = await backfill(sim.url, store, symbols=["AAPL"], rng=day)
    assert stats.bars_stored == 210


async def test_many_small_pages_give_the_same_store(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = DuckDBStore(tmp_path / "a.duckdb"), DuckDBStore(tmp_path / "b.duckdb")
    await backfill(sim.url, a)
    stats = await backfill(sim.url, b, page_limit=250)
    assert stats.pages > 14
    assert values(a).equals(values(b))
    a.close()
    b.close()


async def test_invalid_rows_are_quarantined_never_stored_or_repaired(sim, store) -> None:  # type: ignore[no-untyped-def]
    sim.faults.set(
        [
            FaultRule(
                kind="invalid_rows",
                row_kinds=["high_lt_low", "negative_volume", "duplicate_ts", "misaligned_ts"],
                row_ratio=0.02,
            )
        ]
    )
    stats = await backfill(sim.url, store)
    assert stats.bars_rejected > 0
    q = store.quarantine(limit=100_000)
    assert q.height == stats.bars_rejected
    reasons = set(",".join(q["reason"].to_list()).split(","))
    assert {"ohlc_inconsistent", "negative_volume", "misaligned_ts"} <= reasons
    df = values(store)
    assert (df["high"] >= df["low"]).all() and (df["volume"] >= 0).all()
    assert df.height + q.height >= 3510 - 1  # every delivered row is either stored or quarantined
    assert df.select(pl.struct("symbol", "ts").is_duplicated().any()).item() is False


async def test_failure_mid_backfill_leaves_a_consistent_resumable_store(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = DuckDBStore(tmp_path / "ref.duckdb")
    await backfill(sim.url, ref, page_limit=400)
    st = DuckDBStore(tmp_path / "st.duckdb")
    sim.faults.set([FaultRule(kind="http_500", after=5)])
    stats = await backfill(sim.url, st, page_limit=400)
    assert not stats.ok and all(e["code"] == "PROVIDER_UNAVAILABLE" for e in stats.errors)
    partial = values(st)
    assert 0 < partial.height < 3510
    # whatever is stored is covered by the ledger, and nothing beyond what is stored is claimed
    cov = st.coverage(SYMS, "1Min", *WEEK)
    for sym, s, e in cov.select("symbol", "start", "end").iter_rows():
        expected = CAL.regular_minutes(s, e)
        got = partial.filter((pl.col("symbol") == sym) & (pl.col("ts") >= s) & (pl.col("ts") < e)).height
        assert got == expected
    sim.faults.clear()
    resumed = await backfill(sim.url, st, page_limit=400)
    assert resumed.ok
    assert values(st).equals(values(ref))
    ref.close()
    st.close()


async def test_bad_credentials_stop_the_whole_run(sim, store) -> None:  # type: ignore[no-untyped-def]
    p = AlpacaProvider.from_config(provider_config(sim.url), env={"ALPACA_API_KEY": "X", "ALPACA_SECRET_KEY": "Y"})
    try:
        with pytest.raises(AuthFailed):
            await run_backfill(p, store, CAL, SYMS, TF, *WEEK)
    finally:
        await p.aclose()
    assert store.counts()["bars"] == 0


def _cli_backfill(url: str, store: Path, cfg: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **SIM_ENV, **(extra_env or {})}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marketpipe.cli.main",
            "backfill",
            *SYMS,
            "--timeframe",
            "1Min",
            "--start",
            "2024-03-04",
            "--end",
            "2024-03-06",
            "--config",
            str(cfg),
            "--store",
            str(store),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_kill_9_mid_backfill_then_rerun_gives_the_uninterrupted_store(sim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'[backfill]\npage_limit = 150\nconcurrency = 2\n[providers.alpaca]\nbase_url = "{sim.url}"\n'
        'plan = "unlimited"\nrate_limit_per_min = 100000\n'
    )
    ref_path, path = tmp_path / "ref.duckdb", tmp_path / "killed.duckdb"
    ref = _cli_backfill(sim.url, ref_path, cfg)
    assert ref.wait(120) == 0, ref.stderr.read() if ref.stderr else ""

    sim.faults.set([FaultRule(kind="latency", latency_ms=40)])
    base = _bar_requests(sim.url)
    killed = _cli_backfill(sim.url, path, cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _bar_requests(sim.url) - base >= 12:  # a dozen of ~24 pages answered
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    assert killed.returncode == -signal.SIGKILL
    sim.faults.clear()

    partial = DuckDBStore(path)
    n_partial = partial.counts()["bars"]
    partial.close()
    assert 0 < n_partial < 3510, "the kill should land mid-backfill"

    rerun = _cli_backfill(sim.url, path, cfg)
    assert rerun.wait(120) == 0, rerun.stderr.read() if rerun.stderr else ""
    a, b = DuckDBStore(ref_path), DuckDBStore(path)
    try:
        assert values(b).height == 3510
        assert values(a).equals(values(b))
    finally:
        a.close()
        b.close()


def _bar_requests(url: str) -> int:
    stats = httpx.get(url + "/_sim/stats", timeout=2).json()
    return int(stats.get("requests", 0)) if isinstance(stats, dict) else 0
