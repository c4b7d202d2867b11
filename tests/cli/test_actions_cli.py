"""``marketpipe actions``, ``actions reconcile`` and ``bars --adjustment`` as a user runs them:
subprocesses against the simulator's three faces, a real store."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from marketpipe.sim.actions import ActionFault
from marketpipe.sim.server import SimServer
from tests.cli.test_cli import run
from tests.service.vendors import ENV, three_faces


@pytest.fixture(scope="module")
def faces() -> Iterator[dict[str, SimServer]]:
    with three_faces() as f:
        yield f


@pytest.fixture
def cfg(faces: dict[str, SimServer], tmp_path: Path) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(
        f'[store]\npath = "{tmp_path / "s.duckdb"}"\n'
        f'[providers.alpaca]\nbase_url = "{faces["alpaca"].url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[providers.polygon]\nbase_url = "{faces["polygon"].url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[providers.yahoo]\nbase_url = "{faces["yahoo"].url}"\nenabled = true\nrate_limit_per_min = 100000\n'
    )
    return p


def test_actions_lists_the_real_facts(cfg: Path) -> None:
    r = run("actions", "AAPL", "NVDA", "--start", "2020-01-01", "--end", "2024-12-31", "--type", "forward_split",
            "--format", "csv", "--config", str(cfg), env=ENV)  # fmt: skip
    assert r.returncode == 0, r.stderr
    frame = pl.read_csv(io.StringIO(r.stdout))
    assert frame.select("symbol", "ex_date", "old_rate", "new_rate").rows() == [
        ("AAPL", "2020-08-31", 1.0, 4.0),
        ("NVDA", "2024-06-10", 1.0, 10.0),
    ]
    assert set(frame["source"]) == {"sim:alpaca"}
    bad = run("actions", "AAPL", "--start", "2020-01-01", "--type", "splits", "--config", str(cfg), env=ENV)
    assert bad.returncode == 2 and "error[INVALID_ARGUMENT]" in bad.stderr


def test_bars_adjustment_and_as_of(cfg: Path) -> None:
    common = ("AAPL", "--start", "2020-08-27", "--end", "2020-08-31", "--timeframe", "1Day", "--format", "csv",
              "--config", str(cfg))  # fmt: skip
    raw = pl.read_csv(io.StringIO(run("bars", *common, env=ENV).stdout))
    adj = run("bars", *common, "--adjustment", "split", env=ENV)
    assert adj.returncode == 0, adj.stderr
    split = pl.read_csv(io.StringIO(adj.stdout))
    assert raw["close"][0] / split["close"][0] == pytest.approx(4.0)
    assert "applied forward_split AAPL ex 2020-08-31 x0.25" in adj.stderr
    pit = pl.read_csv(io.StringIO(run("bars", *common, "--adjustment", "all", "--as-of", "2020-08-28", env=ENV).stdout))
    assert pit["close"].to_list() == raw["close"].to_list()
    bad = run("bars", *common, "--adjustment", "both", env=ENV)
    assert bad.returncode == 2 and "error[INVALID_ARGUMENT]" in bad.stderr and "adjustment" in bad.stderr


def test_actions_reconcile_finds_each_golden_case(faces: dict[str, SimServer], cfg: Path) -> None:
    market = faces["alpaca"].market
    market.actions.set_faults([
        ActionFault(vendor="yahoo", kind="missing_split", symbol="AAPL"),
        ActionFault(vendor="polygon", kind="wrong_ratio", symbol="AAPL"),
        ActionFault(vendor="alpaca", kind="unadjusted_dividend", symbol="AAPL", ex_date=date(2020, 11, 6)),
    ])  # fmt: skip
    try:
        r = run("actions", "reconcile", "AAPL", "--start", "2020-01-01", "--end", "2020-12-31", "--config", str(cfg),
                env=ENV)  # fmt: skip
    finally:
        market.actions.clear_faults()
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "vs reference alpaca" in text
    assert "split yahoo missing 2020-08-31" in text
    assert "split polygon different_ratio 2020-08-31 2020-08-31 4.0 5.0" in text
    # Alpaca lists the dividend but its adjusted bars leave it out: its adjusted series steps there
    assert "adjustment alpaca different_adjustment 2020-11-06 2020-11-06 1.0 0.99898" in text
    assert "3 disagreement(s) stored" in text
