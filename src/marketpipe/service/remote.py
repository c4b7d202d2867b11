"""Reading through a running gateway: ``mp.client(gateway="http://127.0.0.1:8000")``.

DuckDB lets one process hold a store file, and its lock keeps every other process out, read-only ones
too. While ``marketpipe serve`` holds the store, a notebook reads through that gateway instead: bars
come from ``/v1/bars`` in Arrow (the gateway serves from its store where the ledger holds the range
and fetches, checks and stores what is missing first, as ``mp.bars`` does), page after page, and
arrive as the same frame ``mp.bars`` returns. Errors keep their stable codes.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import polars as pl

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import load_config
from marketpipe.core.errors import ERROR_CODES, GatewayUnavailable, InvalidArgument, MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.schema import BAR_COLUMNS, BAR_SCHEMA, normalize_symbols
from marketpipe.core.timeframe import Timeframe, TimeframeLike
from marketpipe.core.timeutil import TimeInput, parse_range, rfc3339
from marketpipe.service.actions import parse_adjustment, parse_as_of
from marketpipe.service.frames import Shape, frame_options, shaped

log = get_logger("marketpipe.remote")
NEXT_PAGE = "X-Marketpipe-Next-Page-Token"
PAGE_LIMIT = 10_000  # the gateway's largest page


class GatewayClient:
    """A synchronous reader of a marketpipe gateway's REST v1. ``api_key``: the gateway's client key,
    when it has client keys configured (``MARKETPIPE_API_KEYS``)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def bars(
        self,
        symbols: list[str] | str,
        start: TimeInput,
        end: TimeInput | None = None,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        feed: str | None = None,
        fetch: bool = True,
        tz: str | None = None,
        shape: Shape = "long",
        adjustment: str = "raw",
        as_of: TimeInput | None = None,
    ) -> Any:
        """Bars for ``[start, end)`` through the gateway, in the columns ``mp.bars`` returns. The range and
        the timeframe are read here by the same rules as ``mp.bars`` and sent as exact instants. ``tz``
        and ``shape`` as for ``mp.bars``; ``"exchange"`` is the zone of the configured calendar.
        ``adjustment`` / ``as_of`` as for ``mp.bars``: the gateway adjusts (the actions it applied are
        in each page's ``X-Marketpipe-Adjustment`` header)."""
        zone, sh = frame_options(tz, shape, lambda: get_calendar(load_config().calendar).tz)
        parse_adjustment(adjustment)
        known = parse_as_of(as_of)
        extra = {"adjustment": adjustment, **({"as_of": known.isoformat()} if known else {})}
        frame = self._bars(symbols, start, end, timeframe, feed, fetch, extra)
        return shaped(frame, Timeframe.parse(timeframe), zone, sh)

    def _bars(
        self,
        symbols: list[str] | str,
        start: TimeInput,
        end: TimeInput | None,
        timeframe: TimeframeLike | Timeframe,
        feed: str | None,
        fetch: bool,
        extra: dict[str, str] | None = None,
    ) -> pl.DataFrame:
        if not fetch:
            raise InvalidArgument(
                "fetch=False is not available through a gateway: it serves from its store and fetches only "
                "what the store lacks",
                details={"parameter": "fetch"},
            )
        syms = normalize_symbols(symbols)
        tf = Timeframe.parse(timeframe)
        s, e = parse_range(start, end)
        params: dict[str, Any] = {
            "symbols": ",".join(syms),
            "start": rfc3339(s),
            "end": rfc3339(e),
            "timeframe": str(tf),
            "format": "arrow",
            "limit": PAGE_LIMIT,
            **(extra or {}),
        }
        if feed:
            params["feed"] = feed.lower()
        pages: list[pl.DataFrame] = []
        token: str | None = None
        while True:
            r = self._get("/v1/bars", {**params, **({"page_token": token} if token else {})})
            pages.append(self._frame(r, str(tf)))
            token = r.headers.get(NEXT_PAGE)
            if not token:
                break
        return pl.concat(pages) if pages else pl.DataFrame(schema=BAR_SCHEMA)

    def _get(self, path: str, params: dict[str, Any]) -> httpx.Response:
        try:
            r = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            log.warning("gateway_unreachable", url=self.url, error=str(exc))
            raise GatewayUnavailable(
                f"cannot reach the marketpipe gateway at {self.url}: {exc}. Is `marketpipe serve` running there?",
                details={"url": self.url},
            ) from exc
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def _error(self, r: httpx.Response) -> MarketpipeError:
        """The gateway's ``{"error": {"code", "message", "details"}}`` as the error class of its code."""
        try:
            err = r.json()["error"]
            cls = ERROR_CODES.get(str(err["code"]), MarketpipeError)
            exc = cls(str(err["message"]), details=dict(err.get("details") or {}))
        except (ValueError, KeyError, TypeError):
            log.warning("gateway_foreign_answer", url=self.url, status=r.status_code)
            return GatewayUnavailable(
                f"{self.url} answered HTTP {r.status_code} without a marketpipe error: is it a marketpipe gateway?",
                details={"url": self.url, "status": r.status_code},
            )
        if retry := r.headers.get("Retry-After"):
            try:
                exc.retry_after = float(retry)
            except ValueError:
                log.warning("gateway_bad_retry_after", url=self.url, value=retry)
        return exc

    def _frame(self, r: httpx.Response, timeframe: str) -> pl.DataFrame:
        try:
            table = pl.read_ipc_stream(io.BytesIO(r.content))
        except Exception as exc:  # polars raises several kinds for bytes that are not an Arrow stream
            raise GatewayUnavailable(
                f"{self.url} did not answer in Arrow (content-type {r.headers.get('content-type')!r})",
                details={"url": self.url},
            ) from exc
        if "timestamp" in table.columns and "ts" not in table.columns:
            table = table.rename({"timestamp": "ts"})
        table = table.with_columns(pl.lit(timeframe).alias("timeframe"))
        return table.select([pl.col(c).cast(BAR_SCHEMA[c]) for c in BAR_COLUMNS])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
