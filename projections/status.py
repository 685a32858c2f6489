"""Where each view stands against the store: position, lag in events and seconds, state."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from pipeline.store.reader import EventReader

from . import VIEWS
from .positions import Positions
from .rebuild import rebuild_lock
from .view import SHADOW

__all__ = ["ViewStatus", "view_status"]


@dataclass(frozen=True)
class ViewStatus:
    """One view (or a rebuild in progress) against the head of the store."""

    view: str
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    """Age of the oldest stored event the view has not reached (0 when it is current)."""
    state: str
    """`running`, `stalled`, `not started`; for a rebuild's shadow `rebuilding`, or
    `rebuild abandoned` (its process died; the next rebuild of the view clears it)."""
    stalled_at: int | None
    error: str | None
    updated_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times in ISO 8601)."""
        data = asdict(self)
        data["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return data


def view_status(conn: psycopg.Connection[Any], schema: str) -> list[ViewStatus]:
    """Every view and rebuild in progress, by name."""
    reader = EventReader(schema)
    positions = Positions(schema)
    head = reader.head(conn)
    found = conn.execute("SELECT to_regclass(%s)", (positions.table.as_string(conn),)).fetchone()
    # No positions table: `pipeline db migrate` has not run; no view has started.
    rows = {p.view: p for p in positions.all(conn)} if found and found[0] else {}
    now = datetime.now(UTC)
    result = []
    for name in sorted(set(VIEWS) | set(rows)):
        row = rows.get(name)
        position = row.position if row else 0
        lag_s = 0.0
        if position < head:
            oldest = reader.stored_at_after(conn, position)
            if oldest is not None:
                lag_s = max(0.0, (now - oldest).total_seconds())
        if row is None:
            state = "not started"
        elif name.endswith(SHADOW):
            state = "rebuilding" if _rebuilding(conn, schema, name) else "rebuild abandoned"
        else:
            state = row.state
        result.append(
            ViewStatus(
                view=name,
                position=position,
                head=head,
                lag_events=head - position,
                lag_seconds=round(lag_s, 3),
                state=state,
                stalled_at=row.stalled_at if row else None,
                error=row.error if row else None,
                updated_at=row.updated_at if row else None,
            )
        )
    return result


def _rebuilding(conn: psycopg.Connection[Any], schema: str, shadow: str) -> bool:
    """Whether a process holds the rebuild lock of a shadow's view (see `rebuild`)."""
    key = rebuild_lock(schema, shadow.removesuffix(SHADOW))
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
    if row and row[0]:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        return False
    return True
