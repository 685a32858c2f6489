"""The event store: an `eventsourcing` application on PostgreSQL, written in batches.

Every accepted message is stored as the single `Recorded` event of its own aggregate,
identified by uuid5(domain, message id). A batch is one transaction and one statement
that inserts only the ids not stored yet, under the table lock every writer takes, so
two workers racing on the same id cannot both store it (see `recorder.py`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import PersistenceError, StoredEvent, Transcoder
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Identifier

from schemas import Domain

from ..errors import StoreUnavailable
from .domain import aggregate_class, event_id
from .recorder import ColumnarRecorder
from .transcoder import OrjsonTranscoder

__all__ = ["Accepted", "EventStore", "Journal", "WriteResult"]


class Journal(Application[uuid.UUID]):
    """The application whose event store holds every accepted message."""

    name = "Journal"
    env = {"APPLICATION_RECORDER_TOPIC": get_topic(ColumnarRecorder)}

    def construct_transcoder(self) -> Transcoder:
        """The orjson transcoder, with the application's transcodings."""
        transcoder = OrjsonTranscoder()
        self.register_transcodings(transcoder)
        return transcoder


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
    event: str = "Recorded"
    """Name of the event class on the domain's aggregate (frames: FrameAnalyzed, FrameSkipped)."""

    @cached_property
    def event_id(self) -> uuid.UUID:
        """Identity of the stored event, derived from domain and message id."""
        return event_id(self.domain, self.message_id)


@dataclass
class WriteResult:
    """Which ids a write stored and which were already there."""

    stored: set[uuid.UUID] = field(default_factory=set)
    duplicates: set[uuid.UUID] = field(default_factory=set)


class EventStore:
    """Batch writes and look-ups on the Journal's event table."""

    def __init__(self, env: dict[str, str]) -> None:
        try:
            self.journal = Journal(env=env)
        except PersistenceError as exc:
            raise StoreUnavailable(f"cannot open the event store: {exc}") from exc
        recorder = self.journal.recorder
        assert isinstance(recorder, ColumnarRecorder)
        self._recorder = recorder
        self._mapper = self.journal.mapper
        self._topics: dict[Domain, str] = {d: get_topic(aggregate_class(d)) for d in Domain}
        table = SQL("{}.{}").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name)
        )
        self._count = SQL("SELECT count(*) AS n FROM {}").format(table)
        self._select_ids = SQL(
            "SELECT originator_id FROM {} WHERE originator_id = ANY(%s) AND originator_version = 1"
        ).format(table)

    def close(self) -> None:
        """Close the connection pool."""
        self.journal.close()

    def count(self) -> int:
        """Number of stored events."""
        with self._recorder.datastore.transaction(commit=False) as curs:
            curs.execute(self._count)
            row = curs.fetchone()
            assert row is not None
            return int(row["n"])

    def stored(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `ids` are stored already. Raises `StoreUnavailable`."""
        if not ids:
            return set()
        try:
            with self._recorder.datastore.transaction(commit=False) as curs:
                curs.execute(self._select_ids, (list(ids),))
                return {row["originator_id"] for row in curs.fetchall()}
        except PersistenceError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def write(self, batch: Sequence[Accepted], known: set[uuid.UUID] | None = None) -> WriteResult:
        """Store each message of the batch that is not stored yet, in one transaction.

        `known` holds ids already known to be stored (from the cache); they are skipped.
        Raises `StoreUnavailable` when the database cannot commit.
        """
        result = WriteResult(duplicates=set(known or ()))
        # One row per id: a statement cannot insert the same key twice.
        todo = list({a.event_id: a for a in batch if a.event_id not in result.duplicates}.values())
        try:
            result.stored = self._recorder.insert_new([self._to_stored(a) for a in todo])
        except PersistenceError as exc:
            raise StoreUnavailable(str(exc)) from exc
        result.duplicates.update(a.event_id for a in todo if a.event_id not in result.stored)
        return result

    def _to_stored(self, accepted: Accepted) -> StoredEvent:
        # Fields are set by eventsourcing's event dataclasses.
        event_class: Any = getattr(aggregate_class(accepted.domain), accepted.event)
        event = event_class(
            originator_id=accepted.event_id,
            originator_version=1,
            timestamp=accepted.received_at,
            originator_topic=self._topics[accepted.domain],
            message_id=accepted.message_id,
            subject=accepted.subject,
            stream_seq=accepted.stream_seq,
            schema_version=accepted.schema_version,
            payload=accepted.payload,
        )
        return self._mapper.to_stored_event(event)
