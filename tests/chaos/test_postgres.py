"""Issue 15's scenarios on the PostgreSQL store: the real CLI against the simulator, writing to a
PostgreSQL server started by the session fixture (each scenario its own database).

- the server restarted mid-backfill: the run resumes (its store reconnects and retries the page it
  was writing) or ends with STORE_ERROR and a rerun completes; the store equals the reference;
- ``kill -9`` of a backfill writing to PostgreSQL at random points, then a rerun: equal to the reference;
- two backfills of overlapping ranges at once: each bar stored once, equal to the reference;
- ``serve --workers N`` on the PostgreSQL store starts N worker processes that answer, while a
  notebook-style client reads the same store; with DuckDB ``--workers 2`` stays a clear error.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.chaos.harness import RUN_BOUND, SYMBOLS, Chaos, Finished, free_port
from tests.pg_server import PgServer

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def ok(done: Finished) -> None:
    assert done.returncode == 0, f"the run did not complete\n{done.tail()}"


def test_postgres_restarted_mid_backfill_then_the_store_equals_the_reference(
    chaos: Chaos, pg: PgServer, pg_url: str
) -> None:
    cfg = chaos.config()
    chaos.sim.set_faults({"kind": "latency", "latency_ms": 30})  # the run lasts long enough to be hit mid-way
    proc = chaos.start_backfill(pg_url, cfg)
    chaos.sim.wait_requests(6, proc)
    assert proc.alive(), "the run ended before the restart: the scenario did not hit it mid-way"
    pg.restart(down_seconds=1.0)
    done = proc.wait(RUN_BOUND + 20)
    chaos.sim.clear()
    if done.returncode == 0:  # resumed: its store saw the connection go and carried on
        assert "store_connection_lost" in done.stderr, done.tail()
    else:  # the store gave up on the server: a typed error, then a rerun completes
        assert "error[STORE_ERROR]" in done.stderr, done.tail()
        ok(chaos.backfill(pg_url, cfg))
    chaos.assert_equal_reference(pg_url)
    chaos.assert_clean()


def test_kill9_of_a_backfill_writing_to_postgres_then_rerun_equals_the_reference(chaos: Chaos, pg_url: str) -> None:
    cfg = chaos.config()
    chaos.sim.set_faults({"kind": "latency", "latency_ms": 20})
    kills = 0
    for k in (0, *(chaos.rng.randint(1, 12) for _ in range(3))):
        chaos.sim.reset_stats()
        proc = chaos.start_backfill(pg_url, cfg)
        if k == 0:
            time.sleep(chaos.rng.uniform(0.2, 0.8))
        else:
            chaos.sim.wait_requests(k, proc)
            time.sleep(chaos.rng.uniform(0.0, 0.03))
        done = proc.killed()
        kills += done.returncode == -signal.SIGKILL
        chaos.assert_claims_held(pg_url)
    assert kills >= 2, f"only {kills} runs were still running when killed"
    chaos.sim.clear()
    ok(chaos.backfill(pg_url, cfg))
    chaos.assert_equal_reference(pg_url)
    chaos.assert_clean()


def test_two_backfills_of_overlapping_ranges_at_once_store_each_bar_once(chaos: Chaos, pg_url: str) -> None:
    cfg = chaos.config()
    chaos.sim.set_faults({"kind": "latency", "latency_ms": 5})
    first = chaos.start_backfill(pg_url, cfg)
    second = chaos.start_backfill(pg_url, cfg, symbols=[*SYMBOLS[1:], SYMBOLS[0]][:3])
    ok(first.wait(RUN_BOUND + 10))
    ok(second.wait(RUN_BOUND + 10))
    chaos.sim.clear()
    img = chaos.assert_equal_reference(pg_url)  # row count, values hash: no bar twice
    assert len(set(img.bars)) == img.rows
    chaos.assert_clean()


def worker_pids(pid: int) -> list[int]:
    """The gateway's worker processes: children started by multiprocessing's spawn (not its tracker)."""
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "multiprocessing" in cmd and "resource_tracker" not in cmd:
            out.append(int(child))
    return out


def test_serve_with_workers_on_postgres_answers_while_a_notebook_reads(chaos: Chaos, pg_url: str) -> None:
    cfg = chaos.config()
    ok(chaos.backfill(pg_url, cfg))
    s = chaos.secrets
    v1 = {"Authorization": f"Bearer {s.client_secret}"}
    with chaos.serve(pg_url, cfg, workers=3) as gw:
        deadline = time.monotonic() + 20
        while len(worker_pids(gw.proc.popen.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker_pids(gw.proc.popen.pid)) == 3, gw.proc.tail()
        calls: list[tuple[str, str, str, dict[str, str] | None]] = [
            (f"bars {i}", "GET", f"/v1/bars/{SYMBOLS[i % 4]}?start=2024-03-0{4 + i % 3}&end=2024-03-0{4 + i % 3}", v1)
            for i in range(24)
        ]
        chaos.sim.reset_stats()
        answers = gw.many(calls, timeout=60)
        for a in answers:
            assert a.status == 200, a.brief()
            bars = json.loads(a.body)["bars"]
            assert len(bars) == 390, a.brief()
        # the bars came from the PostgreSQL store: 24 answers, at most a start-up request per worker upstream
        assert chaos.sim.requests() <= 3
        # A notebook reads the same store while the gateway runs (DuckDB would be locked by it).
        code = (
            "import marketpipe as mp\n"
            "df = mp.bars('AAPL', '2024-03-05', '2024-03-05', fetch=False)\n"
            "print(df.height, df['timestamp'].dtype)\n"
        )
        env = {**chaos.env(), "MARKETPIPE_STORE_URL": pg_url, "MARKETPIPE_CONFIG": str(cfg)}
        nb = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert nb.returncode == 0 and "Traceback" not in nb.stderr, nb.stderr[-2000:]
        assert nb.stdout.split() == ["390", "Datetime(time_unit='us',", "time_zone='UTC')"], nb.stdout
        # more than one worker process serves from the store. The kernel hands each accepted connection to
        # whichever worker accepts first, so on a loaded machine one worker can take a whole batch: ask
        # again (bounded) until a second worker has opened its store connection.
        def connections() -> int:
            with psycopg.connect(pg_url, autocommit=True) as con:
                row = con.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'marketpipe' "
                    "AND datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            return int(row[0]) if row else 0

        deadline = time.monotonic() + 30
        while connections() < 2 and time.monotonic() < deadline:
            assert all(a.status == 200 for a in gw.many(calls, timeout=60))
        assert connections() >= 2, "only one worker holds a store connection: the others never served"
    chaos.assert_clean()


def test_serve_with_workers_on_duckdb_stays_a_clear_error(chaos: Chaos) -> None:
    cfg = chaos.config()
    proc = chaos.start("serve", "serve", "--port", str(free_port()), "--workers", "2", "--config", str(cfg),
                       "--store", str(chaos.root / "one.duckdb"))  # fmt: skip
    done = proc.wait(RUN_BOUND)
    assert done.returncode == 1, done.tail()
    assert "error[CONFIG_ERROR]" in done.stderr and "postgresql://" in done.stderr, done.tail()
