"""The live dashboard at ``/``: the page itself (self-contained, with the ids the browser test reads),
and Debian's headless Chromium driving it against the gateway and the simulator's live stream —
prices arrive over the WebSocket and change, the router shows the primary active, sparklines, provider
rows and alerts render — leaving a screenshot in ``build/screenshots/dashboard.png``; with client keys,
the page's ``?token=`` reaches both the stream and ``/v1/live``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI

from marketpipe.api.app import create_app
from marketpipe.api.state import API_KEYS_VAR
from marketpipe.core.events import emit
from marketpipe.sim.server import SimServer
from marketpipe.sim.stream import StreamConfig
from tests.api.conftest import ENV, gateway_config, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "screenshots" / "dashboard.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IDS = (
    "ws-state",
    "prices-body",
    "router-state",
    "router-source",
    "router-history",
    "providers-body",
    "alerts",
    "active-alerts",
)
NUMBER = re.compile(r"^-?[\d,]+\.\d+$")
CLIENT_SECRET = "dash-secret"
READ = (  # an element's textContent (before CSS text-transform), or an attribute with a second argument
    "const e = document.querySelector(arguments[0]);"
    "return e && (arguments[1] ? e.getAttribute(arguments[1]) : e.textContent);"
)
SPARK = (  # [points the page holds, points drawn] of a row's sparkline
    "const s = document.querySelector(arguments[0] + ' td.spark svg'); if (!s) return [0, 0];"
    "return [Number(s.dataset.points), s.querySelector('polyline').getAttribute('points').trim().split(/\\s+/).length];"
)
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Page:
    """Reads the dashboard through JavaScript, so a re-render between finding an element and reading
    it never fails with a stale element reference."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def text(self, css: str) -> str:
        return str(self.driver.execute_script(READ, css, None) or "").strip()

    def attr(self, css: str, name: str) -> str:
        return str(self.driver.execute_script(READ, css, name) or "")

    def count(self, css: str) -> int:
        return int(self.driver.execute_script("return document.querySelectorAll(arguments[0]).length", css))

    def price(self, symbol: str) -> str | None:
        t = self.text(f'tr[data-symbol="{symbol}"] td.price')
        return t if NUMBER.match(t) else None

    def spark(self, symbol: str) -> list[int]:
        return list(self.driver.execute_script(SPARK, f'tr[data-symbol="{symbol}"]'))

    def severe_console_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]


@pytest.fixture(scope="module")
def streaming_vendor() -> Iterator[SimServer]:
    with SimServer(vendor="alpaca", stream_config=StreamConfig(rate=300, bar_interval_s=0.5)) as s:
        yield s


@pytest.fixture
def live_app(streaming_vendor: SimServer, tmp_path: Path) -> FastAPI:
    return create_app(gateway_config(streaming_vendor.url, tmp_path / "gw.duckdb"), env=ENV)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)  # with the driver's path given, Selenium Manager never runs
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


async def test_page_is_self_contained_html_with_the_ids_the_browser_reads(live_app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=live_app), base_url="http://gateway") as c:
        res = await c.get("/")
        again = await c.get("/?symbols=AAPL&token=x")
        schema = (await c.get("/openapi.json")).json()
    st = live_app.state.mp
    await st.cache.aclose()
    await st.data.aclose()
    assert res.status_code == 200 and again.status_code == 200
    assert res.headers["content-type"].startswith("text/html")
    html = res.text
    for id_ in IDS:
        assert f'id="{id_}"' in html, id_
    assert "/v1/stream" in html and "/v1/live" in html
    external = re.findall(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^"'\s)]*""", html, flags=re.IGNORECASE)
    assert not external, f"the page must not load anything from other hosts: {external}"
    assert not re.search(r"<(?:script|link|img|iframe)[^>]+(?:src|href)=[\"'](?!data:)", html), "no external files"
    assert "/" not in schema["paths"]  # the page is not part of the API


@pytest.mark.timeout(60)
def test_dashboard_in_headless_chromium(live_app: FastAPI, browser: Any) -> None:
    emit("outlier", "warning", "dashboard test: a sample alert", symbol="AAPL", source="test")
    page = Page(browser)
    with serving(live_app) as url:
        browser.get(f"{url}/?symbols=AAPL,MSFT")
        first = wait_for("a price for AAPL", lambda: page.price("AAPL"))
        changed = wait_for("the AAPL price to change", lambda: (p := page.price("AAPL")) != first and p)
        assert float(changed.replace(",", "")) > 0
        assert page.text('tr[data-symbol="MSFT"] td.symbol') == "MSFT"
        wait_for("the stream badge to say live", lambda: page.text("#ws-state") == "live")
        wait_for("the router to show primary_active", lambda: page.text("#router-state") == "primary_active")
        assert "ok" in page.attr("#router-state", "class").split()
        assert page.text("#router-source") == "primary"
        points, drawn = wait_for("a sparkline with points", lambda: (sp := page.spark("AAPL"))[0] >= 5 and sp)
        assert drawn == points
        wait_for("a provider row", lambda: page.count("#providers-body tr[data-provider]"))
        assert page.text('#providers-body tr[data-provider="alpaca"] .badge') == "healthy"
        wait_for("the sample alert", lambda: "a sample alert" in page.text("#alerts"))
        # an event while the engine runs is an active alert (the event wakes the engine at once)
        emit("outlier", "critical", "dashboard test: an active alert", symbol="MSFT", source="test")
        wait_for("the active alert", lambda: "an active alert" in page.text("#active-alerts"))
        assert "event_outlier/test/MSFT" in page.text("#active-alerts")
        assert page.text("#stream-connected") == "connected"
        assert not page.severe_console_errors()

        time.sleep(1.0)  # a little more history in the sparklines for the picture
        bars, height = browser.execute_script(  # the window's own bars, and the page's content
            "return [window.outerHeight - window.innerHeight, Math.ceil(document.body.getBoundingClientRect().height)]"
        )
        browser.set_window_size(1440, int(bars) + int(height))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
    data = SCREENSHOT.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


@pytest.mark.timeout(60)
def test_dashboard_passes_its_token_to_the_stream_and_the_api(
    streaming_vendor: SimServer, tmp_path: Path, browser: Any
) -> None:
    env = {**ENV, API_KEYS_VAR: f"dash:{CLIENT_SECRET}"}
    app = create_app(gateway_config(streaming_vendor.url, tmp_path / "gw.duckdb"), env=env)
    page = Page(browser)
    with serving(app) as url:
        browser.get(f"{url}/?symbols=MSFT&token={CLIENT_SECRET}")
        wait_for("a price for MSFT", lambda: page.price("MSFT"))
        wait_for("the stream badge to say live", lambda: page.text("#ws-state") == "live")
        wait_for("a provider row (from /v1/live)", lambda: page.count("#providers-body tr[data-provider]"))

        browser.get(f"{url}/?symbols=MSFT")  # no key: the stream is refused, and the page says so
        wait_for("the stream badge to say disconnected", lambda: page.attr("#ws-state", "data-state") == "disconnected")
        wait_for("the refusal to be shown", lambda: "UNAUTHENTICATED" in page.text("#notice"))
        assert page.price("MSFT") is None
