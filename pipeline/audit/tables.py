"""The audit trail's tables, and the trigger that keeps them and the event table append-only.

- `audit_leaves`: the log, one row per run of leaves appended together (at most
  `ROW_LEAVES`), in store order. `idx` is the index in the Merkle tree of the run's first
  leaf and `position` that event's position in the store; `positions` holds the
  position of each leaf of the run (8 bytes each, big-endian) and `hashes` each leaf's
  stored hashes, end to end: the leaf hash followed by the hashes of the complete
  subtrees that leaf completes (`merkle.node_row`). Leaf i's hashes start
  `merkle.stored_offset(i) - merkle.stored_offset(idx)` hashes into its run's, so a node
  is read with one index lookup and a `substring` (the columns are stored uncompressed
  so that reads only the part it needs). A row per run rather than per leaf makes the
  follower's writes several times cheaper beside the writers.
- `audit_checkpoints`: every signed checkpoint (a C2SP signed note), by tree size.
- `audit_cosignatures`: witnesses' cosignature lines, by checkpoint size and key.
- `audit_break_glass`: who changed an append-only table with the break-glass setting on.

UPDATE, DELETE and TRUNCATE are granted to no runtime role, and a statement trigger
refuses them to everyone else too (the owner included) unless the transaction has set
`pipeline.break_glass = 'on'`; each such statement is then recorded in
`audit_break_glass` and in the server's log. A superuser can still disable the trigger
or drop a table: the signed checkpoints, kept outside the database as well, are what
reveals that (`pipeline audit verify`).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.sql import SQL, Composed, Identifier

from ..store.reader import EVENTS_TABLE

__all__ = ["BREAK_GLASS", "ROW_LEAVES", "AuditTables"]

BREAK_GLASS = "pipeline.break_glass"
"""The setting (`SET LOCAL pipeline.break_glass = 'on'`) that lets an owner change a row."""

ROW_LEAVES = 1024
"""The most leaves one row of `audit_leaves` holds (a batch larger is split)."""

_TRIGGER = "append_only"


class AuditTables:
    """The qualified names of the audit tables of one schema, and their DDL."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        s = Identifier(schema)
        self.events: Composed = SQL("{}.{}").format(s, Identifier(EVENTS_TABLE))
        self.leaves: Composed = SQL("{}.audit_leaves").format(s)
        self.checkpoints: Composed = SQL("{}.audit_checkpoints").format(s)
        self.cosignatures: Composed = SQL("{}.audit_cosignatures").format(s)
        self.break_glass: Composed = SQL("{}.audit_break_glass").format(s)
        self.function: Composed = SQL("{}.audit_append_only").format(s)

    def append_only(self) -> list[Composed]:
        """Every table kept append-only: the events and the audit tables."""
        return [self.events, self.leaves, self.checkpoints, self.cosignatures, self.break_glass]

    def create(self, conn: psycopg.Connection[Any]) -> None:
        """Make the tables, the trigger function and the triggers where missing (and the
        log of an earlier release, a row per leaf, into runs)."""
        earlier = self._per_leaf(conn)
        if earlier is not None:
            conn.execute(SQL("ALTER TABLE {} RENAME TO {}").format(self.leaves, earlier[1]))
        statements = [
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (idx bigint PRIMARY KEY, "
                "position bigint NOT NULL UNIQUE, positions bytea NOT NULL, "
                "hashes bytea NOT NULL)"
            ).format(self.leaves),
            SQL(
                "ALTER TABLE {} ALTER positions SET STORAGE EXTERNAL, "
                "ALTER hashes SET STORAGE EXTERNAL"
            ).format(self.leaves),
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (size bigint PRIMARY KEY, root bytea NOT NULL, "
                "note bytea NOT NULL, signed_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(self.checkpoints),
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (size bigint NOT NULL REFERENCES {} (size), "
                "key_name text NOT NULL, key_id bytea NOT NULL, line text NOT NULL, "
                "received_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
                "PRIMARY KEY (size, key_name, key_id))"
            ).format(self.cosignatures, self.checkpoints),
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (at timestamptz NOT NULL DEFAULT clock_timestamp(), "
                "by_role name NOT NULL DEFAULT session_user, table_name name NOT NULL, "
                "operation text NOT NULL)"
            ).format(self.break_glass),
            SQL(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN "
                "IF coalesce(current_setting('{setting}', true), '') = 'on' THEN "
                "RAISE WARNING 'break-glass: % on %.% by %', TG_OP, TG_TABLE_SCHEMA, "
                "TG_TABLE_NAME, session_user; "
                "INSERT INTO {log} (table_name, operation) VALUES (TG_TABLE_NAME, TG_OP); "
                "RETURN NULL; "
                "END IF; "
                "RAISE EXCEPTION '%.% is append-only: % refused', TG_TABLE_SCHEMA, "
                "TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege', "
                "HINT = 'the audit trail keeps every stored event; to change one anyway, "
                "SET LOCAL {setting} = ''on'' in the transaction (it is logged)'; "
                "END $$"
            ).format(function=self.function, setting=SQL(BREAK_GLASS), log=self.break_glass),
        ]
        for table in self.append_only():
            statements.append(
                SQL(
                    "CREATE OR REPLACE TRIGGER {} BEFORE UPDATE OR DELETE OR TRUNCATE ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {}()"
                ).format(Identifier(_TRIGGER), table, self.function)
            )
        for statement in statements:
            conn.execute(statement)
        if earlier is not None:
            conn.execute(
                SQL(
                    "INSERT INTO {} (idx, position, positions, hashes) "
                    "SELECT min(idx), min(position), "
                    "string_agg(int8send(position), ''::bytea ORDER BY idx), "
                    "string_agg(hashes, ''::bytea ORDER BY idx) FROM {} GROUP BY idx / %s"
                ).format(self.leaves, earlier[0]),
                (ROW_LEAVES,),
            )
            conn.execute(SQL("DROP TABLE {}").format(earlier[0]))

    def _per_leaf(self, conn: psycopg.Connection[Any]) -> tuple[Composed, Identifier] | None:
        """An earlier release's log (a row per leaf) to convert: (its name once renamed,
        that name unqualified), or None."""
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE column_name = 'hashes'), "
            "count(*) FILTER (WHERE column_name = 'positions') "
            "FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'audit_leaves'",
            (self.schema,),
        ).fetchone()
        if not row or not row[0] or row[1]:
            return None
        name = Identifier("audit_leaves_per_leaf")
        return SQL("{}.{}").format(Identifier(self.schema), name), name
