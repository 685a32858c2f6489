"""Evidence frames kept, against a real nats-server and PostgreSQL: a frame that becomes
evidence is copied from the FRAMES stream into the evidence bucket with the same bytes; a
frame the stream dropped first is settled as expired, not a crash; the incident process
killed and restarted copies what is missing; NATS down delays the copies, not the
incidents; the API serves a kept frame's bytes and 404s the rest."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from fastapi.testclient import TestClient
from nats.aio.client import Client

from pipeline.api import create_app
from pipeline.app import apply_streams_once
from pipeline.metrics import IncidentMetrics
from pipeline.ops.embedded import EmbeddedNats
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import Accepted, EventStore
from projections.incidents import load_sites
from projections.incidents.evidence import EXPIRED_REASON, EvidenceKeeper, FrameBucket
from projections.incidents.process import IncidentProcess
from schemas import Domain
from streams import Subjects

from ..conftest import PG_DB, PG_HOST, as_role, make_settings, wait_until
from .incidents import T0, frame, frame_meta, publish_frame, security, sites_file

S = timedelta(seconds=1)
READ = {"Authorization": "Bearer reader-token"}


@pytest.fixture
def settings(nats_server: EmbeddedNats, pg_schema: str, tmp_path: Path) -> Settings:
    """The incident process's settings (as the projector), on the test's NATS server."""
    return as_role(
        make_settings(
            nats_server.url,
            pg_schema,
            sites_file=str(sites_file(tmp_path)),
            projections_poll_s=0.2,
            evidence_max_bytes=64 * 1024**2,
            api_tokens={"reader-token": ("read",)},
        ),
        "projector",
    )


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    """A client on the test's NATS, with the streams and the bucket applied."""
    applied = await apply_streams_once(settings)
    assert any(r.name == "OBJ_EVIDENCE" and r.action == "created" for r in applied)
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    user = settings.postgres_user
    return psycopg.connect(host=PG_HOST, dbname=PG_DB, user=user, autocommit=True)


async def _publish_frame(nc: Client, message_id: str, camera: str, size: int) -> tuple[int, bytes]:
    """A JPEG-like frame of `size` bytes published to FRAMES: its sequence and bytes."""
    body = b"\xff\xd8\xff" + secrets.token_bytes(size - 5) + b"\xff\xd9"
    return await publish_frame(nc, frame_meta(message_id, T0, camera), body), body


def _analysed(message_id: str, camera: str, seq: int, found: list[tuple[str, float]]) -> Accepted:
    """The `FrameAnalyzed` the worker stores for the frame at `seq`."""
    return frame(message_id, T0, camera, found, T0 + 10 * S, stream_seq=seq)


async def _incident_with_frames(
    nc: Client, store: EventStore, count: int, *, size: int = 300_000, tag: str = "door"
) -> dict[uuid.UUID, bytes]:
    """A forced door and `count` frames of a person on its camera, published and stored:
    each frame is evidence of the incident. The frames' event ids and bytes."""
    frames: dict[uuid.UUID, bytes] = {}
    events = [security(tag, T0, "door.forced", "high", "door-1", T0 + 10 * S)]
    for _ in range(count):
        ident = str(uuid.uuid4())
        seq, body = await _publish_frame(nc, ident, "cam-1", size)
        events.append(_analysed(ident, "cam-1", seq, [("person", 0.91)]))
        frames[event_id(Domain.FRAMES, ident)] = body
    store.write(events)
    return frames


def _follow(settings: Settings) -> None:
    """The incident process, caught up with the store."""
    process = IncidentProcess(load_sites(settings.sites_file), settings.postgres_schema)
    with _connect(settings) as conn:
        process.prepare(conn)
        process.catch_up(conn)


def _settled(settings: Settings) -> dict[uuid.UUID, tuple[str, str]]:
    with _connect(settings) as conn:
        found = conn.execute(
            "SELECT to_regclass(%s)", (f'"{settings.postgres_schema}".incident_frames',)
        ).fetchone()
        if found is None or found[0] is None:
            return {}
        rows = conn.execute(
            f'SELECT event_id, state, reason FROM "{settings.postgres_schema}".incident_frames'
        ).fetchall()
    return {ident: (state, reason) for ident, state, reason in rows}


async def _keep_all(settings: Settings) -> None:
    """Settle every evidence frame waiting, as the incident process's keeper does."""
    keeper = EvidenceKeeper(settings, lambda: _connect(settings))
    try:
        while await keeper.step():
            pass
    finally:
        await keeper.link.close()


async def _bucket_bytes(nc: Client, name: uuid.UUID) -> bytes:
    """An object of the bucket, read by nats.py's own object store client."""
    result = await (await nc.jetstream().object_store("EVIDENCE")).get(str(name))
    return bytes(result.data or b"")


