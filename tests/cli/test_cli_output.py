"""Issue 13 items 4, 7 and 8 as a user sees them in a terminal of 80 columns: every ``error[CODE]`` is one
physical line even when stderr is a pipe, ``update`` tells each symbol's own numbers, and help text shows
its square brackets (``[[jobs]]``) instead of Rich eating them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.text import Text

from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from tests.cli.test_cli import run
from tests.conftest import SIM_ENV

NARROW = {"COLUMNS": "80"}
SIM_CFG = '[providers.alpaca]\nbase_url = "{url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n'
# one attempt, no retry, so an always-failing vendor ends the run at once
FAILING_CFG = (
    SIM_CFG
    + "retry = {{ attempts = 1, base_seconds = 0.01, max_seconds = 0.02 }}\n[providers.polygon]\nenabled = false\n"
)


def error_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error[")]


def assert_one_physical_line(r: subprocess.CompletedProcess[str], code: str, *whole: str) -> str:
    """The error is one line of stderr (longer than the 80 columns, so it was not folded) holding ``whole``."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in error_lines(r) if line.startswith(f"error[{code}]")]
    assert lines, r.stderr
    line = lines[0]
    assert len(line) > 80, line
    for text in whole:
        assert text in line, (text, r.stderr)
    return line


# --- item 4 -----------------------------------------------------------------------------------------------


