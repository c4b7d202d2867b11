"""The command line as a user runs it: subprocesses, real simulator, real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import SIM_ENV


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))}
    return subprocess.run(
        [sys.executable, "-m", "marketpipe.cli.main", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cfg(sim, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    p = tmp_path / "m.toml"
    p.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n')
    return p


def test_bars_fetches_then_serves_from_store(cfg: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    r = run(
        "bars",
        "AAPL",
        "--start",
        "2024-03-05",
        "--end",
        "2024-03-05",
        "--format",
        "csv",
        "--config",
        str(cfg),
        "--store",
        str(store),
        env=SIM_ENV,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("symbol,timeframe,timestamp,open,high,low,close,volume")
    assert len(lines) == 391
    # second time: no credentials needed, nothing fetched
    r2 = run(
        "bars",
        "AAPL",
        "--start",
        "2024-03-05",
        "--end",
        "2024-03-05",
        "--format",
        "json",
        "--config",
        str(cfg),
        "--store",
        str(store),
        "--no-fetch",
    )
    assert r2.returncode == 0, r2.stderr
    assert len(json.loads(r2.stdout)) == 390
    # a covered range reads without credentials even when fetching is allowed: nothing is missing
    r3 = run(
        "bars",
        "AAPL",
        "--start",
        "2024-03-05",
        "--end",
        "2024-03-05",
        "--format",
        "json",
        "--config",
        str(cfg),
        "--store",
        str(store),
    )
    assert r3.returncode == 0, r3.stderr
    assert len(json.loads(r3.stdout)) == 390


def test_parquet_output(cfg: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.parquet"
    r = run(
        "bars",
        "MSFT",
        "--start",
        "2024-03-05",
        "--timeframe",
        "1Day",
        "--end",
        "2024-03-08",
        "--format",
        "parquet",
        "-o",
        str(out),
        "--config",
        str(cfg),
        "--store",
        str(tmp_path / "s.duckdb"),
        env=SIM_ENV,
    )
    assert r.returncode == 0, r.stderr
    assert pl.read_parquet(out).height == 4


@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["bars", "AAPL", "--start", "2024-03-05", "--timeframe", "7Sec"], "INVALID_TIMEFRAME", 2),
        (["bars", "AAPL", "--start", "2024-03-09", "--end", "2024-03-01"], "INVALID_RANGE", 2),
        (["bars", "AAPL", "--start", "last tuesday"], "INVALID_ARGUMENT", 2),
        (["bars", "AA PL!", "--start", "2024-03-05"], "INVALID_SYMBOL", 2),
        (["bars", "AAPL", "--start", "2024-03-05", "--format", "xml"], "INVALID_ARGUMENT", 2),
        (["backfill", "AAPL", "--start", "2024-03-05"], "MISSING_CREDENTIALS", 1),
    ],
)
def test_bad_input_one_line_stable_code_nonzero_exit(
    args: list[str], code: str, exit_code: int, tmp_path: Path
) -> None:
    r = run(*args, "--store", str(tmp_path / "s.duckdb"))
    assert r.returncode == exit_code
    assert f"error[{code}]" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_credentials_message_names_the_variables(tmp_path: Path) -> None:
    r = run("backfill", "AAPL", "--start", "2024-03-05", "--store", str(tmp_path / "s.duckdb"))
    assert "ALPACA_API_KEY" in r.stderr and "ALPACA_SECRET_KEY" in r.stderr


def test_wrong_keys_never_printed(cfg: Path, tmp_path: Path) -> None:
    r = run(
        "backfill",
        "AAPL",
        "--start",
        "2024-03-05",
        "--config",
        str(cfg),
        "--store",
        str(tmp_path / "s.duckdb"),
        env={"ALPACA_API_KEY": "PKWRONG", "ALPACA_SECRET_KEY": "SUPERSECRETVALUE"},
    )
    assert r.returncode == 1
    assert "error[AUTH_FAILED]" in r.stderr
    assert "SUPERSECRETVALUE" not in r.stderr + r.stdout


def test_latest_commands(cfg: Path) -> None:
    for cmd in ("quote", "trade", "snapshot"):
        r = run(cmd, "AAPL", "--config", str(cfg), env=SIM_ENV)
        assert r.returncode == 0, r.stderr
        assert "AAPL" in r.stdout
    r = run("quote", "ZZZZ", "--config", str(cfg), env=SIM_ENV)
    assert r.returncode == 1 and "no data for: ZZZZ" in r.stderr


def test_config_show_masks_secrets(cfg: Path) -> None:
    r = run(
        "config",
        "show",
        "--config",
        str(cfg),
        env={
            "ALPACA_API_KEY": "PKVISIBLEKEY123",
            "ALPACA_SECRET_KEY": "s3cr3tvalue",
            "POLYGON_API_KEY": "polysecret99",
        },
    )
    assert r.returncode == 0, r.stderr
    assert "s3cr3tvalue" not in r.stdout and "PKVISIBLEKEY123" not in r.stdout and "polysecret99" not in r.stdout
    assert "POLYGON_API_KEY" in r.stdout
    assert "unlimited" in r.stdout


def test_config_show_shows_the_data_url_of_the_environment(tmp_path: Path) -> None:
    """Issue 13: ``APCA_API_DATA_URL`` alone is the effective Alpaca base_url (it printed ``null``)."""
    import json

    p = tmp_path / "plain.toml"
    p.write_text('[providers.alpaca]\nplan = "unlimited"\n')
    r = run("config", "show", "--config", str(p), env={"APCA_API_DATA_URL": "http://127.0.0.1:8765"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["providers"]["alpaca"]["base_url"] == "http://127.0.0.1:8765"


def test_config_show_prints_each_vendor_with_its_own_keys(cfg: Path) -> None:
    import json

    r = run("config", "show", "--config", str(cfg), env={"ALPACA_SECRET_KEY": "s3cr3tvalue"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    providers = doc["providers"]
    assert set(providers) >= {"alpaca", "polygon", "yahoo"}
    assert providers["alpaca"]["recent_sip"] == "clamp" and providers["alpaca"]["plan"] == "unlimited"
    assert providers["polygon"]["plan"] == "free" and "recent_sip" not in providers["polygon"]
    assert "feed" not in providers["polygon"] and providers["yahoo"]["feed"] == "yahoo"
    assert providers["yahoo"]["enabled"] is False and "plan" not in providers["yahoo"]
    for vendor in providers.values():  # the shared keys, every vendor
        assert {"retry", "circuit", "read_timeout", "priority", "base_url"} <= set(vendor)
    assert "s3cr3tvalue" not in r.stdout and doc["credentials"]["ALPACA_SECRET_KEY"] != "s3cr3tvalue"


def test_store_commands_and_backfill_summary(cfg: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    r = run(
        "backfill",
        "AAPL",
        "MSFT",
        "--start",
        "2024-03-04",
        "--end",
        "2024-03-05",
        "--config",
        str(cfg),
        "--store",
        str(store),
        env=SIM_ENV,
    )
    assert r.returncode == 0, r.stderr
    assert "1,560 newly stored" in r.stdout
    r = run(
        "backfill",
        "AAPL",
        "MSFT",
        "--start",
        "2024-03-04",
        "--end",
        "2024-03-05",
        "--config",
        str(cfg),
        "--store",
        str(store),
        env=SIM_ENV,
    )
    assert "already covered" in r.stdout and "0 requests" in r.stdout
    info = run("store", "info", "--store", str(store))
    assert info.returncode == 0 and "MSFT" in info.stdout
    assert run("store", "log", "--store", str(store)).returncode == 0
    assert run("store", "quarantine", "--store", str(store)).returncode == 0


def test_symbols_file(cfg: Path, tmp_path: Path) -> None:
    f = tmp_path / "syms.txt"
    f.write_text("AAPL  # a comment\nmsft, spy\n\n")
    r = run(
        "backfill",
        "--symbols-file",
        str(f),
        "--start",
        "2024-03-04",
        "--end",
        "2024-03-04",
        "--config",
        str(cfg),
        "--store",
        str(tmp_path / "s.duckdb"),
        env=SIM_ENV,
    )
    assert r.returncode == 0, r.stderr
    assert "1,170 newly stored" in r.stdout


def test_demo_runs_offline(tmp_path: Path) -> None:
    r = run("demo", "--store", str(tmp_path / "demo.duckdb"), timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Demo backfill" in r.stdout and "newly stored" in r.stdout
    assert "latest quotes" in r.stdout


def test_demo_hints_print_commands_that_run_as_printed(tmp_path: Path) -> None:
    """Issue 13: the hints named a bare ``marketpipe`` that is not on PATH after ``./dev demo``. Run through
    ./dev they say ``./dev marketpipe``; run by the venv's script off PATH, its absolute path — and the printed
    command runs."""
    import shlex

    store = tmp_path / "demo.duckdb"
    r = run("demo", "--days", "1", "--store", str(store), env={"MARKETPIPE_CLI": "./dev marketpipe"}, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "read them again: ./dev marketpipe bars AAPL --start " in r.stdout
    script = Path(sys.executable).parent / "marketpipe"
    no_path = {"PATH": "/usr/bin:/bin", "MARKETPIPE_CLI": ""}
    r = subprocess.run(
        [str(script), "demo", "--days", "1", "--store", str(store)],
        env={**{k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))}, **no_path},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    hint = next(line for line in r.stdout.splitlines() if line.startswith("read them again: "))
    argv = shlex.split(hint.removeprefix("read them again: "))
    assert argv[0] == str(script.resolve())
    again = subprocess.run(argv, env={**os.environ, **no_path}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "AAPL" in again.stdout


@pytest.fixture(scope="module")
def three(sim):  # type: ignore[no-untyped-def]
    from marketpipe.sim.server import SimServer

    with SimServer(sim.market, vendor="polygon") as p, SimServer(sim.market, vendor="yahoo") as y:
        yield sim, p, y


def _three_cfg(three, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    a, p, y = three
    cfg = tmp_path / "three.toml"
    cfg.write_text(
        f'[providers.alpaca]\nbase_url = "{a.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
        f'[providers.polygon]\nbase_url = "{p.url}"\nrate_limit_per_min = 100000\n'
        f'[providers.yahoo]\nbase_url = "{y.url}"\nenabled = true\n'
    )
    return cfg


def test_providers_table(three, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = run("providers", "--config", str(_three_cfg(three, tmp_path)), env={**SIM_ENV, "POLYGON_API_KEY": "POLYKEY"})
    assert r.returncode == 0, r.stderr
    for name in ("alpaca", "polygon", "yahoo"):
        assert name in r.stdout
    assert r.stdout.count("healthy") == 3
    r = run("providers", "--config", str(_three_cfg(three, tmp_path)), env=SIM_ENV)
    assert "MISSING_CREDENTIALS" in r.stdout  # polygon without its key is listed as unavailable


def test_reconcile_command(three, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "r.duckdb"
    r = run(
        "reconcile",
        "AAPL",
        "--start",
        "2024-03-04",
        "--end",
        "2024-03-08",
        "--config",
        str(_three_cfg(three, tmp_path)),
        "--store",
        str(store),
        env={**SIM_ENV, "POLYGON_API_KEY": "POLYKEY"},
    )
    assert r.returncode == 0, r.stderr
    assert "sim:polygon" in r.stdout and "sim:yahoo" in r.stdout
    from marketpipe.store.duckdb import DuckDBStore

    with DuckDBStore(store) as st:
        rec = st.reconciliation("AAPL", "1Day")
    assert rec.height == 10 and set(rec["status"]) == {"match"}


# --- offline, everything (issue 13): `marketpipe sim` and what it prints ---------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sim_exports(lines: list[str]) -> dict[str, str]:
    """The variables of the ``export`` lines, parsed as a shell would."""
    import shlex

    env: dict[str, str] = {}
    for line in lines:
        if line.startswith("export "):
            for word in shlex.split(line)[1:]:
                name, _, value = word.partition("=")
                env[name] = value
    return env


async def _stream_trades(url: str, symbol: str, n: int, wait_s: float = 20.0) -> list[dict[str, object]]:
    """The first ``n`` trades of ``symbol`` on an Alpaca-protocol stream (JSON), any key pair."""
    import asyncio

    import orjson
    from websockets.asyncio.client import connect

    trades: list[dict[str, object]] = []
    async with asyncio.timeout(wait_s), connect(url) as ws:
        assert orjson.loads(await ws.recv()) == [{"T": "success", "msg": "connected"}]
        await ws.send(orjson.dumps({"action": "auth", "key": "anyone", "secret": "anysecret"}).decode())
        assert orjson.loads(await ws.recv()) == [{"T": "success", "msg": "authenticated"}]
        await ws.send(orjson.dumps({"action": "subscribe", "trades": [symbol]}).decode())
        while len(trades) < n:
            trades += [m for m in orjson.loads(await ws.recv()) if m["T"] == "t"]
    return trades[:n]


def test_sim_serves_every_vendor_and_what_it_prints_runs_reconcile_and_serve(tmp_path: Path) -> None:
    """`marketpipe sim` plays Alpaca, Polygon and Yahoo; the exports it prints (with the config file it names)
    are all `reconcile` needs to get rows from every provider, and `serve` with them streams from the sim."""
    import asyncio
    import time

    import httpx

    written = tmp_path / "sim" / "sim.toml"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "POLYGON_", "MARKETPIPE_"))}
    sim_proc = subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "sim", "--port", "0", "--write-config", str(written)],
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    serve_proc: subprocess.Popen[str] | None = None
    try:
        assert sim_proc.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("export MARKETPIPE_CONFIG=") for line in lines):
            line = sim_proc.stdout.readline()
            assert line, f"sim ended before printing its exports: {sim_proc.stderr.read() if sim_proc.stderr else ''}"
            lines.append(line.rstrip("\n"))
        env = _sim_exports(lines)
        assert set(env) == {
            "ALPACA_API_KEY",
            "ALPACA_SECRET_KEY",
            "APCA_API_DATA_URL",
            "POLYGON_API_KEY",
            "MARKETPIPE_CONFIG",
        }
        assert Path(env["MARKETPIPE_CONFIG"]) == written.resolve() and written.is_file()
        r = run("reconcile", "AAPL", "--start", "2024-03-04", "--end", "2024-03-08", "--timeframe", "1Day", env=env)
        assert r.returncode == 0, r.stderr
        assert "sim:polygon" in r.stdout and "sim:yahoo" in r.stdout and "skipped" not in r.stderr
        from marketpipe.store.duckdb import DuckDBStore

        with DuckDBStore(written.parent / "sim-seed0.duckdb") as st:  # the sim's own store, named in the config
            rec = st.reconciliation("AAPL", "1Day")
        assert set(rec["other"]) == {"sim:polygon", "sim:yahoo"}  # a row from each provider
        assert rec.height == 10 and set(rec["status"]) == {"match"}

        port = _free_port()
        serve_proc = subprocess.Popen(
            [sys.executable, "-m", "marketpipe.cli.main", "serve", "--port", str(port)],
            env={**base, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert serve_proc.poll() is None, serve_proc.stderr.read() if serve_proc.stderr else ""
                assert time.monotonic() < deadline, "serve never answered"
                time.sleep(0.2)
        trades = asyncio.run(_stream_trades(f"ws://127.0.0.1:{port}/v2/iex", "AAPL", 3))
        assert len(trades) == 3 and {t["S"] for t in trades} == {"AAPL"}
    finally:
        for proc in (serve_proc, sim_proc):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
