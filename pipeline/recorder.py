"""A Postgres application recorder that inserts a batch as four column arrays.

The stock recorder sends a batch as an array of a composite type, which psycopg
renders row by row in Python. Sending one array per column (`unnest` of uuid[],
bigint[], text[], bytea[]) does the same insert, under the same table lock and
notification, several times faster for large batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

__all__ = ["ColumnarRecorder"]


class ColumnarRecorder(PostgresApplicationRecorder):
    """`PostgresApplicationRecorder` with a columnar batch insert."""

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        self._insert_columns = SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[]) "
            "RETURNING notification_id"
        ).format(Identifier(datastore.schema), Identifier(events_table_name))

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **_: Any
    ) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(
            self._insert_columns,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
            prepare=True,
            binary=True,  # binary arrays need no per-element escaping
        )
