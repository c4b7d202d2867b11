"""Real receivers on loopback: an HTTP server (aiohttp) that records every request and answers from a
script (status, headers, body per request, then a default), and an SMTP server (aiosmtpd) that demands
STARTTLS with a self-signed certificate made for the test by ``openssl`` and AUTH before it takes mail."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], str]] = field(default_factory=list)  # answered in order, first
    default: tuple[int, dict[str, str], str] = (200, {}, "ok")
    hang_seconds: float = 0.0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, n: int, within: float = 10.0) -> list[Received]:
        async with asyncio.timeout(within):
            while len(self.requests) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(url="")

    async def handle(request: web.Request) -> web.Response:
        rec.requests.append(Received(request.path_qs, dict(request.headers), await request.read()))
        rec.arrived.set()
        if rec.hang_seconds:
            await asyncio.sleep(rec.hang_seconds)
        status, headers, text = rec.script.pop(0) if rec.script else rec.default
        return web.Response(status=status, headers=headers, text=text)

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


# --- SMTP ----------------------------------------------------------------------------------------------

SMTP_USER, SMTP_PASSWORD = "alerts", "smtp-pass-8d1f"


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (it is also its own CA for the client)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (scripts/debian-packages.txt)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Mailbox:
    host: str
    port: int
    cert: Path
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    tls_seen: list[bool] = field(default_factory=list)


@pytest.fixture
def smtp_server(tls_cert: tuple[Path, Path]) -> Iterator[Mailbox]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, key = tls_cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    box = Mailbox("127.0.0.1", free_port(), cert)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            box.messages.append(message_from_bytes(envelope.original_content, policy=policy.default))
            box.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            box.tls_seen.append(session.ssl is not None)
            return "250 OK"

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == SMTP_USER
            and auth_data.password.decode() == SMTP_PASSWORD
        )
        if ok:
            box.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        Handler(),
        hostname=box.host,
        port=box.port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
        server_hostname="localhost",
    )
    controller.start()
    try:
        yield box
    finally:
        controller.stop()
