"""Issue 13 item 9: a notebook reads while ``marketpipe serve`` holds the store, through the gateway."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import marketpipe as mp
from marketpipe.core.config import load_config
from marketpipe.core.errors import GatewayUnavailable, InvalidArgument, StoreError
from marketpipe.core.schema import BAR_COLUMNS
from marketpipe.service.frames import public_name
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def gateway(sim: SimServer, tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    """A real ``marketpipe serve`` subprocess over the simulator, holding its store: (url, store, pid)."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n')
    store, port = tmp_path / "s.duckdb", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "MARKETPIPE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "serve", "--port", str(port), "--store", str(store),
         "--config", str(cfg)],
        env={**env, **SIM_ENV},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway never answered"
            time.sleep(0.2)
        yield url, store, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bars_through_the_gateway_while_it_holds_the_store(gateway: tuple[str, Path, int]) -> None:
    url, store, pid = gateway
    client = mp.client(gateway=url)
    # more than one gateway page (10,000 rows): 2 symbols x 15 days x 390 minutes
    frame = client.bars(["AAPL", "MSFT"], "2024-03-04", "2024-03-22", timeframe="1m")
    assert frame.columns == [public_name(c) for c in BAR_COLUMNS] and frame.height == 2 * 15 * 390
    assert frame["source"].unique().to_list() == ["sim:alpaca"] and frame["timeframe"].unique().to_list() == ["1Min"]
    assert frame.select("symbol", "timestamp").is_duplicated().sum() == 0
    with pytest.raises(StoreError) as info:  # the store itself is held, and the error says by whom and what to do
        DuckDBStore(store)
    assert info.value.details["pid"] == pid and "mp.client(gateway=" in info.value.message
    with pytest.raises(InvalidArgument):
        client.bars("AAPL", "2024-03-04", fetch=False)
    # adjusted through the gateway: AAPL's real 4:1 split of 2020-08-31
    raw = client.bars("AAPL", "2020-08-27", "2020-08-31", timeframe="1Day")
    split = client.bars("AAPL", "2020-08-27", "2020-08-31", timeframe="1Day", adjustment="split")
    assert raw["close"][0] / split["close"][0] == pytest.approx(4.0) and raw["close"][-1] == split["close"][-1]
    with pytest.raises(InvalidArgument):
        client.bars("AAPL", "2020-08-27", adjustment="both")  # refused before anything is sent
    client.close()


def test_an_unreachable_gateway_is_a_typed_error() -> None:
    with pytest.raises(GatewayUnavailable) as info, mp.client(gateway=f"http://127.0.0.1:{_free_port()}") as c:
        c.bars("AAPL", "2024-03-04", "2024-03-04")
    assert info.value.code == "GATEWAY_UNAVAILABLE" and "marketpipe serve" in info.value.message


def test_gateway_answers_are_what_mp_bars_returns(
    gateway: tuple[str, Path, int], sim: SimServer, tmp_path: Path
) -> None:
    """The same frame (columns, types, values) as ``mp.bars`` reading its own store of the same vendor."""
    url, _, _ = gateway
    with mp.client(gateway=url) as c:
        through = c.bars("AAPL", "2024-03-05", "2024-03-05", timeframe="5Min")
    local_toml = tmp_path / "local.toml"
    local_toml.write_text(
        f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[store]\npath = "{tmp_path / "local.duckdb"}"\n'
    )
    local = mp.client(config=load_config(local_toml), env=SIM_ENV)
    direct = local.bars("AAPL", "2024-03-05", "2024-03-05", timeframe="5Min")
    assert through.height == direct.height == 78
    assert through.schema == direct.schema
    assert through.drop("fetched_at").equals(direct.drop("fetched_at"))
