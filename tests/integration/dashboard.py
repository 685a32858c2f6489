"""Helpers of the dashboard's tests: the API served as `pipeline run api` serves it (which
a test may stop and start again on the same port), the views and the incident process
kept live in threads, and a reader of the server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipeline.api.server import run_api
from pipeline.ops.embedded import free_port
from pipeline.settings import ApiToken, Settings
from projections.incidents import load_sites
from projections.incidents.service import IncidentService
from projections.service import ProjectionService

from ..conftest import as_role, make_settings
from .incidents import sites_file

TOKENS: dict[str, object] = {
    "reader-token": ("read",),
    "operator-token": ("operate",),
    "ada-token": ApiToken(name="ada", scopes=("read", "operate")),
}
READER = {"Authorization": "Bearer reader-token"}
SESSION_KEY = "dashboard-tests-session-key-0123456789abcdef"


def api_settings(schema: str, folder: Path) -> Settings:
    """The API's settings (as the API role) and, for the processes, the tests' sites file."""
    return make_settings(
        "nats://unused",
        schema,
        api_tokens=TOKENS,
        api_port=free_port(),
        sites_file=str(sites_file(folder)),
        # One key across the API's restarts, as replicas share one: sessions survive them.
        api_session_key=SESSION_KEY,
        projections_poll_s=0.2,
        projections_standby_s=0.5,
    )


class Api:
    """`run_api` in this event loop, on one port, stopped and started at will."""

    def __init__(self, settings: Settings) -> None:
        self.settings = as_role(settings, "api")
        self.url = f"http://127.0.0.1:{settings.api_port}"
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve until `stop`; fail if the server does not start in 30 s."""
        self._stop = asyncio.Event()
        started = asyncio.Event()
        self._task = asyncio.create_task(run_api(self.settings, self._stop, started))
        up = asyncio.create_task(started.wait())
        await asyncio.wait({self._task, up}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # raises why it did not start
        assert up.done(), "the API did not start in 30 s"

    async def stop(self) -> None:
        """Stop serving (open streams are ended); within 10 s."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=10)
            self._task = None


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Api]:
    """The API, stopped when the block ends."""
    api = Api(settings)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@contextlib.contextmanager
def processes(settings: Settings) -> Iterator[None]:
    """The views and the incident process, live in threads (as the projector role)."""
    projector = as_role(settings, "projector")
    views = ProjectionService(projector)
    incidents = IncidentService(projector, load_sites(settings.sites_file))
    views.start()
    incidents.start()
    try:
        yield
    finally:
        incidents.stop(10)
        views.stop(10)


@dataclass
class Received:
    """One server-sent event."""

    event: str
    id: str | None
    data: dict[str, Any] = field(default_factory=dict)
    retry: int | None = None


class SseReader:
    """Reads a stream's events one at a time (comments skipped)."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self, timeout_s: float = 10.0) -> Received:
        """The next event; fails the test after `timeout_s`."""
        return await asyncio.wait_for(self._next(), timeout_s)

    async def _next(self) -> Received:
        event, ident, retry = "message", None, None
        data: list[str] = []
        async for line in self._lines:
            if not line:
                if data:
                    return Received(event, ident, json.loads("\n".join(data)), retry)
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)
            elif name == "retry":
                retry = int(value)
        raise EOFError("the stream ended")


@contextlib.asynccontextmanager
async def stream(
    url: str, last_event_id: int | str | None = None, **params: Any
) -> AsyncIterator[SseReader]:
    """The dashboard's stream, as the reader token, resumed after `last_event_id`."""
    headers = dict(READER)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=None)) as http,
        http.stream("GET", "/v1/stream", headers=headers, params=params) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)
