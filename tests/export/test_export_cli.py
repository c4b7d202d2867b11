"""``marketpipe export`` as a user runs it: subprocesses over a real store, a local directory and moto's S3
server; ``kill -9`` in the middle of an export, then a rerun, gives the dataset an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from marketpipe.service.data import SyncMarketData
from marketpipe.sim.server import SimServer
from tests.conftest import SIM_ENV
from tests.export.conftest import DAILY_SYMBOLS, S3_SECRET, Held, S3Server, sim_config, start_moto, stop_moto


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "marketpipe.cli.main", *args]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "APCA_", "AWS_", "MARKETPIPE_"))}
    return {**base, **(extra or {})}


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def dataset(root: Path) -> dict[str, tuple[str, int]]:
    """Each committed file: its content digest and row count; hidden (temporary) files listed as such."""
    return described({str(p.relative_to(root)): str(p) for p in sorted(root.rglob("*")) if p.is_file()}, None)


def s3_dataset(s3: S3Server, bucket: str, prefix: str) -> dict[str, tuple[str, int]]:
    keys = [k for k in s3.keys(bucket) if k.startswith(prefix + "/")]
    return described({k[len(prefix) + 1 :]: f"{bucket}/{k}" for k in keys}, s3.fs())


def described(paths: dict[str, str], fs: pafs.FileSystem | None) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for rel, where in paths.items():
        if rel.rsplit("/", 1)[-1].startswith("."):
            out[rel] = ("temporary", 0)
            continue
        meta = pq.read_metadata(where, filesystem=fs)  # a partial object would fail here
        out[rel] = (meta.metadata[b"marketpipe.sha256"].decode(), meta.num_rows)
    return out


def kill_when(proc: subprocess.Popen[bytes], committed: Callable[[], int], at_least: int) -> None:
    """SIGKILL ``proc`` once ``committed()`` reaches ``at_least`` (it must still be running then)."""
    deadline = time.monotonic() + 60
    while committed() < at_least:
        assert proc.poll() is None, "the export ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def test_export_then_rerun_json_and_duckdb(held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    first = run("export", "AAPL", "BRK.B", "--to", str(lake), "--store", str(held.path), "--json")
    assert first.returncode == 0, first.stderr
    stats = json.loads(first.stdout)
    assert stats["files_written"] == 4 and stats["rows_written"] == 2 * 7 * 390 and stats["empty_symbols"] == []
    again = run("export", "AAPL", "BRK.B", "--to", f"parquet://{lake}", "--store", str(held.path))
    assert again.returncode == 0, again.stderr
    assert "0 files written" in again.stdout and "4 unchanged" in again.stdout
    day = ["--start", "2024-03-01", "--end", "2024-03-01"]
    shown = run("bars", "BRK.B", *day, "--format", "csv", "--source", f"parquet://{lake}")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.strip().splitlines()) == 1 + 390  # header + the session's minutes, no store needed
    got = duckdb.execute(
        f"""SELECT symbol, count(*) FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true)
            GROUP BY symbol ORDER BY symbol"""
    ).fetchall()
    assert got == [("AAPL", 7 * 390), ("BRK.B", 7 * 390)]


def test_kill_9_mid_export_then_rerun_gives_the_uninterrupted_dataset(held: Held, tmp_path: Path) -> None:
    reference, lake = tmp_path / "reference", tmp_path / "lake"
    args = ["--timeframe", "1Day", "--store", str(held.path), "--no-progress"]
    done = run("export", *DAILY_SYMBOLS, "--to", str(reference), *args)
    assert done.returncode == 0, done.stderr
    want = dataset(reference)
    assert len(want) > 400
    proc = subprocess.Popen(
        cli("export", *DAILY_SYMBOLS, "--to", str(lake), *args),
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    kill_when(proc, lambda: sum(1 for _ in lake.rglob("*.parquet")), len(want) // 4)  # a quarter committed
    partial = dataset(lake)
    committed = {k: v for k, v in partial.items() if v[0] != "temporary"}
    assert len(want) // 4 <= len(committed) < len(want)
    assert all(want[k] == v for k, v in committed.items())  # what was committed is whole and final
    rerun = run("export", *DAILY_SYMBOLS, "--to", str(lake), *args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads(rerun.stdout)
    assert stats["files_unchanged"] == len(committed)  # resumed: the committed months were not rewritten
    assert stats["files_written"] == len(want) - len(committed)
    assert dataset(lake) == want  # identical, no temporary file left


def test_cli_errors_are_one_line_with_a_stable_code(held: Held, tmp_path: Path, s3: S3Server) -> None:
    store = ["--store", str(held.path)]
    cases = [
        (["export", "ZZZZ", "--to", str(tmp_path / "x"), *store], {}, "NOTHING_TO_EXPORT", 1),
        (["export", "AAPL", "--to", "ftp://h/x", *store], {}, "INVALID_ARGUMENT", 2),
        (["export", "AAPL", *store], {}, "INVALID_ARGUMENT", 2),
        (
            ["export", "AAPL", "--to", str(tmp_path), "--start", "2024-03-05", "--end", "2024-03-01", *store],
            {},
            "INVALID_ARGUMENT",
            2,
        ),
        (["export", "AAPL", "--to", "s3://b/p", *store], {"HOME": str(tmp_path)}, "MISSING_CREDENTIALS", 1),
        (["export", "AAPL", "--to", "s3://no-such-bucket/p", *store], s3.env(), "BUCKET_NOT_FOUND", 1),
        (
            ["export", "AAPL", "--to", str(tmp_path / "x"), "--store", str(tmp_path / "none.duckdb")],
            {},
            "STORE_ERROR",
            1,
        ),
    ]
    for args, env, code, status in cases:
        r = run(*args, env=env)
        assert r.returncode == status, (args, r.stderr)
        lines = r.stderr.strip().splitlines()  # a log warning of the store may come first; one error line, last
        assert lines[-1].startswith(f"error[{code}]: ") and sum("error[" in x for x in lines) == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and S3_SECRET not in r.stderr + r.stdout
    assert not (tmp_path / "x").exists()  # nothing was created for a refused export


def test_s3_export_from_the_cli_and_config_show_masks_the_secret(held: Held, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    r = run("export", "MSFT", "--to", f"s3://{bucket}/bars", "--store", str(held.path), "--json", env=s3.env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files_written"] == 2
    assert s3.keys(bucket) == [f"bars/symbol=MSFT/year=2024/month={m}/bars-1Min.parquet" for m in (2, 3)]
    shown = run("config", "show", env=s3.env())
    assert shown.returncode == 0, shown.stderr
    assert S3_SECRET not in shown.stdout
    doc = json.loads(shown.stdout)
    assert doc["export"]["endpoint_url"] == s3.url
    assert doc["credentials"]["AWS_SECRET_ACCESS_KEY"] != S3_SECRET and doc["credentials"]["AWS_ACCESS_KEY_ID"]


@pytest.mark.parametrize("symbols", [["BRK.B"], ["brk/b"]])
def test_share_class_symbols_are_one_partition(held: Held, tmp_path: Path, symbols: list[str]) -> None:
    lake = tmp_path / "lake"
    r = run("export", *symbols, "--to", str(lake), "--store", str(held.path), "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in lake.iterdir()) == ["symbol=BRK.B"]


def test_kill_9_mid_s3_export_then_rerun_gives_the_uninterrupted_dataset(
    held: Held, s3: S3Server, tmp_path: Path
) -> None:
    symbols = DAILY_SYMBOLS[:2]
    args = ["--timeframe", "1Day", "--store", str(held.path), "--no-progress"]
    reference = tmp_path / "reference"
    assert run("export", *symbols, "--to", str(reference), *args).returncode == 0
    want = dataset(reference)
    bucket = s3.new_bucket()
    to = f"s3://{bucket}/lake"
    proc = subprocess.Popen(
        cli("export", *symbols, "--to", to, *args), env=clean_env(s3.env()), stdout=subprocess.DEVNULL
    )
    kill_when(proc, lambda: sum(k.endswith(".parquet") for k in s3.keys(bucket)), len(want) // 4)
    partial = s3_dataset(s3, bucket, "lake")  # every object under a final name is a whole file
    committed = {k: v for k, v in partial.items() if v[0] != "temporary"}
    assert len(want) // 4 <= len(committed) < len(want) and all(want[k] == v for k, v in committed.items())
    rerun = run("export", *symbols, "--to", to, *args, "--json", env=s3.env())
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["files_unchanged"] == len(committed)
    assert s3_dataset(s3, bucket, "lake") == want


def test_an_object_store_that_dies_mid_export_ends_it_with_a_typed_error(held: Held, tmp_path: Path) -> None:
    server = start_moto(tmp_path)
    try:
        bucket = server.new_bucket()
        proc = subprocess.Popen(
            cli("export", *DAILY_SYMBOLS, "--to", f"s3://{bucket}/lake", "--timeframe", "1Day", "--store",
                str(held.path), "--no-progress"),
            env=clean_env(server.env()),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(server.keys(bucket)) < 20:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        server.proc.kill()  # the server goes away mid-export
        stop_moto(server)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error[OBJECT_STORE_UNREACHABLE]: cannot reach the object store"), stderr
    assert "Traceback" not in stderr and S3_SECRET not in stderr


def test_a_stored_pair_exports_with_its_fractional_volume_under_one_encoded_partition(
    sim: SimServer, tmp_path: Path
) -> None:
    store, lake = tmp_path / "pairs.duckdb", tmp_path / "lake"
    cfg = sim_config(sim.url, store)
    span = ("2024-02-29T00:00:00Z", "2024-03-03T00:00:00Z")  # across February's end, into a weekend
    with SyncMarketData(config=cfg, env=SIM_ENV) as client:
        client.backfill(["BTC/USD"], *span, timeframe="1Hour")
        stored = client.bars("BTC/USD", *span, timeframe="1Hour", fetch=False)
    assert stored.height == 3 * 24
    r = run("export", "BTC/USD", "--timeframe", "1Hour", "--to", str(lake), "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files_written"] == 2
    assert sorted(dataset(lake)) == [
        f"symbol=BTC%2FUSD/year=2024/month={m}/bars-1Hour.parquet" for m in (2, 3)
    ]  # the slash encoded: one directory level, not two
    assert pq.read_schema(lake / "symbol=BTC%2FUSD/year=2024/month=3/bars-1Hour.parquet").field("volume").type == (
        pa.float64()
    )
    with SyncMarketData(config=cfg, env=SIM_ENV) as client:
        back = client.bars("BTC/USD", *span, timeframe="1Hour", source=f"parquet://{lake}")
    assert back.equals(stored)  # fractional volumes exactly as stored, the symbol decoded back
    assert (back["volume"] != back["volume"].round(0)).any()
    got = duckdb.execute(
        f"""SELECT symbol, sum(volume) FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true)
            GROUP BY symbol"""
    ).fetchall()
    assert got == [("BTC/USD", pytest.approx(float(stored["volume"].sum())))]