async def test_a_frame_that_is_evidence_is_kept_with_its_bytes(
    settings: Settings, nc: Client, store: EventStore
) -> None:
    frames = await _incident_with_frames(nc, store, 2)
    other = str(uuid.uuid4())  # a car: evidence of nothing
    seq, _ = await _publish_frame(nc, other, "cam-1", 1000)
    store.write([_analysed(other, "cam-1", seq, [("car", 0.9)])])
    await asyncio.to_thread(_follow, settings)
    await _keep_all(settings)
    assert _settled(settings) == {ident: ("kept", "") for ident in frames}
    for ident, body in frames.items():
        assert await _bucket_bytes(nc, ident) == body
    bucket = await nc.jetstream().object_store("EVIDENCE")
    info = await bucket.get_info(str(next(iter(frames))))
    assert info.headers is not None
    assert info.headers["Frame-Camera"] == ["cam-1"]
    assert info.headers["Content-Type"] == ["image/jpeg"]
    assert "evidence of incident" in (info.description or "")
    with pytest.raises(nats.js.errors.ObjectNotFoundError):
        await bucket.get_info(str(event_id(Domain.FRAMES, other)))
    # Applying the streams again leaves the bucket as it is.
    again = await apply_streams_once(settings)
    assert [r.action for r in again if r.name == "OBJ_EVIDENCE"] == ["unchanged"]


async def test_a_frame_gone_from_the_stream_is_reported_not_a_crash(
    settings: Settings, nc: Client, store: EventStore
) -> None:
    frames = await _incident_with_frames(nc, store, 2, size=2000)
    gone, kept = list(frames)
    # The first frame's message is dropped from FRAMES (as its hour or byte cap would).
    info = await nc.jsm().stream_info("FRAMES")
    await nc.jsm().delete_msg("FRAMES", info.state.first_seq)
    # A frame whose sequence holds another frame's message (the stream made anew since).
    other = str(uuid.uuid4())
    store.write([_analysed(other, "cam-1", info.state.last_seq, [("person", 0.8)])])
    await asyncio.to_thread(_follow, settings)
    await _keep_all(settings)
    assert _settled(settings) == {
        gone: ("expired", EXPIRED_REASON),
        kept: ("kept", ""),
        event_id(Domain.FRAMES, other): ("expired", f"{EXPIRED_REASON} (the stream was reset)"),
    }
    assert await _bucket_bytes(nc, kept) == frames[kept]


def _start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PIPELINE_NATS_URL": settings.nats_url,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_USER": settings.postgres_user,
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema,
        "PIPELINE_SITES_FILE": settings.sites_file,
        "PIPELINE_PROJECTIONS_POLL_S": "0.2",
        "PIPELINE_INCIDENTS_METRICS_PORT": "0",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "incidents"], env=env, stdout=out, stderr=out
        )


