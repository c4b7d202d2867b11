"""The API docs, served whole from the installed packages: ``/docs`` (Swagger UI 5) and ``/redoc`` load
their JavaScript and CSS from ``/docs/static``, the files the ``fastapi-offline`` distribution ships,
not from a CDN — so both render on a machine with no internet. (``swagger-ui-bundle`` ships Swagger UI
4, which cannot read the OpenAPI 3.1 document FastAPI writes.)

``/docs/...`` and ``/redoc`` are among the middleware's open paths: the pages and their files load
without a client key."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
STATIC_URL = f"{DOCS_URL}/static"
OAUTH2_REDIRECT_URL = f"{DOCS_URL}/oauth2-redirect"
SWAGGER_JS = f"{STATIC_URL}/swagger-ui-bundle.js"
SWAGGER_CSS = f"{STATIC_URL}/swagger-ui.css"
REDOC_JS = f"{STATIC_URL}/redoc.standalone.js"
FAVICON = f"{STATIC_URL}/favicon.png"


def install_docs(app: FastAPI) -> None:
    """Mount the UI files and add ``/docs`` and ``/redoc`` (build the app with ``docs_url=None, redoc_url=None``)."""
    app.mount(STATIC_URL, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} — Swagger UI",
            swagger_js_url=SWAGGER_JS,
            swagger_css_url=SWAGGER_CSS,
            swagger_favicon_url=FAVICON,
            oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} — ReDoc",
            redoc_js_url=REDOC_JS,
            redoc_favicon_url=FAVICON,
            with_google_fonts=False,
        )
