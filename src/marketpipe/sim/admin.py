"""The simulator's own control surface, outside the vendor's URL space (``/_sim/...``):

``GET /_sim/faults``     current rules, rate-limit override and per-rule counters
``PUT /_sim/faults``     replace them: ``{"rules": [...], "rate_limit_per_min": N}``
``POST /_sim/faults``    append one rule (the body is one rule object)
``DELETE /_sim/faults``  no rules, no override
``GET /_sim/stats``      data requests served: total, by path and status, by status
``DELETE /_sim/stats``   reset those counters

Admin requests never count as data requests and are never faulted.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from aiohttp import web

from marketpipe.sim.actions import ActionBook, ActionFault
from marketpipe.sim.faults import FaultRule, Faults


class Stats:
    """Request counters by path and status (status is the HTTP code, or ``reset``/``cancelled``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._total = 0

    def record(self, path: str, status: str) -> None:
        with self._lock:
            self._total += 1
            self._by_path[path][status] += 1

    def reset(self) -> None:
        with self._lock:
            self._by_path.clear()
            self._total = 0

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            by_status: defaultdict[str, int] = defaultdict(int)
            for counts in self._by_path.values():
                for status, n in counts.items():
                    by_status[status] += n
            return {
                "requests": self._total,
                "by_path": {p: dict(c) for p, c in sorted(self._by_path.items())},
                "by_status": dict(sorted(by_status.items())),
            }


ADMIN_PREFIX = "/_sim/"
SIM_HEADER = "X-Marketpipe-Sim"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# a face's own answering of a data request (authentication, limits, faults): (response, status label)
Serve = Callable[[web.Request, Handler], Awaitable[tuple[web.StreamResponse, str]]]


def face_app(
    faults: Faults,
    stats: Stats,
    serve: Serve,
    add_routes: Callable[[web.UrlDispatcher], None],
    actions: ActionBook | None = None,
) -> web.Application:
    """The application of one simulator face: the vendor's routes (``add_routes``), then the admin
    routes. ``/_sim/`` requests go to :func:`serve_admin`; every other request is answered by
    ``serve`` and counted in ``stats`` under its status label."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(ADMIN_PREFIX):
            return await serve_admin(request, handler)
        label = "cancelled"  # stays so if the client went away and aiohttp cancelled the handler
        try:
            resp, label = await serve(request, handler)
        finally:
            stats.record(request.path, label)
        return resp

    app = web.Application(middlewares=[middleware])
    add_routes(app.router)
    add_admin_routes(app, faults, stats)
    if actions is not None:
        add_action_routes(app, actions)
    return app


def add_action_routes(app: web.Application, book: ActionBook) -> None:
    """``/_sim/actions``: the market's corporate actions; ``/_sim/actions/faults`` (GET, PUT a JSON
    list of :class:`ActionFault`, DELETE): make one vendor's view wrong. The market is shared by every
    face, so a fault set through one face's port holds for all of them."""

    def faults_doc() -> web.Response:
        return _json([msgspec.to_builtins(f) for f in book.faults])

    async def get_actions(_: web.Request) -> web.Response:
        return _json([{"symbol": a.symbol, "type": a.type, "ex_date": a.ex_date.isoformat(), "old_rate": a.old_rate,
                       "new_rate": a.new_rate, "cash": a.cash, "id": a.id} for a in book.actions])  # fmt: skip

    async def get_faults(_: web.Request) -> web.Response:
        return faults_doc()

    async def put_faults(request: web.Request) -> web.Response:
        try:
            book.set_faults(msgspec.json.decode(await request.read(), type=list[ActionFault]))
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            return _json({"message": f"invalid action faults: {exc}"}, 400)
        return faults_doc()

    async def delete_faults(_: web.Request) -> web.Response:
        book.clear_faults()
        return faults_doc()

    app.router.add_get("/_sim/actions", get_actions)
    app.router.add_get("/_sim/actions/faults", get_faults)
    app.router.add_put("/_sim/actions/faults", put_faults)
    app.router.add_delete("/_sim/actions/faults", delete_faults)


async def serve_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every face's middleware hands ``/_sim/`` requests here: no auth, no faults, no counting, and
    marketpipe's own error body whatever vendor the face plays."""
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        resp = _json({"message": exc.reason.lower()}, exc.status)
    resp.headers[SIM_HEADER] = "1"
    return resp


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def add_admin_routes(app: web.Application, faults: Faults, stats: Stats) -> None:
    async def get_faults(_: web.Request) -> web.Response:
        return _json(faults.to_dict())

    async def put_faults(request: web.Request) -> web.Response:
        try:
            faults.load(await request.read())
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json({"message": f"invalid fault config: {exc}"}, 400)
        return _json(faults.to_dict())

    async def post_fault(request: web.Request) -> web.Response:
        try:
            faults.add(msgspec.json.decode(await request.read(), type=FaultRule))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _json({"message": f"invalid fault rule: {exc}"}, 400)
        return _json(faults.to_dict())

    async def delete_faults(_: web.Request) -> web.Response:
        faults.clear()
        return _json(faults.to_dict())

    async def get_stats(_: web.Request) -> web.Response:
        return _json(stats.to_dict())

    async def delete_stats(_: web.Request) -> web.Response:
        stats.reset()
        return _json(stats.to_dict())

    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_put("/_sim/faults", put_faults)
    app.router.add_post("/_sim/faults", post_fault)
    app.router.add_delete("/_sim/faults", delete_faults)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_delete("/_sim/stats", delete_stats)
