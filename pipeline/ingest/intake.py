"""Intake: turn one pulled batch into stored events, dead letters, acks and naks.

Order of effects for a batch:
1. decode each message; rejected ones become dead letters;
2. dead letters are published and acknowledged by the DLQ stream, then their sources acked;
3. valid messages are written in one transaction (ids already stored are skipped);
4. after the commit, their sources are acked and the ids cached.
A transient failure naks the affected messages with backoff; past `max_deliver`
deliveries they are dead-lettered instead. Nothing is acked before it is safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

import nats.errors

from schemas import Domain
from streams import Subjects

from ..errors import Reason, Rejected, RetryLater
from ..metrics import Metrics
from ..store.eventstore import Accepted, WriteResult
from .codec import decode
from .deadletter import DeadLetter, DeadLetters
from .dedup import CommittedIds

__all__ = ["Delivery", "Intake", "IntakeServices", "Writer"]

log = logging.getLogger(__name__)


class Delivery(Protocol):
    """What the intake needs of a JetStream message (`nats.aio.msg.Msg` has it)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None

    @property
    def metadata(self) -> Any: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...


def delivery_info(msg: Delivery) -> tuple[str, int, int]:
    """(stream, stream sequence, deliveries so far) of a JetStream message.

    Read from the ack subject directly: nats-py's `Msg.metadata` also builds timestamps
    and objects the pipeline does not use, at several times the cost per message.
    """
    if msg.reply.startswith("$JS.ACK."):
        t = msg.reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
        if len(t) == 9:
            return t[2], int(t[5]), int(t[4])
        # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<stream seq>.... (v2)
        if len(t) >= 11:
            return t[4], int(t[7]), int(t[6])
    meta = msg.metadata
    return meta.stream, meta.sequence.stream, meta.num_delivered


class Writer(Protocol):
    """Stores batches of accepted messages (`pipeline.writer.GroupWriter`)."""

    async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult: ...


class IntakeServices(TypedDict):
    """What every domain's intake is built with, besides its own limits."""

    subjects: Subjects
    writer: Writer
    dead_letters: DeadLetters
    metrics: Metrics
    max_deliver: int
    retry_delay: Callable[[int], float]
    cache: CommittedIds | None


