"""The intake's verdicts, with in-memory stand-ins for the store and the DLQ."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.errors import DeadLetterUnavailable, Reason, StoreUnavailable
from pipeline.ingest.deadletter import DeadLetter
from pipeline.ingest.intake import delivery_info
from pipeline.ingest.pause import Pauses
from pipeline.logs import JsonFormatter
from pipeline.metrics import Metrics
from pipeline.store.eventstore import Accepted, WriteResult
from schemas import Domain

from ..conftest import make_intake, wait_until


@dataclass
class FakeMsg:
    """A JetStream message as the intake sees it, recording its fate in a shared log."""

    subject: str
    data: bytes
    seq: int
    log: list[tuple[str, int]]
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
            timestamp=datetime(2026, 11, 27, tzinfo=UTC),
        )

    async def ack(self) -> None:
        self.fate.append(("ack", None))
        self.log.append(("ack", self.seq))

    async def nak(self, delay: float | None = None) -> None:
        self.fate.append(("nak", delay))
        self.log.append(("nak", self.seq))

    async def in_progress(self) -> None:
        self.log.append(("in_progress", self.seq))


class FakeStore:
    """Stores in a dict; `down` makes every write fail as an unreachable database would."""

    def __init__(self, down: bool = False, refuse: set[str] | None = None) -> None:
        self.down = down
        self.refuse = refuse or set()
        self.attempts = 0
        self.stored: dict[uuid.UUID, Accepted] = {}

    async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult:
        self.attempts += 1
        if self.down:
            raise StoreUnavailable("connection refused")
        result = WriteResult()
        for item in batch:
            if item.message_id in self.refuse:
                result.unstorable[item.event_id] = "DataError: value out of range"
            elif item.event_id in self.stored:
                result.duplicates.add(item.event_id)
            else:
                self.stored[item.event_id] = item
                result.stored.add(item.event_id)
        return result


class FakeDeadLetters:
    """Keeps letters; logs each publish in the shared log; `down` fails every publish."""

    def __init__(self, log: list[tuple[str, int]], down: bool = False) -> None:
        self.log = log
        self.down = down
        self.letters: list[DeadLetter] = []

    async def publish(self, domain: Domain, letters: Sequence[DeadLetter]) -> list[bool]:
        if self.down:
            raise DeadLetterUnavailable("no responders")
        held = {letter.stream_seq for letter in self.letters}
        for letter in letters:
            self.log.append(("dead_letter", letter.stream_seq))
        self.letters.extend(letters)
        # As the DLQ stream: one letter per source message, a later one not written.
        return [letter.stream_seq not in held for letter in letters]


class Setup:
    """An intake on the fakes; tests call `flush()` so the commit in flight has finished."""

    def __init__(self, *, max_deliver: int = 3, ack_wait_s: float = 30.0, **store: Any) -> None:
        self.log: list[tuple[str, int]] = []
        self.store = FakeStore(**store)
        self.dlq = FakeDeadLetters(self.log)
        self.metrics = Metrics()
        self.pauses = Pauses(self.metrics, first_s=0.01, max_s=0.05)
        self.intake = make_intake(
            self.store,
            self.dlq,
            metrics=self.metrics,
            pauses=self.pauses,
            max_deliver=max_deliver,
            ack_wait_s=ack_wait_s,
        )

    def msg(
        self, seq: int, message_id: str = "", body: bytes | None = None, delivered: int = 1
    ) -> FakeMsg:
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
        return FakeMsg("security.v1.door-7", body, seq, self.log, delivered)

    def paused(self, cause: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "pipeline_intake_paused", {"domain": "security", "cause": cause}
        )
        return value or 0.0


async def test_valid_messages_are_stored_then_acked_and_copies_acked_without_storing() -> None:
    s = Setup()
    batch = [s.msg(1), s.msg(2), s.msg(3, "m1")]  # the third repeats the first id
    await s.intake.handle(batch)
    await s.intake.flush()
    assert len(s.store.stored) == 2
    assert all(m.fate == [("ack", None)] for m in batch)
    again = [s.msg(4, "m2")]
    await s.intake.handle(again)
    await s.intake.flush()
    assert len(s.store.stored) == 2 and again[0].fate == [("ack", None)]


async def test_bad_messages_are_acked_only_after_their_dead_letter() -> None:
    s = Setup()
    bad = s.msg(1, body=b"not json")
    await s.intake.handle([bad, s.msg(2)])
    await s.intake.flush()
    assert [letter.reason for letter in s.dlq.letters] == [Reason.INVALID_JSON]
    assert s.dlq.letters[0].body == b"not json" and s.dlq.letters[0].stream_seq == 1
    assert bad.fate == [("ack", None)]
    assert s.log.index(("dead_letter", 1)) < s.log.index(("ack", 1))


async def test_a_message_whose_letter_the_dlq_holds_is_counted_as_held_not_written() -> None:
    s = Setup()
    await s.intake.handle([s.msg(1, body=b"not json")])
    await s.intake.handle([s.msg(1, body=b"not json", delivered=2)])  # a replay, say
    await s.intake.flush()
    assert s.metrics.total("pipeline_dead_lettered") == 2
    assert s.metrics.total("pipeline_dead_letters_held") == 1


async def test_a_dlq_outage_holds_the_bad_message_and_pauses_until_it_is_back() -> None:
    s = Setup()
    s.dlq.down = True
    bad = s.msg(1, body=b"not json")
    handling = asyncio.create_task(s.intake.handle([bad]))
    await wait_until(lambda: s.paused("dead_letters") == 1)
    assert not handling.done(), "the handler must not return (and pull) while paused"
    assert bad.fate == []
    s.dlq.down = False
    await handling
    assert bad.fate == [("ack", None)]
    assert [letter.reason for letter in s.dlq.letters] == [Reason.INVALID_JSON]
    assert s.paused("dead_letters") == 0


async def test_a_store_outage_uses_up_no_delivery_and_dead_letters_nothing() -> None:
    s = Setup(max_deliver=1, down=True)
    msgs = [s.msg(1, delivered=1), s.msg(2, delivered=1)]
    await s.intake.handle(msgs)
    await wait_until(lambda: s.store.attempts >= 5)
    assert s.paused("store") == 1
    assert s.pauses.active() and "security paused (store)" in s.pauses.active()[0]
    assert all(m.fate == [] for m in msgs), "held: neither nak'd nor acked"
    s.store.down = False
    await s.intake.flush()
    assert all(m.fate == [("ack", None)] for m in msgs)
    assert len(s.store.stored) == 2 and s.dlq.letters == []
    assert s.paused("store") == 0 and s.pauses.active() == []


async def test_held_messages_are_marked_in_progress_so_they_are_not_redelivered() -> None:
    s = Setup(ack_wait_s=0.3, down=True)
    msg = s.msg(1)
    await s.intake.handle([msg])
    await wait_until(lambda: s.log.count(("in_progress", 1)) >= 2)
    s.store.down = False
    await s.intake.stop()
    assert msg.fate == [("ack", None)]


async def test_stopping_during_an_outage_gives_the_messages_back() -> None:
    s = Setup(down=True)
    msg = s.msg(1)
    await s.intake.handle([msg])
    await wait_until(lambda: s.paused("store") == 1)
    s.pauses.stop()
    await s.intake.stop()
    assert msg.fate == [("nak", None)]
    assert s.dlq.letters == []


async def test_a_message_the_store_refuses_is_dead_lettered_alone() -> None:
    s = Setup(refuse={"m2"})
    msgs = [s.msg(1), s.msg(2), s.msg(3)]
    await s.intake.handle(msgs)
    await s.intake.flush()
    assert len(s.store.stored) == 2
    assert [(d.reason, d.stream_seq) for d in s.dlq.letters] == [(Reason.UNSTORABLE, 2)]
    assert "out of range" in s.dlq.letters[0].detail
    assert all(m.fate == [("ack", None)] for m in msgs)
    assert s.log.index(("dead_letter", 2)) < s.log.index(("ack", 2))


async def test_a_message_redelivered_past_the_limit_is_dead_lettered_unprocessed() -> None:
    s = Setup(max_deliver=3)
    crashed_on = s.msg(1, delivered=4)
    await s.intake.handle([crashed_on])
    assert s.store.stored == {}
    assert [d.reason for d in s.dlq.letters] == [Reason.MAX_DELIVER_EXCEEDED]
    assert crashed_on.fate == [("ack", None)]


async def test_an_unexpected_store_error_is_retried_then_dead_lettered() -> None:
    class Broken(FakeStore):
        async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult:
            raise RuntimeError("bug")

    s = Setup()
    s.intake._writer = Broken()
    msg = s.msg(1)
    await s.intake.handle([msg])
    await s.intake.flush()
    assert msg.fate == [("nak", 1.0)]
    last = s.msg(1, delivered=3)
    await s.intake.handle([last])
    await s.intake.flush()
    assert [d.reason for d in s.dlq.letters] == [Reason.RETRIES_EXHAUSTED]
    assert "bug" in s.dlq.letters[0].detail


def test_delivery_info_reads_both_ack_subject_formats() -> None:
    v1 = SimpleNamespace(reply="$JS.ACK.SECURITY.pipeline-security.3.1234.56.1700000000000000000.9")
    v2 = SimpleNamespace(
        reply="$JS.ACK._.ACCHASH.SECURITY.pipeline-security.2.77.8.1700000000000000001.0.xyz"
    )
    assert delivery_info(v1) == ("SECURITY", 1234, 3, 1700000000000000000)  # type: ignore[arg-type]
    assert delivery_info(v2) == ("SECURITY", 77, 2, 1700000000000000001)  # type: ignore[arg-type]
    fallback = Setup().msg(5, delivered=4)
    assert delivery_info(fallback)[:3] == ("SECURITY", 5, 4)
    assert delivery_info(fallback).stored_ns == 1_795_737_600_000_000_000


async def test_lines_about_a_message_carry_its_domain_subject_sequence_and_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Setup(refuse={"m2"})
    bad = s.msg(1, body=b"not json")
    bad.headers = {"Nats-Msg-Id": "m1"}
    refused = s.msg(2)
    refused.headers = {"Nats-Msg-Id": "m2"}
    with caplog.at_level(logging.INFO, logger="pipeline"):
        await s.intake.handle([bad, refused])
        await s.intake.flush()
    lines = [
        json.loads(JsonFormatter().format(r)) for r in caplog.records if "dead-lettered" in r.msg
    ]
    assert [(line["reason"], line["stream_seq"], line["message_id"]) for line in lines] == [
        ("invalid_json", 1, "m1"),
        ("unstorable", 2, "m2"),
    ]
    assert all(
        (line["domain"], line["subject"], line["level"])
        == ("security", "security.v1.door-7", "INFO")
        for line in lines
    )
