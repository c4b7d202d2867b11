"""The benchmarks still run: each bench script on a tiny workload, start to finish. Nothing here is
timed — the figures are the benchmarks' own business (``./dev bench NAME``); this only keeps the
scripts from rotting when the code they drive moves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("backfill.py", ["--symbols", "2", "--days", "3"], "ratio (b)/(a)"),
        ("failover.py", ["--symbols", "2", "--days", "3"], "primary hangs mid-run"),
        ("quality.py", ["--years", "1", "--symbols", "3", "--repeat", "1"], "1 symbol x 1y 1Min"),
        ("export.py", ["--symbols", "2", "--days", "3", "--repeat", "1", "--reads", "3"], "ratio export (a) vs peer"),
        ("scale.py", ["--symbols", "2", "--days", "3", "--reads", "20"], "PG/DuckDB"),
        ("adjust.py", ["--years", "1", "--repeat", "1"], "ratio adjusted/raw"),
        ("options.py", ["--repeat", "1", "--weekly", "1", "--monthly", "1"], "ratio contracts/s vs alpaca-py"),
        ("serve.py", ["--quick", "--cold-only", "--cold", "3"], "ratio cold miss (d)/(e)"),  # wrk-free rows only
        ("transport.py", ["--symbols", "2", "--days", "3", "--repeat", "1"], "CPU vs httpx"),
    ],
)
def test_bench_script_runs_to_the_end(script: str, args: list[str], expect: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT / "bench",
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert expect in done.stdout, done.stdout[-2000:]
    assert "Traceback" not in done.stderr
