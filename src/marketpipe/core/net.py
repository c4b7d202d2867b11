"""Listening sockets for the servers (``marketpipe serve``, ``marketpipe sim``): bound before anything is
announced, and a failure to bind is a typed error naming the address instead of a traceback."""

from __future__ import annotations

import errno
import socket

from marketpipe.core.errors import AddressInUse, InvalidArgument, MarketpipeError


def listen_error(exc: OSError, host: str, port: int) -> MarketpipeError:
    """The typed error for ``exc`` raised while binding ``host:port``."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return InvalidArgument(
            f"cannot listen on {where}: unknown host {host!r} ({exc.strerror})", details={"parameter": "host"}
        )
    if exc.errno == errno.EADDRINUSE:
        in_use = AddressInUse(
            f"cannot listen on {where}: the address is already in use by another process; choose another --port",
            details={"host": host, "port": port},
        )
        in_use.errno = errno.EADDRINUSE
        return in_use
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidArgument(
            f"cannot listen on {where}: {host} is not an address of this machine", details={"parameter": "host"}
        )
    if exc.errno == errno.EACCES:
        return InvalidArgument(
            f"cannot listen on {where}: permission denied (ports below 1024 need privileges)",
            details={"parameter": "port"},
        )
    return MarketpipeError(f"cannot listen on {where}: {exc.strerror or exc}", details={"host": host, "port": port})


def bind_sockets(host: str, port: int, *, backlog: int = 2048) -> list[socket.socket]:
    """Listening TCP sockets on every address ``host`` resolves to (as asyncio's ``create_server`` would
    bind them), or the typed error of :func:`listen_error`; nothing is left open after a failure."""
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port {port} is not in 0..65535", details={"parameter": "port"})
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise listen_error(exc, host, port) from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart is not refused by TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise listen_error(exc, host, port) from None
    return socks
