"""The Parquet cold tier: a Hive-partitioned dataset of bars on a local path or in an S3 bucket.

Layout (one file per symbol, timeframe and UTC month)::

    ROOT/symbol=AAPL/year=2024/month=3/bars-1Min.parquet
    ROOT/symbol=BRK.B/year=2024/month=3/bars-1Day.parquet
    ROOT/symbol=BTC%2FUSD/year=2024/month=3/bars-1Min.parquet

The partition values are URI-encoded (``/`` → ``%2F``; letters, digits and ``._-~`` stay as they are), the
encoding pyarrow, polars and DuckDB decode when they read Hive partitions, so ``BTC/USD`` never becomes a
directory level. ``month`` is not zero-padded, so every reader types it as an integer. A file holds the
``BAR_SCHEMA`` columns less ``symbol`` (the path holds it); ``timeframe``, ``source``, ``feed`` and
``fetched_at`` stay, so every row still says where it came from. A crypto pair's files hold its
``CRYPTO_BAR_SCHEMA`` instead: ``volume`` is a float64, the fractions of a coin exactly as stored.

Every file carries, in its Parquet key-value metadata, the SHA-256 of its content
(:data:`HASH_KEY`): a writer compares it with what it would write and skips the file when they agree.
Files are committed whole: written under a hidden temporary name beside the final one
(``.bars-1Min.parquet.<id>.tmp``: hidden from pyarrow's discovery, not matched by ``*.parquet``), then
renamed — ``os.rename`` on a local disk, a server-side copy then delete on S3 — so a reader, or a run
killed at any moment, never sees half a file under a final name.

S3 goes through pyarrow's own ``S3FileSystem`` (the AWS C++ SDK bundled in the pyarrow wheel, which marketpipe
already depends on): no second HTTP stack, and ``pyarrow.dataset`` reads through it with partition pruning and
row-group filtering. Credentials come from the environment only and never reach a message or a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from marketpipe.core.config import ExportConfig
from marketpipe.core.errors import (
    BucketNotFound,
    DatasetNotFound,
    InvalidArgument,
    MarketpipeError,
    MissingCredentials,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnreachable,
    OutputError,
    StoreError,
)
from marketpipe.core.log import get_logger
from marketpipe.core.schema import BAR_COLUMNS, BAR_SCHEMA, CRYPTO_BAR_SCHEMA, TIME_COLUMN, empty_frame, is_crypto
from marketpipe.core.tables import CRYPTO_TABLES, bar_tables

log = get_logger("marketpipe.parquet")

HASH_KEY = b"marketpipe.sha256"  # key-value metadata: SHA-256 of the file's content (Arrow IPC of its table)
FILE_COLUMNS = [c for c in BAR_COLUMNS if c != "symbol"]  # the store's columns a file holds
# what a file calls them: the time column is the user-facing ``timestamp``, as in every other output
FILE_NAMES = {c: (TIME_COLUMN if c == "ts" else c) for c in FILE_COLUMNS}


def _arrow_type(dtype: pl.DataType) -> pa.DataType:
    """The plain Arrow type of a bar column (``string``, not polars' ``string_view``), so that every file has
    one schema whichever library wrote the frame."""
    if dtype == pl.String():
        return pa.string()
    if isinstance(dtype, pl.Datetime):
        return pa.timestamp(dtype.time_unit, dtype.time_zone)
    if dtype == pl.Float64():
        return pa.float64()
    if dtype == pl.Int64():
        return pa.int64()
    raise TypeError(f"no Arrow type for bar column type {dtype}")


def _file_schema(bars: dict[str, pl.DataType]) -> pa.Schema:
    return pa.schema([(FILE_NAMES[c], _arrow_type(bars[c])) for c in FILE_COLUMNS])


FILE_SCHEMA = _file_schema(BAR_SCHEMA)  # a stock's file: whole-share volume (int64)
CRYPTO_FILE_SCHEMA = _file_schema(CRYPTO_BAR_SCHEMA)  # a pair's file: fractional volume (float64)


def bar_schema(symbols: list[str]) -> dict[str, pl.DataType]:
    """The frame schema of ``symbols``' bars (one asset class, as in the store: INVALID_ARGUMENT otherwise)."""
    return CRYPTO_BAR_SCHEMA if bar_tables(symbols) is CRYPTO_TABLES else BAR_SCHEMA


def file_schema(symbol: str) -> pa.Schema:
    """The schema of ``symbol``'s files: a crypto pair keeps its float volume, a stock its whole shares."""
    return CRYPTO_FILE_SCHEMA if is_crypto(symbol) else FILE_SCHEMA


PARTITIONING = ds.partitioning(
    pa.schema([("symbol", pa.string()), ("year", pa.int32()), ("month", pa.int32())]), flavor="hive"
)
_FILE = re.compile(r"year=(\d{4})/month=(\d{1,2})/bars-([0-9A-Za-z]+)\.parquet$")
_TMP = re.compile(r"/\.bars-[0-9A-Za-z]+\.parquet\.[0-9a-f]+\.tmp$")
KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

Month = tuple[int, int]  # (year, month), UTC


@dataclass(frozen=True, slots=True)
class Location:
    """Where a dataset lives: ``kind`` local (``root`` a directory) or s3 (``root`` = ``bucket/prefix``)."""

    kind: Literal["local", "s3"]
    root: str
    url: str  # as the user wrote it, for messages (never holds a credential)

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]


