"""Where incidents are kept: two append-only logs of incident events and the read model.

- `incident_events`: what the incident process decided (`IncidentOpened`,
  `EvidenceAdded`, `Assessed`), each with the store position of the event that caused
  it. Made by `pipeline db migrate`; the process (projector role) inserts, in the
  transaction that moves its position, so a batch of decisions is recorded once or not
  at all. No role may update or delete a row: a rebuild re-derives the decisions and
  finds them recorded, it does not rewrite them.
- `incident_actions`: what operators did (`Acknowledged`, `Resolved`: by whom, a note,
  when), inserted by the API role. An action is placed after the stored event at its
  `position`: the incident process's position when the action was recorded, read with
  a share lock on the process's position row, so the process cannot move past that
  position until the action is committed, and takes it before any later event. A rebuild
  never touches this table: who did what survives, and is fed to the correlator again at
  the same place.
- `incidents`: the read model, one row per incident (`record.Incident`), kept by the
  process in the same transaction as its events (a rebuild fills `incidents__next` from
  both logs and swaps it in).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier, Literal
from psycopg.types.json import Jsonb

from .record import ACTIONS, COLUMNS, DECIDED, Incident, IncidentEvent, order

__all__ = ["POSITION_KEY", "IncidentTables"]

POSITION_KEY = "incidents"
"""The incident process's row in `projection_positions` (shown by `projections status`)."""

_MODEL = (
    "incident_id uuid PRIMARY KEY, rule text NOT NULL, key text NOT NULL, zone text, "
    "opened_at timestamptz NOT NULL, opened_position bigint NOT NULL, "
    "updated_position bigint NOT NULL, causes uuid[] NOT NULL, evidence uuid[] NOT NULL, "
    "score integer NOT NULL, level text NOT NULL, reasons text[] NOT NULL, "
    "acknowledged_by text, acknowledged_at timestamptz, acknowledged_note text, "
    "resolved_by text, resolved_at timestamptz, resolved_note text, state text NOT NULL"
)
_MODEL_INDEXES = (
    "state, score DESC, opened_at DESC",
    "zone, opened_at DESC",
    "opened_at DESC",
    "updated_position",
)
_EVENT_COLUMNS = "seq, event_id, incident_id, kind, position, data"


