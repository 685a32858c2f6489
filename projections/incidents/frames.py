"""Which evidence frames are kept: the table `incident_frames`, one row per analysed frame
that is evidence of an incident, once its copy into the evidence bucket is settled.

A frame is evidence when an `IncidentOpened` names its `FrameAnalyzed` event among the
causes or an `EvidenceAdded` names it. Its row says `kept` (the bucket holds its bytes
under the event's id) or `expired` (the FRAMES stream had dropped it before it could be
copied). No row yet: the copy is pending. The evidence keeper (`evidence.py`) finds the
frames without a row in the order their incident events were recorded (`pending`) and
inserts a row once the bucket or the stream has answered (`settle`): an insert of one
already settled changes nothing, so a copy repeated after a crash records nothing twice.

The incident process never waits for this table, and a rebuild never touches it: the
incidents do not depend on their frames being kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

from pipeline.store.domain import CameraFrame
from pipeline.store.reader import EventReader
from schemas import FrameAnalyzedV1, FrameMetaV1

__all__ = ["CONTENT_TYPES", "EvidenceFrame", "FrameState", "FrameTable", "Settled", "State"]

State = Literal["kept", "expired"]

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
"""The media type of a frame's encoding."""

_TABLE = (
    "event_id uuid PRIMARY KEY, incident_id uuid NOT NULL, "
    "state text NOT NULL CHECK (state IN ('kept', 'expired')), "
    "stream_seq bigint NOT NULL, size bigint, content_type text, digest text, "
    "reason text NOT NULL DEFAULT '', settled_at timestamptz NOT NULL DEFAULT clock_timestamp()"
)


@dataclass(frozen=True, slots=True)
class EvidenceFrame:
    """An analysed frame that is evidence of an incident, as the store recorded it."""

    event_id: uuid.UUID
    incident_id: uuid.UUID
    """The first incident it is evidence of."""
    message_id: str
    subject: str
    stream_seq: int
    frame: FrameMetaV1

    @property
    def content_type(self) -> str:
        """The media type of the frame's bytes."""
        return CONTENT_TYPES[self.frame.encoding.value]


@dataclass(frozen=True, slots=True)
class Settled:
    """How a frame's copy ended: kept in the bucket (its size and digest) or expired."""

    frame: EvidenceFrame
    state: State
    size: int | None = None
    digest: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FrameState:
    """A frame's row, as the API reads it."""

    event_id: uuid.UUID
    state: State
    size: int | None
    content_type: str | None
    reason: str
    settled_at: datetime


class FrameTable:
    """The `incident_frames` table of one schema, and the evidence frames still to settle."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        s = Identifier(schema)
        self.table: Composed = SQL("{}.incident_frames").format(s)
        self.events: Composed = SQL("{}.incident_events").format(s)
        self.reader = EventReader(schema)

    def create(self, conn: psycopg.Connection[Any]) -> None:
        """Make the table where missing (the keeper, as the projector: the API reads it
        through the projector's default privileges)."""
        found = conn.execute("SELECT to_regclass(%s)", (self.table.as_string(conn),)).fetchone()
        if found is None or found[0] is None:
            conn.execute(SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(self.table, SQL(_TABLE)))

    def pending(
        self, conn: psycopg.Connection[Any], after: int, limit: int
    ) -> tuple[list[EvidenceFrame], int]:
        """The evidence frames named by the incident events recorded after `after` (their
        `seq`), at most `limit` events' worth, that are not settled; and the `seq` they
        reach (the next call's `after`)."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT seq, incident_id, kind, data FROM {} WHERE seq > %s "
                    "AND kind IN ('IncidentOpened', 'EvidenceAdded') ORDER BY seq LIMIT %s"
                ).format(self.events),
                (after, limit),
            )
            rows = curs.fetchall()
        if not rows:
            return [], after
        named: dict[uuid.UUID, uuid.UUID] = {}  # evidence -> its first incident
        for _seq, incident, kind, data in rows:
            ids = data["causes"] if kind == "IncidentOpened" else [data["event_id"]]
            for ident in ids:
                named.setdefault(uuid.UUID(ident), incident)
        settled = self._settled(conn, named)
        frames: list[EvidenceFrame] = []
        for item in self.reader.get_many(conn, [i for i in named if i not in settled]):
            event = item.event
            if not isinstance(event, CameraFrame.FrameAnalyzed):
                continue
            payload = FrameAnalyzedV1.model_validate(event.payload)
            frames.append(
                EvidenceFrame(
                    event_id=event.originator_id,
                    incident_id=named[event.originator_id],
                    message_id=event.message_id,
                    subject=event.subject,
                    stream_seq=event.stream_seq,
                    frame=payload.frame,
                )
            )
        return frames, int(rows[-1][0])

    def _settled(self, conn: psycopg.Connection[Any], ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL("SELECT event_id FROM {} WHERE event_id = ANY(%s)").format(self.table),
                (list(ids),),
            )
            return {row[0] for row in curs.fetchall()}

    def settle(self, conn: psycopg.Connection[Any], outcomes: Sequence[Settled]) -> None:
        """Record how these frames' copies ended (a frame settled already keeps its row)."""
        if not outcomes:
            return
        with conn.cursor() as curs:
            curs.executemany(
                SQL(
                    "INSERT INTO {} (event_id, incident_id, state, stream_seq, size, "
                    "content_type, digest, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (event_id) DO NOTHING"
                ).format(self.table),
                [
                    (
                        o.frame.event_id,
                        o.frame.incident_id,
                        o.state,
                        o.frame.stream_seq,
                        o.size,
                        o.frame.content_type if o.state == "kept" else None,
                        o.digest,
                        o.reason,
                    )
                    for o in outcomes
                ],
            )

    def states(
        self, conn: psycopg.Connection[Any], ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, FrameState]:
        """The rows of these frames (none for a frame not settled yet; an empty answer
        before the keeper has made the table)."""
        found = conn.execute("SELECT to_regclass(%s)", (self.table.as_string(conn),)).fetchone()
        if not ids or found is None or found[0] is None:
            return {}
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT event_id, state, size, content_type, reason, settled_at FROM {} "
                    "WHERE event_id = ANY(%s)"
                ).format(self.table),
                (list(ids),),
            )
            return {row[0]: FrameState(*row) for row in curs.fetchall()}
