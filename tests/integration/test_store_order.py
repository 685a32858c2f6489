"""A batch is stored in its own order: positions follow the messages as they were pulled."""

from __future__ import annotations

import random

import psycopg

from pipeline.store.domain import event_id
from pipeline.store.eventstore import EventStore
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, PG_PORT, make_settings
from .incidents import T0, security


def test_positions_follow_the_batch_order(pg_schema: str) -> None:
    """Also where PostgreSQL (16 and later) would answer the insert's anti-join in hash
    order: the rows are inserted in the batch's order, and positions given as they come."""
    store = EventStore(make_settings("nats://unused", pg_schema).eventsourcing_env())
    names = [f"m-{i}" for i in range(300)]
    random.Random(3).shuffle(names)
    try:
        # Some stored first, so the insert skips ids already there, as it does in use.
        store.write([security(n, T0, "door.opened", "info", "door-1", T0) for n in names[::7]])
        store.write([security(n, T0, "door.opened", "info", "door-1", T0) for n in names])
    finally:
        store.close()
    with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DB, user="postgres") as conn:
        stored = [
            row[0]
            for row in conn.execute(
                f'SELECT originator_id FROM "{pg_schema}".journal_events ORDER BY notification_id'
            )
        ]
    first = [event_id(Domain.SECURITY, n) for n in names[::7]]
    rest = [event_id(Domain.SECURITY, n) for n in names if n not in set(names[::7])]
    assert stored == first + rest
