"""`pipeline db migrate`: the store's tables, functions and roles, made by the owner.

Run as the database's owner (a superuser, or a role that may create roles and is a
member of those it made), before the processes start and after each upgrade; it is
idempotent. Every process then connects as a role holding only what it needs:

- `<prefix>_writer` (workers, replay): inserts events through the store's function and
  reads them (dedup); no direct insert, no update, delete, truncate or DDL.
- `<prefix>_projector` (projections, the incident process): reads events; owns the views
  and their positions (a rebuild makes and swaps tables); appends the incident process's
  decisions to `incident_events`; writes no event.
- `<prefix>_api` (query API): reads events, views and positions; records a skip
  (`operate`) and an operator's acknowledgement or resolution of an incident
  (`incident_actions`); writes no event or view row, no DDL.
- `<prefix>_auditor` (the audit trail): reads events; appends to the audit log and its
  checkpoints.

The event table, the audit tables and the incident logs are append-only: no role is
granted UPDATE, DELETE or TRUNCATE on them, and a trigger refuses those to the owner
too (see `pipeline/audit/tables.py` for the logged break-glass setting).

The event table's vacuum settings (`EVENTS_STORAGE`) suit an insert-only table: a
vacuum every `autovacuum_vacuum_insert_threshold` new rows, whatever the table's size,
freezes the pages it scans, so an anti-wraparound vacuum finds them frozen already;
and no vacuum ends by truncating the table (which takes ACCESS EXCLUSIVE, a lock even
readers wait for). Writers do not wait for a vacuum at all (see
`pipeline/store/recorder.py`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier, Literal

from projections import VIEWS
from projections.incidents.tables import IncidentTables
from projections.positions import Positions

from ..audit.tables import AuditTables
from ..settings import Settings
from ..store.eventstore import EventStore
from ..store.reader import EVENTS_TABLE

__all__ = ["EVENTS_STORAGE", "ROLES", "Migrated", "migrate"]

log = logging.getLogger(__name__)

ROLES = ("writer", "projector", "api", "auditor")

EVENTS_STORAGE = {
    # Vacuumed every 100,000 inserted rows rather than every fifth of the table's size:
    # each run's work stays small as the store grows.
    "autovacuum_vacuum_insert_threshold": "100000",
    "autovacuum_vacuum_insert_scale_factor": "0",
    # Frozen as soon as vacuumed: an insert-only table's rows never change again.
    "autovacuum_freeze_min_age": "0",
    # No truncation at the end of a vacuum (an append-only table has no empty tail).
    "vacuum_truncate": "false",
}
"""Storage parameters of the event table, set (where they differ) by `migrate`."""

DDL_WAIT = "2s"
"""How long `migrate`'s DDL waits for a lock (writers may wait behind it) before it
tries again."""


@dataclass(frozen=True)
class Migrated:
    """What `migrate` made: the schema and the role of each kind."""

    schema: str
    roles: dict[str, str]

    def __str__(self) -> str:
        roles = ", ".join(f"{kind} {name}" for kind, name in self.roles.items())
        return f"schema {self.schema}: events, views' positions and roles ({roles}) ready"


def migrate(settings: Settings) -> Migrated:
    """Make (or bring up to date) the schema, the event table and its insert function,
    the positions tables and the roles with their grants."""
    schema = settings.postgres_schema
    roles = {kind: settings.postgres_role(kind) for kind in ROLES}  # type: ignore[arg-type]
    passwords = {
        "writer": settings.postgres_writer_password,
        "projector": settings.postgres_projector_password,
        "api": settings.postgres_api_password,
        "auditor": settings.postgres_auditor_password,
    }
    with psycopg.connect(**settings.postgres_connection(), autocommit=True) as conn:
        # Two migrations at once (two Helm releases, a rerun) take turns.
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"migrate:{schema}",))
        conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))
        for kind, name in roles.items():
            _role(conn, name, passwords[kind])
        # The event table and its insert function, as eventsourcing makes them.
        EventStore(settings.eventsourcing_env(create_table=True)).close()
        while True:
            # The append-only trigger's DDL takes a lock on the event table that waits for
            # a running VACUUM, and every writer would wait behind it: first let the
            # vacuum end, then wait for any other lock only briefly, and try again.
            _no_vacuum(conn, schema)
            try:
                _storage(conn, schema)
                with conn.transaction():
                    conn.execute(SQL("SET LOCAL lock_timeout = {}").format(Literal(DDL_WAIT)))
                    Positions(schema).create(conn)
                    AuditTables(schema).create(conn)
                    IncidentTables(schema).create_logs(conn)
                    _grant(conn, schema, roles)
                break
            except psycopg.errors.LockNotAvailable as exc:
                log.info("migrating schema %s: %s; trying again", schema, exc)
    log.info("migrated schema %s", schema)
    return Migrated(schema, roles)


def _no_vacuum(conn: psycopg.Connection[Any], schema: str) -> None:
    """Return once no VACUUM of the event table runs (as far as this role can see)."""
    events = SQL("{}.{}").format(Identifier(schema), Identifier(EVENTS_TABLE)).as_string(conn)
    logged = False
    while True:
        row = conn.execute(
            "SELECT pid FROM pg_stat_progress_vacuum WHERE relid = %s::regclass", (events,)
        ).fetchone()
        if row is None:
            return
        if not logged:
            log.info("waiting for the VACUUM of %s (pid %s) to end", events, row[0])
            logged = True
        time.sleep(1.0)


def _storage(conn: psycopg.Connection[Any], schema: str) -> None:
    """Set the event table's storage parameters that differ from `EVENTS_STORAGE`."""
    events = SQL("{}.{}").format(Identifier(schema), Identifier(EVENTS_TABLE))
    row = conn.execute(
        "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (events.as_string(conn),)
    ).fetchone()
    have = dict(o.split("=", 1) for o in (row[0] if row and row[0] else []))
    changed = {k: v for k, v in EVENTS_STORAGE.items() if have.get(k) != v}
    if changed:
        # Skipped when nothing differs: the ALTER waits for a running VACUUM to end.
        options = SQL(", ").join(
            SQL("{} = {}").format(SQL(k), Literal(v)) for k, v in changed.items()
        )
        conn.execute(SQL("ALTER TABLE {} SET ({})").format(events, options))


