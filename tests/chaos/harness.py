"""The chaos harness: the real CLI as subprocesses against the vendor simulator, faults set over the
simulator's ``/_sim`` admin paths, and the invariants every scenario ends with.

Invariants (``Chaos`` methods; each failure prints its evidence):

- ``assert_equal_reference(store)``: the store holds exactly the reference run's bars (row count, a
  hash of every value, per-symbol counts), no quarantined rows the reference lacks, and its coverage
  ledger covers exactly the ranges the reference's does (merged per symbol/timeframe/provider/feed:
  page boundaries differ from run to run, what is claimed must not).
- ``assert_claims_held(store)``: every range the ledger claims holds the bars the vendor has there —
  the reference's, value for value. A run that failed may claim less, never more.
- ``assert_clean()``: no ``Traceback`` in any process's output, no secret (vendor key id and secret,
  admin token, client key id and secret) in any output, any file under the scenario's directory
  (config, logs, the store and its WAL) or any gateway answer, and no 5xx from the gateway other
  than 503 with ``Retry-After``.
- every process ends within its bound (``Proc.wait``): past it the process is killed and the test
  fails with its output.

The simulator runs in the test process (a real HTTP server on a free port) with its own randomly
drawn, seeded credentials; everything random here derives from ``SEED``.

Every scenario is marked ``chaos``: ``pytest -m chaos`` runs only these, ``-m "not chaos"`` skips them
(CI runs them with the rest). The suite takes about 1.5 minutes on two shared cores.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

import marketpipe

SEED = 12
SYMBOLS = ("AAPL", "MSFT", "SPY", "NVDA")
START, END = "2024-03-04", "2024-03-06"  # three regular sessions: 390 bars per symbol and day
TIMEFRAME = "1Min"
PAGE_LIMIT = 100  # 4 pages per symbol-day: 12 units, 48 pages
SESSIONS = 3
BARS_PER_SESSION = 390

# Bounds (seconds) on every process the scenarios start; a process still running past its bound is
# killed and the scenario fails. Generous against a shared 2-core machine, short against a hang.
RUN_BOUND = 20.0
SIGNAL_BOUND = 3.0  # SIGINT/SIGTERM to exit
GATEWAY_START_BOUND = 20.0
GATEWAY_STOP_BOUND = 10.0

SRC_DIR = str(Path(marketpipe.__file__).resolve().parents[1])
BAR_VALUES = "symbol, timeframe, ts, open, high, low, close, volume, trade_count, vwap, source, feed"
LedgerKey = tuple[str, str, str, str, str | None]  # symbol, timeframe, provider, source, feed
Interval = tuple[datetime, datetime]


# --- secrets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    """Distinctive random values for every secret a run holds; none of them may appear anywhere."""

    vendor_key: str
    vendor_secret: str
    admin_token: str
    client_id: str
    client_secret: str

    @classmethod
    def draw(cls, rng: random.Random) -> Secrets:
        def token(prefix: str, n: int = 24) -> str:
            return prefix + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(n))

        return cls(
            vendor_key=token("PKCHAOS"),
            vendor_secret=token("vsecret", 32),
            admin_token=token("admtok", 32),
            client_id=token("cid"),
            client_secret=token("csecret", 32),
        )

    def items(self) -> dict[str, str]:
        return {
            "vendor key id": self.vendor_key,
            "vendor secret": self.vendor_secret,
            "admin token": self.admin_token,
            "client key id": self.client_id,
            "client key secret": self.client_secret,
        }

    def found(self, blob: str | bytes) -> list[str]:
        """The names of the secrets that occur in ``blob``."""
        data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
        return [name for name, value in self.items().items() if value.encode() in data]


# --- the simulator, over its admin paths -----------------------------------------------------------


class SimControl:
    """Faults and counters through ``/_sim/faults`` and ``/_sim/stats``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=5.0)

    def set_faults(self, *rules: dict[str, Any], rate_limit_per_min: int | None = None) -> None:
        r = self.http.put("/_sim/faults", json={"rules": list(rules), "rate_limit_per_min": rate_limit_per_min})
        if r.status_code != 200:
            pytest.fail(f"the simulator refused the faults {list(rules)}: HTTP {r.status_code} {r.text}")

    def clear(self) -> None:
        self.http.delete("/_sim/faults").raise_for_status()

    def counters(self) -> list[dict[str, int]]:
        doc: dict[str, Any] = self.http.get("/_sim/faults").raise_for_status().json()
        return list(doc["counters"])

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.http.get("/_sim/stats").raise_for_status().json()
        return doc

    def requests(self) -> int:
        return int(self.stats()["requests"])

    def by_status(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.stats()["by_status"].items()}

    def reset_stats(self) -> None:
        self.http.delete("/_sim/stats").raise_for_status()

    def wait_requests(self, n: int, proc: Proc, timeout: float = RUN_BOUND) -> int:
        """Block until the simulator has served ``n`` data requests (or ``proc`` ended); returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.requests()
            if seen >= n or proc.popen.poll() is not None:
                return seen
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{proc.name}: the simulator saw only {seen} of {n} requests in {timeout}s\n{proc.tail()}")
            time.sleep(0.005)

    def close(self) -> None:
        self.http.close()


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Finished:
    name: str
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, lines: int = 30) -> str:
        def last(text: str) -> str:
            return "\n".join(text.rstrip().splitlines()[-lines:])

        return (
            f"--- {self.name}: exit {self.returncode} after {self.seconds:.2f}s: {' '.join(self.args)}\n"
            f"--- stdout (tail)\n{last(self.stdout)}\n--- stderr (tail)\n{last(self.stderr)}"
        )

    def error_codes(self) -> list[str]:
        """The stable codes of the ``error[CODE]`` lines on stderr, in order."""
        return re.findall(r"error\[([A-Z_]+)\]", self.stderr)


class Proc:
    """A started subprocess whose output goes to files under the scenario's directory."""

    def __init__(
        self, chaos: Chaos, name: str, args: list[str], env: dict[str, str], preexec: Callable[[], None] | None = None
    ) -> None:
        self.chaos, self.name, self.args = chaos, name, args
        n = len(chaos.finished) + len(chaos.running)
        self.out_path = chaos.logs / f"{n:02d}-{name}.out"
        self.err_path = chaos.logs / f"{n:02d}-{name}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "marketpipe.cli.main", *args],
            env=env,
            cwd=chaos.root,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            preexec_fn=preexec,
        )
        self.result: Finished | None = None
        chaos.running.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait(10)

    def _finish(self) -> Finished:
        if self.result is None:
            self._out.close()
            self._err.close()
            self.result = Finished(
                self.name,
                self.args,
                self.popen.returncode,
                self.out_path.read_text(errors="replace"),
                self.err_path.read_text(errors="replace"),
                time.monotonic() - self.started,
            )
            self.chaos.running.remove(self)
            self.chaos.finished.append(self.result)
        return self.result

    def wait(
        self, bound: float = RUN_BOUND, *, since: float | None = None, evidence: Callable[[], str] | None = None
    ) -> Finished:
        """Wait for the process to end within ``bound`` seconds (from ``since``, default now); past it
        it is killed and the scenario fails with its output (and ``evidence()``, taken before the kill)."""
        deadline = (since if since is not None else time.monotonic()) + bound
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            extra = f"\n{evidence()}" if evidence is not None else ""
            self.popen.kill()
            self.popen.wait(10)
            done = self._finish()
            pytest.fail(f"{self.name} did not end within {bound:.1f}s; killed{extra}\n{done.tail()}")
        return self._finish()

    def killed(self) -> Finished:
        """SIGKILL now and collect what it wrote."""
        self.kill()
        return self._finish()

    def tail(self) -> str:
        self._out.flush()
        self._err.flush()
        return "\n".join(
            [
                f"--- {self.name} (running {time.monotonic() - self.started:.1f}s)",
                self.err_path.read_text(errors="replace")[-3000:],
            ]
        )