async def test_the_incident_process_killed_and_restarted_copies_what_is_missing(
    settings: Settings, nc: Client, store: EventStore, tmp_path: Path
) -> None:
    log = tmp_path / "incidents.log"
    first = await _incident_with_frames(nc, store, 3, tag="door-a")
    process = _start(settings, log)
    try:
        await wait_until(lambda: len(_settled(settings)) == 3, 60)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        # While it is down: more evidence; and a frame copied just before a crash (in the
        # bucket, its row not written) that the stream has dropped since.
        later = await _incident_with_frames(nc, store, 2, tag="door-b")
        await asyncio.to_thread(_follow, settings)
        copied = next(iter(later))
        frame_row = await _frame_of(settings, copied)
        bucket = await FrameBucket.open(nc, Subjects())
        await bucket.keep(frame_row)
        stream_seq = frame_row.stream_seq
        await nc.jsm().delete_msg("FRAMES", stream_seq)
        process = _start(settings, log)
        await wait_until(lambda: len(_settled(settings)) == 5, 60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert _settled(settings) == {ident: ("kept", "") for ident in {**first, **later}}
    for ident, body in {**first, **later}.items():
        assert await _bucket_bytes(nc, ident) == body


async def _frame_of(settings: Settings, ident: uuid.UUID) -> Any:
    from projections.incidents.frames import FrameTable

    def pending() -> Any:
        with _connect(settings) as conn:
            found, _ = FrameTable(settings.postgres_schema).pending(conn, 0, 1000)
        return next(f for f in found if f.event_id == ident)

    return await asyncio.to_thread(pending)


async def test_nats_down_delays_the_copies_not_the_incidents(
    settings: Settings, nc: Client, store: EventStore, nats_server: EmbeddedNats
) -> None:
    frames = await _incident_with_frames(nc, store, 2, size=5000)
    await nc.close()
    nats_server.stop()
    metrics = IncidentMetrics()
    keeper = EvidenceKeeper(settings, lambda: _connect(settings), metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    try:
        await asyncio.to_thread(_follow, settings)  # incidents recorded meanwhile
        await wait_until(lambda: metrics.evidence_errors._value.get() >= 2, 20)
        assert _settled(settings) == {}
        nats_server.start()
        await wait_until(lambda: len(_settled(settings)) == 2, 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert _settled(settings) == {ident: ("kept", "") for ident in frames}
    client = await nats.connect(settings.nats_url)
    try:
        for ident, body in frames.items():
            assert await _bucket_bytes(client, ident) == body
    finally:
        await client.close()


async def test_after_an_outage_the_keeper_goes_on_from_where_it_was(
    settings: Settings, nc: Client, store: EventStore, nats_server: EmbeddedNats
) -> None:
    """Frames settled before NATS went away are not looked at again: once it is back, the
    keeper reads the incident events after them, not the incident log from its start."""
    first = await _incident_with_frames(nc, store, 2, size=5000)
    await asyncio.to_thread(_follow, settings)
    metrics = IncidentMetrics()
    keeper = EvidenceKeeper(settings, lambda: _connect(settings), metrics)
    while await keeper.step():
        pass
    reached = keeper.after
    assert reached > 0 and len(_settled(settings)) == 2
    later = await _incident_with_frames(nc, store, 1, size=5000, tag="door-again")
    await nc.close()
    nats_server.stop()
    await asyncio.to_thread(_follow, settings)  # the later frame's incident event, recorded
    asked: list[int] = []
    pending = keeper.table.pending

    def counted(conn: psycopg.Connection[Any], after: int, limit: int) -> Any:
        asked.append(after)
        return pending(conn, after, limit)

    keeper.table.pending = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    try:
        await wait_until(lambda: metrics.evidence_errors._value.get() >= 3, 30)
        nats_server.start()
        await wait_until(lambda: len(_settled(settings)) == 3, 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert _settled(settings) == {ident: ("kept", "") for ident in {**first, **later}}
    assert len(asked) >= 4 and min(asked) == reached, asked


async def test_the_api_serves_a_kept_frame_and_404s_the_rest(
    settings: Settings, nc: Client, store: EventStore
) -> None:
    frames = await _incident_with_frames(nc, store, 2, size=200_000)
    kept, expired = list(frames)
    info = await nc.jsm().stream_info("FRAMES")
    await nc.jsm().delete_msg("FRAMES", info.state.last_seq)  # the second frame
    await asyncio.to_thread(_follow, settings)
    await _keep_all(settings)
    later = str(uuid.uuid4())  # evidence not copied yet
    seq, _ = await _publish_frame(nc, later, "cam-1", 1000)
    store.write([_analysed(later, "cam-1", seq, [("person", 0.8)])])
    await asyncio.to_thread(_follow, settings)
    pending = event_id(Domain.FRAMES, later)

    api_settings = as_role(settings, "api")

    def requests() -> None:
        with TestClient(create_app(api_settings)) as client:
            listed = client.get("/v1/incidents", headers=READ).json()["items"]
            (incident,) = [i for i in listed if i["rule"] == "forced-door-with-person"]
            ident = incident["incident_id"]
            detail = client.get(f"/v1/incidents/{ident}", headers=READ).json()
            shown = {f["event_id"]: f for f in detail["frames"]}
            assert shown[str(kept)]["state"] == "kept"
            assert shown[str(kept)]["url"] == f"/v1/incidents/{ident}/frames/{kept}"
            assert shown[str(kept)]["size"] == len(frames[kept])
            assert shown[str(kept)]["detections"][0]["box"] == [1.0, 2.0, 30.0, 40.0]
            assert shown[str(expired)]["state"] == "expired"
            assert shown[str(expired)]["detail"] == EXPIRED_REASON
            assert shown[str(expired)]["url"] is None
            assert shown[str(pending)]["state"] == "pending"

            image = client.get(shown[str(kept)]["url"], headers=READ)
            assert image.status_code == 200, image.text
            assert image.headers["content-type"] == "image/jpeg"
            assert image.headers["x-content-type-options"] == "nosniff"
            assert image.content == frames[kept]
            assert client.get(shown[str(kept)]["url"]).status_code == 401

            for frame_id, code in (
                (expired, "frame_expired"),
                (pending, "frame_pending"),
                (uuid.uuid4(), "not_found"),
            ):
                answer = client.get(f"/v1/incidents/{ident}/frames/{frame_id}", headers=READ)
                assert answer.status_code == 404
                assert answer.json()["error"] == code
            unknown = client.get(f"/v1/incidents/{uuid.uuid4()}/frames/{kept}", headers=READ)
            assert unknown.status_code == 404
            assert unknown.json()["error"] == "not_found"

    await asyncio.to_thread(requests)
