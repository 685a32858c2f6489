"""Incidents for the API: list and read them, and record an operator's acknowledgement or
resolution. Each function takes a connection (as the API role) and the store's schema,
and answers JSON-ready dicts (ids as strings, times in ISO 8601 with their offset).

An action is placed in store order where the incident process stands (`tables.py`):
the position row is read with a share lock, so the action commits before the process
moves on and is taken before any later event. One acknowledgement and one resolution
per incident: the second is refused (`IncidentStateError`), a retried request as well.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composable, Identifier

from pipeline.store.reader import EventReader

from ..positions import Positions
from ..queries import BadCursor, Page, decode_cursor, encode_cursor
from .record import COLUMNS, Incident, IncidentEvent, Kind, action_id
from .tables import POSITION_KEY, IncidentTables

__all__ = [
    "IncidentNotFound",
    "IncidentStateError",
    "acknowledge",
    "get_incident",
    "list_incidents",
    "page_incidents",
    "resolve",
]

STATES = ("open", "acknowledged", "resolved")
LEVELS = ("low", "medium", "high", "critical")


class IncidentNotFound(LookupError):
    """No incident has this id (or the incident process has not recorded it yet)."""


class IncidentStateError(Exception):
    """The action does not apply to the incident as it stands (already done)."""


def list_incidents(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    state: str | None = None,
    level: str | None = None,
    zone: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Incidents, those still open first, then by score and newest; filtered by state,
    level, zone and opening time (`since`, inclusive)."""
    return page_incidents(
        conn, schema, state=state, level=level, zone=zone, since=since, limit=limit
    ).items


_KEY = SQL("(state <> 'resolved', score, opened_at, incident_id)")
"""The list's order (all descending): unresolved first, by score, newest, then by id."""


def page_incidents(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    state: str | None = None,
    level: str | None = None,
    zone: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page:
    """One page of `list_incidents`, and the cursor of the next (a page's last key)."""
    tables = IncidentTables(schema)
    where: list[Composable] = []
    args: list[Any] = []
    for column, value in (("state", state), ("level", level), ("zone", zone)):
        if value is not None:
            where.append(SQL("{} = %s").format(Identifier(column)))
            args.append(value)
    if since is not None:
        where.append(SQL("opened_at >= %s"))
        args.append(since)
    if cursor is not None:
        where.append(SQL("{} < (%s, %s, %s, %s)").format(_KEY))
        args.extend(_after(cursor))
    condition = SQL(" AND ").join(where) if where else SQL("TRUE")
    names = SQL(", ").join(Identifier(c) for c in COLUMNS)
    with conn.cursor(row_factory=tuple_row) as curs:
        curs.execute(
            SQL(
                "SELECT {} FROM {} WHERE {} ORDER BY state <> 'resolved' DESC, score DESC, "
                "opened_at DESC, incident_id DESC LIMIT %s"
            ).format(names, tables.model, condition),
            [*args, limit + 1],
        )
        rows = curs.fetchall()
    incidents = [Incident.from_row(row) for row in rows[:limit]]
    following = None
    if len(rows) > limit and incidents:
        last = incidents[-1]
        following = encode_cursor(
            [int(last.state != "resolved"), last.score, last.opened_at, str(last.incident_id)]
        )
    return Page([_json(i) for i in incidents], following)


def _after(cursor: str) -> list[Any]:
    """The key a cursor names, as the query compares it."""
    unresolved, score, opened_at, ident = decode_cursor(cursor, (int, int, datetime, str))
    try:
        return [bool(unresolved), score, opened_at, uuid.UUID(ident)]
    except ValueError:
        raise BadCursor("invalid cursor: not an incident id") from None


def get_incident(
    conn: psycopg.Connection[Any], schema: str, incident_id: uuid.UUID
) -> dict[str, Any] | None:
    """One incident with its history (every incident event, in log order), or None."""
    tables = IncidentTables(schema)
    found = tables.load(conn, [incident_id]).get(incident_id)
    if found is None:
        return None
    return {**_json(found), "history": [_event(e) for e in tables.history(conn, incident_id)]}


def acknowledge(
    conn: psycopg.Connection[Any], schema: str, incident_id: uuid.UUID, by: str, note: str = ""
) -> dict[str, Any]:
    """Record that `by` acknowledged the incident; the recorded action."""
    return _act(conn, schema, incident_id, "Acknowledged", by, note)


def resolve(
    conn: psycopg.Connection[Any], schema: str, incident_id: uuid.UUID, by: str, note: str = ""
) -> dict[str, Any]:
    """Record that `by` resolved the incident (it gathers no more evidence)."""
    return _act(conn, schema, incident_id, "Resolved", by, note)


def _act(
    conn: psycopg.Connection[Any],
    schema: str,
    incident_id: uuid.UUID,
    kind: Kind,
    by: str,
    note: str,
) -> dict[str, Any]:
    tables = IncidentTables(schema)
    positions = Positions(schema)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as curs:
        curs.execute(
            SQL("SELECT position FROM {} WHERE view = %s FOR SHARE").format(positions.table),
            (POSITION_KEY,),
        )
        placed = curs.fetchone()
        found = tables.load(conn, [incident_id]).get(incident_id)
        if placed is None or found is None:
            raise IncidentNotFound(f"no incident {incident_id}")
        if found.resolved_by is not None:
            raise IncidentStateError(f"incident {incident_id} is resolved already")
        if kind == "Acknowledged" and found.acknowledged_by is not None:
            raise IncidentStateError(f"incident {incident_id} is acknowledged already")
        ident = action_id(incident_id, kind)
        curs.execute(
            SQL(
                "INSERT INTO {} (event_id, incident_id, kind, position, by_whom, note) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING "
                "RETURNING seq, at"
            ).format(tables.actions),
            (ident, incident_id, kind, placed[0], by, note),
        )
        inserted = curs.fetchone()
        if inserted is None:
            done = "acknowledged" if kind == "Acknowledged" else "resolved"
            raise IncidentStateError(f"incident {incident_id} is {done} already")
        # Wake the incident process now rather than at its next poll.
        curs.execute("SELECT pg_notify(%s, '')", (EventReader(schema).channel,))
    seq, at = inserted
    return _event(
        IncidentEvent(
            ident, incident_id, kind, placed[0], {"by": by, "note": note, "at": at.isoformat()}, seq
        )
    )


def _json(incident: Incident) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in COLUMNS:
        value = getattr(incident, name)
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, tuple):
            value = [str(v) for v in value]
        data[name] = value
    return data


def _event(event: IncidentEvent) -> dict[str, Any]:
    data = dict(event.data)
    if "event_id" in data:  # EvidenceAdded's: the stored event that joined, not this one
        data["evidence_id"] = data.pop("event_id")
    return {
        "event_id": str(event.event_id),
        "incident_id": str(event.incident_id),
        "kind": event.kind,
        "position": event.position,
        **data,
    }
