"""`GET /v1/stream`: the dashboard's server-sent events, whose ids are store positions.

The first event of a stream depends on `Last-Event-ID` (the header a browser's
`EventSource` sends when it reconnects; `last_event_id=` in the query does the same for
a client that cannot set it):

- none, or one this store cannot resume (ahead of its head, or more than
  `RESUME_LIMIT` events behind): `snapshot`, every section and the last events, `id`
  the head;
- a position: `update`, with `after` that position, what was stored since (`stored`:
  counts per domain; `events`: the last ones) and every section.

Then one `update` per move of the store or of the views, from the API's one follower
(`pipeline.api.hub`): `after` is always the previous event's id, so a client that keeps
the last id misses nothing and is sent nothing twice. Sections are the views as they
stand (replaced whole); an update of the sections alone keeps the id. A comment every
`PING_S` keeps proxies from closing a quiet stream. A client too slow to take its events
is ended and resumes where it was. The stream needs the `read` scope, as every `/v1`
endpoint, from a bearer token or the browser's session cookie, which the dashboard's
`fetch` sends as an `EventSource` would (see `pipeline/api/static/dashboard/dashboard.js`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import StreamingResponse

from ..auth import READ
from ..board import Board
from ..deps import ApiContext, Context
from ..errors import ApiError
from ..hub import Hub, encode

__all__ = ["PING_S", "RESUME_LIMIT", "end_streams", "hub_of", "router"]

PING_S = 15.0
RESUME_LIMIT = 100_000
"""The most events a resume counts from the store; further behind, a snapshot."""
RETRY_MS = 1000
"""How long the client waits before it reconnects (sent with the first event)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The application's follower of the store, started by the first stream."""
    api: ApiContext = app.state.api
    settings = api.settings
    app.state.dashboard_hub = Hub(
        Board(api.schema),
        api.pool.connection,
        lambda: psycopg.connect(**settings.postgres_connection()),
        api.reader.channel,
    )
    yield
    await hub_of(app).close()


router = APIRouter(prefix="/v1", tags=["dashboard"], lifespan=lifespan)


def hub_of(app: FastAPI) -> Hub:
    """The application's follower of the store."""
    hub = app.state.dashboard_hub
    assert isinstance(hub, Hub)
    return hub


def end_streams(app: FastAPI) -> None:
    """End every open stream and refuse new ones (the server is stopping: the clients
    resume on another server, or on this one when it is back)."""
    hub = getattr(app.state, "dashboard_hub", None)
    if isinstance(hub, Hub):
        hub.end_streams()


@router.get(
    "/stream",
    dependencies=READ,
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
)
async def stream(
    request: Request,
    api: Context,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
    after: Annotated[
        int | None, Query(alias="last_event_id", ge=0, description="as the Last-Event-ID header")
    ] = None,
) -> StreamingResponse:
    """The dashboard's sections and what is stored, pushed as server-sent events whose ids
    are store positions (resume with `Last-Event-ID`)."""
    hub = hub_of(request.app)
    if hub.closed:
        raise ApiError(503, "shutting_down", "the API is stopping: reconnect")
    if not await hub.ready(10.0):
        raise ApiError(503, "database_unavailable", "the store does not answer yet")
    resume = _position(last_event_id) if last_event_id is not None else after
    if resume is not None and resume > hub.position:
        await hub.reached(resume, 2.0)  # another server of the API may be a moment ahead
    subscribed = hub.subscribe()  # every event after hub.position, as of now
    position, sections = hub.position, dict(hub.sections)
    try:
        if resume is None or resume > position or position - resume > RESUME_LIMIT:
            payload = {
                "snapshot": True,
                "after": position,
                "position": position,
                "stored": {},
                "events": list(hub.recent),
            }
            first = encode("snapshot", {**payload, "sections": sections}, retry_ms=RETRY_MS)
        else:
            changes = await asyncio.to_thread(_changes, api, hub.board, resume, position)
            first = encode("update", {**changes, "sections": sections}, retry_ms=RETRY_MS)
    except BaseException:
        hub.unsubscribe(subscribed)
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            yield first
            while True:
                try:
                    message = await asyncio.wait_for(subscribed.queue.get(), PING_S)
                except TimeoutError:
                    yield b": ping\n\n"
                    continue
                if message is None:
                    return
                yield message
        finally:
            hub.unsubscribe(subscribed)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _position(value: str) -> int | None:
    """A Last-Event-ID that is a position, else None (the client gets a snapshot)."""
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 19 else None


def _changes(api: ApiContext, board: Board, after: int, upto: int) -> dict[str, Any]:
    with api.pool.connection() as conn:
        return board.changes(conn, after, upto)