# --- the store, read directly with DuckDB -------------------------------------------------------------


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@dataclass
class StoreImage:
    """What a store holds, in the terms the invariants compare."""

    path: str
    bars: list[tuple[Any, ...]]  # BAR_VALUES, sorted
    ledger: dict[LedgerKey, list[Interval]]  # merged
    quarantine: int
    ingest_pages: int

    @property
    def rows(self) -> int:
        return len(self.bars)

    @property
    def values_hash(self) -> str:
        h = hashlib.sha256()
        for row in self.bars:
            h.update(repr(row).encode())
        return h.hexdigest()[:16]

    def per_symbol(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for row in self.bars:
            counts[row[0]] += 1
        return dict(sorted(counts.items()))

    def by_symbol(self) -> dict[str, list[tuple[Any, ...]]]:
        out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for row in self.bars:
            out[row[0]].append(row)
        return out

    def describe(self) -> str:
        ledger = {
            f"{k[0]}/{k[1]}/{k[2]}/{k[4]}": [(s.isoformat(), e.isoformat()) for s, e in v]
            for k, v in self.ledger.items()
        }
        return (
            f"{self.path}: {self.rows} bars {self.per_symbol()} hash {self.values_hash}, quarantine {self.quarantine}, "
            f"ingest pages {self.ingest_pages}, ledger {ledger}"
        )


def read_pg_store(url: str) -> StoreImage:
    """A PostgreSQL store, read from outside (psycopg) in the terms of a DuckDB image: naive UTC times,
    rows in DuckDB's ``ORDER BY ALL`` order (nulls last). A database without the tables holds nothing."""
    import psycopg

    def naive(v: Any) -> Any:
        return v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) else v

    with psycopg.connect(url, autocommit=True) as con:
        if con.execute("SELECT to_regclass('bars')").fetchone() == (None,):
            return StoreImage(url, [], {}, 0, 0)
        rows = [tuple(naive(v) for v in r) for r in con.execute(f"SELECT {BAR_VALUES} FROM bars").fetchall()]
        bars = sorted(rows, key=lambda r: tuple((v is None, v) for v in r))
        ledger: dict[LedgerKey, list[Interval]] = defaultdict(list)
        for sym, tf, prov, src, feed, s, e in con.execute(
            'SELECT symbol, timeframe, provider, source, feed, start, "end" FROM coverage'
        ).fetchall():
            ledger[(sym, tf, prov, src, feed)].append((naive(s), naive(e)))
        quarantine = con.execute("SELECT count(*) FROM quarantine").fetchone()
        pages = con.execute("SELECT count(*) FROM ingest_log").fetchone()
    merged = {k: merge(v) for k, v in sorted(ledger.items())}
    return StoreImage(url, bars, merged, int(quarantine[0]) if quarantine else 0, int(pages[0]) if pages else 0)


