"""The live dashboard in headless Chromium: signed in with a token (posted once; the
browser then holds an HttpOnly, Secure, SameSite=Strict session cookie, which a reload
keeps and the page's scripts cannot read), events stored while it is open appear without
a reload (counts, cameras, services, and an incident recorded by the incident process);
the API stopped and started again while events are stored, and the page resumes with
nothing lost and nothing counted twice; on a phone-sized screen it needs no sideways
scrolling; an incident is acknowledged through the page by an operator, the page sending
its CSRF token (a reader is told that its token cannot); a form on another site, or on
another port of the same host, that posts to the API while the operator is signed in is
refused and changes nothing; signed out, the cookie is gone. Screenshots are saved with
the test's output (and in PIPELINE_TESTS_ARTIFACTS, if set).

Chromium is Debian's, driven by Playwright through its executable, as in
`test_api_docs.py` (skipped without it unless PIPELINE_TESTS_REQUIRE_CHROMIUM is set).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from pipeline.api.auth import COOKIE
from pipeline.settings import Settings
from pipeline.store.eventstore import Accepted, EventStore

from ..conftest import as_role
from .dashboard import READER, Api, api_settings, processes
from .helpers import head
from .incidents import boxed, frame, health, security
from .test_api_docs import OFFLINE, _chromium

pytestmark = pytest.mark.timeout(180)

ARTIFACTS = "PIPELINE_TESTS_ARTIFACTS"


@pytest.fixture
def settings(pg_schema: str, tmp_path: Path) -> Settings:
    return api_settings(pg_schema, tmp_path)


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _badges(count: int, severity: str = "low") -> list[Accepted]:
    at = _now()
    return [
        security(uuid.uuid4().hex, at, "badge.rejected", severity, "gate", at) for _ in range(count)
    ]


def _scene() -> list[Accepted]:
    """Cameras, services and security events of several kinds, as a site sends them."""
    at = _now()
    s = timedelta(seconds=1)
    return [
        frame(uuid.uuid4().hex, at - 40 * s, "cam-2", [], at),
        boxed(
            frame(uuid.uuid4().hex, at - 30 * s, "cam-2", [("car", 0.88)], at),
            (300, 250, 520, 390),
        ),
        boxed(
            frame(uuid.uuid4().hex, at - 20 * s, "cam-1", [("car", 0.71)], at),
            (40, 260, 260, 400),
        ),
        health(uuid.uuid4().hex, at, "auth", "ok", at),
        health(uuid.uuid4().hex, at, "api-gateway", "degraded", at),
        security(uuid.uuid4().hex, at, "badge.accepted", "info", "door-1", at),
        security(uuid.uuid4().hex, at, "motion.detected", "medium", "door-2", at),
    ]


def _intrusion() -> list[Accepted]:
    """A forced door and a person on the camera watching it: one incident."""
    at = _now()
    return [
        security(uuid.uuid4().hex, at, "door.forced", "high", "door-1", at),
        boxed(
            frame(
                uuid.uuid4().hex,
                at + timedelta(seconds=2),
                "cam-1",
                [("person", 0.91), ("car", 0.64)],
                at,
            ),
            (330, 120, 420, 400),
            (40, 262, 258, 398),
        ),
    ]


async def _signed_in_by_cookie(page: Page) -> None:
    """The session is the cookie the page cannot read; the page keeps no token."""
    (cookie,) = await page.context.cookies()
    assert cookie["name"] == COOKIE and cookie["domain"] == "127.0.0.1"
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
    assert cookie["path"] == "/" and cookie["expires"] > 0
    kept = "[document.cookie, sessionStorage.length, localStorage.length]"
    assert await page.evaluate(kept) == ["", 0, 0]


async def _forged(page: Page, origin: str, action: str) -> str:
    """What the API answers a form on `origin` (served by the test, no server) that posts
    to `action` when the operator submits it: as a page elsewhere would make it."""
    html = f'<form method="post" action="{action}"><input name="note" value="x">' + (
        "<button>Win a prize</button></form>"
    )
    await page.route(
        f"{origin}/**", lambda route: route.fulfill(body=html, content_type="text/html")
    )
    await page.goto(f"{origin}/prize")
    async with page.expect_navigation():
        await page.get_by_role("button", name="Win a prize").click()
    assert page.url == action
    return await page.locator("body").inner_text()


async def _stored_total(page: Page) -> int:
    return int(await page.locator("#stored-total").get_attribute("data-total") or -1)


async def _shot(page: Page, folder: Path, name: str) -> None:
    path = folder / name
    await page.screenshot(path=str(path), full_page=True)
    if os.environ.get(ARTIFACTS):
        target = Path(os.environ[ARTIFACTS])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)


async def test_the_page_follows_the_store_live_and_resumes_after_a_cut_with_nothing_lost(
    settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    chromium = _chromium()
    schema = settings.postgres_schema
    api = Api(settings)
    requested: list[str] = []
    sent: list[tuple[str, str, dict[str, str]]] = []
    errors: list[str] = []
    with processes(settings):
        await api.start()
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=chromium, args=[OFFLINE])
                try:
                    context = await browser.new_context(viewport={"width": 1280, "height": 900})
                    context.on("request", lambda request: requested.append(request.url))
                    context.on("request", lambda r: sent.append((r.method, r.url, r.headers)))
                    context.on("weberror", lambda error: errors.append(str(error.error)))
                    page = await context.new_page()
                    await page.goto(api.url + "/")
                    # Keyboard first: the token field has the focus and a label.
                    assert await page.evaluate("document.activeElement.id") == "token"
                    await page.get_by_label("API token").fill("reader-token")
                    await page.keyboard.press("Enter")
                    body = page.locator("body")
                    await expect(body).to_have_attribute("data-position", str(head(schema)))
                    await _signed_in_by_cookie(page)
                    await page.reload()  # the session goes on, no token asked for
                    await expect(body).to_have_attribute("data-position", str(head(schema)))
                    await expect(page.locator("#sign-in")).to_be_hidden()
                    opened_at = head(schema)

                    written = _scene() + _badges(3)
                    store.write(written)
                    await expect(page.locator("#stored-total")).to_have_attribute(
                        "data-total", str(len(written))
                    )
                    gate = page.locator('#security-counts td[data-zone=""][data-severity="low"]')
                    await expect(gate).to_have_text("3")
                    await expect(
                        page.locator('#services tr[data-service="auth/auth-0"]')
                    ).to_contain_text("ok")
                    await expect(page.locator('#cameras [data-camera="cam-2"]')).to_contain_text(
                        "car 1"
                    )

                    intrusion = _intrusion()
                    store.write(intrusion)
                    written += intrusion
                    incident = page.locator('#incidents [data-rule="forced-door-with-person"]')
                    await expect(incident).to_be_visible(timeout=10_000)
                    await expect(incident).to_contain_text("critical")
                    await expect(incident).to_contain_text("person 0.91")
                    await expect(page.locator("#announce")).to_contain_text("New critical incident")

                    # The connection is cut: the API stops; events are stored meanwhile.
                    await api.stop()
                    await expect(page.locator("#status")).to_contain_text("Reconnecting")
                    while_away = _badges(4)
                    store.write(while_away)
                    await api.start()
                    after_cut = 3 + 4
                    await expect(gate).to_have_text(str(after_cut), timeout=15_000)
                    more = _badges(2)
                    store.write(more)
                    total = len(written) + len(while_away) + len(more)
                    await expect(body).to_have_attribute("data-position", str(head(schema)))
                    await expect(page.locator("#stored-total")).to_have_attribute(
                        "data-total", str(total)
                    )
                    await expect(gate).to_have_text(str(after_cut + 2))
                    shown = [
                        int(p or 0)
                        for p in await page.locator("#feed [data-position]").evaluate_all(
                            "items => items.map(i => i.dataset.position)"
                        )
                    ]
                    assert sorted(shown) == list(range(opened_at + 1, head(schema) + 1))
                    assert await body.get_attribute("data-anomalies") is None
                    await _shot(page, tmp_path, "dashboard.png")

                    # A phone-sized screen: one column, no sideways scrolling.
                    await page.set_viewport_size({"width": 390, "height": 844})
                    wide = await page.evaluate("document.documentElement.scrollWidth")
                    assert wide <= 390, f"the page is {wide} px wide on a 390 px screen"
                    await _shot(page, tmp_path, "dashboard-phone.png")

                    # Acknowledging through the page needs the operate scope.
                    acknowledge = incident.get_by_role("button", name="Acknowledge")
                    await acknowledge.click()
                    await expect(incident).to_contain_text("lacks the operate scope")
                    await page.get_by_role("button", name="Sign out").click()
                    await page.get_by_label("API token").fill("ada-token")
                    await page.get_by_role("button", name="Sign in").click()
                    await expect(acknowledge).to_be_visible()
                    await acknowledge.click()
                    await expect(incident).to_contain_text("acknowledged by ada", timeout=5_000)
                    await expect(acknowledge).to_have_count(0)

                    # Forms elsewhere post with ada's session in the browser: refused.
                    found = await incident.get_attribute("data-incident")
                    resolve = f"{api.url}/v1/incidents/{found}/resolve"
                    attacker = await context.new_page()
                    port = settings.api_port
                    # Another site: the SameSite=Strict cookie is not even sent.
                    answer = await _forged(attacker, f"http://localhost:{port}", resolve)
                    assert '"unauthenticated"' in answer, answer
                    # Another port of this host is the same site: the cookie is sent, and
                    # the request is refused for its origin and its missing CSRF token.
                    answer = await _forged(attacker, f"http://127.0.0.1:{port + 1}", resolve)
                    assert '"csrf_failed"' in answer, answer
                    # The incident was not resolved: ada still can, once.
                    async with httpx.AsyncClient(base_url=api.url) as http:
                        ada = {"Authorization": "Bearer ada-token"}
                        assert (await http.post(resolve[len(api.url) :], headers=ada)).is_success
                        assert (await http.get("/v1/incidents", headers=READER)).is_success

                    # Signed out: the cookie is gone, and a reload asks for a token.
                    await page.get_by_role("button", name="Sign out").click()
                    await expect(page.get_by_label("API token")).to_be_visible()
                    assert await context.cookies() == []
                    await page.reload()
                    await expect(page.get_by_label("API token")).to_be_focused()
                finally:
                    await browser.close()
        finally:
            await api.stop()
    elsewhere = [
        u
        for u in requested
        if urlsplit(u).hostname != "127.0.0.1" and not u.startswith("http://localhost:")
    ]
    assert elsewhere == [], "requests that would leave the host"
    # The token went to the sign-in only; the acknowledgements carried the CSRF token.
    with_token = {(method, url) for method, url, headers in sent if "authorization" in headers}
    assert with_token == {("POST", f"{api.url}/v1/session")}
    acknowledged = [h for _, url, h in sent if url.endswith("/acknowledge")]
    assert len(acknowledged) == 2 and all(h.get("x-csrf-token") for h in acknowledged)
    assert errors == []
