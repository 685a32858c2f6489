"""The audit trail's tables, and the trigger that keeps them and the event table append-only.

- `audit_leaves`: one row per logged event, in store order. `idx` is the leaf's index in
  the Merkle tree, `position` the event's position in the store, `hashes` the leaf hash
  followed by the hashes of the complete subtrees this leaf completes (see `merkle`).
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

__all__ = ["BREAK_GLASS", "AuditTables"]

BREAK_GLASS = "pipeline.break_glass"
"""The setting (`SET LOCAL pipeline.break_glass = 'on'`) that lets an owner change a row."""

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
        """Make the tables, the trigger function and the triggers where missing."""
        statements = [
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (idx bigint PRIMARY KEY, "
                "position bigint NOT NULL UNIQUE, hashes bytea NOT NULL)"
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
