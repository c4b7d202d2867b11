"""``/docs`` and ``/redoc`` work offline: the pages name only the gateway's own URLs, those answer with the
JavaScript and CSS from the installed package, and headless Chromium — with every host but the gateway
unresolvable — renders the operations list from ``/openapi.json``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from marketpipe.api.app import create_app
from marketpipe.api.state import API_KEYS_VAR
from marketpipe.sim.server import SimServer
from tests.api.conftest import ENV, gateway_config, serving
from tests.api.test_dashboard_browser import CHROMEDRIVER, CHROMIUM, wait_for

URL_ATTR = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']|Url:\s*["']([^"']+)["']""")
REDOC_BRANDING = "https://cdn.redoc.ly/redoc/logo-mini.svg"
EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)


@pytest.fixture
def offline_browser() -> Iterator[Any]:
    """Debian's headless Chromium in which every host name but 127.0.0.1 fails to resolve."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def referenced(html: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in URL_ATTR.finditer(html)]


@pytest.mark.parametrize(("page", "needs_css"), [("/docs", True), ("/redoc", False)])
async def test_docs_page_references_only_local_files_that_answer(
    client: httpx.AsyncClient, page: str, needs_css: bool
) -> None:
    res = await client.get(page)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    html = res.text
    assert not EXTERNAL.findall(html), f"{page} must load nothing from other hosts: {EXTERNAL.findall(html)}"
    urls = referenced(html)
    js = [u for u in urls if u.endswith(".js")]
    css = [u for u in urls if u.endswith(".css")]
    assert js and (css or not needs_css), urls
    for u in urls:
        assert u.startswith("/"), f"not a local path: {u}"
        got = await client.get(u)
        assert got.status_code == 200, (u, got.status_code)
        assert len(got.content) > 0, u
    for u in js:
        got = await client.get(u)
        assert "javascript" in got.headers["content-type"]
        assert ("SwaggerUIBundle" if page == "/docs" else "Redoc") in got.text
    for u in css:
        got = await client.get(u)
        assert got.headers["content-type"].startswith("text/css")
        assert ".swagger-ui" in got.text
    assert (await client.get("/openapi.json")).status_code == 200
    assert (await client.get("/docs/oauth2-redirect")).status_code == 200


async def test_docs_files_need_no_client_key(vendor: SimServer, tmp_path: Path) -> None:
    app = create_keyed_app(vendor.url, tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        page = await c.get("/docs")
        files = [await c.get(u) for u in referenced(page.text) if u.endswith((".js", ".css"))]
        files.append(await c.get("/redoc"))
        guarded = await c.get("/v1/live")
    st = app.state.mp
    await st.cache.aclose()
    await st.data.aclose()
    assert page.status_code == 200 and files and all(f.status_code == 200 for f in files)
    assert guarded.status_code == 401  # the keys are on: the docs are open, the data is not


def create_keyed_app(sim_url: str, tmp_path: Path) -> FastAPI:
    return create_app(gateway_config(sim_url, tmp_path / "gw.duckdb"), env={**ENV, API_KEYS_VAR: "c:secret"})


@pytest.mark.timeout(60)
def test_swagger_ui_renders_the_operations_in_chromium_with_no_network(app: FastAPI, offline_browser: Any) -> None:
    browser = offline_browser
    with serving(app) as url:
        browser.get(f"{url}/docs")
        count = "return document.querySelectorAll('.opblock').length"
        n = wait_for("Swagger UI to list the operations", lambda: browser.execute_script(count), timeout=20)
        assert n >= 10
        paths = browser.execute_script(
            "return Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.textContent)"
        )
        assert any("/v1/bars" in p for p in paths), paths
        title = browser.execute_script("return document.querySelector('.info .title')?.textContent || ''")
        assert "marketpipe gateway" in title
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(url) for u in loaded), loaded


@pytest.mark.timeout(60)
def test_redoc_renders_the_operations_in_chromium_with_no_network(app: FastAPI, offline_browser: Any) -> None:
    browser = offline_browser
    with serving(app) as url:
        browser.get(f"{url}/redoc")
        count = "return document.querySelectorAll('[data-section-id^=\"operation/\"]').length"
        n = wait_for("ReDoc to list the operations", lambda: browser.execute_script(count), timeout=20)
        assert n >= 10
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        # ReDoc's own "powered by" logo is a URL inside its bundle; it fails offline and nothing else needs it.
        assert loaded and all(u.startswith(url) or u == REDOC_BRANDING for u in loaded), loaded
        assert f"{url}/openapi.json" in loaded