def test_store_error_with_a_long_path_is_one_line_on_a_pipe(tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a directory")
    store = str(a_file / ("a-rather-long-directory-name-" * 4) / "market-data-store-with-a-long-name.duckdb")
    for args in (("store", "info"), ("bars", "AAPL", "--start", "2024-03-04", "--no-fetch")):
        r = run(*args, "--store", store, env=NARROW)
        assert r.returncode == 1, r.stderr
        line = assert_one_physical_line(r, "STORE_ERROR", store)
        assert r.stderr.rstrip().splitlines()[-1] == line


def test_backfill_unit_error_is_one_line_on_a_pipe(sim: SimServer, tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(FAILING_CFG.format(url=sim.url))
    sim.faults.set([FaultRule(kind="http_500")])
    r = run(
        "backfill", "AAPL", "--start", "2024-03-04", "--end", "2024-03-05", "--no-progress",
        "--config", str(cfg), "--store", str(tmp_path / "s.duckdb"), env={**SIM_ENV, **NARROW},
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert_one_physical_line(r, "PROVIDER_UNAVAILABLE", "AAPL 2024-03-04", "server error 500")


def test_update_error_is_one_line_on_a_pipe(sim: SimServer, tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(FAILING_CFG.format(url=sim.url))
    store = str(tmp_path / "s.duckdb")
    sim.faults.set([FaultRule(kind="http_500")])
    r = run(
        "update", "AAPL", "--start", "2024-03-04", "--end", "2024-03-05",
        "--config", str(cfg), "--store", store, env={**SIM_ENV, **NARROW},
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert_one_physical_line(r, "PROVIDER_UNAVAILABLE", "AAPL: ", "server error 500")


# --- item 7 -----------------------------------------------------------------------------------------------


def test_update_shows_each_symbols_own_numbers(sim: SimServer, tmp_path: Path) -> None:
    import duckdb

    cfg = tmp_path / "m.toml"
    cfg.write_text(SIM_CFG.format(url=sim.url))
    store = tmp_path / "s.duckdb"
    common = ("--config", str(cfg), "--store", str(store))
    r = run("backfill", "AAPL", "MSFT", "--start", "2024-03-04", "--end", "2024-03-04", *common, env=SIM_ENV)
    assert r.returncode == 0, r.stderr

    def held() -> dict[str, int]:
        with duckdb.connect(str(store), read_only=True) as con:
            return dict(con.execute("SELECT symbol, count(*) FROM bars GROUP BY symbol").fetchall())

    before = held()
    r = run("update", "AAPL", "MSFT", "--end", "2024-03-07", *common, env={**SIM_ENV, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    after = held()
    gained = {s: after[s] - before[s] for s in ("AAPL", "MSFT")}
    assert all(n > 0 for n in gained.values()), gained
    rows = {line.split("│")[1].strip(): line.split("│") for line in r.stdout.splitlines() if line.count("│") >= 7}
    for sym, n in gained.items():
        assert rows[sym][4].strip() == f"{n:,}", (sym, n, r.stdout)
    assert sum(gained.values()) == sum(int(rows[s][4].strip().replace(",", "")) for s in gained)
    assert "shared by several symbols" not in r.stdout


# --- item 8 -----------------------------------------------------------------------------------------------


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_no_help_text_loses_its_square_brackets_to_rich_markup() -> None:
    """Typer renders help as Rich markup, where ``[anything]`` is a tag: written text must come through."""
    from marketpipe.cli.main import app

    eaten = []
    for path, cmd in _commands(typer.main.get_command(app)):
        texts = [("help", cmd.help), ("epilog", cmd.epilog), ("short help", cmd.short_help)]
        texts += [(f"--{p.name}", getattr(p, "help", None)) for p in cmd.params]
        for what, text in texts:
            if text and Text.from_markup(text).plain != text.replace("\\[", "["):
                eaten.append(f"{' '.join(path)} {what}: {text!r}")
    assert not eaten, "\n".join(eaten)


def test_schedule_help_shows_jobs_tables() -> None:
    r = run("schedule", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "or the config's [[jobs]]." in r.stdout
    assert "run these [[jobs]] from the config" in r.stdout
    assert "[]" not in r.stdout


def _on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the command line with stderr on a pseudo-terminal (stdout a pipe); (exit status, what stderr showed)."""
    import os
    import pty
    import sys

    master, slave = pty.openpty()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketpipe.cli.main", *args],
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("command", ["update", "repair"])
def test_update_and_repair_show_the_backfill_progress_bar_on_a_terminal(
    command: str, sim: SimServer, tmp_path: Path
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(SIM_CFG.format(url=sim.url))
    common = ("--config", str(cfg), "--store", str(tmp_path / "s.duckdb"))
    if command == "update":
        r = run("backfill", "AAPL", "MSFT", "--start", "2024-03-04", "--end", "2024-03-04", *common, env=SIM_ENV)
        assert r.returncode == 0, r.stderr
        args: tuple[str, ...] = ("update", "AAPL", "MSFT", "--end", "2024-03-06")
    else:
        args = ("repair", "AAPL", "MSFT", "--start", "2024-03-04", "--end", "2024-03-05", "--gaps-only")
    env = {**SIM_ENV, "COLUMNS": "160", "TERM": "xterm"}
    code, shown = _on_a_terminal(*args, *common, env=env)
    assert code == 0, shown
    assert command in shown and "100.0%" in shown and "bars/s" in shown, shown
    off = run(*args, *common, env=env)  # again, on a pipe: nothing to fetch, and no bar either way
    assert off.returncode == 0 and "bars/s" not in off.stderr, off.stderr


def test_update_says_what_a_shared_page_stored_instead_of_guessing_whose_it_was(sim: SimServer, tmp_path: Path) -> None:
    """A full refresh of two symbols fetched in one request: the page's one revised row cannot be
    given to a symbol from the store's page counts, so no row claims it and the caption tells it."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(SIM_CFG.format(url=sim.url))
    common = ("--config", str(cfg), "--store", str(tmp_path / "s.duckdb"))
    r = run("backfill", "AAPL", "MSFT", "--start", "2024-03-05", "--end", "2024-03-05", *common, env=SIM_ENV)
    assert r.returncode == 0, r.stderr
    sim.faults.set([FaultRule(kind="bad_data", defect="volume_spike", at=["2024-03-05T18:00:00Z"], symbols=["AAPL"])])
    r = run(
        "update", "AAPL", "MSFT", "--full", "--start", "2024-03-05", "--end", "2024-03-05", *common,
        env={**SIM_ENV, "COLUMNS": "200"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line.split("│") for line in r.stdout.splitlines() if line.count("│") >= 7}
    assert {rows[s][4].strip() for s in ("AAPL", "MSFT")} == {"0"}, r.stdout
    assert "1 stored and 1 revised rows came on pages shared by several symbols" in " ".join(r.stdout.split())
