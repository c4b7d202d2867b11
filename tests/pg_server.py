"""A throwaway PostgreSQL server for tests: the Debian binaries (``initdb`` + ``pg_ctl``), run as the
``postgres`` user (PostgreSQL refuses to run as root), in a temp dir owned by that user, on a free
TCP port of 127.0.0.1 with its unix socket in the same dir. Never the machine's own server on 5432.

``PgServer.database()`` hands out a fresh database per test (``CREATE DATABASE`` from ``template0``
takes a few ms); ``restart()`` stops and starts the same cluster (the restart scenarios)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("MARKETPIPE_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = [] if os.geteuid() != 0 else ["runuser", "-u", PG_USER, "--"]
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout, check=True)


def available() -> bool:
    return (PG_BIN / "initdb").is_file() and (PG_BIN / "pg_ctl").is_file()


class PgServer:
    """``durable=False`` (tests): no fsync. ``durable=True`` (benchmarks): PostgreSQL's defaults."""

    def __init__(self, *, durable: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="marketpipe-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.host = "127.0.0.1"
        if os.geteuid() == 0:
            shutil.chown(self.root, PG_USER, PG_USER)
        os.chmod(self.root, 0o755)
        _as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        conf = (
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
            "max_connections = 200\nshared_buffers = 128MB\n"
        )
        if not durable:
            conf += "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        _as_postgres("sh", "-c", f"cat >> {self.data}/postgresql.conf <<'EOF'\n{conf}EOF")
        self.start()

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{dbname}"

    def start(self) -> None:
        _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "30", "start"
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not open port {self.port}")

    def running(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, mode: str = "fast") -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (fast: open connections are cut) and start again on the same port and data."""
        self.stop("fast")
        if down_seconds:
            time.sleep(down_seconds)
        self.start()

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        out = _as_postgres(
            str(PG_BIN / "psql"),
            "-h",
            str(self.root),
            "-p",
            str(self.port),
            "-U",
            PG_USER,
            "-d",
            dbname,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            statement,
        )
        return out.stdout.strip()

    def database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