def read_store(path: Path | str, scratch: Path) -> StoreImage:
    """Open a copy of the store (and its WAL: DuckDB replays it on open), so inspecting never changes
    the file a later run continues from. A store that does not exist yet holds nothing. A
    ``postgresql://`` URL is read from the server (``read_pg_store``)."""
    if isinstance(path, str) and path.startswith("postgresql://"):
        return read_pg_store(path)
    path = Path(path)
    if not path.exists():
        return StoreImage(str(path), [], {}, 0, 0)
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / f"inspect-{time.monotonic_ns()}.duckdb"
    shutil.copyfile(path, copy)
    wal = Path(str(path) + ".wal")
    if wal.exists():
        shutil.copyfile(wal, Path(str(copy) + ".wal"))
    try:
        con = duckdb.connect(str(copy))
    except duckdb.Error as exc:
        pytest.fail(f"the store {path} cannot be opened after the scenario: {exc}")
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "bars" not in tables:
            return StoreImage(str(path), [], {}, 0, 0)
        bars = con.execute(f"SELECT {BAR_VALUES} FROM bars ORDER BY ALL").fetchall()
        ledger: dict[LedgerKey, list[Interval]] = defaultdict(list)
        for sym, tf, prov, src, feed, s, e in con.execute(
            'SELECT symbol, timeframe, provider, source, feed, start, "end" FROM coverage'
        ).fetchall():
            ledger[(sym, tf, prov, src, feed)].append((s, e))
        quarantine = con.execute("SELECT count(*) FROM quarantine").fetchone()
        pages = con.execute("SELECT count(*) FROM ingest_log").fetchone()
    finally:
        con.close()
        copy.unlink(missing_ok=True)
        Path(str(copy) + ".wal").unlink(missing_ok=True)
    merged = {k: merge(v) for k, v in sorted(ledger.items())}
    return StoreImage(str(path), bars, merged, int(quarantine[0]) if quarantine else 0, int(pages[0]) if pages else 0)


