"""``marketpipe cluster``: a whole scaled-out deployment on one machine, for trying it.

PostgreSQL (the shared store), Redis (the gateways' shared cache), NATS with JetStream (the bus), the
vendor simulator, two gateways and two workers — every server on a free port of 127.0.0.1 with its data in
one temp dir, all stopped (and the dir removed) on Ctrl-C or SIGTERM. PostgreSQL refuses to run as root, so
as root it runs as the ``postgres`` user (``runuser``)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from marketpipe.cli.common import app, err, handle_errors, out
from marketpipe.core.errors import ConfigError

SIM_KEYS = {"ALPACA_API_KEY": "SIMKEY", "ALPACA_SECRET_KEY": "SIMSECRET"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _which(name: str, *extra: str) -> str:
    for cand in (shutil.which(name), *(p for pattern in extra for p in sorted(glob.glob(pattern)))):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise ConfigError(f"{name} not found: install its Debian package (see scripts/debian-packages.txt)")


def _wait_port(port: int, what: str, proc: subprocess.Popen[bytes] | None = None, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"{what} exited at start (exit {proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise ConfigError(f"{what} did not open port {port} within {within:g}s")


class Cluster:
    def __init__(self, root: Path, gateways: int, workers: int) -> None:
        self.root = root
        self.n_gateways = gateways
        self.n_workers = workers
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pg_data: Path | None = None
        self.pg_ctl: str | None = None
        self.sim: Any = None
        self.urls: dict[str, str] = {}

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 -- the child keeps it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def _as_postgres(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        from marketpipe.sim.server import SimServer

        # NATS with JetStream
        nats_port = _free_port()
        nats = _which("nats-server", "/usr/sbin/nats-server")
        p = self._spawn("nats", [nats, "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(self.root / "nats")])
        _wait_port(nats_port, "nats-server", p)
        self.urls["bus"] = f"nats://127.0.0.1:{nats_port}"
        # Redis, nothing persisted
        redis_port = _free_port()
        redis = _which("redis-server")
        p = self._spawn(
            "redis", [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.root)]
        )
        _wait_port(redis_port, "redis-server", p)
        self.urls["cache"] = f"redis://127.0.0.1:{redis_port}/0"
        # PostgreSQL
        bindir = os.environ.get("MARKETPIPE_PG_BIN") or str(
            Path(_which("initdb", "/usr/lib/postgresql/*/bin/initdb")).parent
        )
        pg_port = _free_port()
        pg_root = self.root / "pg"
        pg_root.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pg_root, "postgres", "postgres")
        self.pg_data, self.pg_ctl = pg_root / "data", f"{bindir}/pg_ctl"
        self._as_postgres(f"{bindir}/initdb", "-D", str(self.pg_data), "-U", "postgres", "--auth=trust", "--no-sync")
        opts = f"-p {pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={pg_root} -c max_connections=200"
        self._as_postgres(self.pg_ctl, "-D", str(self.pg_data), "-l", str(pg_root / "log"), "-o", opts, "-w", "start")
        _wait_port(pg_port, "PostgreSQL")
        self.urls["store"] = f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
        # the simulator (in this process, on its own thread)
        self.sim = SimServer().start()  # port 0: a free one
        self.urls["sim"] = self.sim.url
        config = self.root / "cluster.toml"
        config.write_text(
            "# marketpipe cluster: written by `marketpipe cluster`, removed when it stops\n"
            f'[store]\nurl = "{self.urls["store"]}"\n'
            f'[cache]\nredis_url = "{self.urls["cache"]}"\n'
            f'[bus]\nurl = "{self.urls["bus"]}"\n'
            f'[providers.alpaca]\nbase_url = "{self.sim.url}"\nplan = "unlimited"\nrate_limit_per_min = 10000\n'
            "[providers.polygon]\nenabled = false\n[providers.yahoo]\nenabled = false\n"
        )
        os.chmod(config, 0o644)
        self.urls["config"] = str(config)
        env = {**os.environ, **SIM_KEYS, "MARKETPIPE_CONFIG": str(config)}
        me = [sys.executable, "-m", "marketpipe.cli.main"]
        for i in range(self.n_gateways):
            port = _free_port()
            p = self._spawn(f"gateway{i + 1}", [*me, "serve", "--port", str(port)], env)
            _wait_port(port, f"gateway {i + 1}", p, within=60)
            self.urls[f"gateway{i + 1}"] = f"http://127.0.0.1:{port}"
        for i in range(self.n_workers):
            self._spawn(f"worker{i + 1}", [*me, "worker"], env)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.pg_data is not None and self.pg_ctl is not None:
            with contextlib.suppress(subprocess.SubprocessError):
                self._as_postgres(self.pg_ctl, "-D", str(self.pg_data), "-m", "fast", "-w", "stop")
        if self.sim is not None:
            self.sim.stop()


@app.command()
@handle_errors
def cluster(
    gateways: Annotated[int, typer.Option("--gateways", min=1, max=8)] = 2,
    workers: Annotated[int, typer.Option("--workers", min=0, max=16)] = 2,
    duration: Annotated[float | None, typer.Option("--duration", help="stop after this many seconds")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="leave the temp dir (logs, data) after stopping")] = False,
) -> None:
    """A local cluster for trying the scaled-out setup: PostgreSQL, Redis, NATS, the simulator, gateways
    and workers on free ports; prints the URLs; Ctrl-C stops them all."""
    root = Path(tempfile.mkdtemp(prefix="marketpipe-cluster-"))
    os.chmod(root, 0o755)
    c = Cluster(root, gateways, workers)
    stopping = False

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        c.start()
        rows = [("store (PostgreSQL)", c.urls["store"]), ("cache (Redis)", c.urls["cache"])]
        rows += [("bus (NATS JetStream)", c.urls["bus"]), ("simulator (Alpaca)", c.urls["sim"])]
        rows += [(f"gateway {i + 1}", c.urls[f"gateway{i + 1}"]) for i in range(gateways)]
        rows += [("workers", f"{workers} x `marketpipe worker`"), ("config", c.urls["config"]), ("logs", str(root))]
        for name, url in rows:
            out.print(f"{name:<22} {url}", highlight=False, soft_wrap=True)
        out.print(
            "\nIn another shell:\n"
            f"  export MARKETPIPE_CONFIG={c.urls['config']} ALPACA_API_KEY=SIMKEY ALPACA_SECRET_KEY=SIMSECRET\n"
            "  marketpipe backfill AAPL MSFT SPY --timeframe 1Min --start 2024-03-04 --end 2024-03-08 --distributed\n"
            f"  curl '{c.urls['gateway1']}/v1/bars/AAPL?timeframe=1Min&start=2024-03-04&end=2024-03-04&limit=3'\n"
            f"  marketpipe stream AAPL --gateway {c.urls[f'gateway{min(2, gateways)}']}\n"
            "  marketpipe events tail 'mp.>'\n"
            "Ctrl-C stops everything.",
            highlight=False,
            soft_wrap=True,
        )
        sys.stdout.flush()
        began = time.monotonic()
        while duration is None or time.monotonic() - began < duration:
            for name, proc in c.procs:
                if proc.poll() is not None:
                    raise ConfigError(f"{name} exited (exit {proc.returncode}); see {root / (name + '.log')}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopping = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        err.print("stopping the cluster" if stopping else "cluster stopped", highlight=False)
        c.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
