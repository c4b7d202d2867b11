"""Issue 15, the Parquet cold tier: store → Hive-partitioned Parquet (local and S3) → ``mp.bars(source=…)``
and DuckDB ``read_parquet``, over bars the simulator served into a real DuckDB store; moto's S3 server
plays the object store."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

import marketpipe as mp
from marketpipe.core.errors import (
    BucketNotFound,
    DatasetNotFound,
    InvalidArgument,
    MissingCredentials,
    NothingToExport,
    ObjectStoreDenied,
    ObjectStoreUnreachable,
    OutputError,
)
from marketpipe.core.schema import BAR_COLUMNS, BAR_SCHEMA, TIME_COLUMN
from marketpipe.core.timeframe import Timeframe
from marketpipe.service.data import SyncMarketData
from marketpipe.service.export import ExportStats, export_bars
from marketpipe.sim.server import SimServer
from marketpipe.store import open_store
from marketpipe.store.parquet import HASH_KEY, PARTITIONING, open_dataset, symbol_dir
from tests.export.conftest import (
    DAILY_SYMBOLS,
    MINUTE_RANGE,
    MINUTE_SYMBOLS,
    S3_SECRET,
    Held,
    S3Server,
    backfilled,
    free_port,
    start_moto,
    stop_moto,
)

MIN, DAY = Timeframe.parse("1Min"), Timeframe.parse("1Day")


def export(held: Held, to: str, symbols: list[str], tf: Timeframe = MIN, env: dict[str, str] | None = None,
           start: datetime | None = None, end: datetime | None = None) -> ExportStats:  # fmt: skip
    dataset = open_dataset(to, held.config.export, env=env or {})
    with open_store(held.config, create=False) as st:
        return export_bars(st, dataset, symbols, tf, start, end)


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# what users read (mp.bars, the files): the store's columns with ``ts`` named ``timestamp``
PUBLIC_COLUMNS = [TIME_COLUMN if c == "ts" else c for c in BAR_COLUMNS]
PUBLIC_SCHEMA = {(TIME_COLUMN if c == "ts" else c): t for c, t in BAR_SCHEMA.items()}


def store_read(held: Held, symbols: list[str], start: str, end: str, tf: str = "1Min") -> pl.DataFrame:
    with SyncMarketData(config=held.config) as c:
        frame: pl.DataFrame = c.bars(symbols, start, end, timeframe=tf, fetch=False)
    return frame


@pytest.fixture(scope="module")
def lake(held: Held, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The held store's 1Min and 1Day bars exported once, for the tests that only read."""
    root = tmp_path_factory.mktemp("lake") / "lake"
    export(held, str(root), MINUTE_SYMBOLS, MIN)
    export(held, str(root), DAILY_SYMBOLS, DAY)
    return root


@pytest.mark.parametrize(
    ("symbols", "start", "end", "tf"),
    [
        (MINUTE_SYMBOLS, *MINUTE_RANGE, "1Min"),  # across February's end
        (["BRK.B"], "2024-03-01", "2024-03-01", "1Min"),  # one symbol-day
        (["MSFT", "AAPL"], "2024-02-29T15:00:00Z", "2024-03-04T15:00:00Z", "1Min"),  # instants, mid-session
        (DAILY_SYMBOLS, "2016-01-01", "2024-03-28", "1Day"),  # eight years, ~100 files a symbol
        (["SPY"], "2019-12-30", "2020-01-03", "1Day"),  # across a year's end
    ],
)
def test_round_trip_equals_the_store_read_exactly(
    held: Held, lake: Path, symbols: list[str], start: str, end: str, tf: str
) -> None:
    expected = store_read(held, symbols, start, end, tf)
    assert expected.height > 0
    with SyncMarketData(config=held.config) as c:
        got = c.bars(symbols, start, end, timeframe=tf, source=f"parquet://{lake}")
    assert got.schema == pl.Schema(PUBLIC_SCHEMA)
    assert got.equals(expected)
    assert got["source"].unique().to_list() == ["sim:alpaca"]  # attribution kept