def diff_bars(got: StoreImage, want: StoreImage) -> str:
    """Evidence for two stores that differ: missing and extra rows by symbol and day."""
    g, w = set(got.bars), set(want.bars)
    missing: dict[str, int] = defaultdict(int)
    extra: dict[str, int] = defaultdict(int)
    for row in w - g:
        missing[f"{row[0]} {row[2]:%Y-%m-%d}"] += 1
    for row in g - w:
        extra[f"{row[0]} {row[2]:%Y-%m-%d}"] += 1
    dups = len(got.bars) - len(g)
    return f"missing {dict(sorted(missing.items()))}, extra {dict(sorted(extra.items()))}, duplicated rows {dups}"


def unheld_claims(image: StoreImage, reference: StoreImage) -> list[str]:
    """Ranges the ledger claims whose bars are not exactly the reference's bars there."""
    have, want = image.by_symbol(), reference.by_symbol()
    problems: list[str] = []
    for (sym, tf, prov, _src, feed), intervals in image.ledger.items():
        for s, e in intervals:
            held = [r for r in have.get(sym, []) if r[1] == tf and s <= r[2] < e]
            truth = [r for r in want.get(sym, []) if r[1] == tf and s <= r[2] < e]
            if held != truth:
                diff = len(set(truth) - set(held)), len(set(held) - set(truth)), len(held) - len(set(held))
                problems.append(
                    f"{sym} {tf} {prov}/{feed} [{s.isoformat()}, {e.isoformat()}): claimed, holds {len(held)} bars, "
                    f"the vendor has {len(truth)} (missing {diff[0]}, extra {diff[1]}, duplicated {diff[2]})"
                )
    return problems


