"""Alpaca crypto market data (``/v1beta3/crypto/{loc}/...``), REST. Wire format: :mod:`marketpipe.wire.alpaca_crypto`.

The crypto endpoints need no keys; when Alpaca keys are configured they are sent (the vendor gives
authenticated callers a higher rate limit). Answers become canonical crypto frames
(``core/schema.py``: ``CRYPTO_BAR_SCHEMA``, ``CRYPTO_TRADE_SCHEMA``, ``CRYPTO_QUOTE_SCHEMA``,
``ORDERBOOK_SCHEMA``) whose sizes and volumes are the vendor's floats, unrounded. The location is
validated before any request (INVALID_ARGUMENT); one the account lacks (the vendor's 403) is
NOT_ENTITLED; pairs are checked by :func:`~marketpipe.wire.alpaca_crypto.crypto_symbols`
(``BTCUSD`` is INVALID_SYMBOL with ``BTC/USD`` suggested). A pair the vendor does not list is simply
absent from the frames, as it is from the vendor's answer.

For the backfill engine the provider is also a bars-only :class:`~marketpipe.providers.base.BarsProvider`
(:meth:`AlpacaCryptoProvider.iter_bars`, ``capabilities`` = bars, whose ``feed`` is the location):
pairs are backfilled, stored and covered in the ledger like stocks, from Alpaca alone (no other
vendor in marketpipe serves crypto, so there is no failover for pairs).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson
import polars as pl

from marketpipe.core.config import alpaca_credentials
from marketpipe.core.errors import InvalidArgument, MalformedResponse, MarketpipeError, MissingCredentials, NotEntitled
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import rfc3339, utcnow
from marketpipe.core.validation import validate_limit, validate_sort
from marketpipe.providers.alpaca import map_http_error
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.base import BarPage, Capabilities, complete_through, pagination_loop
from marketpipe.providers.http import HttpProvider
from marketpipe.wire.alpaca_crypto import (
    DEFAULT_LOCATION,
    LOCATIONS,
    MAX_LIMIT,
    bars_frame,
    crypto_symbols,
    historical_path,
    latest_path,
    orderbooks_frame,
    quotes_frame,
    snapshots_path,
    symbols_param,
    trades_frame,
    validate_location,
)
from marketpipe.wire.alpaca_rest import DEFAULT_BASE_URL

# snapshot key -> (canonical name, decoder kind)
SNAPSHOT_PARTS = {
    "latestTrade": ("latest_trade", "trades"),
    "latestQuote": ("latest_quote", "quotes"),
    "minuteBar": ("minute_bar", "bars"),
    "dailyBar": ("daily_bar", "bars"),
    "prevDailyBar": ("prev_daily_bar", "bars"),
}


@dataclass(frozen=True)
class CryptoPage:
    """One page of a paginated answer: its rows as a canonical frame, and the vendor's next token."""

    frame: pl.DataFrame
    next_page_token: str | None
    source: str
    request_id: str = ""
    nbytes: int = 0


def _map_error(status: int, body: bytes, headers: httpx.Headers, endpoint: str) -> MarketpipeError:
    err = map_http_error(status, body, headers, provider="alpaca", url=endpoint)
    if status == 403 and "location" in str(err.details.get("vendor_message", "")):
        return NotEntitled(f"alpaca: {err.details['vendor_message']}", provider="alpaca", details=err.details)
    return err


def _body(resp: httpx.Response, key: str) -> dict[str, Any]:
    doc = orjson.loads(resp.content)
    if not isinstance(doc, dict) or not isinstance(doc.get(key, {}), dict):
        raise MalformedResponse(f"alpaca crypto: answer without a {key!r} object", provider="alpaca")
    return doc


