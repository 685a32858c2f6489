"""Reading the Journal's events in the order they were stored, upcast to their current version.

Each stored event has a position: its notification id, which only grows. Every writer
takes the writers' advisory lock before it draws ids and keeps it until it commits (see
`recorder.py`), so events become visible in position order: a reader that has seen
position N will never later find a new event at a position below N.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from eventsourcing.persistence import MapperDeserialisationError
from eventsourcing.utils import resolve_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

from schemas import Domain

from .domain import domain_of, event_id
from .eventstore import event_mapper
from .recorder import commit_channel

__all__ = ["EVENTS_TABLE", "EventReader", "Positioned"]

EVENTS_TABLE = "journal_events"


@dataclass(frozen=True, slots=True)
class Positioned:
    """A stored event (upcast, as its current class) and its position in the store."""

    position: int
    event: Any

    def as_json(self) -> dict[str, Any]:
        """The event as operators see it (`events get`, the API): JSON-ready."""
        e = self.event
        return {
            "position": self.position,
            "event_id": str(e.originator_id),
            "domain": domain_of(e).value,
            "event": type(e).__name__,
            "payload_version": getattr(type(e), "class_version", 1),
            "message_id": e.message_id,
            "subject": e.subject,
            "stream_seq": e.stream_seq,
            "schema_version": e.schema_version,
            "received_at": e.timestamp.isoformat(),
            "trace_id": e.trace_id,
            "payload": e.payload,
        }


class EventReader:
    """Reads events of the Journal's table in a PostgreSQL schema, on the caller's cursor."""

    def __init__(self, schema: str, table: str = EVENTS_TABLE) -> None:
        self.table: Composed = SQL("{}.{}").format(Identifier(schema), Identifier(table))
        self.channel = commit_channel(schema, table)
        """The channel writers NOTIFY on each commit (this schema's)."""
        self._transcoder = event_mapper().transcoder
        self._classes: dict[str, Any] = {}
        columns = SQL("notification_id, originator_id, originator_version, topic, state")
        self._head = SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(self.table)
        self._page = SQL(
            "SELECT {} FROM {} WHERE notification_id > %s AND notification_id <= %s "
            "AND topic = ANY(%s) ORDER BY notification_id LIMIT %s"
        ).format(columns, self.table)
        self._by_id = SQL("SELECT {} FROM {} WHERE originator_id = %s").format(columns, self.table)
        self._by_ids = SQL(
            "SELECT {} FROM {} WHERE originator_id = ANY(%s) ORDER BY notification_id"
        ).format(columns, self.table)
        self._next_state = SQL(
            "SELECT state FROM {} WHERE notification_id > %s ORDER BY notification_id LIMIT 1"
        ).format(self.table)
        self._recent = SQL(
            "SELECT {} FROM {} WHERE (%s::text[] IS NULL OR topic = ANY(%s)) "
            "ORDER BY notification_id DESC LIMIT %s"
        ).format(columns, self.table)
        self._since = SQL(
            "SELECT {} FROM {} WHERE notification_id > %s AND (%s::text[] IS NULL "
            "OR topic = ANY(%s)) ORDER BY notification_id LIMIT %s"
        ).format(columns, self.table)

    def head(self, conn: psycopg.Connection[Any]) -> int:
        """The position of the last stored event (0 when there is none)."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._head)
            row = curs.fetchone()
            return int(row[0]) if row else 0

    def rows(
        self,
        conn: psycopg.Connection[Any],
        after: int,
        upto: int,
        topics: Sequence[str],
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Stored rows of `topics` at positions in (after, upto], at most `limit`, in order."""
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(self._page, (after, upto, list(topics), limit), prepare=True)
            return curs.fetchall()

    def decode(self, rows: Iterable[tuple[Any, ...]]) -> list[Positioned]:
        """The events of rows read by `rows`, upcast to their current class.

        What the Journal's mapper (`Mapper.to_domain_event`) does, without a
        `StoredEvent` per row: the stored state through the transcoder, the id and
        version from their columns, `upcast_vN_vN+1` up to the class's `class_version`.
        The store uses no cipher and no compressor. A test holds the two equal.
        """
        decode = self._transcoder.decode
        classes = self._classes
        new = object.__new__
        setattr_ = object.__setattr__
        events = []
        for position, originator_id, version, topic, state in rows:
            cls = classes.get(topic)
            if cls is None:
                cls = classes[topic] = resolve_topic(topic)
            try:
                values = decode(state)
            except Exception as exc:
                raise MapperDeserialisationError(
                    f"cannot decode the event at position {position} ({topic}): {exc}"
                ) from exc
            values["originator_id"] = originator_id
            values["originator_version"] = version
            stored_as = values.pop("class_version", 1)
            while stored_as < getattr(cls, "class_version", 1):
                getattr(cls, f"upcast_v{stored_as}_v{stored_as + 1}")(values)
                stored_as += 1
            event = new(cls)
            setattr_(event, "__dict__", values)
            events.append(Positioned(position, event))
        return events

    def get(self, conn: psycopg.Connection[Any], event_id: uuid.UUID) -> Positioned | None:
        """The event with this id (the aggregate's id), or None."""
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(self._by_id, (event_id,))
            rows = curs.fetchall()
        return self.decode(rows)[0] if rows else None

    def get_many(
        self, conn: psycopg.Connection[Any], event_ids: Sequence[uuid.UUID]
    ) -> list[Positioned]:
        """The events with these ids that are stored, in store order."""
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(self._by_ids, (list(event_ids),))
            return self.decode(curs.fetchall())

    def find(self, conn: psycopg.Connection[Any], ident: str) -> Positioned | None:
        """The event with this event id, or with this producer's message id (any domain)."""
        try:
            ids = [uuid.UUID(ident)]
        except ValueError:
            ids = []
        ids += [event_id(d, ident) for d in Domain]
        for candidate in ids:
            found = self.get(conn, candidate)
            if found is not None:
                return found
        return None

    def stored_at_after(self, conn: psycopg.Connection[Any], position: int) -> datetime | None:
        """When the first event after `position` (of any topic) was stored, or None.

        Read from the stored state's timestamp alone, without decoding the event: it
        answers also for an event that cannot be decoded (where a view may be stuck).
        """
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(self._next_state, (position,))
            row = curs.fetchone()
        if row is None:
            return None
        try:
            stamp = orjson.loads(row[0])["timestamp"]["_data_"]
            return datetime.fromisoformat(stamp)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def recent(
        self, conn: psycopg.Connection[Any], *, topics: Sequence[str] | None = None, limit: int = 20
    ) -> list[Positioned]:
        """The last `limit` events (of `topics`, if given), oldest first."""
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            wanted = list(topics) if topics is not None else None
            curs.execute(self._recent, (wanted, wanted, limit))
            rows = curs.fetchall()
        return self.decode(reversed(rows))

    def since(
        self,
        conn: psycopg.Connection[Any],
        after: int,
        *,
        topics: Sequence[str] | None = None,
        limit: int = 1000,
    ) -> list[Positioned]:
        """The first `limit` events after position `after` (of `topics`, if given)."""
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            wanted = list(topics) if topics is not None else None
            curs.execute(self._since, (after, wanted, wanted, limit))
            return self.decode(curs.fetchall())
