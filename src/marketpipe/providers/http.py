"""HTTP plumbing shared by the REST provider adapters (Alpaca, Polygon, Yahoo, ...).

Public API — kept small on purpose:

``VendorHttp(provider, config, *, base_url, map_error, headers=None, params=None, transport=None, secrets=())``
    One ``httpx.AsyncClient`` plus the provider's :class:`~marketpipe.core.resilience.Resilience`
    (retry, rate limiter, circuit breaker, built from ``config``) and an in-flight cap of
    ``config.max_in_flight``. ``headers``/``params`` are sent with every request (auth goes here).
    ``secrets`` are strings (API keys) that must never leave the process in text: they are replaced
    by ``***`` in every error message, error detail and log line this module produces, and in the
    request lines httpx/httpcore log through ``logging`` (which quote URLs, ``apiKey=`` included)
    while the client is open. Strings shorter than ``MIN_SECRET_LEN`` are not scrubbed: replacing
    them would garble ordinary text, and no vendor issues keys that short.

``await http.get(url, params, endpoint, decode, *, offload=False) -> (decoded, httpx.Response)``
    One GET under ``Resilience.call``. ``url`` is a path under ``base_url`` or an absolute URL (a
    vendor's ``next_url``); a query string already in ``url`` is kept and ``params`` are added to it
    (httpx would otherwise drop it). Transport failures become ``ProviderTimeout`` /
    ``ProviderUnavailable``; a status >= 300 becomes ``map_error(status, body, headers, endpoint)``;
    ``decode(response)`` runs inside the retried call — so a truncated page is fetched again rather
    than half-used — and its msgspec/orjson/polars/ValueError failures become ``MalformedResponse``;
    ``decode`` may itself raise a ``MarketpipeError`` (e.g. for a 200 whose body says "ERROR").
    ``offload=True`` (bulk pages) runs ``decode`` in a worker thread and the request over
    :class:`AiohttpTransport` (unless ``transport`` was given). Every call is counted in
    ``PROVIDER_REQUESTS``/``PROVIDER_LATENCY`` and every failure in ``PROVIDER_ERRORS`` plus one
    ``provider_error`` log line, labelled by the fixed ``endpoint`` name, never by URL.

``http.resilience``, ``http.requests``, ``http.bytes_received``, ``http.scrub(text)``, ``await http.aclose()``

``error_text(body) -> (message, doc)``
    The vendor's human text from a JSON error body (``message``, else ``error``) or from an
    HTML/plain-text body, and the decoded JSON object (or ``None``).

``status_error(status, message, *, provider, details, headers, forbidden=AuthFailed, auth_hint="")``
    The typed error for an HTTP status: 400/422 bad request, 401 auth, 403 ``forbidden``, 404 not
    found, 429 rate limited (with ``retry_after``), 5xx unavailable. ``auth_hint`` (e.g. which
    environment variables to check) ends the message of an AUTH_FAILED. Adapters decide
    vendor-specific nuances (which 403 means "not entitled") and delegate the table to this.

``retry_after(headers) -> float | None``
    Seconds to wait from ``Retry-After`` or an epoch ``X-RateLimit-Reset``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol, Self
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp
import httpx
import msgspec
import orjson
import polars as pl
import yarl

from marketpipe.core.config import ProviderConfig
from marketpipe.core.errors import (
    AuthFailed,
    MalformedResponse,
    MarketpipeError,
    NotFound,
    ProviderBadRequest,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import PROVIDER_ERRORS, PROVIDER_LATENCY, PROVIDER_REQUESTS
from marketpipe.core.resilience import Resilience
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.base import sim_source

log = get_logger("marketpipe.providers.http")
REDACTED = "***"
MIN_SECRET_LEN = 8
USER_AGENT = "marketpipe/0.1"


class ErrorMapper(Protocol):
    def __call__(self, status: int, body: bytes, headers: httpx.Headers, endpoint: str) -> MarketpipeError: ...


# --- error helpers -----------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")


def error_text(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """Vendor error text from a JSON body (``message`` or ``error``) or, failing that, from
    plain/HTML text — proxies in front of vendors answer some errors with HTML."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("error") or doc), doc
    text = _TAG.sub(" ", body[:500].decode("utf-8", "replace"))
    return " ".join(text.split())[:200] or "(empty body)", None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: ``Retry-After`` in seconds, else an epoch ``X-RateLimit-Reset``; None when
    neither is there or parses (an HTTP-date Retry-After is left to the backoff)."""
    delay = _number(headers.get("retry-after"))
    if delay is not None:
        return max(0.0, delay)
    reset = _number(headers.get("x-ratelimit-reset"))
    return max(0.0, reset - utcnow().timestamp()) if reset is not None else None


def status_error(
    status: int,
    message: str,
    *,
    provider: str,
    details: dict[str, Any],
    headers: Mapping[str, str],
    forbidden: type[ProviderError] = AuthFailed,
    auth_hint: str = "",
) -> MarketpipeError:
    """The typed error for a non-2xx status. ``forbidden`` is the class a 403 becomes (vendors
    differ in whether 403 means bad credentials or a plan that does not cover the data)."""
    if status in (400, 422):
        return ProviderBadRequest(f"{provider} rejected the request: {message}", provider=provider, details=details)
    if status == 401:
        return AuthFailed(
            f"{provider}: authentication missing or malformed ({message}){auth_hint}",
            provider=provider,
            details=details,
        )
    if status == 403:
        if forbidden is AuthFailed:
            text = f"{provider}: credentials rejected or not permitted ({message}){auth_hint}"
        else:
            text = f"{provider}: {message}"
        return forbidden(text, provider=provider, details=details)
    if status == 404:
        return NotFound(f"{provider}: not found ({message})", provider=provider, details=details)
    if status == 429:
        return RateLimited(
            f"{provider}: rate limited ({message})",
            provider=provider,
            details=details,
            retry_after=retry_after(headers),
        )
    if status >= 500:
        return ProviderUnavailable(f"{provider}: server error {status} ({message})", provider=provider, details=details)
    return ProviderBadRequest(f"{provider}: unexpected status {status} ({message})", provider=provider, details=details)


# --- secrets in third-party log lines --------------------------------------------------------------


class _RedactFilter(logging.Filter):
    """Scrubs the secrets of open clients from records of the HTTP libraries' loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: Counter[str] = Counter()  # secret -> open clients holding it

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            clean = text
            for s in sorted(self.secrets, key=len, reverse=True):
                clean = clean.replace(s, REDACTED)
            if clean != text:
                record.msg, record.args = clean, None
        return True


_REDACT = _RedactFilter()
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).addFilter(_REDACT)


# --- the client --------------------------------------------------------------------------------

_DECODE_ERRORS = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    orjson.JSONDecodeError,
    ValueError,
    pl.exceptions.PolarsError,
)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over aiohttp's client, for bulk pages: on the backfill bench's
    simulator pages over loopback it reads a body with ~5x less CPU than httpx's own transport
    (bench/transport.py). Everything above the transport — the client's headers, params, timeouts and
    gzip/deflate decoding — stays httpx's, and aiohttp's failures are raised as the httpx errors
    the same failure raises there, so the resilience layer sees exactly what it saw before."""

    def __init__(self, *, max_connections: int, max_keepalive: int) -> None:
        self._limits = (max_connections, max_keepalive)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            # A session belongs to its event loop (as httpx's pool does); one per loop that uses it.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limits[0], limit_per_host=0, force_close=False),
                auto_decompress=False,  # httpx decodes Content-Encoding, as with its own transport
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            # aiohttp silently re-sends an idempotent request once when a kept-alive connection drops;
            # httpx does not, and the resilience layer must see (retry, count, back off) every reset.
            # No public switch exists; tests/providers/test_alpaca.py's reset case fails if this stops working.
            self._session._retry_connection = False
            self._loop = loop
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
            connect=timeouts.get("pool"),
        )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw if k.lower() != b"host"]
        body = request.content if request.method not in ("GET", "HEAD") else None
        try:
            async with self._session_now().request(
                request.method,
                yarl.URL(str(request.url), encoded=True),  # as httpx encoded it, not re-quoted
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                content = await resp.read()
                raw_headers = list(resp.raw_headers)
                status = resp.status
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError) as exc:
            # a body cut short, a connection closed before the answer, an unparsable answer
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
        except aiohttp.ClientError as exc:  # ClientOSError (reset, ...) and the rest of aiohttp's failures
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(
            status,
            headers=raw_headers,
            stream=_Body(content),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


class _Body(httpx.AsyncByteStream):
    """A body already read whole (httpx then decodes its Content-Encoding as it reads it)."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._content


class VendorHttp:
    """One vendor's HTTP client under its resilience policy. See the module docstring."""

    def __init__(
        self,
        provider: str,
        config: ProviderConfig,
        *,
        base_url: str,
        map_error: ErrorMapper,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.provider = provider
        self.config = config
        self.base_url = base_url.rstrip("/")
        self._map_error = map_error
        self._params = dict(params or {})
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
        _REDACT.secrets.update(self._secrets)

        def client(transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=self.base_url,
                headers={"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})},
                timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
                limits=httpx.Limits(
                    max_connections=config.max_in_flight * 2, max_keepalive_connections=config.max_in_flight
                ),
                transport=transport,
            )

        self._client = client(transport)
        # Bulk pages (``offload=True``) go over aiohttp unless a transport was given (tests pass theirs).
        self._bulk = (
            client(AiohttpTransport(max_connections=config.max_in_flight * 2, max_keepalive=config.max_in_flight))
            if transport is None
            else self._client
        )
        self.resilience = Resilience(
            provider, retry=config.retry, circuit=config.circuit, rate_limit_per_min=config.rate_limit_per_min
        )
        self._in_flight = asyncio.Semaphore(config.max_in_flight)
        self.requests = 0
        self.bytes_received = 0

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, REDACTED)
        return text

    def _scrub_error(self, exc: MarketpipeError) -> None:
        if not self._secrets:
            return
        exc.message = self.scrub(exc.message)
        exc.args = (exc.message,)
        for k, v in exc.details.items():
            if isinstance(v, str):
                exc.details[k] = self.scrub(v)
        # The chained transport exception may quote the request URL; drop it rather than leak.
        cause = exc.__cause__
        if cause is not None and self.scrub(str(cause)) != str(cause):
            exc.__cause__ = None
            exc.__suppress_context__ = True

    def _split(self, url: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Move ``url``'s own query into the params (httpx replaces a URL's query with ``params``)."""
        parts = urlsplit(url)
        merged: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True)) if parts.query else {}
        merged.update(self._params)
        merged.update(params)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment)), merged

    async def get(
        self,
        url: str,
        params: Mapping[str, Any],
        endpoint: str,
        decode: Callable[[httpx.Response], Any],
        *,
        offload: bool = False,
    ) -> tuple[Any, httpx.Response]:
        target, query = self._split(url, params)
        deadline = self.config.connect_timeout + self.config.read_timeout
        name = self.provider

        async def once() -> tuple[Any, httpx.Response]:
            loop = asyncio.get_running_loop()
            started = loop.time()
            status = "error"
            try:
                async with self._in_flight:
                    try:
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the answer and
                        # drops a cancellation that arrives as the answer does, so a cancelled run went on.
                        async with asyncio.timeout(deadline):
                            resp = await (self._bulk if offload else self._client).get(target, params=query)
                    except (httpx.TimeoutException, TimeoutError) as exc:
                        raise ProviderTimeout(
                            f"{name}: {_timeout_text(exc, self.config, deadline)} ({type(exc).__name__})",
                            provider=name,
                            details={"endpoint": endpoint},
                        ) from exc
                    except httpx.TransportError as exc:
                        raise ProviderUnavailable(
                            f"{name}: connection failed ({type(exc).__name__}: {exc})",
                            provider=name,
                            details={"endpoint": endpoint},
                        ) from exc
                self.requests += 1
                self.bytes_received += len(resp.content)
                status = str(resp.status_code)
                self.resilience.limiter.observe(resp.headers)
                if resp.status_code >= 300:
                    raise self._map_error(resp.status_code, resp.content, resp.headers, endpoint)
                try:
                    if offload:
                        return await asyncio.to_thread(decode, resp), resp
                    return decode(resp), resp
                except _DECODE_ERRORS as exc:
                    snippet = resp.content[:80].decode("utf-8", "replace")
                    raise MalformedResponse(
                        f"{name}: undecodable response body ({exc}); starts with {snippet!r}",
                        provider=name,
                        details={"endpoint": endpoint, "bytes": len(resp.content)},
                    ) from exc
            except MarketpipeError as exc:
                self._scrub_error(exc)
                PROVIDER_ERRORS.labels(name, exc.code).inc()
                log.warning("provider_error", provider=name, endpoint=endpoint, code=exc.code, error=exc.message)
                raise
            finally:
                PROVIDER_REQUESTS.labels(name, endpoint, status).inc()
                PROVIDER_LATENCY.labels(name, endpoint).observe(loop.time() - started)

        result: tuple[Any, httpx.Response] = await self.resilience.call(once)
        return result

    async def aclose(self) -> None:
        if not self._client.is_closed:
            _REDACT.secrets.subtract(self._secrets)
            for s in self._secrets:
                if _REDACT.secrets[s] <= 0:
                    del _REDACT.secrets[s]
        await self._client.aclose()
        if self._bulk is not self._client:
            await self._bulk.aclose()


__all__ = [
    "MIN_SECRET_LEN",
    "REDACTED",
    "AiohttpTransport",
    "ErrorMapper",
    "VendorHttp",
    "error_text",
    "retry_after",
    "status_error",
]


def _timeout_text(exc: BaseException, config: ProviderConfig, deadline: float) -> str:
    """Name the limit that actually fired: httpx's connect or read timeout, or our overall deadline."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {config.connect_timeout:.1f}s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data within the {config.read_timeout:.1f}s read timeout"
    return f"no complete answer within {deadline:.1f}s"


class HttpProvider:
    """What every HTTP adapter shares: counters, closing, the async context manager and the
    ``source`` label. Subclasses set ``name`` and ``self._http`` (a :class:`VendorHttp`)."""

    name: str
    base_url: str
    resilience: Resilience
    _http: VendorHttp
    _now: Callable[[], datetime]

    def _connect(
        self,
        config: ProviderConfig,
        base_url: str | None,
        default_url: str,
        now: Callable[[], datetime],
        **http: Any,
    ) -> None:
        """The one way an adapter opens its vendor client: ``base_url`` (argument, then config, then
        the vendor's default), the clock, and a :class:`VendorHttp` whose resilience it exposes."""
        self.base_url = (base_url or config.base_url or default_url).rstrip("/")
        self._now = now
        self._http = VendorHttp(self.name, config, base_url=self.base_url, **http)
        self.resilience = self._http.resilience

    @property
    def requests(self) -> int:
        return self._http.requests

    @property
    def bytes_received(self) -> int:
        return self._http.bytes_received

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _source(self, resp: httpx.Response) -> str:
        return sim_source(resp.headers, self.name)
