"""What every simulator face does with a fault decision, whatever the vendor: the vendor supplies
only its own bodies (server error, 429, the page shown during an outage)."""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from marketpipe.sim.admin import Handler, Stats, face_app
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import Decision, FaultRule, Faults

NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
NGINX_503 = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center><h1>503 "
    b"Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class VendorBodies:
    server_error: Callable[[], web.StreamResponse]  # the vendor's own 500
    too_many: Callable[[FaultRule], web.StreamResponse]  # the vendor's own 429
    outage_200: bytes  # the HTML page served with status 200 during an outage
    finish: Callable[[web.StreamResponse], web.StreamResponse] = lambda r: r  # add headers etc.
    # null_page: the key of the page a request asks for ("bars", "results", "chart", ...)
    page_key: Callable[[web.Request], str] = lambda request: "bars"


async def before_handler(
    decision: Decision, request: web.Request, bodies: VendorBodies
) -> tuple[web.StreamResponse, str] | None:
    """Apply latency, then the faults that replace the answer (returned) or delay it (None)."""
    if decision.latency_s:
        await asyncio.sleep(decision.latency_s)
    fault = decision.fault
    if fault is None:
        return None
    kind = fault.kind
    if kind == "reset":
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500), "reset"  # never reaches the client: the socket is gone
    if kind == "hang":
        await asyncio.sleep(fault.hang_seconds)
        return None
    if kind == "http_500":
        return bodies.finish(bodies.server_error()), "500"
    if kind in ("http_502", "http_503"):
        status, page = (502, NGINX_502) if kind == "http_502" else (503, NGINX_503)
        return bodies.finish(web.Response(body=page, status=status, content_type="text/html")), str(status)
    if kind == "html_200":
        return bodies.finish(web.Response(body=bodies.outage_200, content_type="text/html")), "200"
    if kind == "rate_limit":
        resp = bodies.too_many(fault)
        if fault.retry_after is not None:
            resp.headers["Retry-After"] = str(math.ceil(fault.retry_after))
        return bodies.finish(resp), "429"
    if kind in ("empty_json", "null_page"):
        body = b"{}" if kind == "empty_json" else b'{"' + bodies.page_key(request).encode() + b'":null}'
        return bodies.finish(web.Response(body=body, content_type="application/json")), "200"
    return None


ROW_FAULTS = ("invalid_rows", "bad_data")  # the faults that corrupt the rows of a 200 answer


TOKEN_LOOP = web.RequestKey("sim_token_loop", bool)  # the token_loop fault hit this request


async def apply_faults(
    faults: Faults, request: web.Request, bodies: VendorBodies
) -> tuple[FaultRule | None, tuple[web.StreamResponse, str] | None]:
    """Decide the request's fault, then apply what acts before the handler (:func:`before_handler`):
    ``(fault, the answer that replaces the handler's or None)``. When the handler is to run,
    ``request[TOKEN_LOOP]`` says whether the ``token_loop`` fault hit it."""
    decision = faults.decide(request.path)
    early = await before_handler(decision, request, bodies)
    if early is None:
        request[TOKEN_LOOP] = decision.fault is not None and decision.fault.kind == "token_loop"
    return decision.fault, early


def rows_to_corrupt(fault: FaultRule | None, resp: web.StreamResponse) -> bytes | None:
    """The body of a 200 JSON answer whose rows a row fault (:data:`ROW_FAULTS`) should corrupt, else None."""
    if fault is None or fault.kind not in ROW_FAULTS or resp.status != 200 or not isinstance(resp, web.Response):
        return None
    body = resp.body
    return body if isinstance(body, bytes) else None


def truncate_if_asked(fault: FaultRule | None, resp: web.StreamResponse) -> web.StreamResponse:
    """``truncated_json``: a 200 whose body stops half-way, with a Content-Length that matches."""
    if fault is not None and fault.kind == "truncated_json" and resp.status == 200 and isinstance(resp, web.Response):
        body = resp.body
        if isinstance(body, bytes):
            return web.Response(body=body[: max(1, len(body) // 2)], content_type="application/json")
    return resp


# --- rate limits -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quota:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # epoch seconds

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class RateLimits:
    """Fixed one-minute windows per key (the event loop is single-threaded: no lock needed)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[int, int]] = {}

    def hit(self, who: str, limit: int) -> Quota:
        window = int(self._clock() // 60)
        w, used = self._windows.get(who, (window, 0))
        if w != window:
            used = 0
        used += 1
        self._windows[who] = (window, used)
        return Quota(used <= limit, limit, max(0, limit - used), (window + 1) * 60)


# --- the face ---------------------------------------------------------------------------------------


class Face(ABC):
    """What every vendor face holds and does alike: the market, the fault rules, the request
    counters, the clock and per-key rate limits, and its application (:func:`face_app`). A face adds
    its vendor's routes and its answering of a data request."""

    def __init__(self, market: SimMarket, faults: Faults, stats: Stats, clock: Callable[[], float]) -> None:
        self.market = market
        self.faults = faults
        self.stats = stats
        self.clock = clock
        self.limits = RateLimits(clock)

    def now_ns(self) -> int:
        return int(self.clock() * 1e6) * 1000

    def build_app(self) -> web.Application:
        return face_app(self.faults, self.stats, self._serve, self._routes, self.market.actions)

    @abstractmethod
    def _routes(self, r: web.UrlDispatcher) -> None:
        """Add the vendor's routes."""

    @abstractmethod
    async def _serve(self, request: web.Request, handler: Handler) -> tuple[web.StreamResponse, str]:
        """Answer one data request (authentication, limits, faults, the handler): (response, status label)."""