class Intake:
    """Handles batches of one domain."""

    def __init__(
        self,
        domain: Domain,
        *,
        subjects: Subjects,
        writer: Writer,
        dead_letters: DeadLetters,
        metrics: Metrics,
        max_deliver: int,
        max_message_bytes: int,
        retry_delay: Callable[[int], float],
        cache: CommittedIds | None = None,
    ) -> None:
        self.domain = domain
        self._subjects = subjects
        self._writer = writer
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._max_deliver = max_deliver
        self._max_bytes = max_message_bytes
        self._retry_delay = retry_delay
        self._cache = cache
        self._label = domain.value
        self._committing: asyncio.Task[None] | None = None

    def _received(self, batch: Sequence[Delivery]) -> tuple[float, datetime]:
        """Count a pulled batch; (start of its handling, when it arrived)."""
        self._metrics.consumed.labels(self._label).inc(len(batch))
        self._metrics.batch_size.labels(self._label).observe(len(batch))
        return time.perf_counter(), datetime.now(UTC)

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Process one batch; every message ends acked, nak'd or dead-lettered."""
        started, received_at = self._received(batch)

        rejected: list[tuple[Delivery, DeadLetter]] = []
        # Keyed by message id: copies of one message in a batch are stored once.
        accepted: dict[str, Accepted] = {}
        deliveries: dict[str, list[Delivery]] = {}
        for msg in batch:
            try:
                item = self._accept(msg, received_at)
            except Rejected as exc:
                rejected.append((msg, self._dead_letter(msg, exc.reason, exc.detail)))
                continue
            accepted.setdefault(item.message_id, item)
            deliveries.setdefault(item.message_id, []).append(msg)

        if rejected:
            await self._dead_letter_all(rejected)
        # One commit in flight: the next batch is pulled and decoded while this one is
        # written. Waiting for the previous commit first bounds the work in hand.
        await self.flush()
        if accepted:
            self._committing = asyncio.create_task(self._store_all(accepted, deliveries, started))
        else:
            self._observe(started)

    async def flush(self) -> None:
        """Wait until the batch being committed is committed and acked (or nak'd)."""
        task = self._committing
        if task is None:
            return
        # Shielded: a cancelled pull (NATS reconnecting, shutdown) must not cut a commit
        # off from its acks; the task stays in hand until it is done.
        await asyncio.shield(task)
        if self._committing is task:
            self._committing = None

    def _observe(self, started: float) -> None:
        self._metrics.handler_seconds.labels(self._label).observe(time.perf_counter() - started)

    def _accept(self, msg: Delivery, received_at: datetime) -> Accepted:
        _, stream_seq, delivered = delivery_info(msg)
        if delivered > self._max_deliver:
            raise Rejected(
                Reason.MAX_DELIVER_EXCEEDED,
                f"delivered {delivered} times without being acked "
                f"(limit {self._max_deliver}); the worker may have crashed on it",
            )
        model = decode(
            self._subjects, self.domain, msg.subject, msg.data, max_bytes=self._max_bytes
        )
        payload = model.model_dump(mode="json")
        return Accepted(
            domain=self.domain,
            message_id=payload["id"],
            subject=msg.subject,
            stream_seq=stream_seq,
            schema_version=payload["schema_version"],
            received_at=received_at,
            payload=payload,
        )

    def _dead_letter(self, msg: Delivery, reason: Reason, detail: str) -> DeadLetter:
        stream, stream_seq, delivered = delivery_info(msg)
        return DeadLetter(
            reason=reason,
            detail=detail,
            subject=msg.subject,
            stream=stream,
            stream_seq=stream_seq,
            delivered=delivered,
            body=msg.data or b"",
            headers=dict(msg.headers or {}),
        )

    async def _dead_letter_all(self, rejected: list[tuple[Delivery, DeadLetter]]) -> None:
        try:
            await self._dead_letters.publish(self.domain, [letter for _, letter in rejected])
        except RetryLater as exc:
            log.warning("%s: %s; %d messages will be redelivered", self._label, exc, len(rejected))
            for msg, _ in rejected:
                await self._nak(msg, exc)
            return
        for msg, letter in rejected:
            await self._settle(msg.ack())
            self._metrics.dead_lettered.labels(self._label, letter.reason.value).inc()

    async def _store_all(
        self,
        accepted: dict[str, Accepted],
        deliveries: dict[str, list[Delivery]],
        batch_started: float,
    ) -> None:
        in_batch = sum(len(d) for d in deliveries.values()) - len(deliveries)
        if in_batch:
            self._metrics.duplicates.labels(self._label, "batch").inc(in_batch)
        known = (
            await self._cache.known([a.event_id for a in accepted.values()])
            if self._cache
            else set()
        )
        started = time.perf_counter()
        try:
            result = await self._writer.write(list(accepted.values()), known)
        except Exception as exc:
            msgs = [m for ms in deliveries.values() for m in ms]
            if isinstance(exc, RetryLater):
                log.warning("%s: %s; %d messages will be retried", self._label, exc, len(msgs))
                retry = exc
            else:  # a bug, not bad input: retried, then dead-lettered with the error
                log.exception("%s: storing a batch failed unexpectedly", self._label)
                retry = RetryLater(f"unexpected error: {exc!r}")
            await self._retry(msgs, retry)
            self._observe(batch_started)
            return
        self._metrics.commit_seconds.labels(self._label).observe(time.perf_counter() - started)
        self._metrics.stored.labels(self._label).inc(len(result.stored))
        for ms in deliveries.values():
            for msg in ms:
                await self._settle(msg.ack())
        if known:
            self._metrics.duplicates.labels(self._label, "cache").inc(len(known))
        if len(result.duplicates) > len(known):
            self._metrics.duplicates.labels(self._label, "store").inc(
                len(result.duplicates) - len(known)
            )
        if self._cache:
            await self._cache.remember(result.stored | (result.duplicates - known))
        self._observe(batch_started)

    async def _retry(self, msgs: list[Delivery], exc: RetryLater) -> None:
        """Nak for redelivery, or dead-letter what has used up its deliveries."""
        exhausted = []
        for msg in msgs:
            delivered = delivery_info(msg)[2]
            if delivered >= self._max_deliver:
                exhausted.append(
                    (
                        msg,
                        self._dead_letter(
                            msg, Reason.RETRIES_EXHAUSTED, f"after {delivered} deliveries: {exc}"
                        ),
                    )
                )
            else:
                await self._nak(msg, exc)
        if exhausted:
            await self._dead_letter_all(exhausted)

    async def _nak(self, msg: Delivery, exc: RetryLater) -> None:
        await self._settle(msg.nak(delay=self._retry_delay(delivery_info(msg)[2])))
        self._metrics.retried.labels(self._label, type(exc).__name__).inc()

    async def _settle(self, ack_or_nak: Awaitable[None]) -> None:
        """Send an ack or nak; if NATS is unreachable, JetStream redelivers after ack_wait."""
        try:
            await ack_or_nak
        except nats.errors.Error as exc:
            # Safe: a redelivered message that was stored is found in the store and acked.
            self._metrics.settle_errors.labels(self._label).inc()
            log.warning(
                "%s: ack/nak not sent (%r); the message will be redelivered", self._label, exc
            )
