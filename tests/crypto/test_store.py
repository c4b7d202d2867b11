"""Crypto pairs through the same pipeline as stocks, against the simulator: a weekend of 1Min
BTC/USD backfilled into the store scores complete on the 24/7 calendar, a second backfill over an
overlapping range asks the vendor only for what the ledger lacks, and stored pairs are read without
fetching (``fetch=False``, ``--no-fetch``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import CRYPTO_BAR_SCHEMA
from marketpipe.core.timeframe import Timeframe
from marketpipe.service.data import MarketData
from marketpipe.sim.server import SimServer
from tests.cli.test_cli import run
from tests.conftest import provider_config

FRI = datetime(2024, 3, 1, tzinfo=UTC)
SAT = FRI + timedelta(days=1)
SUN = FRI + timedelta(days=2)
MON = FRI + timedelta(days=3)


def _config(sim: SimServer, tmp: Path) -> Config:
    cfg = Config()
    cfg.providers["alpaca"] = provider_config(sim.url)
    cfg.store.path = str(tmp / "s.duckdb")
    return cfg


def _asked(sim: SimServer) -> int:
    """Crypto bar requests the simulator answered since the last reset."""
    by_path = sim.stats()["by_path"].items()
    return sum(sum(st.values()) for path, st in by_path if "/crypto/" in path and path.endswith("/bars"))


async def test_a_weekend_backfilled_scores_complete_and_a_second_backfill_asks_only_for_the_rest(
    sim: SimServer, tmp_path: Path
) -> None:
    data = MarketData(_config(sim, tmp_path), env={})
    try:
        sim.reset_stats()
        first = await data.backfill("BTC/USD", FRI, SUN, timeframe="1Min")  # Fri 00:00 -> Sun 00:00
        assert first.ok and first.bars_stored == 2 * 1440 and _asked(sim) == first.requests
        stored = await data.bars("BTC/USD", FRI, SUN, timeframe="1Min", fetch=False)
        assert stored["volume"].dtype == CRYPTO_BAR_SCHEMA["volume"] and stored.height == 2880
        assert (stored["volume"] != stored["volume"].round(0)).any()  # fractions of a coin, unrounded

        sim.reset_stats()
        second = await data.backfill("BTC/USD", SAT + timedelta(hours=12), MON, timeframe="1Min")  # overlaps Sat
        assert second.ok and second.bars_stored == 1440  # Sunday only: Saturday was held
        assert _asked(sim) == second.requests >= 1
        asked = data.store.ingest_log(limit=second.requests)
        assert set(asked["start"]) == {SUN} and set(asked["end"]) == {MON}  # the planned window: what was missing
        assert data.store.counts()["crypto_bars"] == 3 * 1440 and data.store.counts()["bars"] == 0

        sim.reset_stats()
        again = await data.backfill("BTC/USD", FRI, MON, timeframe="1Min")
        assert again.units_total == 0 and again.skipped_symbols == ["BTC/USD"] and _asked(sim) == 0

        # every day of the weekend (and the Friday) scores complete on the 24/7 calendar: 1440 a day
        (q,) = await data.quality("BTC/USD", FRI, MON, timeframe="1Min")
        assert q.completeness.expected == 3 * 1440 and q.completeness.present == 3 * 1440
        assert q.completeness.ratio == 1.0
        assert q.days["expected"].to_list() == [1440, 1440, 1440] and q.days["completeness"].to_list() == [1.0] * 3

        # mp.bars over the whole range reads the store and asks for nothing
        sim.reset_stats()
        frame = await data.bars("BTC/USD", FRI, MON, timeframe="1Min")
        assert frame.height == 3 * 1440 and _asked(sim) == 0
        assert set(frame["source"]) == {"sim:alpaca"} and set(frame["feed"]) == {"us"}  # attribution kept
    finally:
        await data.aclose()


async def test_mp_bars_of_a_pair_fetches_only_what_the_ledger_lacks(sim: SimServer, tmp_path: Path) -> None:
    data = MarketData(_config(sim, tmp_path), env={})
    try:
        sim.reset_stats()
        day = await data.bars("ETH/USD", SAT, SUN, timeframe="1Hour")
        assert day.height == 24 and _asked(sim) >= 1
        sim.reset_stats()
        held = await data.bars("ETH/USD", SAT + timedelta(hours=6), SAT + timedelta(hours=12), timeframe="1Hour")
        assert held.height == 6 and _asked(sim) == 0  # inside what the ledger holds
        with pytest.raises(InvalidArgument, match="alpaca only"):
            await data.fill(["ETH/USD"], Timeframe.parse("1Hour"), SUN, MON, provider="tiingo")
        with pytest.raises(InvalidArgument, match="unknown crypto location"):
            await data.bars("ETH/USD", SAT, SUN, timeframe="1Hour", feed="mars")  # checked even when held
    finally:
        await data.aclose()


def test_cli_backfills_a_pair_and_reads_it_back_with_no_fetch(sim: SimServer, tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\n')
    store = tmp_path / "s.duckdb"
    common = ["--timeframe", "1Hour", "--store", str(store), "--config", str(cfg)]
    span = ["--start", "2024-03-02T00:00:00Z", "--end", "2024-03-04T00:00:00Z"]  # a weekend, UTC
    r = run("backfill", "BTC/USD", *span, *common)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "btc.csv"
    r = run("bars", "BTC/USD", *span, "--no-fetch", "--format", "csv", "--output", str(out), *common)
    assert r.returncode == 0, r.stderr
    frame = pl.read_csv(out)
    assert frame.height == 48 and frame["volume"].dtype == pl.Float64
    r = run("quality", "BTC/USD", *span, *common)
    assert r.returncode == 0, r.stderr
    assert "24/7 UTC" in r.stdout and "100" in r.stdout  # scored on the continuous calendar, complete


async def test_an_update_of_a_pair_fetches_only_past_what_is_stored(sim: SimServer, tmp_path: Path) -> None:
    """The scheduler's path (``MarketData.update``, incremental): a pair held through Saturday noon is
    brought up to Sunday with only the missing minutes asked for, on the 24/7 calendar."""
    data = MarketData(_config(sim, tmp_path), env={})
    try:
        first = await data.backfill("BTC/USD", FRI, SAT + timedelta(hours=12), timeframe="1Min")
        assert first.ok and first.bars_stored == 1440 + 720
        sim.reset_stats()
        (up,) = (await data.update("BTC/USD", timeframe="1Min", strategy="incremental", end=SUN)).values()
        assert up.ok and up.strategy == "incremental" and up.stats is not None
        assert up.stats.bars_stored == 720 and _asked(sim) == up.stats.requests >= 1  # Saturday afternoon only
        assert data.store.counts()["crypto_bars"] == 2 * 1440
        (q,) = await data.quality("BTC/USD", FRI, SUN, timeframe="1Min")
        assert q.completeness.ratio == 1.0
    finally:
        await data.aclose()
