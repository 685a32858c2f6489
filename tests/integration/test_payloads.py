"""Whatever a producer sends in a free-form place reads back exactly as sent: through the
event reader, the views and the API, and no valid message can stop a view."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nats.aio.client import Client

from pipeline.api import create_app
from pipeline.ingest.codec import MAX_DEPTH, decode
from pipeline.settings import Settings
from pipeline.store.eventstore import Accepted, EventStore
from pipeline.store.reader import EventReader
from projections.service import ProjectionService
from schemas import Domain
from schemas.common import INT64_MAX, INT64_MIN
from streams import Subjects

from ..conftest import PG_DB, PG_HOST, as_role, make_settings, running_worker, wait_until
from .helpers import positions, security_body, stored_ids, views_current

TOKENS = {"reader-token": ("read",)}
READ = {"Authorization": "Bearer reader-token"}

MARKS = [
    {"_type_": "nope", "_data_": "x"},
    {"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:00+00:00"},
    {"_type_": "decimal_str", "_data_": "12.50"},
    {"_type_": "uuid_hex", "_data_": "6f4b1c9e3a525d7e9a410c8e2f5b7d13"},
    {"_type_": "", "_data_": ""},
]
"""Objects shaped like the store transcoder's type marks."""


def _metrics_body(message_id: str, labels: dict[str, str]) -> bytes:
    return json.dumps(
        {
            "id": message_id,
            "service": "api",
            "instance": "api-0",
            "collected_at": "2026-11-27T09:00:00Z",
            "samples": [{"name": "requests_total", "value": 1.0, "labels": labels}],
        }
    ).encode()


def _newer_minor_body(message_id: str, extra: dict[str, Any]) -> bytes:
    body = json.loads(security_body(message_id))
    return json.dumps({**body, "schema_version": "1.9", **extra}).encode()


async def test_type_marks_from_a_producer_read_back_as_sent_and_stop_no_view(
    nats_server: Any, pg_schema: str, nc: Client
) -> None:
    """Five valid messages with mark-shaped objects, then twenty ordinary ones."""
    settings = make_settings(nats_server.url, pg_schema, api_tokens=TOKENS, projections_poll_s=0.2)
    subjects = Subjects()
    security = subjects.subject(Domain.SECURITY, 1, "door-7")
    odd = [
        (security, "m-0", security_body("m-0", attributes=MARKS[0])),
        (security, "m-1", security_body("m-1", attributes=MARKS[1])),
        (subjects.subject(Domain.METRICS, 1, "api"), "m-2", _metrics_body("m-2", MARKS[2])),
        (security, "m-3", _newer_minor_body("m-3", {"extra": MARKS[3], "deep": [MARKS[2]]})),
        (security, "m-4", security_body("m-4", attributes=MARKS[4])),
    ]
    ordinary = [(security, f"o-{i}", security_body(f"o-{i}")) for i in range(20)]
    service = ProjectionService(as_role(settings, "projector"))
    service.start()
    try:
        async with running_worker(settings):
            js = nc.jetstream()
            for subject, message_id, body in odd + ordinary:
                await js.publish(subject, body, headers={"Nats-Msg-Id": message_id})
            await wait_until(lambda: sum(stored_ids(pg_schema).values()) == 25, timeout_s=60)
        await wait_until(lambda: views_current(pg_schema), timeout_s=60)
        with TestClient(create_app(as_role(settings, "api"))) as client:
            for _, message_id, body in odd:
                answer = client.get(f"/v1/events/{message_id}", headers=READ)
                assert answer.status_code == 200, answer.text
                sent, payload = json.loads(body), answer.json()["payload"]
                # The free-form places (times are normalised to UTC, as documented).
                for key in ("attributes", "extra", "deep"):
                    assert payload.get(key) == sent.get(key), key
                if "samples" in sent:
                    assert payload["samples"][0]["labels"] == sent["samples"][0]["labels"]
            status = client.get("/v1/projections", headers=READ)
            assert status.status_code == 200, status.text
            assert {v["view"]: v["state"] for v in status.json()} == {
                "cameras": "running",
                "health": "running",
                "metrics": "running",
                "security": "running",
            }
            rows = client.get("/v1/security/events?limit=100", headers=READ).json()["items"]
            attributes = {r["message_id"]: r["attributes"] for r in rows}
            assert len(attributes) == 24  # every security event, the ordinary ones too
            assert attributes["m-0"] == MARKS[0]
            assert attributes["m-1"] == MARKS[1]
            assert attributes["m-4"] == MARKS[4]
            totals = client.get("/v1/metrics/totals?name=requests_total", headers=READ).json()
            assert [t["labels"] for t in totals] == [MARKS[2]]
    finally:
        service.stop()


# -- any JSON a producer may send, in every free-form place ---------------------------------

