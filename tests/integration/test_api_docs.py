"""`/docs` and `/redoc` work offline: in headless Chromium they render, and every request
their pages make goes to the API's host.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright through its
executable (no browser download). Without it the browser test is skipped, unless
PIPELINE_TESTS_REQUIRE_CHROMIUM is set (CI sets it): then it fails. The browser resolves
no name but 127.0.0.1, as on a host with no internet, and records every request.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import async_playwright

from pipeline.api.routes.docs import CSP
from pipeline.api.server import run_api
from pipeline.ops.embedded import free_port

from ..conftest import as_role, make_settings

REQUIRE = "PIPELINE_TESTS_REQUIRE_CHROMIUM"
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"
RENDERED = {
    # An operation's path, as Swagger UI draws it.
    "/docs": '.opblock-summary-path[data-path="/v1/security/events"]',
    # An operation's section, as ReDoc draws it.
    "/redoc": '[data-section-id="tag/security/operation/security_events_v1_security_events_get"]',
}
PACKAGED = {
    "/static/swagger-ui/swagger-ui-bundle.js",
    "/static/swagger-ui/swagger-ui.css",
    "/static/redoc/redoc.standalone.js",
    "/openapi.json",
}


def _chromium() -> str:
    """Debian's chromium; skips the test (fails it under REQUIRE) without it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get(REQUIRE):
            pytest.fail(f"{reason}, and {REQUIRE} is set")
        pytest.skip(reason)
    return found


@pytest.fixture
async def api_url(pg_schema: str) -> AsyncIterator[str]:
    """The API as `pipeline run api` serves it, on a free port, until the test ends."""
    settings = make_settings(
        "nats://unused", pg_schema, api_tokens={"reader-token": ("read",)}, api_port=free_port()
    )
    stop, started = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(run_api(as_role(settings, "api"), stop, started))
    up = asyncio.create_task(started.wait())
    await asyncio.wait({server, up}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        server.result()  # raises why it did not start
    assert up.done(), "the API did not start in 30 s"
    yield f"http://127.0.0.1:{settings.api_port}"
    stop.set()
    await asyncio.wait_for(server, timeout=30)


async def test_the_pages_load_the_packaged_files_under_a_policy_of_this_host_only(
    api_url: str,
) -> None:
    async with httpx.AsyncClient(base_url=api_url) as http:
        for page in RENDERED:
            answer = await http.get(page)
            assert answer.status_code == 200
            assert answer.headers["content-security-policy"] == CSP
            assert "cdn" not in answer.text and "https://" not in answer.text
        for path in PACKAGED - {"/openapi.json"}:
            served = await http.get(path)
            assert served.status_code == 200 and len(served.content) > 100_000, path
        assert (await http.get("/static/nothing.js")).json()["error"] == "not_found"


async def test_docs_and_redoc_render_in_a_browser_with_no_request_leaving_the_host(
    api_url: str,
) -> None:
    chromium = _chromium()
    requested: list[str] = []
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=[OFFLINE])
        try:
            context = await browser.new_context()
            context.on("request", lambda request: requested.append(request.url))
            context.on("weberror", lambda error: errors.append(str(error.error)))
            page = await context.new_page()
            for path, rendered in RENDERED.items():
                await page.goto(api_url + path)
                await page.locator(rendered).first.wait_for(timeout=30_000)
        finally:
            await browser.close()
    urls = [urlsplit(url) for url in requested]
    elsewhere = [u.geturl() for u in urls if u.scheme != "blob" and u.hostname != "127.0.0.1"]
    assert elsewhere == [], "requests that would leave the host"
    assert {u.path for u in urls} >= PACKAGED
    assert errors == []
