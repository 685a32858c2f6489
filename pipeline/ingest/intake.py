"""Intake: turn one pulled batch into stored events, dead letters, acks and naks.

Order of effects for a batch:
1. decode each message; rejected ones become dead letters;
2. dead letters are published and acknowledged by the DLQ stream, then their sources acked;
3. valid messages are written in one transaction (ids already stored are skipped; a
   message the store refuses is dead-lettered alone as `unstorable`);
4. after the commit, their sources are acked and the ids cached.
An intake may have an analysis step (`Analysis`; frames: the detector pool) between
validation and the store. Then the step checks each message (an `Accepted` to store as
is, or a `Work` item to analyse), messages already stored are acked without analysis,
the rest are submitted to the step (which waits while it is full: backpressure), and in
the background, once the step has answered, each message's verdict is stored, dead-
lettered, retried or given back. Several batches can be with the step at once.
When a server the batch needs is down (the event store, the DLQ stream), the intake
holds the batch, pauses (it pulls nothing more) and retries the same step until the
server is back: an outage uses up no delivery and turns nothing into a dead letter.
Only failures that may be tied to a message are nak'd with backoff; past `max_deliver`
deliveries those are dead-lettered. Nothing is acked before it is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypedDict, TypeVar

import nats.errors
from opentelemetry.trace import Span

from schemas import Domain
from streams import Subjects

from .. import tracing
from ..errors import Reason, Rejected, RetryLater, Unavailable
from ..metrics import Metrics
from ..store.domain import event_id
from ..store.eventstore import Accepted, WriteResult
from .codec import decode
from .deadletter import DeadLetter, DeadLetters
from .dedup import CommittedIds
from .pause import Pauses, Stopping

__all__ = [
    "Analysis",
    "Delivery",
    "Intake",
    "IntakeServices",
    "Verdict",
    "Work",
    "Writer",
    "delivery_info",
    "message_fields",
]

log = logging.getLogger(__name__)

_Checked = TypeVar("_Checked")


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

    async def in_progress(self) -> None: ...


class DeliveryInfo(NamedTuple):
    """Where a delivered message sits in its stream."""

    stream: str
    stream_seq: int
    delivered: int
    stored_ns: int
    """When the stream stored it (ns since the epoch): with the sequence, its identity."""


_new = tuple.__new__


def delivery_info(msg: Delivery) -> DeliveryInfo:
    """Stream, stream sequence, deliveries so far and storage time of a JetStream message.

    Read from the ack subject directly: nats-py's `Msg.metadata` also builds timestamps
    and objects the pipeline does not use, at several times the cost per message.
    """
    if msg.reply.startswith("$JS.ACK."):
        t = msg.reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
        # tuple.__new__ skips the named tuple's Python-level constructor: this runs per message.
        if len(t) == 9:
            return _new(DeliveryInfo, (t[2], int(t[5]), int(t[4]), int(t[7])))
        # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<stream seq>.... (v2)
        if len(t) >= 11:
            return _new(DeliveryInfo, (t[4], int(t[7]), int(t[6]), int(t[9])))
    meta = msg.metadata
    stamp = getattr(meta, "timestamp", None)
    stored_ns = int(stamp.timestamp() * 1e9) if isinstance(stamp, datetime) else 0
    return DeliveryInfo(meta.stream, meta.sequence.stream, meta.num_delivered, stored_ns)


def message_fields(domain: Domain, msg: Delivery) -> dict[str, Any]:
    """The structured log fields of a line about one message.

    The message id is the producer's `Nats-Msg-Id` (the same as the body's `id` for a
    well-behaved producer; a message that cannot be decoded has no other).
    """
    fields = {
        "domain": domain.value,
        "subject": msg.subject,
        "stream_seq": delivery_info(msg).stream_seq,
        "message_id": (msg.headers or {}).get("Nats-Msg-Id", ""),
    }
    traced = tracing.trace_id(msg.headers)
    if traced:
        fields["trace_id"] = traced
    return fields


class Writer(Protocol):
    """Stores batches of accepted messages (`pipeline.ingest.writer.GroupWriter`)."""

    async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult: ...


@dataclass(frozen=True, slots=True)
class Work:
    """A checked message that needs analysis before it can be stored."""

    message_id: str
    """The producer's id: the stored event's identity, as for an `Accepted` message."""
    item: Any
    """What the analysis step takes (frames: the frame and its metadata)."""


Verdict = Accepted | Rejected | RetryLater | Unavailable
"""What becomes of an analysed message: stored, dead-lettered, retried with backoff, or
given back (nak'd without delay, never dead-lettered: the step stopped)."""


class Analysis(Protocol):
    """An analysis step between validation and the store (frames: the detector pool)."""

    look_up_all: bool
    """Look every message up in the store before analysing it (a replay), not only those
    the cache knows and redelivered ones."""

    def check(self, msg: Delivery, received_at: datetime) -> Accepted | Work:
        """An `Accepted` to store without analysis, or the work to analyse; raises
        `Rejected` with the reason to dead-letter the message."""
        ...

    async def stored(self, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these event ids the store holds (raises `Unavailable`)."""
        ...

    async def submit(self, work: Work) -> Awaitable[Any]:
        """Queue one item, waiting while the step is full; its outcome is awaited later.
        Raises `Unavailable` when the step stops (the rest of the batch is given back)."""
        ...

    def verdict(self, msg: Delivery, work: Work, outcome: Any, received_at: datetime) -> Verdict:
        """What becomes of a message from its outcome (an exception if the step raised)."""
        ...

    def count(self, outcome: str, n: int) -> None:
        """Count messages by outcome: rejected, skipped, analysed, failed."""
        ...

    def trace(self, root: Span, outcome: Any) -> None:
        """Record the analysis of a traced message under its root span."""
        ...


class IntakeServices(TypedDict):
    """What every domain's intake is built with, besides its own limits."""

    subjects: Subjects
    writer: Writer
    dead_letters: DeadLetters
    metrics: Metrics
    pauses: Pauses
    max_deliver: int
    ack_wait_s: float
    retry_delay: Callable[[int], float]
    cache: CommittedIds | None


class Intake:
    """Handles batches of one domain, with an optional analysis step (`Analysis`)."""

    def __init__(
        self,
        domain: Domain,
        *,
        subjects: Subjects,
        writer: Writer,
        dead_letters: DeadLetters,
        metrics: Metrics,
        pauses: Pauses,
        max_deliver: int,
        ack_wait_s: float,
        max_message_bytes: int,
        retry_delay: Callable[[int], float],
        cache: CommittedIds | None = None,
        analysis: Analysis | None = None,
    ) -> None:
        self.domain = domain
        self.analysis = analysis
        self._subjects = subjects
        self._writer = writer
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._pauses = pauses
        self._max_deliver = max_deliver
        self._max_bytes = max_message_bytes
        self._retry_delay = retry_delay
        self._cache = cache
        self._label = domain.value
        self._committing: asyncio.Task[None] | None = None
        # With an analysis step: the batches with the step or being stored.
        self._tasks: set[asyncio.Task[None]] = set()
        # Messages in hand for long (a slow detector, a server down) are marked in
        # progress every third of the ack wait, so JetStream does not redeliver them:
        # by hold, when it was last marked (or taken) and its messages.
        self._held: dict[int, tuple[float, Sequence[Delivery]]] = {}
        self._progress_every = ack_wait_s / 3
        self._keeper: asyncio.Task[None] | None = None
        # Root spans of the traced messages in hand (see `pipeline.tracing`), by id(msg).
        self._traces: dict[int, Span] = {}

    def _received(self, batch: Sequence[Delivery]) -> tuple[float, datetime]:
        """Count a pulled batch; (start of its handling, when it arrived)."""
        self._metrics.consumed.labels(self._label).inc(len(batch))
        self._metrics.batch_size.labels(self._label).observe(len(batch))
        return time.perf_counter(), datetime.now(UTC)

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Process one batch; every message ends acked, nak'd or dead-lettered.

        With an analysis step, returns once the batch is with the step."""
        if self.analysis is not None:
            await self._handle_analysed(self.analysis, batch)
            return
        started, received_at = self._received(batch)
        hold = self._hold(batch)
        try:
            checked, rejected = self._validate(batch, lambda m: self._accept(m, received_at))
            # Keyed by message id: copies of one message in a batch are stored once.
            accepted: dict[str, Accepted] = {}
            deliveries: dict[str, list[Delivery]] = {}
            for msg, item in checked:
                accepted.setdefault(item.message_id, item)
                deliveries.setdefault(item.message_id, []).append(msg)

            if rejected:
                await self._dead_letter_all(rejected)
            # One commit in flight: the next batch is pulled and decoded while this one is
            # written. Waiting for the previous commit first bounds the work in hand.
            await self.flush()
        except BaseException:
            self._release(hold)
            for msg in batch:  # unsettled: redelivered after the ack wait
                self._end_trace(msg, "given back")
            raise
        if not accepted:
            self._release(hold)
            self._observe(started)
            return
        task = asyncio.create_task(self._store_all(accepted, deliveries, started))
        task.add_done_callback(lambda _: self._release(hold))
        self._committing = task

    async def flush(self) -> None:
        """Wait until the batches in hand are committed and acked (or nak'd)."""
        while self._tasks:
            # Shielded: a cancelled caller must not cut a commit off from its acks.
            await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))
        task = self._committing
        if task is None:
            return
        # Shielded: a cancelled pull (NATS reconnecting, shutdown) must not cut a commit
        # off from its acks; the task stays in hand until it is done.
        await asyncio.shield(task)
        if self._committing is task:
            self._committing = None

    async def stop(self) -> None:
        """Finish the batches in hand (they give up waiting for a server that is down)."""
        await self.flush()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None

    # -- with an analysis step --------------------------------------------------------

    async def _handle_analysed(self, analysis: Analysis, batch: Sequence[Delivery]) -> None:
        started, received_at = self._received(batch)
        # Messages waiting for a slow (or absent) step are kept from redelivery.
        hold = self._hold(batch)
        try:
            task = await self._queue(analysis, batch, received_at, started)
        except BaseException:
            # Stopping while the step is full: unacked, these are redelivered later.
            self._release(hold)
            for msg in batch:
                self._end_trace(msg, "given back")
            raise
        if task is None:
            self._release(hold)
            self._observe(started)
            return
        task.add_done_callback(lambda _: self._release(hold))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _queue(
        self,
        analysis: Analysis,
        batch: Sequence[Delivery],
        received_at: datetime,
        started: float,
    ) -> asyncio.Task[None] | None:
        """Settle what needs no analysis; submit the rest. The task that finishes the batch."""

        def check(msg: Delivery) -> Accepted | Work:
            self._check_deliveries(msg)
            return analysis.check(msg, received_at)

        checked, rejected = self._validate(batch, check)
        as_is: list[tuple[Delivery, Accepted]] = []
        work: list[tuple[Delivery, Work]] = []
        for msg, item in checked:
            if isinstance(item, Work):
                work.append((msg, item))
            else:
                as_is.append((msg, item))

        if rejected:
            analysis.count("rejected", len(rejected))
            await self._dead_letter_all(rejected)
        if as_is:
            analysis.count("skipped", len(as_is))
        if work:
            work = await self._drop_stored(analysis, work)
        outcomes: list[Awaitable[Any]] = []
        for i, (_, item) in enumerate(work):
            try:
                outcomes.append(await analysis.submit(item))
            except Unavailable:  # the step is stopping: the rest are redelivered
                await self._give_back([m for m, _ in work[i:]])
                work = work[:i]
                break
        if not work and not as_is:
            return None
        return asyncio.create_task(
            self._finish(analysis, work, outcomes, as_is, received_at, started)
        )

    async def _drop_stored(
        self, analysis: Analysis, work: list[tuple[Delivery, Work]]
    ) -> list[tuple[Delivery, Work]]:
        """Ack messages already stored, without analysing them again.

        Messages the Redis cache knows (when there is one), redelivered messages (a worker
        died after the commit, before the ack) and, with `look_up_all` (a replay), every
        message are looked up in the store, which has the last word: a cache entry alone
        never acks a message. Anything not found here is still caught by the store when
        it is written.
        """
        ids = {item.message_id: event_id(self.domain, item.message_id) for _, item in work}
        known: set[uuid.UUID] = set()
        if self._cache:
            known = await self._cache.known(list(ids.values()))
        look_up = [
            ids[item.message_id]
            for msg, item in work
            if analysis.look_up_all
            or ids[item.message_id] in known
            or delivery_info(msg).delivered > 1
        ]
        found: set[uuid.UUID] = set()
        if look_up:
            try:
                found = await analysis.stored(look_up)
            except Unavailable as exc:  # the store's insert-if-absent still has the last word
                log.warning("%s: cannot look up messages already stored (%s)", self._label, exc)
            else:
                if known - found:
                    self._metrics.cache_stale.labels(self._label).inc(len(known - found))
        if not found:
            return work
        rest = []
        for msg, item in work:
            i = ids[item.message_id]
            if i in found:
                await self._ack(msg, "stored already")
                self._metrics.duplicates.labels(
                    self._label, "cache" if i in known else "store"
                ).inc()
            else:
                rest.append((msg, item))
        return rest

    async def _finish(
        self,
        analysis: Analysis,
        work: list[tuple[Delivery, Work]],
        outcomes: list[Awaitable[Any]],
        as_is: list[tuple[Delivery, Accepted]],
        received_at: datetime,
        started: float,
    ) -> None:
        """Once the step has answered: store, dead-letter, retry or give back each message."""
        answers = await asyncio.gather(*outcomes, return_exceptions=True)
        accepted: dict[str, Accepted] = {}
        deliveries: dict[str, list[Delivery]] = {}
        refused: list[tuple[Delivery, DeadLetter]] = []
        failed: list[Delivery] = []
        given_back: list[Delivery] = []
        error: RetryLater | None = None
        for (msg, item), answer in zip(work, answers, strict=True):
            verdict = analysis.verdict(msg, item, answer, received_at)
            if isinstance(verdict, Unavailable):  # the step stopped: not the message's fault
                given_back.append(msg)
            elif isinstance(verdict, Rejected):
                refused.append((msg, self._dead_letter(msg, verdict.reason, verdict.detail)))
            elif isinstance(verdict, RetryLater):
                failed.append(msg)
                error = verdict
            else:
                root = self._traces.get(id(msg))
                if root is not None:
                    analysis.trace(root, answer)
                accepted.setdefault(verdict.message_id, verdict)
                deliveries.setdefault(verdict.message_id, []).append(msg)
        analysed = sum(len(d) for d in deliveries.values())
        for msg, ready in as_is:
            accepted.setdefault(ready.message_id, ready)
            deliveries.setdefault(ready.message_id, []).append(msg)

        if refused:
            analysis.count("rejected", len(refused))
            await self._dead_letter_all(refused)
        if given_back:
            await self._give_back(given_back)
        if failed:
            assert error is not None
            analysis.count("failed", len(failed))
            log.warning("%s: %s; %d messages will be retried", self._label, error, len(failed))
            await self._retry(failed, error)
        if analysed:
            analysis.count("analysed", analysed)
        if accepted:
            await self._store_all(accepted, deliveries, started)
        else:
            self._observe(started)

    async def _give_back(self, msgs: list[Delivery]) -> None:
        """Nak messages the step could not take (it stops): redelivered, never dead-lettered."""
        for msg in msgs:
            await self._settle(msg.nak())
            self._end_trace(msg, "given back")

    # -- messages in hand --------------------------------------------------------------

    def _hold(self, msgs: Sequence[Delivery]) -> int:
        """Keep `msgs` from being redelivered until `_release`; returns the hold's key."""
        key = id(msgs)
        self._held[key] = (time.monotonic(), msgs)
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_in_progress())
        return key

    def _release(self, key: int) -> None:
        self._held.pop(key, None)

    async def _keep_in_progress(self) -> None:
        # Looks four times per interval, so a hold is marked within 1.25 intervals of
        # being taken or last marked: most of the ack wait is left for a busy event loop.
        while True:
            await asyncio.sleep(self._progress_every / 4)
            due = time.monotonic() - self._progress_every
            for key, (since, msgs) in list(self._held.items()):
                if since <= due:
                    for msg in msgs:
                        await self._settle(msg.in_progress())
                    if key in self._held:
                        self._held[key] = (time.monotonic(), msgs)

    # -- verdicts ----------------------------------------------------------------------

    def _observe(self, started: float) -> None:
        self._metrics.handler_seconds.labels(self._label).observe(time.perf_counter() - started)

    def _validate(
        self, batch: Sequence[Delivery], check: Callable[[Delivery], _Checked]
    ) -> tuple[list[tuple[Delivery, _Checked]], list[tuple[Delivery, DeadLetter]]]:
        """Each message `check` passes, with what it returned; the dead letters of those
        it refuses (`Rejected`). A traced message's check is its `validate` span."""
        passed: list[tuple[Delivery, _Checked]] = []
        rejected: list[tuple[Delivery, DeadLetter]] = []
        for msg in batch:
            root = self._trace(msg)
            span = tracing.child(root, "validate") if root is not None else None
            try:
                passed.append((msg, check(msg)))
            except Rejected as exc:
                rejected.append((msg, self._dead_letter(msg, exc.reason, exc.detail)))
            finally:
                if span is not None:
                    span.end()
        return passed, rejected

    def _check_deliveries(self, msg: Delivery) -> int:
        """The message's stream sequence; `Rejected` past `max_deliver` deliveries."""
        _, stream_seq, delivered, _ = delivery_info(msg)
        if delivered > self._max_deliver:
            raise Rejected(
                Reason.MAX_DELIVER_EXCEEDED,
                f"delivered {delivered} times without being acked "
                f"(limit {self._max_deliver}); the worker may have crashed on it",
            )
        return stream_seq

    def _accept(self, msg: Delivery, received_at: datetime) -> Accepted:
        stream_seq = self._check_deliveries(msg)
        decoded = decode(
            self._subjects, self.domain, msg.subject, msg.data, max_bytes=self._max_bytes
        )
        return Accepted(
            domain=self.domain,
            message_id=decoded.message_id,
            subject=msg.subject,
            stream_seq=stream_seq,
            schema_version=decoded.schema_version,
            received_at=received_at,
            payload=decoded.payload,
            trace_id=tracing.trace_id(msg.headers),
        )

    def _trace(self, msg: Delivery) -> Span | None:
        """Start the root span of a message its producer traced; None for the others."""
        headers = msg.headers
        if not headers or "traceparent" not in headers:
            return None
        root = tracing.receive(
            f"{self._label} receive",
            headers,
            {
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.message.id": headers.get("Nats-Msg-Id", ""),
                "pipeline.stream_seq": delivery_info(msg).stream_seq,
            },
        )
        if root is not None:
            self._traces[id(msg)] = root
        return root

    def _end_trace(self, msg: Delivery, outcome: str) -> None:
        """End a traced message's root span with how it ended (acked, dead-lettered...)."""
        root = self._traces.pop(id(msg), None)
        if root is not None:
            root.set_attribute("pipeline.outcome", outcome)
            root.end()

    async def _ack(self, msg: Delivery, outcome: str = "stored") -> None:
        """Ack a message (in an `ack` span when it is traced) and end its trace."""
        root = self._traces.get(id(msg))
        if root is None:
            await self._settle(msg.ack())
            return
        span = tracing.child(root, "ack")
        try:
            await self._settle(msg.ack())
        finally:
            span.end()
            self._end_trace(msg, outcome)

    def _dead_letter(self, msg: Delivery, reason: Reason, detail: str) -> DeadLetter:
        stream, stream_seq, delivered, stored_ns = delivery_info(msg)
        return DeadLetter(
            reason=reason,
            detail=detail,
            subject=msg.subject,
            stream=stream,
            stream_seq=stream_seq,
            stored_ns=stored_ns,
            delivered=delivered,
            body=msg.data or b"",
            headers=dict(msg.headers or {}),
        )

    async def _dead_letter_all(self, rejected: list[tuple[Delivery, DeadLetter]]) -> None:
        """Publish the dead letters (waiting while the DLQ is down), then ack their sources."""
        letters = [letter for _, letter in rejected]
        try:
            written = await self._pauses.until_available(
                self._label, lambda: self._dead_letters.publish(self.domain, letters)
            )
        except Stopping:
            for msg, _ in rejected:  # the worker stops: another one takes them
                await self._settle(msg.nak())
                self._end_trace(msg, "given back")
            return
        for (msg, letter), new in zip(rejected, written, strict=True):
            await self._ack(msg, f"dead-lettered: {letter.reason.value}")
            self._metrics.dead_lettered.labels(self._label, letter.reason.value).inc()
            if not new:
                self._metrics.dead_letters_held.labels(self._label).inc()
            log.info(
                "dead-lettered (%s%s): %s",
                letter.reason.value,
                "" if new else ", its letter in the DLQ already",
                letter.detail,
                extra={**message_fields(self.domain, msg), "reason": letter.reason.value},
            )

    async def _store_all(
        self,
        accepted: dict[str, Accepted],
        deliveries: dict[str, list[Delivery]],
        batch_started: float,
    ) -> None:
        in_batch = sum(len(d) for d in deliveries.values()) - len(deliveries)
        if in_batch:
            self._metrics.duplicates.labels(self._label, "batch").inc(in_batch)
        batch = list(accepted.values())
        # Hints only: the store confirms every id the cache calls stored.
        known = await self._cache.known([a.event_id for a in batch]) if self._cache else set()
        started = time.perf_counter()
        commits = [
            tracing.child(self._traces[id(m)], "commit")
            for ms in deliveries.values()
            for m in ms
            if id(m) in self._traces
        ]
        try:
            result = await self._pauses.until_available(
                self._label, lambda: self._writer.write(batch, known)
            )
        except Stopping:
            for msgs in deliveries.values():  # the worker stops: another one takes them
                for msg in msgs:
                    await self._settle(msg.nak())
                    self._end_trace(msg, "given back")
            self._observe(batch_started)
            return
        except Exception as exc:  # a bug, not bad input: retried, then dead-lettered
            log.exception("%s: storing a batch failed unexpectedly", self._label)
            msgs = [m for ms in deliveries.values() for m in ms]
            await self._retry(msgs, RetryLater(f"unexpected error: {exc!r}"))
            self._observe(batch_started)
            return
        finally:
            for span in commits:
                span.end()
        self._metrics.commit_seconds.labels(self._label).observe(time.perf_counter() - started)
        self._count(result, known)
        unstorable: list[tuple[Delivery, DeadLetter]] = []
        for message_id, msgs in deliveries.items():
            error = result.unstorable.get(accepted[message_id].event_id)
            for msg in msgs:
                if error is None:
                    await self._ack(msg)
                else:
                    unstorable.append((msg, self._dead_letter(msg, Reason.UNSTORABLE, error)))
        if unstorable:
            self._metrics.unstorable.labels(self._label).inc(len(unstorable))
            await self._dead_letter_all(unstorable)
        if self._cache:
            await self._cache.remember(result.stored | (result.duplicates - known))
        self._observe(batch_started)

    def _count(self, result: WriteResult, known: set[uuid.UUID]) -> None:
        m = self._metrics
        m.stored.labels(self._label).inc(len(result.stored))
        from_cache = len(result.duplicates & known)
        if from_cache:
            m.duplicates.labels(self._label, "cache").inc(from_cache)
        if len(result.duplicates) > from_cache:
            m.duplicates.labels(self._label, "store").inc(len(result.duplicates) - from_cache)
        if result.refuted:
            m.cache_stale.labels(self._label).inc(len(result.refuted))
            log.warning(
                "%s: the cache called %d ids stored that the event store did not hold; "
                "they were stored (a restored or replaced database?)",
                self._label,
                len(result.refuted),
                extra={"domain": self._label, "count": len(result.refuted)},
            )

    async def _retry(self, msgs: list[Delivery], exc: RetryLater) -> None:
        """Nak for redelivery, or dead-letter what has used up its deliveries."""
        exhausted = []
        for msg in msgs:
            delivered = delivery_info(msg).delivered
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
                await self._settle(msg.nak(delay=self._retry_delay(delivered)))
                self._end_trace(msg, f"retried: {exc}")
                self._metrics.retried.labels(self._label, type(exc).__name__).inc()
                log.warning(
                    "will be redelivered: %s",
                    exc,
                    extra=message_fields(self.domain, msg),
                )
        if exhausted:
            await self._dead_letter_all(exhausted)

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
