"""Helpers for integration tests: reading the event store and the DLQ directly."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import psycopg

from pipeline.store.domain import event_id
from schemas import Domain

from ..conftest import PG_DB, PG_HOST


def stored_rows(schema: str) -> list[tuple[uuid.UUID, int, str, dict[str, Any]]]:
    """(originator_id, version, topic, state) of every stored event."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        rows = conn.execute(
            f'SELECT originator_id, originator_version, topic, state FROM "{schema}".journal_events'
        ).fetchall()
    return [(r[0], r[1], r[2], json.loads(bytes(r[3]))) for r in rows]


def stored_ids(schema: str) -> Counter[uuid.UUID]:
    """How many stored events each id has (1 everywhere when nothing is duplicated)."""
    try:
        return Counter(row[0] for row in stored_rows(schema))
    except psycopg.errors.UndefinedTable:  # no worker has created it yet
        return Counter()


def ids_of(domain: Domain, message_ids: list[str]) -> set[uuid.UUID]:
    """Stored event ids of the given message ids."""
    return {event_id(domain, m) for m in message_ids}


def security_body(message_id: str, **changes: Any) -> bytes:
    """A valid v1 security event."""
    body = {
        "id": message_id,
        "source": "door-7",
        "occurred_at": "2026-11-27T10:00:00+01:00",
        "kind": "door.forced",
        "severity": "high",
        "zone": "north",
        "attributes": {"badge": "B1234"},
        **changes,
    }
    return json.dumps(body).encode()