_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]),  # JSON text is UTF-8: no lone surrogates
    max_size=12,
)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_text, inner, max_size=3)
        | st.sampled_from(MARKS)
    ),
    max_leaves=12,
)
_key = _text.filter(lambda k: 1 <= len(k) <= 64)
_attributes = st.dictionaries(
    _key,
    st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    max_size=6,
) | st.sampled_from([{k: str(v) for k, v in m.items()} for m in MARKS])
_labels = st.dictionaries(_key, _text, max_size=4) | st.sampled_from(MARKS[:1] + MARKS[2:])
_extra = st.dictionaries(st.sampled_from(["extra", "more", "_type_", "_data_"]), _json, max_size=2)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _in_view(value: Any) -> Any:
    """What a jsonb column holds of a value: NUL characters become U+FFFD (it has none)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_in_view(k): _in_view(v) for k, v in value.items()}
    return value


@pytest.fixture
def running(pg_schema: str) -> Iterator[tuple[Settings, EventStore, TestClient]]:
    settings = make_settings("nats://unused", pg_schema, api_tokens=TOKENS, projections_poll_s=0.1)
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    service = ProjectionService(as_role(settings, "projector"))
    service.start()
    with TestClient(create_app(as_role(settings, "api"))) as client:
        yield settings, store, client
    service.stop()
    store.close()


def _accept(domain: Domain, body: bytes, seq: int) -> Accepted:
    subjects = Subjects()
    source = "api" if domain is Domain.METRICS else "door-7"
    subject = subjects.subject(domain, 1, source)
    decoded = decode(subjects, domain, subject, body, max_bytes=1 << 20)
    return Accepted(
        domain=domain,
        message_id=decoded.message_id,
        subject=subject,
        stream_seq=seq,
        schema_version=decoded.schema_version,
        received_at=datetime.now(UTC),
        payload=decoded.payload,
    )


@hypothesis_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(attributes=_attributes, labels=_labels, extra=_extra)
def test_any_json_in_a_free_form_place_reads_back_equal(
    running: tuple[Settings, EventStore, TestClient],
    pg_schema: str,
    attributes: dict[str, Any],
    labels: dict[str, str],
    extra: dict[str, Any],
) -> None:
    _, store, client = running
    if any(_depth(v) > MAX_DEPTH for v in extra.values()):
        extra = {}
    tag = uuid.uuid4().hex
    security = _accept(Domain.SECURITY, security_body(f"s-{tag}", attributes=attributes), 1)
    metrics = _accept(Domain.METRICS, _metrics_body(f"m-{tag}", labels), 2)
    newer = _accept(Domain.SECURITY, _newer_minor_body(f"n-{tag}", extra), 3)
    written = store.write([security, metrics, newer])
    assert len(written.stored) == 3, written

    # The event reader.
    reader = EventReader(pg_schema)
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        for accepted in (security, metrics, newer):
            found = reader.get(conn, accepted.event_id)
            assert found is not None
            assert found.event.payload == accepted.payload
    assert security.payload["attributes"] == attributes
    assert metrics.payload["samples"][0]["labels"] == labels
    assert all(newer.payload[k] == v for k, v in extra.items())

    # The API's events, as sent.
    for accepted, sent in ((security, attributes), (newer, extra)):
        answer = client.get(f"/v1/events/{accepted.message_id}", headers=READ)
        assert answer.status_code == 200, answer.text
        payload = answer.json()["payload"]
        assert payload == accepted.payload
        if accepted is security:
            assert payload["attributes"] == sent
    # The views, through the API.
    asyncio.run(wait_until(lambda: views_current(pg_schema), timeout_s=30))
    rows = client.get("/v1/security/events?limit=1000", headers=READ).json()["items"]
    by_id = {r["message_id"]: r for r in rows}
    assert by_id[security.message_id]["attributes"] == attributes
    assert by_id[newer.message_id]["attributes"] == {"badge": "B1234"}
    totals = client.get("/v1/metrics/totals?name=requests_total", headers=READ).json()
    assert _in_view(labels) in [t["labels"] for t in totals]
    status = client.get("/v1/projections", headers=READ).json()
    assert {v["state"] for v in status} == {"running"}


async def test_projections_status_answers_whatever_a_view_is_stuck_on(pg_schema: str) -> None:
    """An event no reader can decode (written around the pipeline) stalls the views that
    read it; the status still answers, with the stall."""
    settings = make_settings("nats://unused", pg_schema, api_tokens=TOKENS, projections_poll_s=0.1)
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    store.write([_accept(Domain.SECURITY, security_body("before"), 1)])
    topic = "pipeline.store.domain:SecurityEvent.Recorded"
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        conn.execute(
            f'INSERT INTO "{pg_schema}".journal_events (originator_id, originator_version, '
            "topic, state) VALUES (%s, 1, %s, %s)",
            (uuid.uuid4(), topic, b'{"timestamp": not json'),
        )
    service = ProjectionService(as_role(settings, "projector"))
    service.start()
    try:
        await wait_until(
            lambda: positions(pg_schema).get("security", (0, ""))[1] == "stalled", timeout_s=30
        )
        with TestClient(create_app(as_role(settings, "api"))) as client:
            answer = client.get("/v1/projections", headers=READ)
            assert answer.status_code == 200, answer.text
            security = next(v for v in answer.json() if v["view"] == "security")
            assert security["state"] == "stalled"
            assert security["stalled_at"] == security["position"] + 1
            assert security["lag_events"] == 1
    finally:
        service.stop()
        store.close()