class AlpacaCryptoProvider(HttpProvider):
    """Async client of Alpaca's crypto data. ``async with AlpacaCryptoProvider.from_config(cfg) as p: ...``."""

    name = "alpaca"
    # As a BarsProvider (the backfill engine's): bars only, whose feed is the crypto location.
    capabilities = Capabilities(frozenset({"bars"}), {"bars": LOCATIONS})

    def __init__(
        self,
        key: str | None = None,
        secret: str | None = None,
        *,
        config: AlpacaConfig | None = None,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], datetime] = utcnow,
        location: str = DEFAULT_LOCATION,
    ) -> None:
        self.config = config or AlpacaConfig()
        self.location = validate_location(location, "location")
        keys = {"APCA-API-KEY-ID": key, "APCA-API-SECRET-KEY": secret} if key and secret else {}
        self._connect(
            self.config,
            base_url,
            DEFAULT_BASE_URL,
            now,
            headers=keys,
            transport=transport,
            secrets=tuple(s for s in (key, secret) if s),
            map_error=_map_error,
        )

    @classmethod
    def from_config(
        cls, config: AlpacaConfig | None = None, *, env: dict[str, str] | None = None, **kw: Any
    ) -> AlpacaCryptoProvider:
        import os

        key: str | None
        secret: str | None
        try:
            key, secret = alpaca_credentials(env)
        except MissingCredentials:
            key = secret = None  # crypto data needs no keys
        src = os.environ if env is None else env
        base = kw.pop("base_url", None) or (config.base_url if config else None) or src.get("APCA_API_DATA_URL")
        return cls(key, secret, config=config, base_url=base, **kw)

    def _loc(self, location: str | None) -> str:
        return validate_location(location, "location") if location is not None else self.location

    # --- historical ----------------------------------------------------------------------------
    async def iter_pages(
        self,
        kind: str,
        symbols: list[str] | str,
        start: datetime,
        end: datetime,
        *,
        timeframe: Timeframe | None = None,
        location: str | None = None,
        limit: int = MAX_LIMIT,
        sort: str = "asc",
        page_token: str | None = None,
        follow: bool = True,
    ) -> AsyncIterator[CryptoPage]:
        """Pages of ``kind`` (``bars`` needs ``timeframe``) for ``[start, end)``, one in memory at a
        time; with ``follow=False`` only the first page (its token tells where the next starts)."""
        syms = crypto_symbols(symbols)
        loc = self._loc(location)
        if end <= start:
            raise InvalidArgument("end must be after start", details={"parameter": "end"})
        if kind == "bars" and timeframe is None:
            raise InvalidArgument("bars need a timeframe", details={"parameter": "timeframe"})
        validate_limit(limit, 1, MAX_LIMIT)
        validate_sort(sort)
        wire: dict[str, Any] = {
            "symbols": symbols_param(syms),
            "start": rfc3339(start),
            "end": rfc3339(end - timedelta(microseconds=1)),  # the vendor's end is inclusive
            "limit": limit,
            "sort": sort,
        }
        if timeframe is not None:
            wire["timeframe"] = str(timeframe)
        token, followed, number = page_token, {page_token} if page_token else set(), 0
        while True:
            if token:
                wire["page_token"] = token
            doc, resp = await self._http.get(
                historical_path(loc, kind), wire, f"crypto_{kind}", lambda r: _body(r, kind)
            )
            number += 1
            nxt = doc.get("next_page_token")
            if nxt is not None and nxt in followed:
                raise pagination_loop(self.name, f"crypto_{kind}", number, f"next_page_token {str(nxt)[:40]!r}")
            source = self._source(resp)
            yield CryptoPage(
                self._decode(kind, doc.get(kind) or {}, timeframe, source, loc),
                nxt,
                source,
                resp.headers.get("x-request-id") or uuid.uuid4().hex[:16],
                len(resp.content),
            )
            if nxt is None or not follow:
                return
            followed.add(nxt)
            token = nxt

    # --- the BarsProvider face (backfill) ----------------------------------------------------------
    def supports(
        self, kind: str, timeframe: Timeframe | None, start: datetime | None, end: datetime | None, now: datetime
    ) -> str | None:
        """Bars of any timeframe and range (the backfill's kind); the other crypto kinds are served by
        ``MarketData.crypto`` directly."""
        return None if self.capabilities.serves(kind) else f"alpaca crypto is backfilled for bars only, not {kind}"

    async def iter_bars(
        self,
        symbols: list[str],
        timeframe: Timeframe,
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        adjustment: str = "raw",
        limit: int = MAX_LIMIT,
        asof: str | None = None,
    ) -> AsyncIterator[BarPage]:
        """Pages of crypto bars as the backfill engine takes them (``BarPage``, with how far each pair
        is complete); ``feed`` is the location (default: the provider's). Pairs have no corporate
        actions, so only ``adjustment="raw"`` and no ``asof``."""
        if adjustment != "raw" or asof:
            raise InvalidArgument(
                "adjustment and asof apply to stocks: crypto pairs have no corporate actions",
                details={"parameter": "adjustment" if adjustment != "raw" else "asof"},
            )
        loc = self._loc(feed)
        number = 0
        async for cp in self.iter_pages("bars", symbols, start, end, timeframe=timeframe, location=loc, limit=limit):
            number += 1
            page = BarPage(
                frame=cp.frame,
                symbols=list(symbols),
                timeframe=timeframe,
                start=start,
                end=end,
                feed=loc,
                source=cp.source,
                request_id=cp.request_id,
                fetched_at=cp.frame["fetched_at"][0] if cp.frame.height else self._now(),
                next_page_token=cp.next_page_token,
                page_number=number,
                last_page=cp.next_page_token is None,
                nbytes=cp.nbytes,
            )
            page.complete_through = complete_through(page, "asc")
            yield page

    def _decode(self, kind: str, rows: dict[str, Any], tf: Timeframe | None, source: str, loc: str) -> pl.DataFrame:
        now = self._now()
        if kind == "bars":
            return bars_frame(rows, str(tf) if tf else "1Min", source, loc, now)
        if kind == "trades":
            return trades_frame(rows, source, loc, now)
        if kind == "quotes":
            return quotes_frame(rows, source, loc, now)
        return orderbooks_frame(rows, source, loc, now)

    async def history(
        self, kind: str, symbols: list[str] | str, start: datetime, end: datetime, **kw: Any
    ) -> pl.DataFrame:
        """Every page of :meth:`iter_pages`, concatenated."""
        frames = [p.frame async for p in self.iter_pages(kind, symbols, start, end, **kw)]
        return pl.concat(frames) if len(frames) > 1 else frames[0]

    # --- latest and snapshots --------------------------------------------------------------------
    async def latest(self, kind: str, symbols: list[str] | str, *, location: str | None = None) -> pl.DataFrame:
        """Latest ``bars`` / ``trades`` / ``quotes`` (one row per listed pair) or ``orderbooks``
        (one row per level)."""
        syms = crypto_symbols(symbols)
        loc = self._loc(location)
        doc, resp = await self._http.get(
            latest_path(loc, kind), {"symbols": symbols_param(syms)}, f"crypto_latest_{kind}", lambda r: _body(r, kind)
        )
        return self._decode(kind, doc.get(kind) or {}, Timeframe.parse("1Min"), self._source(resp), loc)

    async def snapshots(self, symbols: list[str] | str, *, location: str | None = None) -> dict[str, pl.DataFrame]:
        """``{"latest_trade": frame, "latest_quote": ..., "minute_bar", "daily_bar", "prev_daily_bar"}``,
        each with one row per pair that has that part."""
        syms = crypto_symbols(symbols)
        loc = self._loc(location)
        doc, resp = await self._http.get(
            snapshots_path(loc), {"symbols": symbols_param(syms)}, "crypto_snapshots", lambda r: _body(r, "snapshots")
        )
        snaps: dict[str, Any] = doc.get("snapshots") or {}
        source = self._source(resp)
        out: dict[str, pl.DataFrame] = {}
        for key, (name, kind) in SNAPSHOT_PARTS.items():
            rows = {sym: snap.get(key) for sym, snap in snaps.items() if isinstance(snap, dict) and snap.get(key)}
            tf = Timeframe.parse("1Day" if "aily" in key else "1Min")
            out[name] = self._decode(kind, rows, tf, source, loc)
        return out
