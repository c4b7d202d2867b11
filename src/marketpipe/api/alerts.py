"""``GET /v1/alerts``: the alert engine's active alerts (most severe first), the recently resolved ones
(newest first), each sink's counters, and the recent pipeline events the alerts come from."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from starlette.responses import Response

from marketpipe.api.formats import MEDIA
from marketpipe.api.state import AppState, StateDep
from marketpipe.service.live import LiveHub


def alerts_doc(st: AppState, limit: int) -> dict[str, Any]:
    if st.alerts is None:
        doc: dict[str, Any] = {"enabled": False, "active": [], "resolved": [], "sinks": []}
    else:
        doc = {"enabled": True, **st.alerts.snapshot(limit)}
    doc["events"] = LiveHub.alerts(limit)  # the recent events (the hub keeps them)
    return doc


def alerts_router() -> APIRouter:
    r = APIRouter(tags=["alerts"])

    @r.get("/v1/alerts", summary="Active alerts, recently resolved ones, sink counters and recent events")
    async def alerts(st: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:
        return Response(orjson.dumps(alerts_doc(st, limit), default=str), media_type=MEDIA["json"])

    return r
