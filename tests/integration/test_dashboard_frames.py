"""The dashboard shows an incident's evidence frames, in headless Chromium: the frame kept
in the evidence bucket is fetched with the page's session and drawn with its detection
boxes; a frame the FRAMES stream dropped before it was kept says so. Against a real
nats-server (the incident process copying the frames) and PostgreSQL. A screenshot is
saved with the test's output (and in PIPELINE_TESTS_ARTIFACTS, if set)."""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from PIL import Image
from playwright.async_api import Page, async_playwright, expect

from pipeline.app import apply_streams_once
from pipeline.ops.embedded import EmbeddedNats
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import Accepted, EventStore
from projections.incidents.evidence import EXPIRED_REASON
from schemas import Domain, FrameEncoding

from ..conftest import as_role
from .dashboard import Api, api_settings, processes
from .incidents import boxed, frame, frame_meta, publish_frame, security
from .test_api_docs import OFFLINE, _chromium

pytestmark = pytest.mark.timeout(180)

GREY = (90, 110, 130)
YELLOW = (255, 209, 102)  # the boxes' colour (#ffd166)
PERSON = (330.0, 120.0, 420.0, 400.0)
PNG = FrameEncoding.PNG


@pytest.fixture
def settings(nats_server: EmbeddedNats, pg_schema: str, tmp_path: Path) -> Settings:
    return api_settings(pg_schema, tmp_path).model_copy(
        update={"nats_url": nats_server.url, "evidence_max_bytes": 64 * 1024**2}
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


def _png() -> bytes:
    """A 640 x 480 frame of one grey."""
    out = io.BytesIO()
    Image.new("RGB", (640, 480), GREY).save(out, format="PNG")
    return out.getvalue()


def _analysed(
    ident: str, seq: int, at: datetime, box: tuple[float, float, float, float]
) -> Accepted:
    stored = frame(ident, at, "cam-1", [("person", 0.91)], at, stream_seq=seq, encoding=PNG)
    return boxed(stored, box)


async def test_the_incident_shows_its_kept_frame_with_boxes_and_says_which_expired(
    settings: Settings, store: EventStore, tmp_path: Path
) -> None:
    chromium = _chromium()
    await apply_streams_once(settings)
    nc = await nats.connect(settings.nats_url)
    at = datetime.now(UTC)
    kept, gone = str(uuid.uuid4()), str(uuid.uuid4())
    kept_seq = await publish_frame(nc, frame_meta(kept, at, "cam-1", PNG), _png())
    gone_seq = await publish_frame(nc, frame_meta(gone, at, "cam-1", PNG), _png())
    await nc.jsm().delete_msg("FRAMES", gone_seq)  # dropped before it could be kept
    await nc.close()
    store.write(
        [
            security(uuid.uuid4().hex, at, "door.forced", "high", "door-1", at),
            _analysed(kept, kept_seq, at + timedelta(seconds=1), PERSON),
            _analysed(gone, gone_seq, at + timedelta(seconds=2), (10, 10, 100, 100)),
        ]
    )
    api = Api(settings)
    errors: list[str] = []
    with processes(settings):  # the incident process copies the frames too
        await api.start()
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=chromium, args=[OFFLINE])
                try:
                    context = await browser.new_context(viewport={"width": 1280, "height": 900})
                    context.on("weberror", lambda error: errors.append(str(error.error)))
                    page = await context.new_page()
                    await page.goto(api.url + "/")
                    await page.get_by_label("API token").fill("reader-token")
                    await page.keyboard.press("Enter")
                    incident = page.locator('#incidents [data-rule="forced-door-with-person"]')
                    await expect(incident).to_be_visible(timeout=15_000)
                    shown = incident.locator(f'[data-frame="{_event(kept)}"]')
                    canvas = shown.locator("canvas[data-drawn='1']")
                    await expect(canvas).to_be_visible(timeout=20_000)
                    label = re.compile(r"^Evidence frame: cam-1 at .*: person 0\.91$")
                    await expect(canvas).to_have_attribute("aria-label", label)
                    x1, y1, x2, y2 = (int(v) for v in PERSON)
                    pixels = await canvas.evaluate(
                        """(c, [inside, edge]) => {
                          const g = c.getContext("2d");
                          const at = ([x, y]) => [...g.getImageData(x, y, 1, 1).data];
                          return [inside, edge].map((p) => at(p).slice(0, 3));
                        }""",
                        [[(x1 + x2) // 2, (y1 + y2) // 2], [x1, (y1 + y2) // 2]],
                    )
                    assert pixels == [list(GREY), list(YELLOW)]
                    expired = incident.locator(f'[data-frame="{_event(gone)}"]')
                    await expect(expired).to_have_attribute("data-frame-state", "expired")
                    await expect(expired).to_contain_text(EXPIRED_REASON)
                    await _shot(page, tmp_path, "dashboard-evidence.png")
                finally:
                    await browser.close()
        finally:
            await api.stop()
    assert errors == []


def _event(message_id: str) -> str:
    return str(event_id(Domain.FRAMES, message_id))


async def _shot(page: Page, folder: Path, name: str) -> None:
    path = folder / name
    await page.screenshot(path=str(path), full_page=True)
    if os.environ.get("PIPELINE_TESTS_ARTIFACTS"):
        target = Path(os.environ["PIPELINE_TESTS_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
