"""The data-quality commands as a user runs them: ``quality``, ``update``, ``repair``, ``schedule``,
``store runs`` and ``store anomalies`` in a subprocess, against the real simulator and a real
DuckDB store in ``tmp_path``.

Independent commands are started together (:func:`run_many`) to keep the file fast; commands that
touch the same store file always run one after another (DuckDB locks the file).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from marketpipe.core.config import load_config
from marketpipe.service.data import MarketData
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV

# Rich sizes its tables to the terminal, 80 columns when stdout is a pipe. The content assertions
# below run with a wide terminal; what happens at 80 columns is tested on its own.
WIDE = {"COLUMNS": "400"}
SPIKE_AT = "2024-03-05T17:00:00Z"


def _argv(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "marketpipe.cli.main", *args]


def _env(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "POLYGON_", "COLUMNS"))}
    return {**base, **WIDE, **(env or {})}


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(args), env=_env(env), capture_output=True, text=True, timeout=timeout)


def run_many(
    cases: dict[str, tuple[list[str], dict[str, str] | None]], timeout: int = 120
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run independent commands at the same time (each with its own store); results by case id."""
    procs = {
        key: subprocess.Popen(
            _argv(tuple(args)), env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, (args, env) in cases.items()
    }
    done = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        done[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return done


def show(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def box_rows(text: str) -> list[dict[str, str]]:
    """Rows of the first rich box table (┃ header, │ rows) in ``text``, as dicts by header."""
    header: list[str] | None = None
    rows = []
    for line in text.splitlines():
        s = line.strip()
        if header is None and s.startswith("┃"):
            header = [c.strip() for c in s.strip("┃").split("┃")]
        elif header is not None and s.startswith("│"):
            rows.append(dict(zip(header, (c.strip() for c in s.strip("│").split("│")), strict=True)))
        elif header is not None and s.startswith("└"):
            break
    return rows


def summary_rows(text: str) -> list[dict[str, str]]:
    """Rows of the per-series summary table of ``quality`` (header starts with "symbol score"; no cell
    holds a space), boxed or not, as dicts by header."""
    clean = [line.translate(str.maketrans("", "", "│┃")).split() for line in text.splitlines()]
    i = next(n for n, cells in enumerate(clean) if cells[:2] == ["symbol", "score"])
    rows = []
    for cells in clean[i + 1 :]:
        if cells and set("".join(cells)) <= set("─━┡┩╇"):  # a boxed table's rule under the header
            continue
        if len(cells) != len(clean[i]):  # end of the table: a blank line, a box bottom, the next section
            break
        rows.append(dict(zip(clean[i], cells, strict=True)))
    return rows


def col(row: dict[str, str], prefix: str) -> str:
    """The cell whose header starts with ``prefix`` ("anom" for anom/anomalies)."""
    (key,) = [k for k in row if k.startswith(prefix)]
    return row[key]


def simple_rows(text: str, after: str = "") -> list[dict[str, str]]:
    """Rows of the first plain table (header, a ─── rule, rows) after the line containing ``after``,
    sliced at the header's column positions (cells may contain single spaces or be empty)."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if after in line)
    while not (lines[i + 1].strip() and set(lines[i + 1].strip()) == {"─"}):
        i += 1
    head = lines[i]
    starts = [m.start() for m in re.finditer(r"\S+", head)]
    names = head.split()
    rows = []
    for line in lines[i + 2 :]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def write_cfg(path: Path, sim: SimServer, extra: str = "", top: str = "") -> Path:
    path.write_text(
        top + f'[providers.alpaca]\nbase_url = "{sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 100000\n' + extra
    )
    return path


JOBS = """
[[jobs]]
name = "eod"
symbols = ["AAPL", "MSFT"]
every = "1s"
timeframe = "1Day"
strategy = "incremental"
"""


@pytest.fixture
def cfg(sim: SimServer, tmp_path: Path) -> Path:
    return write_cfg(tmp_path / "m.toml", sim)


def cli_opts(cfg: Path, store: Path) -> list[str]:
    return ["--config", str(cfg), "--store", str(store)]


def seed(cfg: Path, store: Path, symbols: list[str], start: str, end: str, timeframe: str = "1Min") -> None:
    """History to work on, backfilled in-process through the library (the backfill command itself is
    tested in test_cli.py; this saves a subprocess per test)."""
    config = load_config(cfg)
    config.store.path = str(store)

    async def go() -> None:
        data = MarketData(config, env=SIM_ENV)
        try:
            stats = await data.backfill(symbols, start, end, timeframe=timeframe)
        finally:
            await data.aclose()  # closes the store: the CLI subprocesses need the file lock
        assert stats.ok and stats.bars_stored > 0, stats

    asyncio.run(go())


@pytest.fixture(scope="module")
def spiked(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """AAPL 1Min 2024-03-04..05 backfilled while the vendor served one spiked bar."""
    d = tmp_path_factory.mktemp("spiked")
    cfg, store = write_cfg(d / "m.toml", sim), d / "s.duckdb"
    sim.faults.set([FaultRule(kind="bad_data", defect="spike", at=[SPIKE_AT], symbols=["AAPL"])])
    try:
        seed(cfg, store, ["AAPL"], "2024-03-04", "2024-03-05")
    finally:
        sim.faults.clear()
    yield cfg, store


# --- quality -----------------------------------------------------------------------------------------


def test_quality_table_html_and_png_show_the_spike(spiked: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, store = spiked
    html, png = tmp_path / "r.html", tmp_path / "d"
    r = run(
        "quality",
        "AAPL",
        "--start",
        "2024-03-04",
        "--end",
        "2024-03-05",
        "--html",
        str(html),
        "--png",
        str(png),
        *cli_opts(cfg, store),
    )
    assert r.returncode == 0, show(r)
    assert "Traceback" not in r.stderr
    assert "Data quality, 1Min (XNYS" in r.stdout

    (row,) = summary_rows(r.stdout)
    assert row["symbol"] == "AAPL"
    assert re.fullmatch(r"\d\.\d{3}", row["score"]), row
    assert 0.0 < float(row["score"]) < 1.0, row  # complete, but one bad bar
    assert (row["expected"], row["held"], row["gap"], row["empty"]) == ("780", "780", "0", "0"), row
    assert col(row, "complete") == "100.0%", row
    assert int(col(row, "anom")) >= 1, row

    found = simple_rows(r.stdout, after="AAPL anomalies")
    spikes = [f for f in found if f["kind"] == "spike"]
    assert spikes and spikes[0]["timestamp"].startswith("2024-03-05 17:00:00"), found
    assert "AAPL missing ranges" not in r.stdout
    worst = simple_rows(r.stdout, after="lowest-scoring days")
    assert worst[0]["day"] == "2024-03-05", worst  # the spiked day scores lowest

    # a self-contained HTML report: nothing loaded from elsewhere
    assert html.is_file()
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "AAPL" in page and "spike" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=|@import|url\(\s*['\"]?https?:", page, re.I)
    assert f"wrote {html}" in r.stderr

    pngs = sorted(png.glob("*.png"))
    assert pngs, list(png.iterdir()) if png.exists() else "no png directory"
    for p in pngs:
        assert p.name.startswith("AAPL_1Min_"), p
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        assert f"wrote {p}" in r.stderr


def test_store_anomalies_lists_the_spike(spiked: tuple[Path, Path]) -> None:
    cfg, store = spiked
    r = run("store", "anomalies", "AAPL", "--start", "2024-03-04", *cli_opts(cfg, store))
    assert r.returncode == 0, show(r)
    rows = simple_rows(r.stdout)
    spikes = [x for x in rows if x["kind"] == "spike"]
    assert len(spikes) == 1, rows
    assert spikes[0]["symbol"] == "AAPL" and spikes[0]["timeframe"] == "1Min"
    assert spikes[0]["timestamp"].startswith("2024-03-05 17:00:00")
    assert spikes[0]["severity"] and spikes[0]["detail"]
    r = run("store", "anomalies", "AAPL", "--start", "2024-03-04", "--end", "2024-03-04", *cli_opts(cfg, store))
    assert r.returncode == 0, show(r)
    assert simple_rows(r.stdout) == [] and "spike" not in r.stdout


def test_store_anomalies_readable_at_80_columns(spiked: tuple[Path, Path]) -> None:
    cfg, store = spiked
    r = run("store", "anomalies", "AAPL", "--start", "2024-03-04", *cli_opts(cfg, store), env={"COLUMNS": "80"})
    assert r.returncode == 0, show(r)
    assert "AAPL" in r.stdout and "spike" in r.stdout, r.stdout


# --- gaps and repair ---------------------------------------------------------------------------------


def test_gap_shown_by_quality_then_repaired_once(cfg: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    opts = cli_opts(cfg, store)
    for day in ("2024-03-04", "2024-03-06"):  # Monday and Wednesday; Tuesday never fetched
        seed(cfg, store, ["AAPL"], day, day)

    r = run("quality", "AAPL", "--start", "2024-03-04", "--end", "2024-03-06", *opts)
    assert r.returncode == 0, show(r)
    (row,) = summary_rows(r.stdout)
    assert (row["symbol"], row["expected"], row["held"], row["gap"], row["empty"]) == (
        "AAPL",
        "1,170",
        "780",
        "390",
        "0",
    ), row
    assert col(row, "complete") == "66.7%", row
    missing = simple_rows(r.stdout, after="AAPL missing ranges")
    assert missing == [
        {"kind": "gap", "start": "2024-03-05 14:30:00+00:00", "end": "2024-03-05 21:00:00+00:00", "bars": "390"}
    ]
    worst = simple_rows(r.stdout, after="lowest-scoring days")
    assert worst[0]["day"] == "2024-03-05" and worst[0]["gap"] == "390", worst

    r = run("repair", "AAPL", "--start", "2024-03-04", "--end", "2024-03-06", *opts, env=SIM_ENV)
    assert r.returncode == 0, show(r)
    (row,) = box_rows(r.stdout)
    assert (row["symbol"], row["gap before"], row["gap after"]) == ("AAPL", "390", "0"), row
    assert (row["complete before"], row["after"]) == ("66.7%", "100.0%"), row
    assert re.search(r"[1-9]\d* requests, 390 bars stored; rows by provider: alpaca 390", r.stdout), r.stdout

    r = run("repair", "AAPL", "--start", "2024-03-04", "--end", "2024-03-06", *opts, env=SIM_ENV)
    assert r.returncode == 0, show(r)
    (row,) = box_rows(r.stdout)
    assert (row["gap before"], row["gap after"], row["after"]) == ("0", "0", "100.0%"), row
    assert "0 requests, 0 bars stored; rows by provider: none" in r.stdout

    with DuckDBStore(store) as st:
        tue = st.read_bars(["AAPL"], "1Min", datetime(2024, 3, 5, tzinfo=UTC), datetime(2024, 3, 6, tzinfo=UTC))
    assert tue.height == 390


# --- update ------------------------------------------------------------------------------------------


def test_update_incremental_to_end(cfg: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    opts = cli_opts(cfg, store)
    seed(cfg, store, ["AAPL"], "2024-03-04", "2024-03-05")

    r = run("update", "AAPL", "--end", "2024-03-06", *opts, env=SIM_ENV)
    assert r.returncode == 0, show(r)
    assert "Update (smart)" in r.stdout
    (row,) = box_rows(r.stdout)
    assert row["symbol"] == "AAPL" and row["did"] == "incremental" and row["status"] == "ok", row
    assert "2024-03-05 20:59" <= row["from"] < "2024-03-07", row  # from what is held, not from the start
    assert row["stored"] == "390" and row["revised"] == "0", row

    with DuckDBStore(store) as st:
        wed = st.read_bars(["AAPL"], "1Min", datetime(2024, 3, 6, tzinfo=UTC), datetime(2024, 3, 7, tzinfo=UTC))
        everything = st.read_bars(["AAPL"], "1Min", datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 9, tzinfo=UTC))
    assert wed.height == 390 and everything.height == 1170


# --- schedule and store runs -------------------------------------------------------------------------


def test_schedule_cli_job_then_config_job(sim: SimServer, tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "jobs.toml", sim, extra=JOBS)
    store = tmp_path / "s.duckdb"
    opts = cli_opts(cfg, store)
    seed(cfg, store, ["AAPL"], "2024-03-04", "2024-03-08", timeframe="1Day")

    # symbols on the command line: job "cli"; incremental up to now (~2.5 years of daily bars)
    r = run(
        "schedule",
        "AAPL",
        "--every",
        "1s",
        "--runs",
        "2",
        "--timeframe",
        "1Day",
        "--strategy",
        "incremental",
        *opts,
        env=SIM_ENV,
    )
    assert r.returncode == 0, show(r)
    assert "Traceback" not in r.stderr
    assert "scheduling 1 job(s): cli every 1s AAPL" in r.stderr
    runs = re.findall(r"job cli: 1/1 symbols ok, ([\d,]+) bars stored", r.stderr)
    assert len(runs) == 2, r.stderr
    stored = [int(n.replace(",", "")) for n in runs]
    assert stored[0] > 500 and stored[1] <= 1, runs  # the second run has (almost) nothing new to fetch

    # the config's [[jobs]]: MSFT has no 1Day history, so it fails; AAPL still updates
    r = run("schedule", "--job", "eod", "--runs", "1", *opts, env=SIM_ENV)
    assert r.returncode == 1, show(r)
    assert "Traceback" not in r.stderr
    assert "scheduling 1 job(s): eod every 1s AAPL,MSFT" in r.stderr
    assert re.search(r"job eod: 1/2 symbols ok, .*; failed: MSFT$", r.stderr, re.M), r.stderr

    r = run("store", "runs", *opts)
    assert r.returncode == 0, show(r)
    rows = simple_rows(r.stdout)
    assert len(rows) == 4, r.stdout
    eod = {x["symbol"]: x for x in rows if x["job"] == "eod"}
    assert eod["AAPL"]["status"] == "ok" and eod["AAPL"]["code"] == "", eod
    assert eod["MSFT"]["status"] == "failed" and eod["MSFT"]["code"] == "INVALID_ARGUMENT", eod
    assert "MSFT has no 1Day history" in eod["MSFT"]["message"], eod
    assert eod["AAPL"]["run_id"] == eod["MSFT"]["run_id"]
    cli = [x for x in rows if x["job"] == "cli"]
    assert len(cli) == 2 and {x["status"] for x in cli} == {"ok"}, rows
    assert {x["symbol"] for x in cli} == {"AAPL"} and {x["strategy"] for x in cli} == {"incremental"}, rows
    assert len({x["run_id"] for x in cli}) == 2, rows
    assert sorted(int(x["bars_stored"]) for x in cli) == sorted(stored), rows

    with DuckDBStore(store) as st:
        logged = st.job_runs(None, 50)
    assert logged.height == 4
    assert sorted(logged.filter(logged["job"] == "eod")["status"].to_list()) == ["failed", "ok"]


def test_schedule_rejects_unknown_strategy_before_running(cfg: Path, tmp_path: Path) -> None:
    r = run(
        "schedule",
        "AAPL",
        "--runs",
        "1",
        "--timeframe",
        "1Day",
        "--strategy",
        "sometimes",
        *cli_opts(cfg, tmp_path / "s.duckdb"),
        env=SIM_ENV,
    )
    assert r.returncode == 2, show(r)
    assert "error[INVALID_ARGUMENT]" in r.stderr and "sometimes" in r.stderr
    assert "scheduling" not in r.stderr


def test_schedule_without_symbols_or_jobs_names_jobs_table(cfg: Path, tmp_path: Path) -> None:
    r = run("schedule", *cli_opts(cfg, tmp_path / "s.duckdb"))
    assert r.returncode == 2, show(r)
    assert "error[INVALID_ARGUMENT]: no jobs to schedule" in r.stderr
    assert "[[jobs]]" in r.stderr, r.stderr


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_input_clear_errors_never_a_traceback(sim: SimServer, tmp_path: Path) -> None:
    good = write_cfg(tmp_path / "m.toml", sim, extra=JOBS)
    nope = write_cfg(tmp_path / "nope.toml", sim, top='calendar = "NOPE"\n')

    def opts(name: str, config: Path = good) -> list[str]:
        return cli_opts(config, tmp_path / f"{name}.duckdb")  # a store each: they run at the same time

    q = ["quality", "AAPL"]
    cases: dict[str, tuple[list[str], dict[str, str] | None, int, list[str]]] = {
        # id: (args, env, exit code, every one of these in stderr)
        "quality without --start": ([*q, *opts("a")], None, 2, ["error[INVALID_ARGUMENT]", "--start"]),
        "quality before the calendar": (
            [*q, "--start", "1990-01-01", "--end", "1990-02-01", *opts("b")],
            None,
            2,
            ["error[INVALID_RANGE]", "outside the XNYS calendar", "2000-01-03"],
        ),
        "quality 7Day": (
            [*q, "--start", "2024-03-04", "--end", "2024-03-05", "--timeframe", "7Day", *opts("c")],
            None,
            2,
            ["error[INVALID_TIMEFRAME]", "7Day"],
        ),
        "quality unknown calendar": (
            [*q, "--start", "2024-03-04", "--end", "2024-03-05", *opts("d", nope)],
            None,
            2,
            ["error[INVALID_ARGUMENT]", "unknown exchange calendar 'NOPE'"],
        ),
        "update without history": (
            ["update", "ZZZZ", *opts("e")],
            SIM_ENV,
            1,
            ["error[INVALID_ARGUMENT]", "ZZZZ", "--start"],
        ),
        "update unknown strategy": (
            ["update", "AAPL", "--strategy", "sometimes", *opts("f")],
            SIM_ENV,
            2,
            ["error[INVALID_ARGUMENT]", "unknown update strategy 'sometimes'", "incremental, full, smart"],
        ),
        "schedule unknown job": (
            ["schedule", "--job", "nope", *opts("g")],
            SIM_ENV,
            2,
            ["error[INVALID_ARGUMENT]", "no such job in the config: nope"],
        ),
    }
    results = run_many({k: (args, env) for k, (args, env, _, _) in cases.items()})
    problems = []
    for key, (_, _, code, needles) in cases.items():
        r = results[key]
        if r.returncode != code or "Traceback" in r.stderr or any(n not in r.stderr for n in needles):
            problems.append(f"[{key}] expected exit {code} and {needles}\n{show(r)}")
    assert not problems, "\n\n".join(problems)
    # the update that failed per symbol still printed its table
    (row,) = box_rows(results["update without history"].stdout)
    assert row["symbol"] == "ZZZZ" and row["status"] == "INVALID_ARGUMENT", row


def test_repair_outside_the_calendar_is_an_error(cfg: Path, tmp_path: Path) -> None:
    r = run(
        "repair",
        "AAPL",
        "--start",
        "1990-01-01",
        "--end",
        "1990-02-01",
        *cli_opts(cfg, tmp_path / "s.duckdb"),
        env=SIM_ENV,
    )
    assert r.returncode == 2, show(r)
    assert "error[INVALID_RANGE]" in r.stderr and "calendar" in r.stderr


def test_store_runs_readable_while_schedule_waits(cfg: Path, tmp_path: Path) -> None:
    opts = cli_opts(cfg, tmp_path / "s.duckdb")
    # ZZZZ has no history: the first run fails at once (no fetching) and logs its row; then it waits an hour
    sched = subprocess.Popen(
        _argv(("schedule", "ZZZZ", "--every", "1h", "--runs", "2", "--timeframe", "1Day", *opts)),
        env=_env(SIM_ENV),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sched.stderr is not None
        lines = []
        for line in sched.stderr:  # blocks until the first run is reported
            lines.append(line)
            if "job cli:" in line:
                break
        assert any("job cli: 0/1 symbols ok" in x for x in lines), lines
        r = run("store", "runs", *opts)
    finally:
        sched.kill()
        sched.communicate(timeout=30)
    assert r.returncode == 0, show(r)
    assert [x["symbol"] for x in simple_rows(r.stdout)] == ["ZZZZ"], r.stdout
