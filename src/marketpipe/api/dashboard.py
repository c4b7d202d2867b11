"""The live dashboard at ``/``: one self-contained HTML page (inline CSS and JavaScript, nothing
fetched from other hosts) that reads ``/v1/live`` every two seconds and the price stream at
``/v1/stream``. Symbols come from ``?symbols=AAPL,MSFT`` (else the gateway's defaults); when client
keys are configured, ``?token=KEY`` is passed on to the stream and as ``Authorization: Bearer``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import HTMLResponse

PAGE = "dashboard.html"


@cache
def page() -> str:
    """The page, read once (on the first request) from the package's ``static`` directory."""
    return (files("marketpipe.api") / "static" / PAGE).read_text(encoding="utf-8")


def dashboard_router() -> APIRouter:
    r = APIRouter(tags=["dashboard"])

    @r.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})

    return r
