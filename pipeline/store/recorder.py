"""A Postgres application recorder that stores a batch of new events in one statement.

`insert_new` calls a database function that takes the same EXCLUSIVE table lock as the
stock recorder (so notification ids commit in order), notifies listeners, and inserts
only the rows whose id is not stored yet, returning the ids it stored. Because every
writer takes that lock first, the existence check and the insert cannot be raced by
another worker. The whole transaction is a single statement: no client round trip
happens while the table lock is held. The same statement also reports which of the
ids a cache believed stored (`confirm`) the table does hold, so a cache is never
believed on its own word. A lock wait longer than the datastore's `lock_timeout` fails
the statement (a transient error: the caller tries again later).

Ids and states travel as one bytea each (the states with the start and length of each
one) and topics as indexes into the few distinct names: psycopg renders a list element
by element in Python, several times slower than one buffer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from itertools import accumulate

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

__all__ = ["ColumnarRecorder"]


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


class ColumnarRecorder(PostgresApplicationRecorder):
    """`PostgresApplicationRecorder` plus a deduplicating batch insert."""

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(datastore.schema)
        table = Identifier(events_table_name)
        function = Identifier(f"{events_table_name}_insert_new")
        # The earlier signature (without `confirm`) is replaced.
        self.sql_create_statements.append(
            SQL(
                "DROP FUNCTION IF EXISTS {schema}.{function}("
                "bytea, bigint[], text[], int[], bytea, int[], int[])"
            ).format(schema=schema, function=function)
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}("
                "ids bytea, versions bigint[], topic_names text[], topic_idx int[], "
                "states bytea, starts int[], lengths int[], confirm uuid[]) "
                "RETURNS TABLE (id uuid, inserted boolean) LANGUAGE plpgsql AS $BODY$ "
                "BEGIN "
                "SET LOCAL lock_timeout = '{lock_timeout}s'; "
                "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY "
                "INSERT INTO {schema}.{table} AS t "
                "(originator_id, originator_version, topic, state) "
                "SELECT b.i, b.v, topic_names[b.ti], substring(states FROM b.st FOR b.ln) "
                "FROM (SELECT "
                "encode(substring(ids FROM (u.n * 16 - 15)::int FOR 16), 'hex')::uuid AS i, "
                "u.v, u.ti, u.st, u.ln, u.n FROM unnest(versions, topic_idx, starts, lengths) "
                "WITH ORDINALITY AS u(v, ti, st, ln, n)) AS b "
                "WHERE NOT EXISTS (SELECT 1 FROM {schema}.{table} e "
                "WHERE e.originator_id = b.i AND e.originator_version = b.v) "
                # In the batch's order: PostgreSQL 16 and later may answer the anti-join
                # in hash order, and positions are given as the rows come.
                "ORDER BY b.n "
                "RETURNING t.originator_id, true; "
                "RETURN QUERY SELECT c.originator_id, false FROM {schema}.{table} c "
                "WHERE c.originator_id = ANY(confirm) AND c.originator_version = 1; "
                "END; $BODY$"
            ).format(
                schema=schema,
                table=table,
                function=function,
                lock_timeout=datastore.lock_timeout,
                channel=Identifier(self.channel_name),
            )
        )
        self._call_insert_new = SQL("SELECT * FROM {}.{}(%s, %s, %s, %s, %s, %s, %s, %s)").format(
            schema, function
        )

    def create_table(self) -> None:
        """Create the table, types and functions; workers starting together take turns."""
        # "IF NOT EXISTS" alone races in PostgreSQL, so a session advisory lock, held on
        # a connection of its own, makes concurrent creators wait for the first.
        pool = self.datastore.pool
        name = f"{self.datastore.schema}.{self.events_table_name}"
        conninfo = pool.conninfo if isinstance(pool.conninfo, str) else pool.conninfo()
        kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs or {}
        with psycopg.connect(conninfo, **kwargs) as conn:
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
            try:
                super().create_table()
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))

    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def insert_new(
        self, stored_events: Sequence[StoredEvent], confirm: Sequence[uuid.UUID] = ()
    ) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
        """Insert the events not stored yet, in one transaction.

        Returns the ids inserted, and those of `confirm` that the table holds.
        """
        # Few distinct topics: each row carries the 1-based index of its topic.
        topics: dict[str, int] = {}
        for e in stored_events:
            topics.setdefault(e.topic, len(topics) + 1)
        lengths = [len(e.state) for e in stored_events]
        starts = [
            end - length + 1 for end, length in zip(accumulate(lengths), lengths, strict=True)
        ]
        # Tuples, not the datastore's dict rows: one row per event comes back.
        with (
            self.datastore.get_connection() as conn,
            conn.cursor(binary=True, row_factory=tuple_row) as curs,
        ):
            curs.execute(
                self._call_insert_new,
                (
                    b"".join(_uuid(e.originator_id).bytes for e in stored_events),
                    [e.originator_version for e in stored_events],
                    list(topics),
                    [topics[e.topic] for e in stored_events],
                    b"".join(e.state for e in stored_events),
                    starts,
                    lengths,
                    list(confirm),
                ),
                prepare=True,
            )
            rows = curs.fetchall()
            inserted = {event_id for event_id, new in rows if new}
            present = {event_id for event_id, new in rows if not new} if confirm else set()
            return inserted, present
