"""The event store: an `eventsourcing` application on PostgreSQL, written in batches.

Every accepted message is stored as the single `Recorded` event of its own aggregate,
identified by uuid5(domain, message id). A batch is one transaction. Before writing, the
batch is filtered against ids already stored (one query); if a racing worker commits one
of the ids in between, the primary key rejects the whole insert and the batch is
filtered again and retried without it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, PersistenceError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Identifier

from schemas import Domain

from .domain import aggregate_class, event_id
from .errors import StoreUnavailable
from .recorder import ColumnarRecorder

__all__ = ["Accepted", "EventStore", "Journal", "WriteResult"]

_RACE_RETRIES = 5


class Journal(Application[uuid.UUID]):
    """The application whose event store holds every accepted message."""

    name = "Journal"


@dataclass(frozen=True)
class Accepted:
    """A decoded, valid message ready to be stored."""

    domain: Domain
    message_id: str
    subject: str
    stream_seq: int
    schema_version: str
    received_at: datetime
    payload: dict[str, Any]
    event_id: uuid.UUID = field(init=False)
    """Identity of the stored event, derived from domain and message id."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_id", event_id(self.domain, self.message_id))


@dataclass
class WriteResult:
    """Which ids a write stored and which were already there."""

    stored: set[uuid.UUID] = field(default_factory=set)
    duplicates: set[uuid.UUID] = field(default_factory=set)
    races: int = 0


class EventStore:
    """Batch writes and look-ups on the Journal's event table."""

    def __init__(self, env: dict[str, str]) -> None:
        env = {**env, "APPLICATION_RECORDER_TOPIC": get_topic(ColumnarRecorder)}
        try:
            self.journal = Journal(env=env)
        except PersistenceError as exc:
            raise StoreUnavailable(f"cannot open the event store: {exc}") from exc
        recorder = self.journal.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)
        self._recorder = recorder
        self._mapper = self.journal.mapper
        self._topics: dict[Domain, str] = {
            d: get_topic(aggregate_class(d)) for d in Domain if d != Domain.FRAMES
        }
        table = SQL("{}.{}").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name)
        )
        self._select_existing = SQL(
            "SELECT originator_id FROM {} WHERE originator_id = ANY(%s) AND originator_version = 1"
        ).format(table)
        self._count = SQL("SELECT count(*) AS n FROM {}").format(table)

    def close(self) -> None:
        """Close the connection pool."""
        self.journal.close()

    def existing(self, ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The subset of `ids` already stored."""
        wanted = list(ids)
        if not wanted:
            return set()
        try:
            with self._recorder.datastore.transaction(commit=False) as curs:
                curs.execute(self._select_existing, (wanted,), prepare=True)
                return {row["originator_id"] for row in curs.fetchall()}
        except PersistenceError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def count(self) -> int:
        """Number of stored events."""
        with self._recorder.datastore.transaction(commit=False) as curs:
            curs.execute(self._count)
            row = curs.fetchone()
            assert row is not None
            return int(row["n"])

    def write(self, batch: Sequence[Accepted], known: set[uuid.UUID] | None = None) -> WriteResult:
        """Store each message of the batch that is not stored yet, in one transaction.

        `known` holds ids already known to be stored (from the cache); they are not
        looked up again. Raises `StoreUnavailable` when the database cannot commit.
        """
        result = WriteResult(duplicates=set(known or ()))
        pending = {a.event_id: a for a in batch if a.event_id not in result.duplicates}
        for _ in range(_RACE_RETRIES):
            result.duplicates |= self.existing(pending)
            todo = [a for i, a in pending.items() if i not in result.duplicates]
            if not todo:
                return result
            try:
                self._recorder.insert_events([self._to_stored(a) for a in todo])
            except IntegrityError:
                # Another worker committed one of these ids since the look-up.
                result.races += 1
                continue
            except PersistenceError as exc:
                raise StoreUnavailable(str(exc)) from exc
            result.stored.update(a.event_id for a in todo)
            return result
        raise StoreUnavailable(f"batch still conflicting after {_RACE_RETRIES} attempts")

    def _to_stored(self, accepted: Accepted) -> StoredEvent:
        event_class: Any = aggregate_class(accepted.domain).Recorded  # fields set by eventsourcing
        event = event_class(
            originator_id=accepted.event_id,
            originator_version=1,
            timestamp=accepted.received_at,
            originator_topic=self._topics[accepted.domain],
            message_id=accepted.message_id,
            subject=accepted.subject,
            stream_seq=accepted.stream_seq,
            schema_version=accepted.schema_version,
            received_at=accepted.received_at,
            payload=accepted.payload,
        )
        return self._mapper.to_stored_event(event)
