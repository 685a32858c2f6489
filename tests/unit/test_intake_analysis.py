"""The intake's analysis step: each verdict ends as stored, dead-lettered, retried or given
back, with in-memory stand-ins for the store, the DLQ and the step."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

from opentelemetry.trace import Span

from pipeline.errors import DetectionFailed, DetectorUnavailable, Reason, Rejected
from pipeline.ingest.intake import Delivery, Intake, Verdict, Work, delivery_info
from pipeline.ingest.pause import Pauses
from pipeline.metrics import Metrics
from pipeline.store.eventstore import Accepted
from schemas import Domain
from streams import Subjects

from .test_intake import FakeDeadLetters, FakeMsg, FakeStore


class Doubler:
    """An analysis step: messages `{"id", "n"}`; the analysis doubles `n`. `n` < 0 is
    refused by the check, 0 is stored without analysis, 13 fails the analysis, 99 is
    refused by it, and `stopping` makes `submit` refuse (as a pool that stops)."""

    def __init__(self, store: FakeStore, look_up_all: bool = False) -> None:
        self.look_up_all = look_up_all
        self.store = store
        self.submitted: list[int] = []
        self.counts: dict[str, int] = {}
        self.looked_up: list[uuid.UUID] = []
        self.stopping = False

    def _accepted(self, msg: Delivery, doc: dict[str, Any], received_at: datetime) -> Accepted:
        return Accepted(
            domain=Domain.SECURITY,
            message_id=doc["id"],
            subject=msg.subject,
            stream_seq=delivery_info(msg).stream_seq,
            schema_version="1.0",
            received_at=received_at,
            payload=doc,
        )

    def check(self, msg: Delivery, received_at: datetime) -> Accepted | Work:
        doc = json.loads(msg.data)
        if doc["n"] < 0:
            raise Rejected(Reason.SCHEMA_VIOLATION, "n is negative")
        if doc["n"] == 0:
            return self._accepted(msg, doc, received_at)
        return Work(doc["id"], doc)

    async def stored(self, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        self.looked_up.extend(ids)
        return {i for i in ids if i in self.store.stored}

    async def submit(self, work: Work) -> Awaitable[Any]:
        if self.stopping:
            raise DetectorUnavailable("stopping")
        self.submitted.append(work.item["n"])
        n = work.item["n"]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        answer: Any = DetectionFailed("unlucky") if n == 13 else 2 * n
        asyncio.get_running_loop().call_later(0.01, future.set_result, answer)
        return future

    def verdict(self, msg: Delivery, work: Work, outcome: Any, received_at: datetime) -> Verdict:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, DetectionFailed | DetectorUnavailable)
            return outcome
        if outcome == 198:
            return Rejected(Reason.UNDECODABLE_IMAGE, "cannot double 99")
        return self._accepted(msg, {**work.item, "doubled": outcome}, received_at)

    def count(self, outcome: str, n: int) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + n

    def trace(self, root: Span, outcome: Any) -> None:  # no traced messages here
        raise AssertionError("not traced")


class Setup:
    def __init__(self, **step: Any) -> None:
        self.log: list[tuple[str, int]] = []
        self.store = FakeStore()
        self.dlq = FakeDeadLetters(self.log)
        self.metrics = Metrics()
        self.step = Doubler(self.store, **step)
        self.intake = Intake(
            Domain.SECURITY,
            subjects=Subjects(),
            writer=self.store,
            dead_letters=self.dlq,  # type: ignore[arg-type]
            metrics=self.metrics,
            pauses=Pauses(self.metrics, first_s=0.01, max_s=0.05),
            max_deliver=3,
            ack_wait_s=30.0,
            max_message_bytes=10_000,
            retry_delay=lambda n: float(n),
            analysis=self.step,
        )

    def msg(self, seq: int, n: int, delivered: int = 1, message_id: str = "") -> FakeMsg:
        body = json.dumps({"id": message_id or f"m{seq}", "n": n}).encode()
        return FakeMsg("security.v1.door-7", body, seq, self.log, delivered)


async def test_each_verdict_ends_as_it_says() -> None:
    s = Setup()
    msgs = [s.msg(1, 5), s.msg(2, -1), s.msg(3, 0), s.msg(4, 13), s.msg(5, 99), s.msg(6, 7)]
    await s.intake.handle(msgs)
    await s.intake.flush()

    fates = {m.seq: m.fate for m in msgs}
    assert fates == {
        1: [("ack", None)],
        2: [("ack", None)],  # dead-lettered by the check, then acked
        3: [("ack", None)],  # stored as is
        4: [("nak", 1.0)],  # retried with the delay of its first delivery
        5: [("ack", None)],  # dead-lettered by the verdict
        6: [("ack", None)],
    }
    stored = {a.message_id: a.payload for a in s.store.stored.values()}
    assert stored == {
        "m1": {"id": "m1", "n": 5, "doubled": 10},
        "m3": {"id": "m3", "n": 0},
        "m6": {"id": "m6", "n": 7, "doubled": 14},
    }
    assert [(letter.stream_seq, letter.reason) for letter in s.dlq.letters] == [
        (2, Reason.SCHEMA_VIOLATION),
        (5, Reason.UNDECODABLE_IMAGE),
    ]
    assert s.step.submitted == [5, 13, 99, 7]  # the skipped and the refused are not analysed
    assert s.step.counts == {"rejected": 2, "skipped": 1, "failed": 1, "analysed": 2}
    # Dead letters are published before their sources are acked.
    assert s.log.index(("dead_letter", 2)) < s.log.index(("ack", 2))


async def test_past_max_deliver_is_dead_lettered_without_analysis() -> None:
    s = Setup()
    msg = s.msg(1, 5, delivered=4)
    await s.intake.handle([msg])
    await s.intake.flush()
    assert msg.fate == [("ack", None)]
    assert [letter.reason for letter in s.dlq.letters] == [Reason.MAX_DELIVER_EXCEEDED]
    assert s.step.submitted == []


async def test_a_failure_past_max_deliver_is_dead_lettered() -> None:
    s = Setup()
    msg = s.msg(1, 13, delivered=3)
    await s.intake.handle([msg])
    await s.intake.flush()
    assert msg.fate == [("ack", None)]
    assert [letter.reason for letter in s.dlq.letters] == [Reason.RETRIES_EXHAUSTED]


async def test_a_stopping_step_gives_the_rest_back() -> None:
    s = Setup()
    s.step.stopping = True
    msgs = [s.msg(1, 5), s.msg(2, 0)]
    await s.intake.handle(msgs)
    await s.intake.flush()
    assert msgs[0].fate == [("nak", None)]  # given back: no delay, no dead letter
    assert msgs[1].fate == [("ack", None)]  # needed no analysis: stored
    assert s.dlq.letters == []


async def test_redelivered_and_stored_messages_are_acked_without_analysis() -> None:
    s = Setup()
    first = s.msg(1, 5)
    await s.intake.handle([first])
    await s.intake.flush()
    again, new = s.msg(2, 5, delivered=2, message_id="m1"), s.msg(3, 6)
    await s.intake.handle([again, new])
    await s.intake.flush()
    assert again.fate == [("ack", None)]
    assert s.step.submitted == [5, 6]  # m1 is not analysed again
    # Only the redelivered message is looked up (no cache, not a replay).
    assert len(s.step.looked_up) == 1
    assert s.metrics.duplicates.labels("security", "store")._value.get() == 1


async def test_a_replay_looks_every_message_up() -> None:
    s = Setup(look_up_all=True)
    await s.intake.handle([s.msg(1, 5), s.msg(2, 6)])
    await s.intake.flush()
    assert len(s.step.looked_up) == 2


async def test_several_batches_are_with_the_step_at_once() -> None:
    s = Setup()
    await s.intake.handle([s.msg(1, 5)])
    await s.intake.handle([s.msg(2, 6)])  # returns while the first is still with the step
    assert s.step.submitted == [5, 6]
    assert s.store.stored == {}
    await s.intake.flush()
    assert len(s.store.stored) == 2
