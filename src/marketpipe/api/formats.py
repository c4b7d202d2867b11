"""Bars as JSON, CSV, Arrow IPC stream or Parquet, chosen by ``format=`` or the Accept header."""

from __future__ import annotations

import io
from typing import Any

import orjson
import polars as pl

from marketpipe.core.validation import validate_enum

MEDIA = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "arrow": "application/vnd.apache.arrow.stream",
    "parquet": "application/vnd.apache.parquet",
}
_ACCEPT = [
    ("application/vnd.apache.arrow.stream", "arrow"),
    ("application/vnd.apache.parquet", "parquet"),
    ("application/x-parquet", "parquet"),
    ("text/csv", "csv"),
    ("application/json", "json"),
]
ROW_COLUMNS = [
    "timestamp",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "trade_count",
    "vwap",
    "source",
    "feed",
    "fetched_at",
]


def json_body(doc: Any) -> bytes:
    """A JSON document as the gateway sends it (non-string keys allowed, e.g. dates)."""
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)


def negotiate(fmt: str | None, accept: str | None) -> str:
    """``format=`` wins; otherwise the Accept header's best supported media range (q-values and the
    client's order respected; ``q=0`` refuses); JSON when nothing supported is asked for."""
    if fmt:
        return validate_enum(
            fmt, MEDIA, "format", casefold=True, message="unknown format {value!r}; use json, csv, arrow or parquet"
        )
    supported = dict(_ACCEPT)
    best: tuple[float, int, str] | None = None
    for i, part in enumerate((accept or "").split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for prm in params:
            if prm.startswith("q="):
                try:
                    q = float(prm[2:])
                except ValueError:
                    q = 0.0
        name = supported.get(media.lower())
        if name is None and media in ("*/*", "application/*"):
            name = "json"
        if name is not None and q > 0 and (best is None or q > best[0]):
            best = (q, i, name)
    return best[2] if best else "json"


# the columns of ROW_COLUMNS that are written as text rather than taken as stored
_AS_TEXT: dict[str, pl.Expr] = {
    "timestamp": pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("timestamp"),
    "fetched_at": pl.col("fetched_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
}


def _rows(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select([_AS_TEXT.get(c, pl.col(c)) for c in ROW_COLUMNS])


def bars_json(
    frame: pl.DataFrame,
    *,
    single: str | None,
    timeframe: str,
    next_token: str | None,
    meta: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> bytes:
    """``{"symbol", "timeframe", "bars": [...], ...}`` for one symbol, ``{"bars": {SYM: [...]}, ...}``
    for several; ``meta`` per symbol (source, fetched_at, data age, quality score, stale); ``extra``:
    more top-level keys (e.g. ``adjustment``: what an adjusted answer applied)."""
    rows = _rows(frame)
    if single is not None:
        doc: dict[str, Any] = {
            "symbol": single,
            "timeframe": timeframe,
            "bars": orjson.Fragment(_array(rows)),
            "next_page_token": next_token,
            "meta": meta.get(single),
        }
    else:
        parts = (
            {}
            if not rows.height
            else {
                str(k[0]): orjson.Fragment(_array(v))
                for k, v in frame.select("symbol")
                .hstack(rows)
                .partition_by("symbol", as_dict=True, include_key=False, maintain_order=True)
                .items()
            }
        )
        doc = {"timeframe": timeframe, "bars": parts, "next_page_token": next_token, "meta": meta}
    return orjson.dumps({**doc, **(extra or {})})


def _array(rows: pl.DataFrame) -> bytes:
    if not rows.height:
        return b"[]"
    buf = io.BytesIO()
    rows.write_json(buf)
    return buf.getvalue()


def bars_body(frame: pl.DataFrame, fmt: str) -> bytes:
    """CSV / Arrow / Parquet: one flat table with a symbol column (metadata goes in headers)."""
    table = (
        frame.select("symbol").hstack(_rows(frame))
        if frame.height
        else pl.DataFrame(schema={"symbol": pl.String(), **{c: pl.String() for c in ROW_COLUMNS}})
    )
    if fmt == "csv":
        return table.write_csv().encode()
    buf = io.BytesIO()
    native = frame.select("symbol", pl.col("ts").alias("timestamp"), *ROW_COLUMNS[1:])
    if fmt == "arrow":
        native.write_ipc_stream(buf)
    else:
        native.write_parquet(buf)
    return buf.getvalue()
