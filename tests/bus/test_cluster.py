"""`marketpipe cluster` runs what README "Running at scale" says, and the commands it prints work as printed:
a distributed backfill across its two workers, bars read back through one gateway, a live stream through
the other (which does not hold the upstream stream: one of the two gateways does), and Ctrl-C stops it all."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import nats_server

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cluster_starts_everything_the_printed_commands_work_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    if not nats_server.available():
        pytest.skip("nats-server not installed")
    env = {**os.environ, "PYTHONPATH": SRC}
    me = [sys.executable, "-m", "marketpipe.cli.main"]
    proc = subprocess.Popen([*me, "cluster"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "cluster exited:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(lines)
        root = Path(re.search(r"^logs\s+(\S+)", text, re.M).group(1))  # type: ignore[union-attr]
        exports = dict(kv.split("=", 1) for kv in shlex.split(re.search(r"export (.*)", text).group(1)))  # type: ignore[union-attr]
        run_env = {**env, **exports}
        backfill = re.search(r"^  (marketpipe backfill .*)$", text, re.M).group(1)  # type: ignore[union-attr]
        r = subprocess.run([*me, *shlex.split(backfill)[1:]], env=run_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        m = re.search(r"(\d+)/(\d+) items finished by (\d+) worker", r.stdout)
        assert m and m.group(1) == m.group(2) and int(m.group(3)) >= 1, r.stdout
        curl = re.search(r"curl '([^']+)'", text).group(1)  # type: ignore[union-attr]
        body = httpx.get(curl, timeout=30).json()
        assert len(body["bars"]) == 3 and body["bars"][0]["source"] == "sim:alpaca"
        stream = re.search(r"^  (marketpipe stream .*)$", text, re.M).group(1)  # type: ignore[union-attr]
        s = subprocess.run(
            [*me, *shlex.split(stream)[1:], "--json", "--duration", "6"],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert s.returncode == 0, s.stderr
        assert '"AAPL"' in s.stdout, s.stdout[-2000:] + s.stderr[-2000:]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert not root.exists()  # its temp dir (data, logs) is removed
