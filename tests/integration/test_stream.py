"""`GET /v1/stream` against the real PostgreSQL, served as `pipeline run api` serves it: ids
are store positions, every update follows the previous id, a client that reconnects with
`Last-Event-ID` misses nothing and is sent nothing twice, the sections follow the views
and the incident process, and an update comes within a second of the event's commit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from pipeline.settings import Settings
from pipeline.store.eventstore import Accepted, EventStore

from ..conftest import as_role
from .dashboard import READER, Received, SseReader, api_settings, processes, serving, stream
from .helpers import head
from .incidents import frame, health, security

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def settings(pg_schema: str, tmp_path: Path) -> Settings:
    return api_settings(pg_schema, tmp_path)


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


def _doors(count: int, *, zone_source: str = "door-2", severity: str = "low") -> list[Accepted]:
    now = datetime.now(UTC)
    return [
        security(uuid.uuid4().hex, now, "badge.accepted", severity, zone_source, now)
        for _ in range(count)
    ]


def _positions(schema: str, after: int) -> list[int]:
    from .incidents import owner

    with owner() as conn:
        rows = conn.execute(
            f'SELECT notification_id FROM "{schema}".journal_events '
            "WHERE notification_id > %s ORDER BY 1",
            (after,),
        ).fetchall()
    return [r[0] for r in rows]


async def _until(reader: SseReader, position: int, seen: list[Received]) -> None:
    """Read updates until one reaches `position`, keeping them in `seen`."""
    while True:
        got = await reader.next()
        seen.append(got)
        if got.data["position"] >= position:
            return


def _follow_one_another(start: int, updates: list[Received]) -> None:
    """Each update follows the previous id, and its id is its position."""
    last = start
    for update in updates:
        assert update.event == "update"
        assert update.data["after"] == last
        assert update.id == str(update.data["position"])
        assert update.data["position"] >= last
        last = update.data["position"]


async def test_the_stream_needs_the_read_scope(settings: Settings) -> None:
    async with serving(settings) as api, httpx.AsyncClient(base_url=api.url) as http:
        assert (await http.get("/v1/stream")).json()["error"] == "unauthenticated"
        refused = await http.get("/v1/stream", headers={"Authorization": "Bearer operator-token"})
        assert refused.status_code == 403
        page = await http.get("/")
        assert page.status_code == 200 and "static/dashboard/dashboard.js" in page.text
        assert "'unsafe-inline'" not in page.headers["content-security-policy"]
        for name in ("dashboard.js", "dashboard.css"):
            assert (await http.get(f"/static/dashboard/{name}")).status_code == 200


async def test_ids_are_positions_and_each_update_follows_the_last(
    settings: Settings, store: EventStore
) -> None:
    schema = settings.postgres_schema
    store.write(_doors(3))
    async with serving(settings) as api, stream(api.url) as reader:
        first = await reader.next()
        assert first.event == "snapshot" and first.retry is not None
        assert first.id == str(head(schema)) == str(first.data["position"])
        assert [e["position"] for e in first.data["events"]] == _positions(schema, 0)
        assert set(first.data["sections"]) == {
            "incidents",
            "cameras",
            "security",
            "services",
            "lag",
        }
        assert first.data["sections"]["security"] == {"ready": False}  # no view yet
        start = first.data["position"]
        updates: list[Received] = []
        for batch in range(3):
            store.write(_doors(2 + batch))
            await _until(reader, head(schema), updates)
        _follow_one_another(start, updates)
        assert sum(u.data["stored"].get("security", 0) for u in updates) == 2 + 3 + 4
        listed = [e["position"] for u in updates for e in u.data["events"]]
        assert listed == _positions(schema, start)


async def test_a_client_resuming_with_last_event_id_misses_nothing_and_gets_nothing_twice(
    settings: Settings, store: EventStore
) -> None:
    schema = settings.postgres_schema
    async with serving(settings) as api:
        async with stream(api.url) as reader:
            last = (await reader.next()).data["position"]
        store.write(_doors(5))  # while the client is away
        store.write([health(uuid.uuid4().hex, datetime.now(UTC), "auth", "ok", datetime.now(UTC))])
        async with stream(api.url, head(schema)) as reader:  # the API's follower is there
            assert (await reader.next()).data["stored"] == {}
        async with stream(api.url, last) as reader:
            resumed = await reader.next()
            assert resumed.event == "update" and resumed.data["after"] == last
            assert resumed.id == str(head(schema))
            assert resumed.data["stored"] == {"security": 5, "monitoring": 1}
            assert [e["position"] for e in resumed.data["events"]] == _positions(schema, last)
            assert set(resumed.data["sections"]) >= {"incidents", "lag"}
            last = resumed.data["position"]
            store.write(_doors(2))  # while it is connected
            updates: list[Received] = []
            await _until(reader, head(schema), updates)
            _follow_one_another(last, updates)
            last = updates[-1].data["position"]
        # Up to date: resumed with nothing stored in between; the query parameter does
        # what the header does.
        async with stream(api.url, last_event_id=last) as reader:
            same = await reader.next()
            assert (same.data["after"], same.data["position"], same.data["stored"]) == (
                last,
                last,
                {},
            )
            assert same.data["events"] == []
        # An id this store never gave (ahead of the head), or not a position: a snapshot.
        for bad in (last + 1000, "not-a-position"):
            async with stream(api.url, bad) as reader:
                assert (await reader.next()).event == "snapshot"


async def test_the_sections_follow_the_views_and_incidents_within_a_second(
    settings: Settings, store: EventStore
) -> None:
    schema = settings.postgres_schema
    now = datetime.now(UTC)
    with processes(settings):
        async with serving(settings) as api, stream(api.url) as reader:
            last = (await reader.next()).data["position"]
            # A forced door and a person on the camera watching it: an incident.
            store.write([security("forced", now, "door.forced", "high", "door-1", now)])
            stored_at = time.monotonic()
            update = await reader.next()
            latency_s = time.monotonic() - stored_at
            assert update.data["after"] == last and update.data["stored"] == {"security": 1}
            assert latency_s < 1.0, f"the update came {latency_s:.3f} s after the commit"
            person = str(uuid.uuid4())
            store.write(
                [frame(person, now + timedelta(seconds=3), "cam-1", [("person", 0.9)], now)]
            )
            sections: dict[str, object] = {}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                got = await reader.next()
                sections.update(got.data["sections"])
                incidents = sections.get("incidents")
                if isinstance(incidents, dict) and incidents.get("items"):
                    break
            incidents = sections["incidents"]
            assert isinstance(incidents, dict)
            (incident,) = incidents["items"]
            assert (incident["rule"], incident["level"]) == ("forced-door-with-person", "critical")
            assert {e["position"] for e in incident["evidence_shown"]} == set(
                _positions(schema, last)
            )
            # The views have caught up by now.
            await asyncio.sleep(0.5)
    async with serving(settings) as api, stream(api.url) as reader:
        snapshot = (await reader.next()).data["sections"]
    counts = {(r["zone"], r["severity"]): r["events"] for r in snapshot["security"]["counts"]}
    assert counts == {("", "high"): 1}  # the event names no zone
    (camera,) = snapshot["cameras"]["items"]
    assert camera["last_frame"]["detections"][0]["label"] == "person"
    assert camera["last_hour"] == {"person": 1}
    assert {v["view"]: v["lag_events"] for v in snapshot["lag"]["views"]}["cameras"] == 0


async def test_stopping_the_server_ends_its_streams(settings: Settings) -> None:
    async with serving(settings) as api:
        async with stream(api.url) as reader:
            await reader.next()
            started = time.monotonic()
            await api.stop()
            assert time.monotonic() - started < 5
            with pytest.raises((EOFError, httpx.HTTPError)):
                await reader.next()
        await api.start()  # the context's exit stops it again
        async with httpx.AsyncClient(base_url=api.url) as http:
            answer = await http.get("/v1/stream", headers=READER, params={"last_event_id": -1})
            assert answer.status_code == 400