# --- the gateway -------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One gateway exchange: the status (None when the connection failed), headers, body, time taken."""

    label: str
    method: str
    path: str
    status: int | None
    headers: dict[str, str]
    body: bytes
    seconds: float
    error: str | None = None

    def brief(self) -> str:
        what = f"HTTP {self.status}" if self.status is not None else f"no answer ({self.error})"
        return f"{self.label}: {self.method} {self.path[:120]} -> {what} in {self.seconds:.2f}s, {self.body[:200]!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """``marketpipe serve`` running as a subprocess; every answer is recorded for ``assert_clean``."""

    def __init__(self, chaos: Chaos, proc: Proc, url: str) -> None:
        self.chaos, self.proc, self.url = chaos, proc, url
        # One keep-alive connection for sequential requests: a bad request must not spoil the next one on it.
        self.session = httpx.Client(base_url=url, timeout=30.0)

    def request(
        self,
        label: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        timeout: float = 30.0,
        fresh: bool = False,
    ) -> Answer:
        """One exchange, on the shared keep-alive connection unless ``fresh``."""
        started = time.monotonic()
        try:
            if fresh:
                with httpx.Client(base_url=self.url, timeout=timeout) as c:
                    r = c.request(method, path, headers=headers, content=content)
            else:
                r = self.session.request(method, path, headers=headers, content=content, timeout=timeout)
            a = Answer(label, method, path, r.status_code, dict(r.headers), r.content, time.monotonic() - started)
        except httpx.HTTPError as exc:
            a = Answer(label, method, path, None, {}, b"", time.monotonic() - started, f"{type(exc).__name__}: {exc}")
        self.chaos.answers.append(a)
        return a

    def many(self, calls: Sequence[tuple[str, str, str, dict[str, str] | None]], timeout: float = 30.0) -> list[Answer]:
        """Send ``(label, method, path, headers)`` calls concurrently; answers in the same order."""
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = [
                pool.submit(self.request, lab, m, p, headers=h, timeout=timeout, fresh=True) for lab, m, p, h in calls
            ]
            return [f.result() for f in futures]


# --- one scenario ------------------------------------------------------------------------------------


@dataclass
class Chaos:
    """One scenario's directory, simulator handle, secrets and reference; starts the CLI and checks."""

    root: Path
    sim: SimControl
    secrets: Secrets
    reference_image: StoreImage | None  # None while the reference itself is computed
    rng: random.Random
    finished: list[Finished] = field(default_factory=list)
    running: list[Proc] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.scratch = self.root / "inspect"

    # --- configuration ---------------------------------------------------------------------------------
    def config(
        self,
        name: str = "marketpipe.toml",
        *,
        provider: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
        circuit: dict[str, Any] | None = None,
        server: dict[str, Any] | None = None,
        backfill: dict[str, Any] | None = None,
    ) -> Path:
        """A config pointing at the simulator: short timeouts and backoff, small pages; the circuit at
        its default threshold (five failures) with a short recovery. Secrets stay in the environment."""
        prov = {
            "base_url": self.sim.url,
            "plan": "unlimited",
            "rate_limit_per_min": 100_000,
            "connect_timeout": 1.0,
            "read_timeout": 3.0,
            **(provider or {}),
        }
        sections: dict[str, dict[str, Any]] = {
            "backfill": {"page_limit": PAGE_LIMIT, "concurrency": 4, **(backfill or {})},
            "stream": {"enabled": False},
            "providers.alpaca": prov,
            "providers.alpaca.retry": {
                "attempts": 4,
                "base_seconds": 0.05,
                "max_seconds": 0.2,
                "max_retry_after_seconds": 5.0,
                **(retry or {}),
            },
            "providers.alpaca.circuit": {"failure_threshold": 5, "recovery_seconds": 1.0, **(circuit or {})},
            "providers.polygon": {"enabled": False},
            "providers.yahoo": {"enabled": False},
        }
        if server:
            sections["server"] = server
        lines: list[str] = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
            lines.append("")
        path = self.root / name
        path.write_text("\n".join(lines))
        return path

    def env(self, *, gateway: bool = False) -> dict[str, str]:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "MARKETPIPE_", "POLYGON_"))
        }
        pythonpath = os.pathsep.join(p for p in (SRC_DIR, base.get("PYTHONPATH", "")) if p)
        env = {
            **base,
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            "ALPACA_API_KEY": self.secrets.vendor_key,
            "ALPACA_SECRET_KEY": self.secrets.vendor_secret,
        }
        if gateway:
            env["MARKETPIPE_ADMIN_TOKEN"] = self.secrets.admin_token
            env["MARKETPIPE_API_KEYS"] = f"{self.secrets.client_id}:{self.secrets.client_secret}"
        return env

    # --- the CLI -----------------------------------------------------------------------------------------
    def start(self, name: str, *args: str, preexec: Callable[[], None] | None = None, gateway: bool = False) -> Proc:
        return Proc(self, name, ["--log-level", "info", *args], self.env(gateway=gateway), preexec)

    def start_backfill(
        self,
        store: Path | str,
        config: Path,
        *,
        symbols: Sequence[str] = SYMBOLS,
        preexec: Callable[[], None] | None = None,
    ) -> Proc:
        return self.start(
            "backfill",
            "backfill",
            *symbols,
            "--start",
            START,
            "--end",
            END,
            "--timeframe",
            TIMEFRAME,
            "--config",
            str(config),
            "--store",
            str(store),
            "--no-progress",
            preexec=preexec,
        )

    def backfill(self, store: Path | str, config: Path, *, bound: float = RUN_BOUND, **kw: Any) -> Finished:
        return self.start_backfill(store, config, **kw).wait(bound)

    def repair(self, store: Path, config: Path, *, bound: float = RUN_BOUND) -> Finished:
        args = ["repair", *SYMBOLS, "--start", START, "--end", END, "--timeframe", TIMEFRAME]
        return self.start("repair", *args, "--config", str(config), "--store", str(store)).wait(bound)

    @contextmanager
    def serve(self, store: Path | str, config: Path, *, workers: int = 1) -> Iterator[Gateway]:
        """``marketpipe serve`` on a free port, with the admin token and a client key set; stopped with
        SIGINT at the end, within ``GATEWAY_STOP_BOUND``."""
        port = free_port()
        proc = self.start(
            "serve",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(config),
            "--store",
            str(store),
            *(["--workers", str(workers)] if workers != 1 else []),
            gateway=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + GATEWAY_START_BOUND
        while True:
            if not proc.alive():
                pytest.fail(f"the gateway exited during start-up\n{proc.wait(1).tail()}")
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the gateway did not answer /health within {GATEWAY_START_BOUND}s\n{proc.tail()}")
            time.sleep(0.05)
        gw = Gateway(self, proc, url)
        try:
            yield gw
        finally:
            gw.session.close()
            if proc.alive():
                proc.send(signal.SIGINT)
            if proc.result is None:
                proc.wait(GATEWAY_STOP_BOUND)

    # --- invariants ------------------------------------------------------------------------------------
    @property
    def reference(self) -> StoreImage:
        assert self.reference_image is not None, "no reference store in this scenario"
        return self.reference_image

    def image(self, store: Path | str) -> StoreImage:
        return read_store(store, self.scratch)

    def assert_claims_held(self, store: Path | str) -> StoreImage:
        img = self.image(store)
        problems = unheld_claims(img, self.reference)
        assert not problems, (
            "the ledger claims ranges the store does not hold:\n"
            + "\n".join(problems[:20])
            + (f"\n{img.describe()}\n{self.outputs_tail()}")
        )
        return img

    def assert_equal_reference(
        self, store: Path | str, *, symbols: Sequence[str] | None = None, ledger: bool = True
    ) -> StoreImage:
        """The store equals the reference (restricted to ``symbols`` when given). ``ledger=False``: the
        bars only (``repair`` claims the sessions it fetched, not the whole days a backfill claims); the
        ledger must still claim nothing it does not hold."""
        want = self.reference
        img = self.image(store)
        if symbols is not None:
            want = _only(want, symbols)
            got = _only(img, symbols)
        else:
            got = img
        problems: list[str] = []
        if got.rows != want.rows or got.values_hash != want.values_hash:
            problems.append(
                f"bars: {got.rows} rows hash {got.values_hash} {got.per_symbol()}, reference {want.rows} rows "
                f"hash {want.values_hash} {want.per_symbol()}; {diff_bars(got, want)}"
            )
        if ledger and got.ledger != want.ledger:
            keys = sorted(set(got.ledger) | set(want.ledger), key=str)
            for k in keys:
                if got.ledger.get(k) != want.ledger.get(k):
                    problems.append(f"ledger {k}: {got.ledger.get(k)} != reference {want.ledger.get(k)}")
        if got.quarantine != want.quarantine:
            problems.append(f"quarantine: {got.quarantine} rows, reference {want.quarantine}")
        problems += unheld_claims(got, self.reference)
        assert not problems, (
            "the store differs from the unfaulted reference:\n"
            + "\n".join(problems[:20])
            + (f"\n{self.outputs_tail()}")
        )
        return img

    def assert_clean(self, *, also: Sequence[str] = ()) -> None:
        """No traceback, no secret anywhere, no 5xx from the gateway, no process left running; ``also``:
        the scenario's own findings, reported together with these."""
        problems = [*also, *self.unclean()]
        assert not problems, "\n".join(problems)

    def unclean(self) -> list[str]:
        problems: list[str] = []
        for proc in list(self.running):
            problems.append(f"{proc.name} still running at the end of the scenario")
            proc.killed()
        for f in self.finished:
            for stream, text in (("stdout", f.stdout), ("stderr", f.stderr)):
                if "Traceback" in text:
                    at = text.index("Traceback")
                    problems.append(f"{f.name} printed a traceback on {stream}:\n{text[at : at + 1500]}")
                for name in self.secrets.found(text):
                    problems.append(f"{f.name} printed the {name} on {stream}")
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                for name in self.secrets.found(path.read_bytes()):
                    problems.append(f"the {name} is in the file {path.relative_to(self.root)}")
        for a in self.answers:
            blob = a.body + "\n".join(f"{k}: {v}" for k, v in a.headers.items()).encode()
            for name in self.secrets.found(blob):
                problems.append(f"the gateway's answer carries the {name}: {a.brief()}")
            if a.status is not None and a.status >= 500 and not (a.status == 503 and "retry-after" in a.headers):
                problems.append(f"gateway 5xx: {a.brief()}")
        return problems

    def outputs_tail(self, n: int = 3) -> str:
        return "\n".join(f.tail(15) for f in self.finished[-n:])


def _only(img: StoreImage, symbols: Sequence[str]) -> StoreImage:
    keep = set(symbols)
    return StoreImage(
        img.path,
        [r for r in img.bars if r[0] in keep],
        {k: v for k, v in img.ledger.items() if k[0] in keep},
        img.quarantine,
        img.ingest_pages,
    )


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def fsize_limit(limit_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn``: files this process writes cannot grow past ``limit_bytes`` (writes past it fail
    with EFBIG; SIGXFSZ, which would kill the process instead, is ignored and stays ignored across exec)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply
