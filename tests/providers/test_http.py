"""The HTTP plumbing shared by the adapters: error mapping, query merging, retries, secret scrubbing.

The adapters' tests run it against the simulator; here a stand-in transport plays what no server
can be made to do on cue (a transport error that quotes the key, a decoder that fails)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import pytest
from structlog.testing import capture_logs

from marketpipe.core.config import CircuitPolicy, ProviderConfig, RetryPolicy
from marketpipe.core.errors import (
    AuthFailed,
    MalformedResponse,
    MarketpipeError,
    NotEntitled,
    NotFound,
    ProviderBadRequest,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from marketpipe.core.metrics import PROVIDER_REQUESTS
from marketpipe.providers.http import REDACTED, VendorHttp, error_text, retry_after, status_error

SECRET = "TopSecretKey-42"


def cfg(**kw: object) -> ProviderConfig:
    values: dict[str, object] = {
        "rate_limit_per_min": 100_000,
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "retry": RetryPolicy(attempts=2, base_seconds=0.001, max_seconds=0.002),
        "circuit": CircuitPolicy(failure_threshold=50),
    }
    values.update(kw)
    return ProviderConfig(**values)  # type: ignore[arg-type]


def mapper(status: int, body: bytes, headers: httpx.Headers, endpoint: str) -> MarketpipeError:
    msg, _ = error_text(body)
    return status_error(status, msg, provider="test", details={"endpoint": endpoint, "echo": msg}, headers=headers)


def client(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> VendorHttp:
    return VendorHttp(
        "test",
        cfg(),
        base_url="https://vendor.test/",
        map_error=mapper,
        transport=httpx.MockTransport(handler),
        secrets=(SECRET, "x"),
        **kw,  # type: ignore[arg-type]
    )


def test_error_text_reads_json_html_and_nothing() -> None:
    assert error_text(b'{"message": "bad symbol", "code": 1}')[0] == "bad symbol"
    assert error_text(b'{"status": "ERROR", "error": "Unknown API Key"}') == (
        "Unknown API Key",
        {"status": "ERROR", "error": "Unknown API Key"},
    )
    assert error_text(b"<html><title>503 Service Unavailable</title></html>") == ("503 Service Unavailable", None)
    assert error_text(b"") == ("(empty body)", None)


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, ProviderBadRequest), (422, ProviderBadRequest), (401, AuthFailed), (403, AuthFailed), (404, NotFound),
     (429, RateLimited), (500, ProviderUnavailable), (504, ProviderUnavailable), (418, ProviderBadRequest)],
)  # fmt: skip
def test_status_table(status: int, error: type) -> None:
    exc = status_error(status, "why", provider="v", details={}, headers={})
    assert type(exc) is error and "why" in exc.message and exc.provider == "v"


def test_status_nuances() -> None:
    forbidden = status_error(403, "plan", provider="v", details={}, headers={}, forbidden=NotEntitled)
    assert isinstance(forbidden, NotEntitled)
    hinted = status_error(401, "no", provider="v", details={}, headers={}, auth_hint="; check V_KEY")
    assert hinted.message.endswith("; check V_KEY")
    limited = status_error(429, "slow", provider="v", details={}, headers={"retry-after": "3"})
    assert limited.retry_after == 3.0


def test_retry_after() -> None:
    assert retry_after({"retry-after": "2.5"}) == 2.5
    assert retry_after({"x-ratelimit-reset": str(int(time.time()) + 30)}) == pytest.approx(30, abs=2)
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


async def test_query_in_url_is_kept_and_params_added() -> None:
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={})

    http = client(answer, params={"apiKey": SECRET}, headers={"X-Test": "1"})
    try:
        await http.get("/v2/next?cursor=abc", {"limit": 5}, "e", lambda r: r.json())
        await http.get("https://elsewhere.test/p?cursor=def", {}, "e", lambda r: r.json())
    finally:
        await http.aclose()
    assert dict(seen[0].params) == {"cursor": "abc", "apiKey": SECRET, "limit": "5"}
    assert str(seen[0]).startswith("https://vendor.test/v2/next?")
    assert seen[1].host == "elsewhere.test" and seen[1].params["cursor"] == "def"
    assert http.requests == 2


async def test_errors_are_scrubbed_of_secrets() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/refuse":
            raise httpx.ConnectError(f"cannot reach {request.url}")  # quotes apiKey=...
        return httpx.Response(401, json={"message": f"key {SECRET} is unknown to the proxy"})

    http = client(answer, params={"apiKey": SECRET})
    try:
        with capture_logs() as logs:
            with pytest.raises(AuthFailed) as auth:
                await http.get("/data", {}, "data", lambda r: r.json())
            with pytest.raises(ProviderUnavailable) as refused:
                await http.get("/refuse", {}, "refuse", lambda r: r.json())
    finally:
        await http.aclose()
    for exc in (auth.value, refused.value):
        assert SECRET not in str(exc) and SECRET not in repr(exc.args) and SECRET not in str(exc.details)
        assert exc.__cause__ is None or SECRET not in str(exc.__cause__)
    assert REDACTED in auth.value.message and REDACTED in auth.value.details["echo"]
    assert "proxy" in auth.value.message  # the one-letter "secret" is below the minimum: no garbling
    assert len(logs) == 3  # one line per failed attempt (refused: 2 tries)
    assert SECRET not in str(logs) and "apiKey=***" in str(logs)


async def test_secrets_leave_the_log_filter_on_close(caplog: pytest.LogCaptureFixture) -> None:
    http = client(lambda request: httpx.Response(200, json={}), params={"apiKey": SECRET})
    caplog.set_level(logging.INFO, logger="httpx")
    await http.get("/a", {}, "a", lambda r: r.json())
    assert "apiKey=***" in caplog.text and SECRET not in caplog.text
    await http.aclose()
    logging.getLogger("httpx").info("after close: %s", SECRET)
    assert SECRET in caplog.text  # no longer held once no open client uses it


async def test_decode_failures_are_malformed_and_retried() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, content=b'{"half": ' if calls == 1 else b'{"whole": true}')

    http = client(answer)
    try:
        doc, resp = await http.get("/p", {}, "p", lambda r: r.json(), offload=True)
        assert doc == {"whole": True} and resp.status_code == 200
        assert http.resilience.retries == 1
        with pytest.raises(MalformedResponse):
            await http.get("/p", {}, "p", lambda r: int("nope"))
    finally:
        await http.aclose()


async def test_decoder_may_raise_typed_errors_and_metrics_count() -> None:
    http = client(lambda request: httpx.Response(200, json={"status": "ERROR"}))

    def decode(resp: httpx.Response) -> object:
        raise ProviderBadRequest("body says ERROR", provider="test")

    before = PROVIDER_REQUESTS.labels("test", "flagged", "200")._value.get()
    try:
        with pytest.raises(ProviderBadRequest):
            await http.get("/p", {}, "flagged", decode)
    finally:
        await http.aclose()
    assert PROVIDER_REQUESTS.labels("test", "flagged", "200")._value.get() == before + 1
    assert http.resilience.retries == 0  # a bad request is not retried


async def test_timeouts_are_provider_timeouts() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    http = client(answer)
    try:
        with pytest.raises(ProviderTimeout):
            await http.get("/p", {}, "p", lambda r: r.json())
    finally:
        await http.aclose()


async def test_connection_refused_on_a_real_socket() -> None:
    http = VendorHttp("test", cfg(), base_url="http://127.0.0.1:9", map_error=mapper)
    try:
        with pytest.raises(ProviderUnavailable):
            await http.get("/p", {}, "p", lambda r: r.json())
    finally:
        await http.aclose()


# --- bulk pages over aiohttp: the same errors as httpx's own transport ---------------------------------


async def _raw_server(reply: bytes, *, hang: bool = False) -> tuple[asyncio.Server, str]:
    """A socket server that answers every request with ``reply`` verbatim (then hangs or closes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        if hang:
            await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("reply", "hang", "error", "cause"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"a":', False, ProviderUnavailable, "RemoteProtocolError"),
        (b"", False, ProviderUnavailable, "RemoteProtocolError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", True, ProviderTimeout, "ReadTimeout"),
        (b"NOT HTTP AT ALL\r\n\r\n", False, ProviderUnavailable, "RemoteProtocolError"),
    ],
)
async def test_bulk_pages_over_aiohttp_fail_as_httpx_would(
    reply: bytes, hang: bool, error: type[MarketpipeError], cause: str
) -> None:
    server, url = await _raw_server(reply, hang=hang)
    http = VendorHttp("test", cfg(read_timeout=0.3), base_url=url, map_error=mapper)
    try:
        with pytest.raises(error) as caught:
            await http.get("/p", {}, "p", lambda r: r.json(), offload=True)
        assert isinstance(caught.value.__cause__, getattr(httpx, cause)), repr(caught.value.__cause__)
        assert http.resilience.retries == 1  # attempts=2: aiohttp's own silent re-send is off
    finally:
        await http.aclose()
        server.close()


async def test_bulk_pages_over_aiohttp_keep_the_query_headers_and_gzip() -> None:
    import gzip

    import orjson
    from aiohttp import web

    from marketpipe.providers.http import AiohttpTransport

    seen: list[tuple[str, str, str]] = []

    async def page(req: web.Request) -> web.Response:
        seen.append((req.query_string, req.headers.get("X-Key", ""), req.headers.get("Accept-Encoding", "")))
        body = gzip.compress(orjson.dumps({"q": dict(req.query)}))
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_get("/v2/p", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = VendorHttp("test", cfg(), base_url=f"http://127.0.0.1:{port}", map_error=mapper, headers={"X-Key": "k"})
    try:
        assert isinstance(http._bulk._transport, AiohttpTransport)
        doc, resp = await http.get(
            "/v2/p?a=1", {"start": "2024-01-02T09:30:00+00:00", "s": "A,B"}, "p", lambda r: r.json(), offload=True
        )
        assert doc == {"q": {"a": "1", "start": "2024-01-02T09:30:00+00:00", "s": "A,B"}}
        assert resp.status_code == 200 and seen[0][1] == "k" and "gzip" in seen[0][2]
    finally:
        await http.aclose()
        await runner.cleanup()


# --- cancellation always propagates --------------------------------------------------------------------


class _HeldAnswer(httpx.AsyncBaseTransport):
    """Holds its 200 until ``gate`` is opened, so a test can let the answer arrive and cancel the caller in
    the same instant (on Python 3.11 ``asyncio.wait_for`` then returned the answer and dropped the
    cancellation, so a cancelled backfill worker went on taking units)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.entered.set()
        await self.gate
        return httpx.Response(200, json={"ok": True})


async def test_a_cancellation_arriving_with_the_answer_is_not_swallowed() -> None:
    transport = _HeldAnswer()
    http = VendorHttp("v", cfg(), base_url="http://v", map_error=mapper, transport=transport)
    try:
        task = asyncio.create_task(http.get("/x", {}, "x", lambda r: r.json()))
        await transport.entered.wait()
        transport.gate.set_result(None)
        assert task.cancel()  # requested while get() was still pending: it must end cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await http.aclose()


@pytest.mark.parametrize("where", ["backoff", "rate_limit", "response"])
async def test_cancelled_get_raises_cancelled_error_promptly(where: str) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if where == "response":
            await asyncio.sleep(30)
        return httpx.Response(500, json={"message": "down"})

    retry = RetryPolicy(attempts=5, base_seconds=30.0, max_seconds=30.0)  # a retry would sleep up to 30 s
    config = cfg(retry=retry, rate_limit_per_min=1 if where == "rate_limit" else 100_000)
    http = VendorHttp("v", config, base_url="http://v", map_error=mapper, transport=httpx.MockTransport(handler))
    if where == "rate_limit":
        http.resilience.limiter._tokens = 0.0  # the next token is a minute away
    try:
        task = asyncio.create_task(http.get("/x", {}, "x", lambda r: r.json()))
        await asyncio.sleep(0.2)  # in backoff, waiting for the limiter, or waiting for the answer
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 0.5
        assert calls == (0 if where == "rate_limit" else 1)
        assert http.resilience.breaker.retry_in() == 0.0
    finally:
        await http.aclose()


async def test_a_cancelled_half_open_trial_gives_its_slot_back() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json={})

    config = cfg(circuit=CircuitPolicy(failure_threshold=1, recovery_seconds=0.05))
    http = VendorHttp("v", config, base_url="http://v", map_error=mapper, transport=httpx.MockTransport(handler))
    breaker = http.resilience.breaker
    try:
        breaker.failure()
        await breaker.wait_until_allowed()  # half-open
        task = asyncio.create_task(http.get("/x", {}, "x", lambda r: r.json()))
        await asyncio.sleep(0.05)
        assert breaker.retry_in() is None  # the trial is out
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.retry_in() == 0.0  # before: stuck half-open with no trial left, for good
    finally:
        await http.aclose()
