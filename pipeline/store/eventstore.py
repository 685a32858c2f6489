"""The event store: an `eventsourcing` application on PostgreSQL, written in batches.

Every accepted message is stored as the single `Recorded` event of its own aggregate,
identified by uuid5(domain, message id). A batch is one transaction and one statement
that inserts only the ids not stored yet, under the writers' lock every writer takes, so
two workers racing on the same id cannot both store it (see `recorder.py`).

Failures are sorted by what they say about the messages. A server that is down,
read-only, out of connections or holding the lock too long raises `StoreUnavailable`:
nothing is wrong with the batch. A message the store refuses (it cannot be encoded, or
PostgreSQL reports a data or integrity error) is set aside as unstorable, with the
error: the batch is split until the culprits are alone, and the rest is stored.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import psycopg
from eventsourcing.application import Application
from eventsourcing.persistence import (
    DataError,
    DatetimeAsISO,
    DecimalAsStr,
    IntegrityError,
    Mapper,
    PersistenceError,
    StoredEvent,
    Transcoder,
    UUIDAsHex,
)
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Identifier

from schemas import Domain

from ..errors import StoreUnavailable
from .domain import aggregate_class, event_id
from .factory import connection_kwargs
from .recorder import ColumnarRecorder
from .transcoder import OrjsonTranscoder

__all__ = ["Accepted", "EventStore", "Journal", "WriteResult", "event_mapper"]


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


class Journal(Application[uuid.UUID]):
    """The application whose event store holds every accepted message."""

    name = "Journal"
    env = {"APPLICATION_RECORDER_TOPIC": get_topic(ColumnarRecorder)}

    def construct_transcoder(self) -> Transcoder:
        """The orjson transcoder, with the application's transcodings."""
        return _transcoder()


def _transcoder() -> OrjsonTranscoder:
    # The payload is the producer's JSON: read back as sent, whatever its keys.
    transcoder = OrjsonTranscoder(verbatim=("payload",))
    # `Application.register_transcodings`, which needs no application.
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


def event_mapper() -> Mapper[uuid.UUID]:
    """The Journal's mapper (transcoder, upcasting) for readers that open no store."""
    return Mapper(transcoder=_transcoder())


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
    trace_id: str = ""
    """The producer's trace id (from its `traceparent` header), if it sent one."""

    @cached_property
    def event_id(self) -> uuid.UUID:
        """Identity of the stored event, derived from domain and message id."""
        return event_id(self.domain, self.message_id)


