"""A throwaway NATS server with JetStream for tests: Debian's ``nats-server`` binary on a free port of
127.0.0.1 with its store in a temp dir (``-js -sd``), never the machine's own. The port is polled before
anyone connects (nats-py's first connect to a closed port retries for ~120 s). ``restart()`` stops and
starts it on the same port and store (the outage scenarios); ``kill()`` is ``kill -9``."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARY = shutil.which("nats-server") or next(
    (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).is_file()), None
)


def available() -> bool:
    return BINARY is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, port: int | None = None) -> None:
        assert BINARY is not None, "nats-server is not installed (Debian package nats-server)"
        self.root = Path(tempfile.mkdtemp(prefix="marketpipe-nats-"))
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [BINARY or "nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.root / "js")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log", "ab"),  # noqa: SIM115 -- the child keeps it
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self.root / 'log').read_text()[-2000:]}")
            if self.running():
                return
            time.sleep(0.01)
        raise RuntimeError(f"nats-server did not open port {self.port}")

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        if down_seconds:
            time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