def test_mp_bars_reads_the_cold_tier_with_the_notebook_shapes(
    held: Held, lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SyncMarketData(config=held.config) as c:
        monkeypatch.setattr(mp, "_default", c)
        got = mp.bars(["AAPL", "MSFT"], "2024-03-01", "2024-03-01", source=f"parquet://{lake}")
        stored = mp.bars(["AAPL", "MSFT"], "2024-03-01", "2024-03-01", fetch=False)
        assert got.equals(stored) and got.height == 2 * 390
        alpaca = mp.bars("AAPL", "2024-03-01", "2024-03-01", source=f"parquet://{lake}", shape="alpaca")
        assert alpaca.equals(mp.bars("AAPL", "2024-03-01", "2024-03-01", fetch=False, shape="alpaca"))
        ny = mp.bars("AAPL", "2024-03-01", "2024-03-01", source=f"parquet://{lake}", tz="exchange")
        assert ny["timestamp"][0].hour == 9 and ny["timestamp"][0].minute == 30
        # a symbol the dataset lacks: no rows, the store's columns (as a store read of it gives)
        none = mp.bars("QQQ", "2024-03-01", "2024-03-01", source=f"parquet://{lake}")
        assert none.height == 0 and none.schema == pl.Schema(PUBLIC_SCHEMA)


def test_layout_is_hive_partitioned_by_symbol_year_month_with_a_digest(held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    stats = export(held, str(lake), MINUTE_SYMBOLS, MIN)
    names = sorted(files(lake))
    assert names == sorted(f"symbol={s}/year=2024/month={m}/bars-1Min.parquet" for s in MINUTE_SYMBOLS for m in (2, 3))
    assert stats.files_written == 6 and stats.rows_written == stats.rows_seen == 3 * 7 * 390
    meta = pq.read_metadata(lake / "symbol=BRK.B/year=2024/month=3/bars-1Min.parquet")
    assert len(meta.metadata[HASH_KEY]) == 64
    assert meta.schema.names == [c for c in PUBLIC_COLUMNS if c != "symbol"]  # the time column: timestamp


def test_partition_values_are_uri_encoded_so_any_symbol_is_one_level() -> None:
    # BTC/USD-style symbols (a future crypto feed) must not become two directory levels
    assert symbol_dir("BTC/USD") == "symbol=BTC%2FUSD"
    assert symbol_dir("BRK.B") == "symbol=BRK.B"
    # and the Hive readers decode the value back: pyarrow's partitioning (what read-back uses) ...
    assert str(PARTITIONING.parse("/symbol=BTC%2FUSD/year=2024/month=3/bars-1Min.parquet")) == (
        '(((symbol == "BTC/USD") and (year == 2024)) and (month == 3))'
    )


def test_duckdb_read_parquet_of_the_dataset_equals_the_store(held: Held, lake: Path) -> None:
    con = duckdb.connect()
    sql = f"""SELECT {", ".join(PUBLIC_COLUMNS)} FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true)
              WHERE timeframe = '1Min' AND symbol IN ('AAPL', 'BRK.B') ORDER BY symbol, timestamp"""
    got = pl.from_arrow(con.sql(sql).arrow())
    assert isinstance(got, pl.DataFrame)
    expected = store_read(held, ["AAPL", "BRK.B"], *MINUTE_RANGE)
    assert got.cast(PUBLIC_SCHEMA).equals(expected)  # type: ignore[arg-type]
    # the partition columns are typed as integers and prune: one month of one symbol
    row = con.execute(
        f"""SELECT count(*), min(year), min(month) FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true)
            WHERE symbol = 'SPY' AND year = 2020 AND month = 3"""
    ).fetchone()
    assert row == (22, 2020, 3)


def test_a_rerun_with_nothing_changed_writes_nothing(held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    first = export(held, str(lake), DAILY_SYMBOLS, DAY)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in lake.rglob("*.parquet")}
    again = export(held, str(lake), DAILY_SYMBOLS, DAY)
    assert first.files_written == len(before) > 400
    assert again.files_written == 0 and again.rows_written == 0 and again.bytes_written == 0
    assert again.files_unchanged == first.files_written
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in lake.rglob("*.parquet")} == before


def test_a_changed_store_rewrites_only_the_months_that_changed(sim: SimServer, held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    export(held, str(lake), MINUTE_SYMBOLS, MIN)
    february = {p: p.stat().st_mtime_ns for p in lake.rglob("month=2/*.parquet")}
    grown = tmp_path / "grown.duckdb"
    shutil.copy(held.path, grown)
    bigger = backfilled(sim, grown, days=("2024-03-06", "2024-03-06"))  # one more session
    stats = export(bigger, str(lake), MINUTE_SYMBOLS, MIN)
    assert (stats.files_written, stats.files_unchanged) == (3, 3)  # March rewritten, February skipped
    assert {p: p.stat().st_mtime_ns for p in lake.rglob("month=2/*.parquet")} == february
    with SyncMarketData(config=bigger.config) as c:
        got = c.bars(MINUTE_SYMBOLS, "2024-02-26", "2024-03-06", source=f"parquet://{lake}")
        assert got.equals(c.bars(MINUTE_SYMBOLS, "2024-02-26", "2024-03-06", fetch=False))
        assert got.height == 3 * 8 * 390


def test_a_range_is_widened_to_whole_months(held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    day = datetime(2024, 3, 4, 14, 30, tzinfo=UTC)
    stats = export(held, str(lake), ["AAPL"], MIN, start=day, end=day.replace(hour=15))
    assert sorted(files(lake)) == ["symbol=AAPL/year=2024/month=3/bars-1Min.parquet"]
    assert stats.rows_written == 3 * 390  # every March session held, not the hour asked for


def test_leftovers_of_a_killed_write_are_invisible_and_removed(held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    export(held, str(lake), ["AAPL"], MIN)
    part = lake / "symbol=AAPL/year=2024/month=3"
    leftover = part / ".bars-1Min.parquet.0123abcd.tmp"
    leftover.write_bytes((part / "bars-1Min.parquet").read_bytes()[:1000])  # half a file, as a kill leaves it
    n = duckdb.execute(f"SELECT count(*) FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true)").fetchone()
    assert n == (7 * 390,)  # readers never see it
    stats = export(held, str(lake), ["AAPL"], MIN)
    assert stats.leftovers_removed == 1 and not leftover.exists() and stats.files_written == 0


def test_unknown_symbols_and_empty_ranges_are_refused_before_anything_is_written(held: Held, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    with pytest.raises(NothingToExport, match=r"no 1Min bars of ZZZZ"):
        export(held, str(lake), ["ZZZZ"], MIN)
    saturday = datetime(2024, 3, 2, tzinfo=UTC)
    with pytest.raises(NothingToExport, match="nothing to export"):
        export(held, str(lake), ["AAPL"], MIN, start=saturday, end=saturday.replace(day=3))
    with pytest.raises(NothingToExport):
        export(held, str(lake), ["SPY"], MIN)  # held as 1Day only
    assert not lake.exists()
    # one symbol unknown among others: the rest is exported, the unknown one named
    stats = export(held, str(lake), ["AAPL", "ZZZZ"], MIN)
    assert stats.empty_symbols == ["ZZZZ"] and stats.files_written == 2


def test_bad_targets_and_sources_are_typed_errors(held: Held, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="parquet://PATH") as bad:
        open_dataset("ftp://host/x", held.config.export, env={})
    assert bad.value.details["parameter"] == "to"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="is not a directory"):
        export(held, str(blocker), ["AAPL"], MIN)
    with pytest.raises(OutputError):
        export(held, str(blocker / "below"), ["AAPL"], MIN)
    with SyncMarketData(config=held.config) as c:
        with pytest.raises(DatasetNotFound, match="no Parquet dataset"):
            c.bars("AAPL", "2024-03-01", "2024-03-01", source=f"parquet://{tmp_path / 'nothing-here'}")
        with pytest.raises(InvalidArgument, match="source must be parquet://PATH or s3://") as refused:
            c.bars("AAPL", "2024-03-01", "2024-03-01", source="alpaca")
        assert refused.value.details["parameter"] == "source"


# --- S3, against moto's server -----------------------------------------------------------------------


def test_s3_round_trip_rerun_and_read_back(held: Held, s3: S3Server) -> None:
    bucket = s3.new_bucket()
    to = f"s3://{bucket}/cold/bars"
    first = export(held, to, MINUTE_SYMBOLS, MIN, env=s3.env())
    assert first.files_written == 6
    assert s3.keys(bucket) == sorted(
        f"cold/bars/symbol={s}/year=2024/month={m}/bars-1Min.parquet" for s in MINUTE_SYMBOLS for m in (2, 3)
    )  # no temporary object left behind
    again = export(held, to, MINUTE_SYMBOLS, MIN, env=s3.env())
    assert (again.files_written, again.files_unchanged) == (0, 6)
    with SyncMarketData(config=held.config, env=s3.env()) as c:
        got = c.bars(MINUTE_SYMBOLS, *MINUTE_RANGE, source=to)
        assert got.equals(c.bars(MINUTE_SYMBOLS, *MINUTE_RANGE, fetch=False))
        day = c.bars("BRK.B", "2024-03-04", "2024-03-04", source=to)
        assert day.height == 390 and day["symbol"].unique().to_list() == ["BRK.B"]


def test_s3_endpoint_from_the_config_file(held: Held, s3: S3Server) -> None:
    bucket = s3.new_bucket()
    held.config.export.endpoint_url = s3.url
    try:
        env = {k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL"}
        assert export(held, f"s3://{bucket}", ["AAPL"], MIN, env=env).files_written == 2
        assert s3.keys(bucket) == [f"symbol=AAPL/year=2024/month={m}/bars-1Min.parquet" for m in (2, 3)]
    finally:
        held.config.export.endpoint_url = None


def test_s3_missing_bucket_no_credentials_and_unreachable_are_typed(held: Held, s3: S3Server) -> None:
    with pytest.raises(BucketNotFound, match="does not exist") as missing:
        export(held, "s3://no-such-bucket-here/p", ["AAPL"], MIN, env=s3.env())
    assert S3_SECRET not in str(missing.value.to_dict())
    with pytest.raises(MissingCredentials, match="AWS_ACCESS_KEY_ID"):
        open_dataset("s3://b/p", held.config.export, env={"AWS_ENDPOINT_URL": s3.url, "HOME": "/nonexistent"})
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ObjectStoreUnreachable, match="cannot reach") as unreachable:
        export(held, "s3://lake/p", ["AAPL"], MIN, env={**s3.env(), "AWS_ENDPOINT_URL": dead})
    assert S3_SECRET not in str(unreachable.value.to_dict())
    with (
        SyncMarketData(config=held.config, env={**s3.env(), "AWS_ENDPOINT_URL": dead}) as c,
        pytest.raises(ObjectStoreUnreachable),
    ):
        c.bars("AAPL", "2024-03-01", "2024-03-01", source="s3://lake/p")
    bucket = s3.new_bucket()
    with SyncMarketData(config=held.config, env=s3.env()) as c, pytest.raises(DatasetNotFound):
        c.bars("AAPL", "2024-03-01", "2024-03-01", source=f"s3://{bucket}/never-written")


def test_s3_refused_credentials_are_object_store_denied(held: Held, tmp_path: Path) -> None:
    server = start_moto(tmp_path, enforce_auth=True)  # an S3 that checks keys, and knows none of ours
    try:
        with pytest.raises(ObjectStoreDenied, match="refused access") as denied:
            export(held, "s3://lake/p", ["AAPL"], MIN, env=server.env())
        assert S3_SECRET not in str(denied.value.to_dict())
        with SyncMarketData(config=held.config, env=server.env()) as c, pytest.raises(ObjectStoreDenied):
            c.bars("AAPL", "2024-03-01", "2024-03-01", source="s3://lake/p")
    finally:
        stop_moto(server)
