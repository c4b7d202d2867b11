"""``marketpipe backfill`` stopped by Ctrl-C or SIGTERM: it ends within moments with one line saying what it
kept, exits 130 / 143, keeps every committed page, and a re-run completes the store an uninterrupted run gives."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from marketpipe.core.timeutil import parse_time
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV

SYMS = ["AAPL", "MSFT", "SPY"]
START, END = "2024-03-04", "2024-03-15"  # 10 sessions: 11,700 bars, 120 pages of 100
RANGE = (parse_time(START), parse_time(END, end=True))
TOTAL = 3 * 10 * 390
STOP_BOUND_S = 3.0  # each signalled run must be gone within this
LINE = {
    signal.SIGINT: re.compile(r"^interrupted: ([\d,]+) bars kept, run the same command to resume$"),
    signal.SIGTERM: re.compile(r"^terminated \(SIGTERM\): ([\d,]+) bars kept, run the same command to resume$"),
}
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
CLI = [sys.executable, "-m", "marketpipe.cli.main"]


def _start(cfg: Path, store: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_"))}
    return subprocess.Popen(
        [
            *CLI,
            "backfill",
            *SYMS,
            "--start",
            START,
            "--end",
            END,
            "--config",
            str(cfg),
            "--store",
            str(store),
            "--no-progress",
        ],
        env={**base, **SIM_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _bars(path: Path) -> pl.DataFrame:
    s = DuckDBStore(path, read_only=True)
    try:
        return s.read_bars(SYMS, "1Min", *RANGE).drop("fetched_at").sort("symbol", "ts")
    finally:
        s.close()


def _ledger_holds_only_what_is_stored(path: Path, reference: pl.DataFrame) -> None:
    """Every range the ledger claims holds exactly the bars the uninterrupted run holds there."""
    s = DuckDBStore(path, read_only=True)
    try:
        cov = s.coverage(SYMS, "1Min", *RANGE)
    finally:
        s.close()
    bars = _bars(path)
    for sym, a, b in cov.select("symbol", "start", "end").iter_rows():
        claimed = (pl.col("symbol") == sym) & (pl.col("ts") >= a) & (pl.col("ts") < b)
        assert bars.filter(claimed).equals(reference.filter(claimed)), (sym, a, b)


def _interrupt(
    sim: SimServer, cfg: Path, store: Path, sig: signal.Signals, stored_before: int, reference: pl.DataFrame
) -> int:
    """Start a backfill, send ``sig`` once a few pages are in, check how it ends; the bars it kept."""
    base = sim.stats()["requests"]
    proc = _start(cfg, store)
    deadline = time.monotonic() + 60
    while sim.stats()["requests"] - base < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + (proc.stderr.read() or "")
    time.sleep(0.1)  # the first answered pages are checked and committed by now
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{sig.name} did not stop the backfill within {STOP_BOUND_S}s") from None
    took = time.monotonic() - sent
    assert proc.returncode == EXIT[sig], (proc.returncode, stderr)
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    m = LINE[sig].match(lines[0])
    assert m is not None, lines[0]
    kept = int(m.group(1).replace(",", ""))
    stored = _bars(store).height
    assert stored - stored_before == kept > 0, (stored, stored_before, kept)  # what it says is what it kept
    assert stored < TOTAL, "the signal should land mid-backfill"
    _ledger_holds_only_what_is_stored(store, reference)
    assert took < STOP_BOUND_S
    return stored


def test_sigint_and_sigterm_stop_promptly_and_a_rerun_completes_the_store(sim: SimServer, tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'[backfill]\npage_limit = 100\nconcurrency = 2\n[providers.alpaca]\nbase_url = "{sim.url}"\n'
        'plan = "unlimited"\nrate_limit_per_min = 100000\n'
    )
    ref_path, path = tmp_path / "ref.duckdb", tmp_path / "interrupted.duckdb"
    ref = _start(cfg, ref_path)
    _, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_err
    reference = _bars(ref_path)
    assert reference.height == TOTAL

    sim.faults.set([FaultRule(kind="latency", latency_ms=150)])
    stored = 0
    for sig in [signal.SIGINT] * 5 + [signal.SIGTERM] * 5:
        stored = _interrupt(sim, cfg, path, sig, stored, reference)
    sim.faults.clear()

    rerun = _start(cfg, path)
    _, rerun_err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, rerun_err
    assert _bars(path).equals(reference)
    _ledger_holds_only_what_is_stored(path, reference)
