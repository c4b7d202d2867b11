"""Alpaca options market data (``/v1beta1/options``) and contracts (Trading API ``/v2/options/contracts``).

Wire format: :mod:`marketpipe.wire.alpaca_options`. Answers become the canonical frames of
:mod:`marketpipe.core.options` (bars: the stock bar schema, the contract as ``symbol``). Greeks and IV
are passed through as sent; a contract without them keeps nulls and ``greeks_missing``. Nothing is
computed here.

The feed is always sent explicitly and named on every row: the caller's, else the vendor's own default
rule (``opra`` for an entitled plan — ``plan = "unlimited"`` in ``[providers.alpaca]`` — else
``indicative``). Bars and trades take no feed parameter; they are labelled ``opra``, the source the
vendor builds its option history from. Contracts come from the Trading API host: ``trading_url``, else
``APCA_API_BASE_URL``, else the data ``base_url`` when that is not the vendor's (a simulator or the
gateway serves both), else ``https://paper-api.alpaca.markets``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import date, datetime
from typing import Any

import httpx
import polars as pl

from marketpipe.core.config import alpaca_credentials
from marketpipe.core.errors import ContractExpired, InvalidArgument, MarketpipeError, NotEntitled
from marketpipe.core.options import (
    GREEKS_NOT_IN_ENDPOINT,
    OPTION_CONTRACT_SCHEMA,
    OPTION_SNAPSHOT_SCHEMA,
    OPTION_STYLES,
    OPTION_TRADE_SCHEMA,
    OPTION_TYPES,
    OccSymbol,
    parse_occs,
)
from marketpipe.core.schema import BAR_SCHEMA, normalize_symbol
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import NY, rfc3339, utcnow
from marketpipe.core.validation import validate_enum, validate_limit, validate_number, validate_sort
from marketpipe.providers.alpaca import map_http_error
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.base import pagination_loop
from marketpipe.providers.http import HttpProvider, VendorHttp
from marketpipe.wire.alpaca_options import (
    BARS_MAX_LIMIT,
    BARS_PATH,
    CONTRACT_STATUSES,
    CONTRACTS_MAX_LIMIT,
    CONTRACTS_PATH,
    DEFAULT_TRADING_URL,
    FEEDS,
    LATEST_QUOTES_PATH,
    LATEST_TRADES_PATH,
    MAX_SYMBOLS,
    OPRA_NOT_ENTITLED,
    SNAPSHOT_MAX_LIMIT,
    SNAPSHOTS_PATH,
    TRADES_PATH,
    ContractsPage,
    LatestQuotes,
    LatestTrades,
    OQuote,
    OSnapshot,
    OTrade,
    SnapshotsPage,
    TradesPage,
    chain_path,
    contracts_to_frame,
    decode,
    snapshots_to_frame,
    trades_to_frame,
)
from marketpipe.wire.alpaca_rest import DEFAULT_BASE_URL, PAGES, bars_to_frame

HISTORY_FEED = "opra"  # bars and trades take no feed: the vendor's option history is OPRA's


def map_options_error(status: int, body: bytes, headers: httpx.Headers, *, provider: str, url: str) -> MarketpipeError:
    """The stock mapping, plus: a 403 for ``feed=opra`` without the OPRA agreement is NOT_ENTITLED."""
    exc = map_http_error(status, body, headers, provider=provider, url=url)
    if status == 403 and OPRA_NOT_ENTITLED in body.decode("utf-8", "replace"):
        return NotEntitled(
            f"{provider}: feed opra needs a real-time options subscription and a signed OPRA agreement;"
            " use feed indicative",
            provider=provider,
            details={**exc.details, "reason": "opra_not_entitled", "parameter": "feed"},
        )
    return exc


def _chunks(items: list[OccSymbol], n: int = MAX_SYMBOLS) -> list[list[OccSymbol]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


class AlpacaOptionsProvider(HttpProvider):
    """Async client of Alpaca's options data. ``async with AlpacaOptionsProvider.from_config(cfg) as p``."""

    name = "alpaca"

    def __init__(
        self,
        key: str,
        secret: str,
        *,
        config: AlpacaConfig | None = None,
        base_url: str | None = None,
        trading_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config or AlpacaConfig()
        http: dict[str, Any] = {
            "headers": {"APCA-API-KEY-ID": key, "APCA-API-SECRET-KEY": secret},
            "transport": transport,
            "secrets": (key, secret),
            "map_error": lambda status, body, headers, endpoint: map_options_error(
                status, body, headers, provider=self.name, url=endpoint
            ),
        }
        self._connect(self.config, base_url, DEFAULT_BASE_URL, now, **http)
        if trading_url is None:
            trading_url = self.base_url if self.base_url != DEFAULT_BASE_URL else DEFAULT_TRADING_URL
        self.trading_url = trading_url.rstrip("/")
        self._trading = VendorHttp(self.name, self.config, base_url=self.trading_url, **http)

    @classmethod
    def from_config(
        cls, config: AlpacaConfig | None = None, *, env: dict[str, str] | None = None, **kw: Any
    ) -> AlpacaOptionsProvider:
        import os

        key, secret = alpaca_credentials(env)
        src = os.environ if env is None else env
        base = kw.pop("base_url", None) or (config.base_url if config else None) or src.get("APCA_API_DATA_URL")
        trading = kw.pop("trading_url", None) or src.get("APCA_API_BASE_URL")
        return cls(key, secret, config=config, base_url=base, trading_url=trading, **kw)

    async def aclose(self) -> None:
        await super().aclose()
        await self._trading.aclose()

    # --- parameters -----------------------------------------------------------------------------------
    def feed(self, feed: str | None) -> str:
        """The caller's feed, checked, else the vendor's default rule for this plan."""
        if feed is None or feed == "":
            return "opra" if self.config.plan == "unlimited" else "indicative"
        return validate_enum(feed.lower(), FEEDS, "feed")

    def _today(self) -> date:
        return self._now().astimezone(NY).date()

    def _live(self, contracts: list[str] | str) -> list[OccSymbol]:
        """Contracts for live data (latest, snapshots): an expired one is CONTRACT_EXPIRED."""
        occs = parse_occs(contracts)
        today = self._today()
        for o in occs:
            if o.expiration < today:
                raise ContractExpired(
                    f"option contract {o.symbol} expired on {o.expiration}; only its history (bars, trades) is served",
                    details={"parameter": "symbols", "symbol": o.symbol},
                )
        return occs

    # --- snapshots and chains ----------------------------------------------------------------------------
    async def iter_chain(self, underlying: str, **kw: Any) -> AsyncIterator[pl.DataFrame]:
        """The chain of an underlying, one page (at most ``page_size`` contracts) at a time: a chain of
        thousands of contracts never sits in memory as one JSON document (filters: :meth:`chain_pages`)."""
        async for frame, _ in self.chain_pages(underlying, **kw):
            yield frame

    async def chain_pages(
        self,
        underlying: str,
        *,
        feed: str | None = None,
        type: str | None = None,
        strike_price_gte: float | None = None,
        strike_price_lte: float | None = None,
        expiration_date: date | str | None = None,
        expiration_date_gte: date | str | None = None,
        expiration_date_lte: date | str | None = None,
        root_symbol: str | None = None,
        updated_since: datetime | None = None,
        page_size: int = SNAPSHOT_MAX_LIMIT,
    ) -> AsyncIterator[tuple[pl.DataFrame, str]]:
        """:meth:`iter_chain`'s pages with the vendor's request id of each (``X-Request-ID``; one made up
        when the vendor sent none), which quarantined rows keep."""
        und = normalize_symbol(underlying)
        fd = self.feed(feed)
        params: dict[str, Any] = {"feed": fd, "limit": validate_limit(page_size, 1, SNAPSHOT_MAX_LIMIT, "limit")}
        params.update(
            _filters(
                type,
                strike_price_gte,
                strike_price_lte,
                expiration_date,
                expiration_date_gte,
                expiration_date_lte,
                root_symbol,
            )
        )
        if updated_since is not None:
            params["updated_since"] = rfc3339(updated_since)
        async for page in self._snapshot_pages(chain_path(und), params, und, fd, "option chain", self._now()):
            yield page

    async def chain(self, underlying: str, **kw: Any) -> pl.DataFrame:
        frames = [f async for f in self.iter_chain(underlying, **kw)]
        return pl.concat(frames) if frames else pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA)

    async def snapshots(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        occs = self._live(contracts)
        fd = self.feed(feed)
        frames = []
        as_of = self._now()  # one observation, however many requests its contracts take
        for part in _chunks(occs):
            params = {"symbols": ",".join(o.symbol for o in part), "feed": fd, "limit": SNAPSHOT_MAX_LIMIT}
            pages = self._snapshot_pages(SNAPSHOTS_PATH, params, None, fd, "option snapshots", as_of)
            frames += [f async for f, _ in pages]
        return pl.concat(frames) if frames else pl.DataFrame(schema=OPTION_SNAPSHOT_SCHEMA)

    async def _snapshot_pages(
        self, path: str, params: dict[str, Any], underlying: str | None, feed: str, what: str, as_of: datetime
    ) -> AsyncIterator[tuple[pl.DataFrame, str]]:
        """The pages of one logical observation: every row has the same ``as_of``, the time the first page
        was asked for, so a chain of many pages is one snapshot in the store's key (contract, as_of, source,
        feed); ``fetched_at`` is each page's own time, the vendor's quote and trade times stay as sent."""
        async for page, resp in _pages(self._http, path, params, SnapshotsPage, what, offload=False):
            frame = snapshots_to_frame(page.snapshots or {}, underlying, as_of, self._source(resp), feed, self._now())
            yield frame, resp.headers.get("x-request-id") or uuid.uuid4().hex[:16]

    # --- latest --------------------------------------------------------------------------------------------
    async def latest_quotes(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        """Latest quotes as snapshot rows (trade and greek columns null: the endpoint carries none)."""
        return await self._latest(contracts, feed, LATEST_QUOTES_PATH, LatestQuotes, "quotes")

    async def latest_trades(self, contracts: list[str] | str, *, feed: str | None = None) -> pl.DataFrame:
        """Latest trades as snapshot rows (quote and greek columns null: the endpoint carries none)."""
        return await self._latest(contracts, feed, LATEST_TRADES_PATH, LatestTrades, "trades")

    async def _latest(
        self, contracts: list[str] | str, feed: str | None, path: str, kind: type, key: str
    ) -> pl.DataFrame:
        occs = self._live(contracts)
        fd = self.feed(feed)
        snaps: dict[str, OSnapshot] = {}
        src = self.name
        what = f"option latest {key}"
        for part in _chunks(occs):
            params = {"symbols": ",".join(o.symbol for o in part), "feed": fd}
            got, resp = await self._http.get(path, params, what, lambda r: decode(r.content, kind, what))
            src = self._source(resp)
            rows: dict[str, OQuote | OTrade] = getattr(got, key)
            for sym, v in rows.items():
                snaps[sym] = OSnapshot(latestQuote=v) if isinstance(v, OQuote) else OSnapshot(latestTrade=v)
        now = self._now()
        return snapshots_to_frame(snaps, None, now, src, fd, now).with_columns(
            pl.lit(GREEKS_NOT_IN_ENDPOINT, pl.String).alias("greeks_missing")
        )

    # --- history -------------------------------------------------------------------------------------------
    async def bars(
        self,
        contracts: list[str] | str,
        timeframe: Timeframe | str,
        start: datetime,
        end: datetime,
        *,
        limit: int = BARS_MAX_LIMIT,
        sort: str = "asc",
    ) -> pl.DataFrame:
        occs = parse_occs(contracts)
        tf = Timeframe.parse(timeframe) if isinstance(timeframe, str) else timeframe
        limit = validate_limit(limit, 1, BARS_MAX_LIMIT)
        multi, _ = PAGES["bars"]
        frames = []
        for part in _chunks(occs):
            params = {
                "symbols": ",".join(o.symbol for o in part),
                "timeframe": str(tf),
                "start": rfc3339(start),
                "end": rfc3339(end),
                "limit": limit,
                "sort": validate_sort(sort),
            }
            async for page, resp in _pages(self._http, BARS_PATH, params, multi, "option bars"):
                groups = list((page.bars or {}).items())
                frames.append(
                    bars_to_frame(groups, str(tf), self._source(resp), HISTORY_FEED, self._now()).drop("raw_ts")
                )
        return pl.concat(frames) if frames else pl.DataFrame(schema=BAR_SCHEMA)

    async def trades(
        self,
        contracts: list[str] | str,
        start: datetime,
        end: datetime,
        *,
        limit: int = BARS_MAX_LIMIT,
        sort: str = "asc",
    ) -> pl.DataFrame:
        occs = parse_occs(contracts)
        frames = []
        for part in _chunks(occs):
            params = {
                "symbols": ",".join(o.symbol for o in part),
                "start": rfc3339(start),
                "end": rfc3339(end),
                "limit": validate_limit(limit, 1, BARS_MAX_LIMIT),
                "sort": validate_sort(sort),
            }
            async for page, resp in _pages(self._http, TRADES_PATH, params, TradesPage, "option trades"):
                groups = list((page.trades or {}).items())
                frames.append(trades_to_frame(groups, self._source(resp), HISTORY_FEED, self._now()))
        return pl.concat(frames) if frames else pl.DataFrame(schema=OPTION_TRADE_SCHEMA)

    # --- contracts (Trading API) -------------------------------------------------------------------------
    async def contracts(
        self,
        underlyings: list[str] | str,
        *,
        status: str = "active",
        type: str | None = None,
        style: str | None = None,
        strike_price_gte: float | None = None,
        strike_price_lte: float | None = None,
        expiration_date: date | str | None = None,
        expiration_date_gte: date | str | None = None,
        expiration_date_lte: date | str | None = None,
        root_symbol: str | None = None,
        limit: int = CONTRACTS_MAX_LIMIT,
    ) -> pl.DataFrame:
        """Contracts with open interest and its date (the only source of open interest)."""
        unds = [normalize_symbol(s) for s in (underlyings.split(",") if isinstance(underlyings, str) else underlyings)]
        params: dict[str, Any] = {
            "underlying_symbols": ",".join(unds),
            "status": validate_enum(status, CONTRACT_STATUSES, "status"),
            "limit": validate_limit(limit, 1, CONTRACTS_MAX_LIMIT),
        }
        if style is not None:
            params["style"] = validate_enum(style, OPTION_STYLES, "style")
        params.update(
            _filters(
                type,
                strike_price_gte,
                strike_price_lte,
                expiration_date,
                expiration_date_gte,
                expiration_date_lte,
                root_symbol,
            )
        )
        frames = [
            contracts_to_frame(page.option_contracts, self._source(resp), self._now())
            async for page, resp in _pages(self._trading, CONTRACTS_PATH, params, ContractsPage, "option contracts")
        ]
        return pl.concat(frames) if frames else pl.DataFrame(schema=OPTION_CONTRACT_SCHEMA)


async def _pages(
    http: VendorHttp, path: str, params: dict[str, Any], kind: type, what: str, *, offload: bool = True
) -> AsyncIterator[tuple[Any, httpx.Response]]:
    """Every page of a paginated answer (``next_page_token``), one at a time; a token that repeats
    is PAGINATION_LOOP rather than a loop for ever."""
    token: str | None = None
    seen: set[str] = set()
    n = 0
    while True:
        query = {**params, **({"page_token": token} if token else {})}
        page, resp = await http.get(path, query, what, lambda r: decode(r.content, kind, what), offload=offload)
        n += 1
        yield page, resp
        token = page.next_page_token
        if not token:
            return
        if token in seen:
            raise pagination_loop(http.provider, what, n, token)
        seen.add(token)


def _filters(
    type: str | None,
    strike_gte: float | None,
    strike_lte: float | None,
    expiration: date | str | None,
    expiration_gte: date | str | None,
    expiration_lte: date | str | None,
    root: str | None,
) -> dict[str, Any]:
    """The contract filters the chain and the contracts endpoints share, checked, as the vendor spells them."""
    params: dict[str, Any] = {}
    if type is not None:
        params["type"] = validate_enum(type, OPTION_TYPES, "type")
    for name, value in (("strike_price_gte", strike_gte), ("strike_price_lte", strike_lte)):
        if value is not None:
            params[name] = validate_number(value, name, gt=0)
    for name, day in (
        ("expiration_date", expiration),
        ("expiration_date_gte", expiration_gte),
        ("expiration_date_lte", expiration_lte),
    ):
        if day is not None:
            params[name] = parse_day(day, name).isoformat()
    if root is not None:
        params["root_symbol"] = normalize_symbol(root)
    return params


def parse_day(value: date | str, param: str) -> date:
    """A day given as a date or YYYY-MM-DD, else INVALID_ARGUMENT naming ``param``."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise InvalidArgument(f"{param} must be a date YYYY-MM-DD, got {value!r}", details={"parameter": param})


__all__ = ["AlpacaOptionsProvider", "map_options_error"]