@dataclass
class WriteResult:
    """What a write did with each id of its batch."""

    stored: set[uuid.UUID] = field(default_factory=set)
    duplicates: set[uuid.UUID] = field(default_factory=set)
    """Ids the store already held (the store's word: cache hints are confirmed)."""
    unstorable: dict[uuid.UUID, str] = field(default_factory=dict)
    """Ids the store refused, with the error: dead-letter those messages."""
    refuted: set[uuid.UUID] = field(default_factory=set)
    """Ids the cache called stored that the store did not hold (they are in `stored` now)."""


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` or an exception it was raised from is a `kind`."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, kind):
            return True
        cause = cause.__cause__
    return False


def _tied_to_a_message(exc: PersistenceError) -> bool:
    """A data or integrity error comes from a row; anything else is the server's state."""
    return isinstance(exc, DataError | IntegrityError)


class EventStore:
    """Batch writes and look-ups on the Journal's event table."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.journal = self._open()
        recorder = self.journal.recorder
        assert isinstance(recorder, ColumnarRecorder)
        self._recorder = recorder
        self._mapper = self.journal.mapper
        self._broken = False
        self._renewing = threading.Lock()
        self._topics: dict[Domain, str] = {d: get_topic(aggregate_class(d)) for d in Domain}
        self._kinds: dict[tuple[Domain, str], tuple[str, int]] = {}
        """(event topic, class version) of each event class, by domain and event name."""
        transcoder = self._mapper.transcoder
        self._plain = (
            transcoder
            if isinstance(transcoder, OrjsonTranscoder)
            and self._mapper.compressor is None
            and self._mapper.cipher is None
            else None
        )
        """The transcoder, where a stored state is its JSON alone (no compression, no
        cipher): `_to_stored` writes it without building the event object first."""
        table = SQL("{}.{}").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name)
        )
        self._count = SQL("SELECT count(*) AS n FROM {}").format(table)
        self._select_ids = SQL(
            "SELECT originator_id FROM {} WHERE originator_id = ANY(%s) AND originator_version = 1"
        ).format(table)

    def _open(self) -> Journal:
        try:
            return Journal(env=self._env)
        except PersistenceError as exc:
            raise StoreUnavailable(f"cannot open the event store: {exc}") from exc

    def close(self) -> None:
        """Close the connection pool."""
        self.journal.close()

    def _renew(self) -> None:
        """After a failure, a new connection pool once the server answers again.

        The old pool would reconnect too, but its retries back off to minutes after a
        long outage; a new pool connects at once. Raises `StoreUnavailable` while the
        server does not answer (tried with one plain connection, so nothing leaks).
        """
        with self._renewing:
            if self._broken:
                self._renew_now()

    def _renew_now(self) -> None:
        env = self._env
        try:
            # The pool's options: after a fail-over, the promoted standby answers.
            psycopg.connect(**connection_kwargs(env)).close()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"the database does not answer: {exc}") from exc
        journal = self._open()
        recorder = journal.recorder
        assert isinstance(recorder, ColumnarRecorder)
        old = self.journal
        self.journal, self._recorder, self._mapper = journal, recorder, journal.mapper
        self._broken = False
        old.close()

    def ping(self) -> None:
        """Check that the database answers and accepts writes; raises `StoreUnavailable`."""
        if self._broken:
            self._renew()
        try:
            with self._recorder.datastore.transaction(commit=False) as curs:
                curs.execute("SELECT current_setting('transaction_read_only') AS ro")
                row = curs.fetchone()
        except PersistenceError as exc:
            self._broken = True
            raise StoreUnavailable(str(exc)) from exc
        if row is not None and row["ro"] == "on":
            raise StoreUnavailable("the database is read-only (a standby?)")

    def count(self) -> int:
        """Number of stored events."""
        with self._recorder.datastore.transaction(commit=False) as curs:
            curs.execute(self._count)
            row = curs.fetchone()
            assert row is not None
            return int(row["n"])

    def stored(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `ids` are stored already (no lock taken). Raises `StoreUnavailable`."""
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

        `known` holds ids a cache believes stored: they are not sent, and the store
        confirms them in the same statement (any it does not hold are stored after all).
        Raises `StoreUnavailable` when the database cannot commit.
        """
        if self._broken:
            self._renew()
        try:
            return self._write(batch, set(known or ()))
        except StoreUnavailable as exc:
            # A lock wait says nothing about the connections; anything else may.
            self._broken = not _caused_by(exc, psycopg.errors.LockNotAvailable)
            raise

    def _write(self, batch: Sequence[Accepted], hints: set[uuid.UUID]) -> WriteResult:
        result = WriteResult()
        # One row per id: a statement cannot insert the same key twice.
        todo = {a.event_id: a for a in batch if a.event_id not in hints}
        rows = self._encode(todo.values(), result)
        present = self._insert(rows, sorted(hints), result) if rows else self.stored(list(hints))
        result.duplicates = (present & hints) | (set(todo) - result.stored - set(result.unstorable))
        result.refuted = hints - present
        if result.refuted:  # the cache was wrong (another or an older database): store them
            refuted = {a.event_id: a for a in batch if a.event_id in result.refuted}
            self._insert(self._encode(refuted.values(), result), [], result)
            result.duplicates |= result.refuted - result.stored - set(result.unstorable)
        return result

    def _encode(self, batch: Iterable[Accepted], result: WriteResult) -> list[StoredEvent]:
        """The stored events of `batch`; a message that cannot be encoded is unstorable."""
        rows = []
        for accepted in batch:
            try:
                rows.append(self._to_stored(accepted))
            except Exception as exc:
                result.unstorable[accepted.event_id] = f"cannot encode the event: {exc!r}"
        return rows

    def _insert(
        self, rows: list[StoredEvent], confirm: list[uuid.UUID], result: WriteResult
    ) -> set[uuid.UUID]:
        """Insert `rows`, splitting off those the store refuses; returns confirmed hints."""
        try:
            stored: set[uuid.UUID]
            present: set[uuid.UUID]
            stored, present = self._recorder.insert_new(rows, confirm)
        except PersistenceError as exc:
            if not _tied_to_a_message(exc):
                raise StoreUnavailable(str(exc)) from exc
            if len(rows) == 1:
                result.unstorable[_uuid(rows[0].originator_id)] = f"{type(exc).__name__}: {exc}"
                return self.stored(confirm) if confirm else set()
            half = len(rows) // 2
            present = self._insert(rows[:half], confirm, result)
            self._insert(rows[half:], [], result)
            return present
        result.stored |= stored
        return present

    def _to_stored(self, accepted: Accepted) -> StoredEvent:
        """The stored event of `accepted`: what eventsourcing's mapper makes of its
        `Recorded` (or frame) event, byte for byte, written directly (a third of the
        time); the mapper itself where the direct way does not apply."""
        kind = self._kinds.get((accepted.domain, accepted.event))
        if kind is None:
            event_class = getattr(aggregate_class(accepted.domain), accepted.event)
            kind = (get_topic(event_class), getattr(event_class, "class_version", 1))
            self._kinds[(accepted.domain, accepted.event)] = kind
        topic, class_version = kind
        if self._plain is not None:
            # The event's attributes in its dataclass's order, as `vars(event)` has them;
            # the timestamp as DatetimeAsISO writes it.
            state: dict[str, Any] = {
                "timestamp": {"_type_": "datetime_iso", "_data_": accepted.received_at.isoformat()},
                "originator_topic": self._topics[accepted.domain],
                "message_id": accepted.message_id,
                "subject": accepted.subject,
                "stream_seq": accepted.stream_seq,
                "schema_version": accepted.schema_version,
                "payload": accepted.payload,
                "trace_id": accepted.trace_id,
            }
            if class_version > 1:
                state["class_version"] = class_version
            data = self._plain.encode_plain(state)
            if data is not None:
                return StoredEvent(
                    originator_id=accepted.event_id, originator_version=1, topic=topic, state=data
                )
        return self._mapped(accepted)

    def _mapped(self, accepted: Accepted) -> StoredEvent:
        """The stored event of `accepted`, by eventsourcing's mapper."""
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
            trace_id=accepted.trace_id,
        )
        return self._mapper.to_stored_event(event)
