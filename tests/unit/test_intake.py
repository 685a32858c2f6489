"""The intake's verdicts, with in-memory stand-ins for the store and the DLQ."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from pipeline.errors import DeadLetterUnavailable, Reason, StoreUnavailable
from pipeline.ingest.deadletter import DeadLetter
from pipeline.ingest.intake import Intake, delivery_info
from pipeline.metrics import Metrics
from pipeline.store.eventstore import Accepted, WriteResult
from schemas import Domain
from streams import Subjects


@dataclass
class FakeMsg:
    """A JetStream message as the intake sees it, recording its fate."""

    subject: str
    data: bytes
    seq: int
    delivered: int = 1
    headers: dict[str, str] | None = None
    reply: str = ""  # not a JetStream ack subject: `metadata` is read instead
    fate: list[tuple[str, float | None]] = field(default_factory=list)

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(
            stream="SECURITY",
            num_delivered=self.delivered,
            sequence=SimpleNamespace(stream=self.seq),
        )

    async def ack(self) -> None:
        self.fate.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.fate.append(("nak", delay))


class FakeStore:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.stored: dict[uuid.UUID, Accepted] = {}

    async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult:
        if self.fail:
            raise StoreUnavailable("connection refused")
        result = WriteResult()
        for item in batch:
            if item.event_id in self.stored:
                result.duplicates.add(item.event_id)
            else:
                self.stored[item.event_id] = item
                result.stored.add(item.event_id)
        return result


class FakeDeadLetters:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.letters: list[DeadLetter] = []

    async def publish(self, domain: Domain, letters: Sequence[DeadLetter]) -> None:
        if self.fail:
            raise DeadLetterUnavailable("no responders")
        self.letters.extend(letters)


def _intake(store: FakeStore, dlq: FakeDeadLetters, max_deliver: int = 3) -> Intake:
    """An intake on the fakes; tests call `flush()` so the commit in flight has finished."""
    return Intake(
        Domain.SECURITY,
        subjects=Subjects(),
        writer=store,
        dead_letters=dlq,  # type: ignore[arg-type]
        metrics=Metrics(),
        max_deliver=max_deliver,
        max_message_bytes=10_000,
        retry_delay=lambda n: float(n),
    )


def _msg(seq: int, message_id: str = "", body: bytes | None = None, delivered: int = 1) -> FakeMsg:
    if body is None:
        body = json.dumps(
            {
                "id": message_id or f"m{seq}",
                "source": "door-7",
                "occurred_at": "2026-11-27T10:00:00Z",
                "kind": "door.forced",
                "severity": "high",
            }
        ).encode()
    return FakeMsg("security.v1.door-7", body, seq, delivered)


async def test_valid_messages_are_stored_then_acked_and_copies_acked_without_storing() -> None:
    store, dlq = FakeStore(), FakeDeadLetters()
    batch = [_msg(1), _msg(2), _msg(3, "m1")]  # the third repeats the first id
    intake = _intake(store, dlq)
    await intake.handle(batch)
    await intake.flush()
    assert len(store.stored) == 2
    assert all(m.fate == [("ack", None)] for m in batch)
    again = [_msg(4, "m2")]
    await intake.handle(again)
    await intake.flush()
    assert len(store.stored) == 2 and again[0].fate == [("ack", None)]


async def test_bad_messages_are_acked_only_after_their_dead_letter() -> None:
    store, dlq = FakeStore(), FakeDeadLetters()
    bad = _msg(1, body=b"not json")
    intake = _intake(store, dlq)
    await intake.handle([bad, _msg(2)])
    await intake.flush()
    assert [letter.reason for letter in dlq.letters] == [Reason.INVALID_JSON]
    assert dlq.letters[0].body == b"not json" and dlq.letters[0].stream_seq == 1
    assert bad.fate == [("ack", None)]


async def test_unreachable_dlq_naks_the_bad_message_for_later() -> None:
    bad = _msg(1, body=b"not json")
    await _intake(FakeStore(), FakeDeadLetters(fail=True)).handle([bad])
    assert bad.fate == [("nak", 1.0)]


async def test_store_down_naks_with_backoff_until_max_deliver_then_dead_letters() -> None:
    store, dlq = FakeStore(fail=True), FakeDeadLetters()
    first, last = _msg(1, delivered=2), _msg(2, delivered=3)
    intake = _intake(store, dlq, max_deliver=3)
    await intake.handle([first, last])
    await intake.flush()
    assert first.fate == [("nak", 2.0)]
    assert last.fate == [("ack", None)]
    assert [(d.reason, d.delivered) for d in dlq.letters] == [(Reason.RETRIES_EXHAUSTED, 3)]
    assert "connection refused" in dlq.letters[0].detail


async def test_a_message_redelivered_past_the_limit_is_dead_lettered_unprocessed() -> None:
    store, dlq = FakeStore(), FakeDeadLetters()
    crashed_on = _msg(1, delivered=4)
    await _intake(store, dlq, max_deliver=3).handle([crashed_on])
    assert store.stored == {}
    assert [d.reason for d in dlq.letters] == [Reason.MAX_DELIVER_EXCEEDED]
    assert crashed_on.fate == [("ack", None)]


async def test_an_unexpected_store_error_is_retried_not_dropped() -> None:
    class Broken(FakeStore):
        async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult:
            raise RuntimeError("bug")

    dlq = FakeDeadLetters()
    msg = _msg(1)
    intake = _intake(Broken(), dlq)
    await intake.handle([msg])
    await intake.flush()
    assert msg.fate == [("nak", 1.0)]
    last = _msg(1, delivered=3)
    await intake.handle([last])
    await intake.flush()
    assert [d.reason for d in dlq.letters] == [Reason.RETRIES_EXHAUSTED]
    assert "bug" in dlq.letters[0].detail


def test_delivery_info_reads_both_ack_subject_formats() -> None:
    v1 = SimpleNamespace(reply="$JS.ACK.SECURITY.pipeline-security.3.1234.56.1700000000000000000.9")
    v2 = SimpleNamespace(
        reply="$JS.ACK._.ACCHASH.SECURITY.pipeline-security.2.77.8.1700000000000000000.0.xyz"
    )
    assert delivery_info(v1) == ("SECURITY", 1234, 3)  # type: ignore[arg-type]
    assert delivery_info(v2) == ("SECURITY", 77, 2)  # type: ignore[arg-type]
    fallback = _msg(5, delivered=4)
    assert delivery_info(fallback) == ("SECURITY", 5, 4)
