"""Stored payloads keep their version and are upcast when read: old events read as new."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from pipeline.settings import EVENT_DOMAINS
from pipeline.store.domain import SecurityEvent, aggregate_class, event_id, topics_of
from pipeline.store.eventstore import Accepted, EventStore
from pipeline.store.reader import EventReader
from schemas import SCHEMAS, Domain

from ..conftest import PG_DB, PG_HOST, make_settings

PAYLOAD = {
    "source": "door-7",
    "occurred_at": "2026-11-27T09:00:00Z",
    "kind": "door.forced",
    "severity": "high",
    "zone": "north",
    "location": None,
    "attributes": {"badge": "B1"},
}


@pytest.fixture
def store(pg_schema: str) -> Iterator[EventStore]:
    event_store = EventStore(make_settings("nats://unused", pg_schema).eventsourcing_env())
    yield event_store
    event_store.close()


def _insert_v1(schema: str, message_id: str) -> uuid.UUID:
    """A security event as the first payload version stored it (the message whole)."""
    originator_id = event_id(Domain.SECURITY, message_id)
    state = {
        "timestamp": {"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:01+00:00"},
        "originator_topic": "pipeline.domain:SecurityEvent",
        "message_id": message_id,
        "subject": "security.v1.door-7",
        "stream_seq": 1,
        "schema_version": "1.0",
        "payload": {"id": message_id, "schema_version": "1.0", **PAYLOAD},
    }
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".journal_events '
            "(originator_id, originator_version, topic, state) VALUES (%s, 1, %s, %s)",
            (originator_id, "pipeline.domain:SecurityEvent.Recorded", json.dumps(state).encode()),
        )
    return originator_id


def _store_v2(store: EventStore, message_id: str) -> uuid.UUID:
    accepted = Accepted(
        domain=Domain.SECURITY,
        message_id=message_id,
        subject="security.v1.door-7",
        stream_seq=2,
        schema_version="1.1",
        received_at=datetime.now(UTC),
        payload=dict(PAYLOAD),
    )
    assert store.write([accepted]).stored == {accepted.event_id}
    return accepted.event_id


def _read(store: EventStore, originator_id: uuid.UUID) -> Any:
    [event] = store.journal.events.get(originator_id)
    return event


def _state(schema: str, originator_id: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        row = conn.execute(
            f'SELECT state FROM "{schema}".journal_events WHERE originator_id = %s',
            (originator_id,),
        ).fetchone()
    assert row is not None
    result: dict[str, Any] = json.loads(bytes(row[0]))
    return result


def test_events_record_their_payload_version_and_the_version_the_producer_sent(
    store: EventStore, pg_schema: str
) -> None:
    state = _state(pg_schema, _store_v2(store, "m-2"))
    assert state["class_version"] == 2
    assert state["schema_version"] == "1.1"
    assert "id" not in state["payload"] and "schema_version" not in state["payload"]
    for domain in EVENT_DOMAINS:  # every JSON domain's payload version is 2
        assert aggregate_class(domain).Recorded.class_version == 2


def test_a_v1_event_reads_as_the_current_payload(store: EventStore, pg_schema: str) -> None:
    old = _read(store, _insert_v1(pg_schema, "m-1"))
    new = _read(store, _store_v2(store, "m-2"))
    assert type(old) is SecurityEvent.Recorded
    assert old.payload == new.payload == PAYLOAD
    assert SCHEMAS[Domain.SECURITY].read(old.payload) == SCHEMAS[Domain.SECURITY].read(PAYLOAD)
    assert (old.message_id, new.message_id) == ("m-1", "m-2")


def test_a_version_added_later_reads_every_stored_v1_and_v2_event(
    store: EventStore, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = _insert_v1(pg_schema, "m-1")
    v2 = _store_v2(store, "m-2")

    def upcast_v2_v3(state: dict[str, Any]) -> None:  # v3 splits the zone into site and area
        payload = state["payload"]
        site, _, area = (payload.pop("zone") or "").partition("/")
        state["payload"] = {**payload, "site": site or "main", "area": area or None}

    monkeypatch.setattr(SecurityEvent.Recorded, "class_version", 3)
    monkeypatch.setattr(
        SecurityEvent.Recorded, "upcast_v2_v3", staticmethod(upcast_v2_v3), raising=False
    )
    expected = {k: v for k, v in PAYLOAD.items() if k != "zone"} | {"site": "north", "area": None}
    assert _read(store, v1).payload == expected
    assert _read(store, v2).payload == expected
    assert [e.payload for e in _read_all(pg_schema)] == [expected, expected]


def _read_all(schema: str) -> list[Any]:
    """Every stored event, as the read side reads them (EventReader)."""
    reader = EventReader(schema)
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
        rows = reader.rows(conn, 0, reader.head(conn), topics_of(SecurityEvent.Recorded), 100)
    return [p.event for p in reader.decode(rows)]


def test_the_read_side_decodes_events_as_the_event_store_does(
    store: EventStore, pg_schema: str
) -> None:
    ids = [_insert_v1(pg_schema, "m-1"), _store_v2(store, "m-2")]
    ids.append(_store_v2(store, "m-3\x00 \u2603"))
    read = _read_all(pg_schema)
    assert [e.originator_id for e in read] == ids
    for event, originator_id in zip(read, ids, strict=True):
        stored = _read(store, originator_id)  # through the Journal's mapper
        assert type(event) is type(stored)
        assert event.__dict__ == stored.__dict__
