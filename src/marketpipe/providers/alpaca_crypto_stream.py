"""Alpaca's real-time crypto stream (``/v1beta3/crypto/{loc}``): one WebSocket connection, JSON frames.

``connect`` does the handshake (``connected``, then ``auth``: error 402 is AUTH_FAILED, anything
else unexpected STREAM_FAILED); ``send`` subscribes or unsubscribes; ``frames`` yields each frame's
messages as dicts, as the vendor sent them (``t`` as RFC-3339 text). Knows the vendor and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from marketpipe.core.errors import AuthFailed, StreamFailed
from marketpipe.providers.base import sim_source
from marketpipe.wire.alpaca_crypto import stream_path
from marketpipe.wire.alpaca_stream import stream_base_url


def crypto_stream_url(data_url: str | None, loc: str) -> str:
    """The stream URL for a data URL (Alpaca's own stream for the official API; the same host for
    the simulator or a gateway) and location."""
    return stream_base_url(data_url) + stream_path(loc)


class CryptoStreamConnection:
    def __init__(self, url: str, key: str | None, secret: str | None) -> None:
        self.url = url
        self._key, self._secret = key, secret
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.source = "alpaca"  # "sim:alpaca" once connected to marketpipe's simulator

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url, heartbeat=30)
            upgrade = getattr(self._ws, "_response", None)  # aiohttp keeps the upgrade response here
            if upgrade is not None:
                self.source = sim_source(upgrade.headers, "alpaca")
            first = await self._control()
            if first != [{"T": "success", "msg": "connected"}]:
                raise StreamFailed(f"crypto stream {self.url}: no 'connected' greeting ({str(first)[:120]})")
            await self._ws.send_str(
                orjson.dumps({"action": "auth", "key": self._key or "", "secret": self._secret or ""}).decode()
            )
            reply = await self._control()
            if reply and reply[0].get("T") == "error":
                cls = AuthFailed if reply[0].get("code") == 402 else StreamFailed
                raise cls(f"crypto stream: {reply[0].get('msg')} ({reply[0].get('code')})", provider="alpaca")
        except (aiohttp.ClientError, OSError) as exc:
            await self.aclose()
            raise StreamFailed(f"crypto stream {self.url}: {type(exc).__name__}: {exc}", provider="alpaca") from exc
        except BaseException:
            await self.aclose()
            raise

    async def _control(self) -> list[dict[str, Any]]:
        assert self._ws is not None
        msg = await self._ws.receive(timeout=10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise StreamFailed(
                f"crypto stream {self.url}: closed during the handshake ({msg.type.name})", provider="alpaca"
            )
        doc = orjson.loads(msg.data)
        return doc if isinstance(doc, list) else [doc]

    async def send(self, action: str, channels: dict[str, list[str]]) -> None:
        assert self._ws is not None
        await self._ws.send_str(orjson.dumps({"action": action, **channels}).decode())

    async def frames(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Each received frame's messages, until the connection ends (then STREAM_FAILED)."""
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                doc = orjson.loads(msg.data)
                yield [m for m in (doc if isinstance(doc, list) else [doc]) if isinstance(m, dict)]
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
        raise StreamFailed(f"crypto stream {self.url}: connection ended", provider="alpaca")

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._http is not None:
            await self._http.close()
            self._http = None
