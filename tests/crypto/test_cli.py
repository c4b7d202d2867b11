"""`marketpipe bars BTC/USD` as a user runs it, against the simulator."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from marketpipe.sim.server import SimServer
from tests.cli.test_cli import run


@pytest.fixture
def cfg(sim: SimServer, tmp_path: Path) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\n\n[store]\npath = "{tmp_path / "s.duckdb"}"\n')
    return p


def test_cli_prints_crypto_bars_with_fractional_volumes(cfg: Path, tmp_path: Path) -> None:
    out = tmp_path / "btc.csv"
    args = ["--start", "2024-03-02T00:00:00Z", "--end", "2024-03-03T00:00:00Z", "--timeframe", "1Hour"]
    r = run("bars", "BTC/USD", *args, "--format", "csv", "--output", str(out), "--config", str(cfg))  # no keys needed
    assert r.returncode == 0, r.stderr
    frame = pl.read_csv(out)
    assert frame.height == 24 and set(frame["symbol"]) == {"BTC/USD"} and frame["volume"].dtype == pl.Float64
    bad = run("bars", "BTC/USD", *args, "--feed", "mars", "--config", str(cfg))
    assert bad.returncode == 2 and "error[INVALID_ARGUMENT]" in bad.stderr and "unknown crypto location" in bad.stderr
    mixed = run("bars", "BTC/USD", "AAPL", *args, "--config", str(cfg))
    assert mixed.returncode == 2 and "separately" in mixed.stderr
