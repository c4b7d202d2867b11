"""Fixtures of the Parquet cold-tier tests: a DuckDB store holding bars the simulator served (backfilled
once per module), and a real S3-compatible server — moto's ``moto_server`` from PyPI — started as a
subprocess on a free port and stopped after the session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.fs as pafs
import pytest

from marketpipe.core.config import Config, config_from_dict
from marketpipe.service.data import SyncMarketData
from marketpipe.sim.server import SimServer
from tests.conftest import SIM_ENV

MINUTE_SYMBOLS = ["AAPL", "MSFT", "BRK.B"]
DAILY_SYMBOLS = ["AAPL", "MSFT", "BRK.B", "SPY", "QQQ"]
# 1Min across a month's end (Mon 2024-02-26 .. Tue 2024-03-05); 1Day over eight years (~100 months a symbol)
MINUTE_RANGE = ("2024-02-26", "2024-03-05")
DAILY_RANGE = ("2016-01-01", "2024-03-28")
S3_KEY, S3_SECRET = "mp-test-key", "mp-test-secret-value-never-shown"


@dataclass(frozen=True)
class Held:
    """A store file (closed: open it again per test) and the config naming it."""

    path: Path
    config: Config


def sim_config(url: str, store: Path) -> Config:
    return config_from_dict(
        {
            "providers": {"alpaca": {"base_url": url, "plan": "unlimited", "rate_limit_per_min": 100_000}},
            "store": {"path": str(store)},
        }
    )


def backfilled(sim: SimServer, store: Path, *, days: tuple[str, str] = MINUTE_RANGE) -> Held:
    cfg = sim_config(sim.url, store)
    with SyncMarketData(config=cfg, env=SIM_ENV) as client:
        client.backfill(MINUTE_SYMBOLS, *days, timeframe="1Min")
        client.backfill(DAILY_SYMBOLS, *DAILY_RANGE, timeframe="1Day")
    return Held(store, cfg)


@pytest.fixture(scope="module")
def held(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Held:
    return backfilled(sim, tmp_path_factory.mktemp("held") / "store.duckdb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    url: str
    proc: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": self.url}

    def new_bucket(self) -> str:
        """A fresh, empty bucket (one per test keeps tests independent on the one server)."""
        name = f"lake-{uuid.uuid4().hex[:12]}"
        fs = pafs.S3FileSystem(
            access_key=S3_KEY,
            secret_key=S3_SECRET,
            endpoint_override=self.url.split("://", 1)[1],
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return name

    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=S3_KEY, secret_key=S3_SECRET, endpoint_override=self.url.split("://", 1)[1], scheme="http"
        )

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket`` (the S3 listing itself, through the server's REST API)."""
        infos = self.fs().get_file_info(pafs.FileSelector(bucket, recursive=True))
        return sorted(i.path[len(bucket) + 1 :] for i in infos if i.type == pafs.FileType.File)


def start_moto(workdir: Path, *, enforce_auth: bool = False) -> S3Server:
    """``moto_server`` in a subprocess on a free loopback port, once it answers. ``enforce_auth``: it checks
    credentials against its IAM (which knows none), as S3 does, instead of accepting any."""
    port = free_port()
    log = workdir / f"moto-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if enforce_auth else {}),
            },
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/moto-api/", timeout=1)
            return S3Server(url, proc)
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start: {log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.1)


def stop_moto(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        stop_moto(server)
