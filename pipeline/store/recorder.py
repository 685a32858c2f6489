"""A Postgres application recorder that stores a batch of new events in one statement.

`insert_new` calls a database function that serialises the writers of the event table,
notifies listeners, and inserts only the rows whose id is not stored yet, returning the
ids it stored. Writers take turns on a transaction-level advisory lock keyed by the
table (`order_lock`), held until the commit, so notification ids commit in the order
they are drawn: a reader that has seen position N never later finds a new event below
N. Because every writer takes that lock first, the existence check and the insert
cannot be raced by another worker either. The whole transaction is a single
statement: no client round trip happens while the lock is held. The same statement
also reports which of the ids a cache believed stored (`confirm`) the table does hold,
so a cache is never believed on its own word. A lock wait longer than the datastore's
`lock_timeout` fails the statement (a transient error: the caller tries again later).

Why not the EXCLUSIVE table lock of the stock recorder: it conflicts with the SHARE
UPDATE EXCLUSIVE lock of VACUUM and ANALYZE. An anti-wraparound autovacuum, or a
manual `VACUUM (FREEZE)`, does not give way, so every writer would wait for as long as
it runs; the advisory lock does not conflict with any table lock. An inserter still
takes ROW EXCLUSIVE on the table, which conflicts with EXCLUSIVE: a writer running an
earlier definition of the function (LOCK TABLE ... IN EXCLUSIVE MODE) excludes, and is
excluded by, every writer running this one, so the two kinds together still commit
positions in order.

Ids and states travel as one bytea each (the states with the start and length of each
one) and topics as indexes into the few distinct names: psycopg renders a list element
by element in Python, several times slower than one buffer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Composed, Identifier, Literal

__all__ = ["ORDER_LOCK_SPACE", "ColumnarRecorder", "commit_channel", "order_lock"]

ORDER_LOCK_SPACE = 0x65766E74
"""First key of the writers' advisory lock (b"evnt"); the second is the table's oid."""


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


def commit_channel(schema: str, table: str) -> str:
    """The channel each commit to `schema.table` notifies: one per schema, as PostgreSQL's
    channels are the database's, and followers of one schema need not wake for another's
    commits. At most 63 bytes, as `pg_notify` takes (a longer name is cut short)."""
    name = f"{schema}.{table}".encode()
    return name[:63].decode(errors="ignore")


def order_lock(schema: str, table: str) -> Composed:
    """The PL/pgSQL statement every writer of `schema.table` runs before it inserts, in the
    inserting transaction: positions then commit in the order they are drawn."""
    # Two int4 keys: a keyspace apart from the one-bigint keys of `pg_advisory_lock`
    # (taken elsewhere on hashtext of the same name, e.g. by `create_table`).
    return SQL("PERFORM pg_catalog.pg_advisory_xact_lock({}, {}::regclass::oid::int)").format(
        Literal(ORDER_LOCK_SPACE),
        Literal(SQL("{}.{}").format(Identifier(schema), Identifier(table)).as_string(None)),
    )


class ColumnarRecorder(PostgresApplicationRecorder):
    """`PostgresApplicationRecorder` plus a deduplicating batch insert."""

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self.channel_name = commit_channel(datastore.schema, events_table_name)
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
                "RETURNS TABLE (id uuid, inserted boolean) LANGUAGE plpgsql "
                # In the same statement as the body: a replaced function never runs, even
                # for a moment, with the rights of a writer (which may not insert).
                "SECURITY DEFINER SET search_path = pg_catalog, pg_temp "
                # The statements' plans are cached for the session. One made while the
                # table was small hashes the whole table in every call ever after:
                # index probes only, whatever the table's size was when it was planned.
                "SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off "
                "SET plan_cache_mode = force_generic_plan "
                "AS $BODY$ "
                "BEGIN "
                "SET LOCAL lock_timeout = '{lock_timeout}s'; "
                "{order_lock}; "
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
                order_lock=order_lock(datastore.schema, events_table_name),
                channel=Identifier(self.channel_name),
            )
        )
        self.call_insert_new = SQL("SELECT * FROM {}.{}(%s, %s, %s, %s, %s, %s, %s, %s)").format(
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

    def _create_table(self, curs: Cursor[DictRow]) -> None:
        """Run the create statements, less an index that exists already.

        `CREATE INDEX IF NOT EXISTS` takes the table's SHARE lock before it looks: behind
        a running VACUUM it would wait, and every writer would wait behind it, so a
        migration of a store in use would pause writing for as long as the vacuum runs.
        """
        index = SQL("{}.{}").format(
            Identifier(self.datastore.schema), Identifier(self.notification_id_index_name)
        )
        curs.execute("SELECT to_regclass(%s) IS NOT NULL AS found", (index.as_string(None),))
        row = curs.fetchone()
        skip = "CREATE UNIQUE INDEX IF NOT EXISTS" if row and row["found"] else "CREATE TYPE"
        for statement in self.sql_create_statements:
            text = statement.as_string()
            if "CREATE TYPE" not in text and not text.startswith(skip):
                curs.execute(statement, prepare=False)

    @staticmethod
    def arguments(
        stored_events: Sequence[StoredEvent], confirm: Sequence[uuid.UUID]
    ) -> tuple[Any, ...]:
        """The arguments of `call_insert_new` for these events."""
        # Few distinct topics: each row carries the 1-based index of its topic.
        topics: dict[str, int] = {}
        for e in stored_events:
            topics.setdefault(e.topic, len(topics) + 1)
        lengths = [len(e.state) for e in stored_events]
        starts = [
            end - length + 1 for end, length in zip(accumulate(lengths), lengths, strict=True)
        ]
        return (
            b"".join(_uuid(e.originator_id).bytes for e in stored_events),
            [e.originator_version for e in stored_events],
            list(topics),
            [topics[e.topic] for e in stored_events],
            b"".join(e.state for e in stored_events),
            starts,
            lengths,
            list(confirm),
        )

    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def insert_new(
        self, stored_events: Sequence[StoredEvent], confirm: Sequence[uuid.UUID] = ()
    ) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
        """Insert the events not stored yet, in one transaction.

        Returns the ids inserted, and those of `confirm` that the table holds.
        """
        # Tuples, not the datastore's dict rows: one row per event comes back.
        with (
            self.datastore.get_connection() as conn,
            conn.cursor(binary=True, row_factory=tuple_row) as curs,
        ):
            curs.execute(self.call_insert_new, self.arguments(stored_events, confirm), prepare=True)
            rows = curs.fetchall()
            inserted = {event_id for event_id, new in rows if new}
            present = {event_id for event_id, new in rows if not new} if confirm else set()
            return inserted, present