class IncidentTables:
    """The incident tables of one schema: their names, DDL, reads and writes."""

    def __init__(self, schema: str, suffix: str = "") -> None:
        self.schema = schema
        s = Identifier(schema)
        self.events: Composed = SQL("{}.incident_events").format(s)
        self.actions: Composed = SQL("{}.incident_actions").format(s)
        self.model_name = f"incidents{suffix}"
        self.model: Composed = SQL("{}.{}").format(s, Identifier(self.model_name))

    def shadow(self) -> IncidentTables:
        """The same tables, with a rebuild's read model (`incidents__next`)."""
        return IncidentTables(self.schema, "__next")

    # -- DDL ---------------------------------------------------------------------------

    def create_logs(self, conn: psycopg.Connection[Any]) -> None:
        """Make the two logs where missing (`pipeline db migrate`, as the owner)."""
        s = Identifier(self.schema)
        for name, kinds, columns in (
            ("incident_events", DECIDED, "data jsonb NOT NULL"),
            (
                "incident_actions",
                ACTIONS,
                "by_whom text NOT NULL, note text NOT NULL DEFAULT '', "
                "at timestamptz NOT NULL DEFAULT clock_timestamp()",
            ),
        ):
            table = SQL("{}.{}").format(s, Identifier(name))
            conn.execute(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "seq bigint GENERATED ALWAYS AS IDENTITY, event_id uuid PRIMARY KEY, "
                    "incident_id uuid NOT NULL, kind text NOT NULL CHECK (kind IN ({})), "
                    "position bigint NOT NULL, {}, "
                    "recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())"
                ).format(table, SQL(", ").join(Literal(k) for k in kinds), SQL(columns))
            )
            for suffix, index in (("position", "position, seq"), ("incident", "incident_id")):
                conn.execute(
                    SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                        Identifier(f"{name}_{suffix}"), table, SQL(index)
                    )
                )

    def create_model(self, conn: psycopg.Connection[Any]) -> None:
        """Make the read model where missing (the process, as the projector)."""
        found = conn.execute("SELECT to_regclass(%s)", (self.model.as_string(conn),)).fetchone()
        if found is not None and found[0] is not None:
            return
        conn.execute(SQL("CREATE TABLE {} ({})").format(self.model, SQL(_MODEL)))
        for columns in _MODEL_INDEXES:
            conn.execute(SQL("CREATE INDEX ON {} ({})").format(self.model, SQL(columns)))

    def drop_model(self, conn: psycopg.Connection[Any]) -> None:
        """Remove the read model (a rebuild's shadow)."""
        conn.execute(SQL("DROP TABLE IF EXISTS {}").format(self.model))

    # -- the logs ----------------------------------------------------------------------

    def record(self, conn: psycopg.Connection[Any], events: Sequence[IncidentEvent]) -> None:
        """Append the process's events (in the caller's transaction)."""
        if not events:
            return
        with conn.cursor() as curs:
            curs.executemany(
                SQL(
                    "INSERT INTO {} (event_id, incident_id, kind, position, data) "
                    "VALUES (%s, %s, %s, %s, %s)"
                ).format(self.events),
                [(e.event_id, e.incident_id, e.kind, e.position, Jsonb(e.data)) for e in events],
            )

    def decided(
        self, conn: psycopg.Connection[Any], *, upto: int | None = None
    ) -> list[IncidentEvent]:
        """The process's recorded events (at positions up to `upto`), in log order."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT {} FROM {} WHERE %s::bigint IS NULL OR position <= %s "
                    "ORDER BY position, seq"
                ).format(SQL(_EVENT_COLUMNS), self.events),
                (upto, upto),
            )
            return [_event(seq, *rest) for seq, *rest in curs.fetchall()]

    def taken(
        self,
        conn: psycopg.Connection[Any],
        *,
        upto: int | None = None,
        at: int | None = None,
        incident: uuid.UUID | None = None,
    ) -> list[IncidentEvent]:
        """Operators' actions (placed up to `upto`, or at `at`, or of one incident), in
        log order."""
        where = SQL("TRUE")
        args: tuple[Any, ...] = ()
        if at is not None:
            where, args = SQL("position = %s"), (at,)
        elif upto is not None:
            where, args = SQL("position <= %s"), (upto,)
        elif incident is not None:
            where, args = SQL("incident_id = %s"), (incident,)
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT seq, event_id, incident_id, kind, position, by_whom, note, at "
                    "FROM {} WHERE {} ORDER BY position, seq"
                ).format(self.actions, where),
                args,
            )
            return [
                IncidentEvent(
                    event_id,
                    incident,
                    kind,
                    position,
                    {"by": by, "note": note, "at": when.isoformat()},
                    seq,
                )
                for seq, event_id, incident, kind, position, by, note, when in curs.fetchall()
            ]

    def history(self, conn: psycopg.Connection[Any], incident_id: uuid.UUID) -> list[IncidentEvent]:
        """Every event of one incident, in log order."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL("SELECT {} FROM {} WHERE incident_id = %s").format(
                    SQL(_EVENT_COLUMNS), self.events
                ),
                (incident_id,),
            )
            decided = [_event(seq, *rest) for seq, *rest in curs.fetchall()]
        actions = self.taken(conn, incident=incident_id)
        return sorted([*decided, *actions], key=order)

    # -- the read model ----------------------------------------------------------------

    def load(
        self, conn: psycopg.Connection[Any], ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, Incident]:
        """The read model's rows of these incidents."""
        wanted = list(set(ids))
        if not wanted:
            return {}
        names = SQL(", ").join(Identifier(c) for c in COLUMNS)
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL("SELECT {} FROM {} WHERE incident_id = ANY(%s)").format(names, self.model),
                (wanted,),
            )
            return {row[0]: Incident.from_row(row) for row in curs.fetchall()}

    def unresolved(self, conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
        """How many incidents are not resolved, by (level, state)."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT level, state, count(*) FROM {} WHERE state <> 'resolved' "
                    "GROUP BY level, state"
                ).format(self.model)
            )
            return {(level, state): count for level, state, count in curs.fetchall()}

    def save(self, conn: psycopg.Connection[Any], incidents: Iterable[Incident]) -> None:
        """Insert or replace these rows of the read model."""
        rows = [i.row() for i in incidents]
        if not rows:
            return
        names = SQL(", ").join(Identifier(c) for c in COLUMNS)
        update = SQL(", ").join(
            SQL("{} = excluded.{}").format(Identifier(c), Identifier(c)) for c in COLUMNS[1:]
        )
        values = SQL(", ").join(SQL("%s") for _ in COLUMNS)
        with conn.cursor() as curs:
            curs.executemany(
                SQL(
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (incident_id) DO UPDATE SET {}"
                ).format(self.model, names, values, update),
                rows,
            )


def _event(
    seq: int, event_id: uuid.UUID, incident: uuid.UUID, kind: Any, position: int, data: Any
) -> IncidentEvent:
    return IncidentEvent(event_id, incident, kind, position, data, seq)
