"""Issue 13 item 10: one time-column name on every user-facing surface. Before, ``mp.bars`` frames,
``mp.quality`` findings and the CLI's CSV/JSON called it ``ts`` (the store's name) while REST ``/v1``,
alpaca-py's ``.df`` and Alpaca's documentation call it ``timestamp``. Now every frame or answer a user
gets says ``timestamp`` (``timestamp_ns`` for the vendor's exact nanoseconds); only the store and the
code inside keep ``ts``.

Each surface is read for real: the simulator serves the bars, a DuckDB store holds them, the gateway
runs on a port, the CLI runs as a subprocess."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest

from marketpipe.api.app import create_app
from marketpipe.core.config import config_from_dict
from marketpipe.service.data import SyncMarketData
from marketpipe.service.remote import GatewayClient
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config, serving
from tests.cli.test_cli import run
from tests.conftest import SIM_ENV

START, END = "2024-03-04", "2024-03-05"
SPIKE_AT = "2024-03-05T17:00:00Z"  # one bad bar, so the quality answers have a finding to show
TIME_NAMES = {"ts", "timestamp", "time", "t", "date", "datetime"}  # what a time column might be called


def time_columns(names: object) -> set[str]:
    return {str(n) for n in names if str(n).lower() in TIME_NAMES}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def world(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """AAPL 1Min over two sessions, stored while the vendor served one spiked bar."""
    d = tmp_path_factory.mktemp("timecol")
    store = d / "s.duckdb"
    cfg = d / "m.toml"
    cfg.write_text(
        f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[store]\npath = "{store}"\n'
    )
    config = config_from_dict(
        {
            "providers": {"alpaca": {"base_url": sim.url, "plan": "unlimited", "rate_limit_per_min": 100_000}},
            "store": {"path": str(store)},
        }
    )
    sim.faults.set([FaultRule(kind="bad_data", defect="spike", at=[SPIKE_AT], symbols=["AAPL"])])
    try:
        with SyncMarketData(config=config, env=SIM_ENV) as c:
            c.backfill("AAPL", START, END, timeframe="1Min")
    finally:
        sim.faults.clear()
    yield {"config": config, "cfg": cfg, "store": store, "sim": sim, "dir": d}


def test_every_public_frame_and_answer_calls_the_time_column_timestamp(world: dict[str, object]) -> None:
    seen: dict[str, set[str]] = {}
    config, cfg, sim = world["config"], world["cfg"], world["sim"]
    assert isinstance(sim, SimServer) and isinstance(cfg, Path)

    # Python: mp.bars's shapes (mp.bars is SyncMarketData.bars on the default client) and mp.quality
    with SyncMarketData(config=config, env=SIM_ENV) as c:  # type: ignore[arg-type]
        long = c.bars("AAPL", START, END, timeframe="1Min", fetch=False)
        assert isinstance(long, pl.DataFrame) and long.height == 2 * 390
        seen["mp.bars long"] = time_columns(long.columns)
        seen["mp.bars tz=exchange"] = time_columns(c.bars("AAPL", START, END, tz="exchange", fetch=False).columns)
        seen["mp.bars shape=alpaca (index)"] = time_columns(
            c.bars("AAPL", START, END, shape="alpaca", fetch=False).index.names
        )
        (quality,) = c.quality("AAPL", START, END, timeframe="1Min")
        assert quality.findings.height >= 1  # the spike
        seen["mp.quality findings"] = time_columns(quality.findings.columns)

    # the gateway: REST v1, and mp.client(gateway=) reading through it
    app = create_app(gateway_config(sim.url, world["dir"] / "gw.duckdb"), env=ENV)  # type: ignore[operator]
    with serving(app) as url:
        q = {"start": START, "end": END, "timeframe": "1Min"}
        bars = httpx.get(f"{url}/v1/bars/AAPL", params={**q, "limit": 5}, timeout=30).json()
        seen["/v1/bars json"] = time_columns(bars["bars"][0])
        text = httpx.get(f"{url}/v1/bars/AAPL", params={**q, "limit": 5, "format": "csv"}, timeout=30).text
        seen["/v1/bars csv"] = time_columns(next(csv.reader(io.StringIO(text))))
        latest = httpx.get(f"{url}/v1/quotes/AAPL/latest", timeout=30).json()
        seen["/v1/quotes latest"] = time_columns(latest) | time_columns(latest.get("quote", {}))
        with GatewayClient(url) as remote:
            seen["mp.client(gateway=) bars"] = time_columns(remote.bars("AAPL", START, END, timeframe="1Min").columns)
    store_cfg = ["--config", str(cfg)]

    # the CLI, as subprocesses: bars in every text format, the latest-value tables, quality's findings
    r = run("bars", "AAPL", "--start", START, "--end", END, "--no-fetch", "--format", "csv", *store_cfg)
    assert r.returncode == 0, r.stderr
    seen["cli bars csv"] = time_columns(next(csv.reader(io.StringIO(r.stdout))))
    r = run("bars", "AAPL", "--start", START, "--end", END, "--no-fetch", "--format", "json", *store_cfg)
    assert r.returncode == 0, r.stderr
    seen["cli bars json"] = time_columns(json.loads(r.stdout)[0])
    r = run("bars", "AAPL", "--start", START, "--end", START, "--no-fetch", *store_cfg)
    assert r.returncode == 0, r.stderr
    seen["cli bars table"] = time_columns(r.stdout.split())
    out = world["dir"] / "bars.parquet"  # type: ignore[operator]
    r = run("bars", "AAPL", "--start", START, "--no-fetch", "--format", "parquet", "--output", str(out), *store_cfg)
    assert r.returncode == 0, r.stderr
    seen["cli bars parquet"] = time_columns(pl.read_parquet(out).columns)
    r = run("quote", "AAPL", *store_cfg, env={**SIM_ENV, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    seen["cli quote table"] = time_columns(w.strip("│┃ ") for w in r.stdout.split())
    assert "timestamp_ns" in r.stdout and "ts_ns" not in r.stdout
    r = run("store", "anomalies", "AAPL", "--start", START, *store_cfg, env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    seen["cli store anomalies"] = time_columns(r.stdout.split())

    wrong = {surface: names for surface, names in seen.items() if names != {"timestamp"}}
    assert wrong == {}, wrong