def parse_location(url: str, parameter: str) -> Location:
    """``/path``, ``./path``, ``file:///path``, ``parquet://PATH`` (``parquet:///abs``) or ``s3://bucket[/prefix]``.
    Anything else (another scheme, an empty path or bucket) is INVALID_ARGUMENT naming ``parameter``."""
    text = url.strip() if isinstance(url, str) else ""
    if text.startswith("s3://"):
        root = text[len("s3://") :].strip("/")
        if not root or not root.split("/", 1)[0]:
            raise InvalidArgument(
                f"{parameter} {url!r}: an S3 URL names a bucket: s3://BUCKET/prefix", details={"parameter": parameter}
            )
        return Location("s3", root, text)
    for scheme in ("parquet://", "file://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    else:
        if "://" in text:
            raise InvalidArgument(
                f"{parameter} {url!r}: use a path, parquet://PATH, file://PATH or s3://BUCKET/prefix",
                details={"parameter": parameter},
            )
    if not text:
        raise InvalidArgument(f"{parameter} {url!r}: no path given", details={"parameter": parameter})
    return Location("local", str(Path(os.path.expanduser(text)).absolute()), url)


def symbol_dir(symbol: str) -> str:
    """``symbol=…`` with the value URI-encoded, as Hive readers decode it."""
    return f"symbol={quote(symbol, safe='')}"


def file_name(timeframe: str) -> str:
    return f"bars-{timeframe}.parquet"


def month_of(ts: datetime) -> Month:
    t = ts.astimezone(UTC)
    return t.year, t.month


def month_start(m: Month) -> datetime:
    return datetime(m[0], m[1], 1, tzinfo=UTC)


def next_month(m: Month) -> Month:
    return (m[0] + 1, 1) if m[1] == 12 else (m[0], m[1] + 1)


def months(start: datetime, end: datetime) -> list[Month]:
    """The UTC months that ``[start, end)`` touches, in order."""
    if end <= start:
        return []
    out: list[Month] = []
    m, last = month_of(start), month_of(end - timedelta(microseconds=1))
    while m <= last:
        out.append(m)
        m = next_month(m)
    return out


def file_table(symbol: str, frame: pl.DataFrame) -> pa.Table:
    """One file's table from the bars of ``symbol`` (the store's rows): ``symbol`` dropped (the path holds
    it), ``ts`` named ``timestamp``, plain Arrow types (:func:`file_schema`: a pair's volume stays float)."""
    return frame.select(FILE_COLUMNS).rename(FILE_NAMES).to_arrow().cast(file_schema(symbol))


def content_hash(table: pa.Table) -> str:
    """SHA-256 of the table as one Arrow IPC stream: the same rows, columns and types give the same digest."""
    sink = pa.BufferOutputStream()
    table = table.replace_schema_metadata(None).combine_chunks()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


class ParquetDataset:
    """One Hive-partitioned bars dataset (see the module doc). Every failure of the file system is a typed
    error: ``OUTPUT_ERROR`` for a local path that cannot be written, ``STORE_ERROR`` for one that cannot be
    read, and for S3 ``OBJECT_STORE_UNREACHABLE``, ``BUCKET_NOT_FOUND``, ``OBJECT_STORE_DENIED`` or
    ``OBJECT_STORE_ERROR``."""

    def __init__(self, location: Location, fs: pafs.FileSystem) -> None:
        self.location = location
        self.fs = fs
        self.root = location.root

    @property
    def url(self) -> str:
        return self.location.url

    # --- layout --------------------------------------------------------------------------------

    def path(self, symbol: str, timeframe: str, month: Month) -> str:
        return f"{self.root}/{symbol_dir(symbol)}/year={month[0]}/month={month[1]}/{file_name(timeframe)}"

    def files(self, symbol: str, timeframe: str) -> tuple[dict[Month, pafs.FileInfo], list[str]]:
        """The files of one symbol and timeframe, by month, and the leftover temporary files of any
        timeframe under the symbol (a run killed mid-write). One listing of the symbol's prefix."""
        base = f"{self.root}/{symbol_dir(symbol)}"
        with self._errors("list", base):
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        found: dict[Month, pafs.FileInfo] = {}
        leftovers: list[str] = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            if _TMP.search(info.path):
                leftovers.append(info.path)
                continue
            m = _FILE.search(info.path)
            if m and m.group(3) == timeframe:
                found[(int(m.group(1)), int(m.group(2)))] = info
        return found, leftovers

    def check(self, *, create: bool) -> None:
        """Reach the dataset before any work: the bucket (S3) or the root directory (local) must be there;
        with ``create`` a missing local root is made. Raises the typed errors of the class, or
        DATASET_NOT_FOUND when reading (``create=False``) finds nothing there."""
        if self.location.kind == "s3":
            bucket = self.location.bucket
            with self._errors("open", bucket):
                # a listing of the bucket itself: NO_SUCH_BUCKET, access and connection errors show here
                self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
            if not create:
                with self._errors("open", self.root):
                    info = self.fs.get_file_info(self.root)
                if info.type == pafs.FileType.NotFound:
                    raise DatasetNotFound(f"no Parquet dataset at {self.url}", details={"path": self.url})
            return
        root = Path(self.root)
        if root.is_dir():
            return
        if not create or root.exists():
            what = "is not a directory" if root.exists() else "does not exist"
            if not create:
                raise DatasetNotFound(f"no Parquet dataset at {self.url}: {root} {what}", details={"path": str(root)})
            raise OutputError(f"cannot export to {self.url}: {root} {what}", details={"path": str(root)})
        with self._errors("write", self.root):
            root.mkdir(parents=True, exist_ok=True)

    # --- reading a file's digest, writing and removing files -------------------------------------

    def stored_hash(self, path: str) -> str | None:
        """The content digest recorded in the file at ``path`` (its footer only is read); None when the file
        has none (not written by marketpipe) or cannot be read as Parquet (it is then rewritten)."""
        with self._errors("read", path):
            try:
                meta = pq.read_metadata(path, filesystem=self.fs).metadata or {}
            except pa.ArrowInvalid:  # not a Parquet file (truncated by another tool): rewrite it
                return None
        value = meta.get(HASH_KEY)
        return value.decode() if value else None

    def write(self, path: str, table: pa.Table, digest: str) -> int:
        """Commit ``table`` at ``path`` whole (temporary name, then rename); returns the bytes written.
        On any failure the temporary file is removed and nothing changes under ``path``."""
        table = table.replace_schema_metadata({HASH_KEY: digest.encode()})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd", row_group_size=64 * 1024)
        data = buf.getvalue()
        directory, name = path.rsplit("/", 1)
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        with self._errors("write", path):
            try:
                if self.location.kind == "local":
                    _write_local(directory, tmp, path, data)
                else:
                    with self.fs.open_output_stream(tmp) as out:
                        out.write(data)
                    self.fs.move(tmp, path)  # CopyObject then DeleteObject: the final key appears whole
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(tmp)
                raise
        return data.size

    def remove(self, paths: list[str]) -> None:
        for p in paths:
            with self._errors("remove", p), contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(p)

    # --- reading bars back --------------------------------------------------------------------------

    def read_bars(self, symbols: list[str], timeframe: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Bars of ``symbols`` in ``[start, end)`` as the store returns them (``BAR_SCHEMA``, or
        ``CRYPTO_BAR_SCHEMA`` for pairs; ordered by symbol then ts). Partitions are pruned before anything is
        opened: one listing per symbol's prefix, then only the files of the months the range touches; the
        time filter is pushed down to the row groups."""
        schema = bar_schema(symbols)
        wanted = set(months(start, end))
        paths: list[str] = []
        for sym in sorted(symbols):
            found, _ = self.files(sym, timeframe)
            paths += [found[m].path for m in sorted(found) if m in wanted]
        if not paths:
            return empty_frame(schema)
        ts = ds.field(TIME_COLUMN)
        lo, hi = (pa.scalar(t, type=pa.timestamp("us", "UTC")) for t in (start, end))
        with self._errors("read", self.url):
            try:
                dataset = ds.dataset(
                    paths,
                    schema=file_schema(symbols[0]).append(pa.field("symbol", pa.string())),
                    filesystem=self.fs,
                    format="parquet",
                    partitioning=PARTITIONING,
                    partition_base_dir=self.root,
                )
                table = dataset.to_table(
                    columns={c: ds.field(FILE_NAMES.get(c, c)) for c in BAR_COLUMNS}, filter=(ts >= lo) & (ts < hi)
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise StoreError(
                    f"{self.url}: a file is not a marketpipe bars file: {exc}", details={"path": self.url}
                ) from None
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.cast(schema).select(BAR_COLUMNS).sort("symbol", "ts")  # type: ignore[arg-type]

    # --- errors ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, action: str, where: str) -> Iterator[None]:
        try:
            yield
        except MarketpipeError:
            raise
        except OSError as exc:
            raise self._typed(action, where, exc) from None

    def _typed(self, action: str, where: str, exc: OSError) -> MarketpipeError:
        text = str(exc)
        details = {"path": self.url, "action": action}
        if self.location.kind == "local":
            reason = exc.strerror or text
            if action in ("write", "remove"):
                return OutputError(f"cannot {action} {where}: {reason}", details=details)
            return StoreError(f"cannot {action} {where}: {reason}", details=details)
        first = text.split(" (Request ID", 1)[0]  # the SDK's request id is noise to a user
        if "NO_SUCH_BUCKET" in text:
            return BucketNotFound(
                f"bucket {self.location.bucket!r} does not exist ({self.url}); marketpipe does not create buckets",
                details={**details, "bucket": self.location.bucket},
            )
        if any(k in text for k in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve")):
            return ObjectStoreUnreachable(f"cannot reach the object store for {self.url}: {first}", details=details)
        if any(k in text for k in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP 403")):
            return ObjectStoreDenied(f"the object store refused access to {self.url}: {first}", details=details)
        return ObjectStoreError(f"cannot {action} {where}: {first}", details=details)


def _write_local(directory: str, tmp: str, path: str, data: pa.Buffer) -> None:
    """The bytes on disk (fsync'd) under ``tmp``, then renamed over ``path`` and the rename made durable, so
    that a power loss leaves the old file or the new one, never an empty one under the final name."""
    os.makedirs(directory, exist_ok=True)
    with open(tmp, "wb") as fh:
        fh.write(memoryview(data))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dataset(
    url: str, settings: ExportConfig, *, env: Mapping[str, str] | None = None, parameter: str = "to"
) -> ParquetDataset:
    """The dataset at ``url`` (see :func:`parse_location`), its file system built from ``settings`` and the
    environment. Nothing is contacted yet (see :meth:`ParquetDataset.check`)."""
    loc = parse_location(url, parameter)
    if loc.kind == "local":
        return ParquetDataset(loc, pafs.LocalFileSystem())
    return ParquetDataset(loc, s3_filesystem(settings, os.environ if env is None else env))


def s3_filesystem(settings: ExportConfig, env: Mapping[str, str]) -> pafs.S3FileSystem:
    """pyarrow's S3 client for ``settings`` and ``env``. The keys are passed explicitly when the
    environment has them; with none, a shared AWS profile (``AWS_PROFILE`` or ``~/.aws/credentials``) may
    supply them; otherwise MISSING_CREDENTIALS, before any request (the SDK would otherwise try the EC2
    metadata service and wait for it)."""
    key, secret, token = (env.get(v) or None for v in KEY_VARS)
    home = env.get("HOME")
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or (f"{home}/.aws/credentials" if home else None)
    profile = bool(env.get("AWS_PROFILE")) or (shared is not None and Path(shared).is_file())
    if not (key and secret) and not profile:
        raise MissingCredentials(
            "S3 needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
            details={"variables": list(KEY_VARS[:2])},
        )
    endpoint = settings.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    scheme, override = None, None
    if endpoint:
        if "://" in endpoint:
            scheme, override = endpoint.split("://", 1)
        else:
            override = endpoint
        override = override.rstrip("/")
    region = settings.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:
        return pafs.S3FileSystem(
            access_key=key if key and secret else None,
            secret_key=secret if key and secret else None,
            session_token=token if key and secret else None,
            region=region,
            scheme=scheme,
            endpoint_override=override,
            connect_timeout=settings.connect_timeout,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.attempts),
            check_directory_existence_before_creation=False,
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ObjectStoreError(f"cannot set up the S3 client for {endpoint or 'AWS'}: {exc}") from None