def _role(conn: psycopg.Connection[Any], name: str, password: str) -> None:
    """Create the login role `name` unless it exists; set its password when one is given."""
    found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    if found is None:
        # Made meanwhile by another database's migration: as good.
        with contextlib.suppress(psycopg.errors.DuplicateObject):
            conn.execute(SQL("CREATE ROLE {} LOGIN").format(Identifier(name)))
    if password:
        conn.execute(
            SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(Identifier(name), Literal(password))
        )


def _grant(conn: psycopg.Connection[Any], schema: str, roles: dict[str, str]) -> None:
    """Each role's rights on the schema, and nothing more."""
    s = Identifier(schema)
    events = SQL("{}.{}").format(s, Identifier(EVENTS_TABLE))
    writer, projector, api, auditor = (Identifier(roles[k]) for k in ROLES)
    positions = Positions(schema)
    insert = _signature(conn, schema)
    statements = [
        # The insert function runs with its owner's rights (it takes the writers' lock so
        # positions commit in order); writers call it and may not insert directly.
        SQL("ALTER FUNCTION {} SECURITY DEFINER SET search_path = pg_catalog, pg_temp").format(
            insert
        ),
        SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(insert),
        SQL("REVOKE ALL ON {} FROM PUBLIC").format(events),
        SQL("GRANT USAGE ON SCHEMA {} TO {}, {}, {}, {}").format(
            s, writer, projector, api, auditor
        ),
        SQL("GRANT SELECT ON {} TO {}, {}, {}, {}").format(events, writer, projector, api, auditor),
        SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(insert, writer),
        # The projector keeps the views: it makes their tables (and a rebuild's shadow
        # tables, which it swaps in), so it creates in the schema and owns the positions.
        SQL("GRANT CREATE ON SCHEMA {} TO {}").format(s, projector),
        SQL("ALTER TABLE {} OWNER TO {}").format(positions.table, projector),
        SQL("ALTER TABLE {} OWNER TO {}").format(positions.skips, projector),
        # The API reads every view, including tables a rebuild makes later.
        SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}"
        ).format(projector, s, api),
        SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, api),
        # `operate`: move a stalled view past an event, recorded in the skips.
        SQL("GRANT UPDATE ON {} TO {}").format(positions.table, api),
        SQL("GRANT INSERT ON {} TO {}").format(positions.skips, api),
    ]
    audit = AuditTables(schema)
    for audit_table in audit.append_only()[1:]:
        statements.append(SQL("REVOKE ALL ON {} FROM PUBLIC").format(audit_table))
    statements += [
        # The audit log's follower appends leaves and checkpoints; witnesses' cosignatures
        # arrive through the API.
        SQL("GRANT SELECT, INSERT ON {}, {} TO {}").format(
            audit.leaves, audit.checkpoints, auditor
        ),
        SQL("GRANT SELECT ON {} TO {}").format(audit.cosignatures, auditor),
        SQL("GRANT INSERT ON {} TO {}").format(audit.cosignatures, api),
    ]
    incidents = IncidentTables(schema)
    statements += [
        SQL("REVOKE ALL ON {}, {} FROM PUBLIC").format(incidents.events, incidents.actions),
        # The incident process appends its decisions and reads operators' actions; the
        # API appends operators' actions (and reads both, as every table).
        SQL("GRANT SELECT, INSERT ON {} TO {}").format(incidents.events, projector),
        SQL("GRANT SELECT ON {} TO {}").format(incidents.actions, projector),
        SQL("GRANT INSERT ON {} TO {}").format(incidents.actions, api),
    ]
    for log_table in (incidents.events, incidents.actions):
        statements.append(
            SQL(
                "CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
                "ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()"
            ).format(log_table, audit.function)
        )
    for statement in statements:
        conn.execute(statement)
    # Views made by an earlier release as another role become the projector's.
    for view in VIEWS.values():
        for table in view.tables:
            name = SQL("{}.{}").format(s, Identifier(table.name))
            found = conn.execute("SELECT to_regclass(%s)", (name.as_string(conn),)).fetchone()
            if found is not None and found[0] is not None:
                conn.execute(SQL("ALTER TABLE {} OWNER TO {}").format(name, projector))


def _signature(conn: psycopg.Connection[Any], schema: str) -> Any:
    """The insert function with its argument types, as ALTER and GRANT name it."""
    row = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = %s",
        (schema, f"{EVENTS_TABLE}_insert_new"),
    ).fetchone()
    assert row is not None, "the event store's insert function is missing"
    return SQL(str(row[0]))
