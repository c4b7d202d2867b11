"""Issue 12 items 8 and 9: what an operator can get wrong ends in one ``error[CODE]: message`` line on stderr
and a non-zero exit (2 for a bad argument, 1 otherwise), never a traceback, a usage box or a wrong port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from marketpipe.core.errors import AddressInUse, InvalidArgument
from marketpipe.sim.server import SimServer
from tests.cli.test_cli import run
from tests.conftest import SIM_ENV


def assert_error(r: subprocess.CompletedProcess[str], code: str, exit_code: int, *mentions: str) -> str:
    """Exit status, no traceback, and exactly one error line, the last one on stderr; returns it."""
    assert r.returncode == exit_code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error[")]
    assert len(errors) == 1, r.stderr
    line = errors[0]
    assert line.startswith(f"error[{code}]: "), r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == line, r.stderr
    for text in mentions:
        assert text in line, (text, line)
    return line


@pytest.fixture
def listening() -> Iterator[int]:
    """A port another process (here: this one) already listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def sim_cfg(sim, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    p = tmp_path / "m.toml"
    p.write_text(f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n')
    return p


# --- item 8 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["backfill", "bars"])
def test_end_9999_12_31_is_an_invalid_range(command: str, sim_cfg: Path, tmp_path: Path) -> None:
    r = run(
        command, "AAPL", "--start", "2024-03-01", "--end", "9999-12-31",
        "--config", str(sim_cfg), "--store", str(tmp_path / "s.duckdb"), env=SIM_ENV,
    )  # fmt: skip
    assert_error(r, "INVALID_RANGE", 2, "end", "1970-01-01 to 2200-12-31")


def test_non_utf8_symbols_file(tmp_path: Path) -> None:
    symbols = tmp_path / "symbols.txt"
    symbols.write_bytes(b"AAPL\n\xff\xfeMSFT\n")
    r = run("backfill", "--symbols-file", str(symbols), "--start", "2024-03-01", "--store", str(tmp_path / "s.duckdb"))
    assert_error(r, "INVALID_ARGUMENT", 2, str(symbols), "UTF-8")


def test_store_whose_directory_cannot_be_created(tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a directory")
    for store in ("/etc/passwd/x.duckdb", str(a_file / "x.duckdb")):
        r = run("store", "info", "--store", store)
        assert_error(r, "STORE_ERROR", 1, store)


def test_providers_list_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("providers = [1, 2]\n")
    r = run("config", "show", "--config", str(cfg))
    assert_error(r, "CONFIG_ERROR", 1, "providers")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_unwritable_output(fmt: str, sim_cfg: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a directory")
    store = tmp_path / "s.duckdb"
    for output in (a_file / "bars.out", tmp_path):  # under a file; a directory
        r = run(
            "bars", "AAPL", "--start", "2024-03-05", "--end", "2024-03-05", "--format", fmt, "--output", str(output),
            "--config", str(sim_cfg), "--store", str(store), env=SIM_ENV,
        )  # fmt: skip
        assert_error(r, "OUTPUT_ERROR", 1, str(output))
    assert a_file.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []  # nothing partial left


def test_output_is_written_whole(sim_cfg: Path, tmp_path: Path) -> None:
    output = tmp_path / "bars.csv"
    r = run(
        "bars", "AAPL", "--start", "2024-03-05", "--end", "2024-03-05", "--format", "csv", "--output", str(output),
        "--config", str(sim_cfg), "--store", str(tmp_path / "s.duckdb"), env=SIM_ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(output.read_text().splitlines()) == 391
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("command", [["store", "quarantine"], ["store", "log"], ["store", "runs"]])
def test_negative_limit(command: list[str], tmp_path: Path) -> None:
    r = run(*command, "--limit", "-1", "--store", str(tmp_path / "s.duckdb"))
    assert_error(r, "INVALID_ARGUMENT", 2, "--limit")


def test_sim_port_out_of_range() -> None:
    r = run("sim", "--port", "99999", timeout=30)
    assert_error(r, "INVALID_ARGUMENT", 2, "--port")


def test_sim_port_in_use(listening: int) -> None:
    r = run("sim", "--port", str(listening), timeout=30)
    line = assert_error(r, "ADDRESS_IN_USE", 1, f"127.0.0.1:{listening}")
    assert "simulator on" not in r.stderr, line  # nothing announced that is not listening


# --- item 9 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_serve_port_out_of_range(port: str, tmp_path: Path) -> None:
    r = run("serve", "--port", port, "--store", str(tmp_path / "s.duckdb"), timeout=30)
    assert_error(r, "INVALID_ARGUMENT", 2, "--port")
    assert "gateway on" not in r.stderr


def test_serve_port_in_use(listening: int, tmp_path: Path) -> None:
    r = run("serve", "--port", str(listening), "--store", str(tmp_path / "s.duckdb"), timeout=60)
    assert_error(r, "ADDRESS_IN_USE", 1, f"127.0.0.1:{listening}")
    assert "gateway on" not in r.stderr


def test_serve_announces_the_port_it_listens_on(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "serve", "--port", str(port), "--store", str(tmp_path / "s.db")],
        env={k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert f"http://127.0.0.1:{port} " in first
        deadline = time.monotonic() + 30
        while True:  # the announced port answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the announced port never answered"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--log-level", "loud", "store", "info"], "--log-level"), (["serve", "--server-log-level", "loud"], "--server")],
)
def test_unknown_log_level(args: list[str], option: str, tmp_path: Path) -> None:
    r = run(*args, "--store", str(tmp_path / "s.duckdb"), timeout=30)
    assert_error(r, "INVALID_ARGUMENT", 2, option, "'debug'")


def test_log_level_any_case_is_accepted(tmp_path: Path) -> None:
    from marketpipe.store.duckdb import DuckDBStore

    DuckDBStore(tmp_path / "s.duckdb").close()  # `store info` reads an existing store (issue 13 item 16)
    r = run("--log-level", "INFO", "store", "info", "--store", str(tmp_path / "s.duckdb"))
    assert r.returncode == 0, r.stderr


def test_negative_read_timeout_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("[providers.alpaca]\nread_timeout = -1\n")
    for command in (["config", "show"], ["store", "info", "--store", str(tmp_path / "s.duckdb")]):
        r = run(*command, "--config", str(cfg))
        assert_error(r, "CONFIG_ERROR", 1, "providers.alpaca.read_timeout")


# --- the same kinds elsewhere --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mention"),
    [
        (["serve", "--workers", "0"], "--workers"),
        (["demo", "--days", "0"], "--days"),
        (["schedule", "AAPL", "--runs", "0"], "--runs"),
        (["schedule", "AAPL", "--concurrency", "0", "--runs", "1"], "--concurrency"),
        (["quality", "AAPL", "--start", "2024-03-05", "--days", "-1"], "--days"),
        (["reconcile", "AAPL", "--start", "2024-03-05", "--hard-pct", "-3"], "--hard-pct"),
        (["store", "anomalies", "AAPL", "--start", "1900-01-01"], "start"),
        (["bars", "AAPL", "--start", "2024-03-05", "--no-such-option"], "--no-such-option"),
        (["bars", "--start", "2024-03-05"], "symbols"),
    ],
)
def test_other_arguments_that_cannot_work(args: list[str], mention: str, tmp_path: Path) -> None:
    r = run(*args, "--store", str(tmp_path / "s.duckdb"), timeout=60)
    code = "INVALID_RANGE" if mention == "start" else "INVALID_ARGUMENT"
    assert_error(r, code, 2, mention)


def test_unwritable_quality_report(sim_cfg: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    r = run("backfill", "AAPL", "--start", "2024-03-05", "--end", "2024-03-05", "--config", str(sim_cfg),
            "--store", str(store), env=SIM_ENV)  # fmt: skip
    assert r.returncode == 0, r.stderr
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    for flag in ("--html", "--png"):
        target = a_file / "report"
        r = run("quality", "AAPL", "--start", "2024-03-05", "--end", "2024-03-05", flag, str(target),
                "--store", str(store))  # fmt: skip
        assert_error(r, "OUTPUT_ERROR", 1, flag, str(target))


def test_no_arguments_still_prints_the_help() -> None:
    r = run()
    assert r.returncode == 2
    assert "Usage" in r.stdout and "backfill" in r.stdout
    assert "Traceback" not in r.stderr


# --- the simulator server, in process ----------------------------------------------------------------------------


def test_sim_server_port_errors_are_typed() -> None:
    with SimServer() as first:
        with pytest.raises(AddressInUse) as info:
            SimServer(port=first.port).start()
        assert info.value.code == "ADDRESS_IN_USE"
        assert isinstance(info.value, OSError)
    with pytest.raises(InvalidArgument) as bad:
        SimServer(port=99999).start()
    assert bad.value.details == {"parameter": "port"}


# --- issue 13 items 9 and 16: a store that is missing or held by another process ------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["bars", "AAPL", "--start", "2024-03-04", "--no-fetch"],
        ["store", "info"],
        ["store", "quarantine"],
        ["store", "log"],
        ["store", "runs"],
        ["store", "anomalies", "AAPL", "--start", "2024-03-04"],
    ],
)
def test_reading_a_store_that_does_not_exist(command: list[str], tmp_path: Path) -> None:
    """Before: an empty table and exit 0 (and a new empty store file, with its directory)."""
    store = tmp_path / "nonexistent" / "dir" / "x.duckdb"
    r = run(*command, "--store", str(store), timeout=60)
    assert_error(r, "STORE_ERROR", 1, f"no store at {store}")
    assert not store.exists() and not store.parent.exists()


def test_a_store_held_by_a_running_gateway_says_who_holds_it_and_what_to_do(tmp_path: Path) -> None:
    """Before: ``cannot open store …: IO Error: Could not set lock … Is another marketpipe process using it?``."""
    from marketpipe.store.duckdb import DuckDBStore

    store = tmp_path / "s.duckdb"
    DuckDBStore(store).close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", "serve", "--port", str(port), "--store", str(store)],
        env={k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))},
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait on the gateway's own health route, not by opening the store: a CLI probe holding the file
        # while the gateway starts would make the gateway the one refused (the next test's case).
        deadline = time.monotonic() + 60
        while True:  # the gateway answers: its lifespan has run, so its store is open
            assert proc.poll() is None, f"the gateway exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway did not answer /health within 60 s"
            time.sleep(0.2)
        r = run("bars", "AAPL", "--start", "2024-03-04", "--no-fetch", "--store", str(store), timeout=60)
        line = assert_error(r, "STORE_ERROR", 1, str(store), f"locked by process {proc.pid}", "marketpipe serve")
        assert "mp.client(gateway=" in line and f"kill {proc.pid}" in line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_on_a_store_another_process_holds_is_one_store_error_line(tmp_path: Path) -> None:
    """Before: uvicorn's startup traceback (the live hub opened the store inside the app's lifespan),
    then ``error[INTERNAL]: the gateway did not start``. Found following the README: a notebook that had
    called ``mp.bars`` held the file while ``marketpipe serve`` started."""
    from marketpipe.store.duckdb import DuckDBStore

    store = tmp_path / "s.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, marketpipe.store.duckdb as d; s = d.DuckDBStore(sys.argv[1]);"
         " print('held', flush=True); sys.stdin.read()", str(store)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        r = run("serve", "--port", str(port), "--store", str(store), timeout=60)
        assert_error(r, "STORE_ERROR", 1, str(store), f"locked by process {holder.pid}")
        assert "marketpipe gateway on" not in r.stderr  # nothing announced that is not serving
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    DuckDBStore(store).close()  # released: a gateway could start now


def test_serve_with_workers_on_a_database_that_cannot_be_reached_is_one_store_error_line() -> None:
    """Before: each worker process died in its lifespan with a traceback, then uvicorn's "Child process
    failed to start". Found running the README's PostgreSQL steps with no server up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        dead = bound.getsockname()[1]  # bound, never listening: connections are refused
        r = run(
            "serve", "--workers", "2", "--port", str(port), "--store", f"postgresql://u@127.0.0.1:{dead}/x", timeout=60
        )
    assert_error(r, "STORE_ERROR", 1, "cannot connect to PostgreSQL")
    assert "marketpipe gateway on" not in r.stderr and "Traceback" not in r.stderr
