"""Frame intake: pulled frames through the detector pool into `FrameAnalyzed` events.

For each pulled batch:
1. read each frame's metadata from its headers; bad metadata, an unknown major, an
   oversized body, a body that is not the announced JPEG/PNG, or an image whose header
   announces another size than the metadata or more than `max_pixels` pixels is
   dead-lettered, without decoding it;
2. frames older than `max_age_s` are recorded as `FrameSkipped` without analysis;
3. the rest are submitted to the pool, which waits when it is full (backpressure: the
   handler pulls nothing more until there is room);
4. in the background, once the pool has answered: undecodable frames are dead-lettered,
   frames the detector failed on alone (while it answered a test frame) are nak'd for
   redelivery, frames the pool gave back as it stopped are nak'd, never dead-lettered, and
   the batch's events are written in one transaction, then acked. A detector that is
   slow or down pauses the intake in the pool: it costs no delivery.
Several pulled batches can be in the pool at once, so the actors never wait for the
store or for NATS.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from schemas import (
    SCHEMAS,
    Domain,
    FrameAnalyzedV1,
    FrameEncoding,
    FrameMetaV1,
    FrameSkippedV1,
)
from streams import SubjectError

from .. import tracing
from ..errors import DetectionFailed, Reason, Rejected, RetryLater, Unavailable
from ..ingest.codec import validation_summary
from ..ingest.deadletter import DeadLetter
from ..ingest.intake import Delivery, Intake, delivery_info
from ..store.domain import event_id
from ..store.eventstore import Accepted
from .frame import Analysis, Frame, Outcome, Unreadable, check_size
from .pool import DetectorPool

__all__ = ["FrameIntake"]

log = logging.getLogger(__name__)

_MAGIC = {
    FrameEncoding.JPEG: (b"\xff\xd8\xff",),
    FrameEncoding.PNG: (b"\x89PNG\r\n\x1a\n",),
}


class FrameIntake(Intake):
    """Handles batches of camera frames; see the module docstring."""

    def __init__(
        self,
        *,
        pool: DetectorPool,
        max_age_s: float = 0.0,
        max_pixels: int = 7680 * 4320,
        stored: Callable[[list[uuid.UUID]], Awaitable[set[uuid.UUID]]] | None = None,
        look_up_all: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(Domain.FRAMES, **kwargs)
        self._pool = pool
        self._stored = stored
        self._look_up_all = look_up_all
        self._max_age_s = max_age_s
        self._max_pixels = max_pixels
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Check a batch, record stale frames, hand the rest to the pool; returns once queued."""
        started, received_at = self._received(batch)
        # Frames waiting for a slow (or absent) detector are kept from redelivery.
        hold = self._hold(batch)
        try:
            task = await self._queue(batch, received_at, started)
        except BaseException:
            # Stopping while the pool is full: unacked, these are redelivered later.
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
        self, batch: Sequence[Delivery], received_at: datetime, started: float
    ) -> asyncio.Task[None] | None:
        """Settle what needs no model; submit the rest. The task that finishes the batch."""
        rejected: list[tuple[Delivery, DeadLetter]] = []
        stale: list[tuple[Delivery, Accepted]] = []
        fresh: list[tuple[Delivery, FrameMetaV1]] = []
        for msg in batch:
            root = self._trace(msg)
            check = tracing.child(root, "validate") if root is not None else None
            try:
                meta = self._meta(msg)
            except Rejected as exc:
                rejected.append((msg, self._dead_letter(msg, exc.reason, exc.detail)))
                continue
            finally:
                if check is not None:
                    check.end()
            age = (received_at - meta.captured_at).total_seconds()
            if self._max_age_s and age > self._max_age_s:
                payload = FrameSkippedV1(frame=meta, reason="too_old", age_s=round(age, 3))
                stale.append((msg, self._accepted(msg, meta, received_at, payload)))
            else:
                fresh.append((msg, meta))

        if rejected:
            self._metrics.frames.labels("rejected").inc(len(rejected))
            await self._dead_letter_all(rejected)
        if stale:
            self._metrics.frames.labels("skipped").inc(len(stale))
        if fresh:
            fresh = await self._drop_known(fresh)
        futures: list[asyncio.Future[Outcome]] = []
        for i, (msg, meta) in enumerate(fresh):
            try:
                futures.append(await self._pool.submit(Frame(msg.data, meta.width, meta.height)))
            except Unavailable:  # the pool is stopping: the rest are redelivered
                await self._give_back([m for m, _ in fresh[i:]])
                fresh = fresh[:i]
                break
        if not fresh and not stale:
            return None
        return asyncio.create_task(self._finish(fresh, futures, stale, received_at, started))

    async def flush(self) -> None:
        """Wait until every batch in the pool is stored and acked (or nak'd)."""
        while self._tasks:
            # Shielded: a cancelled caller must not cut a commit off from its acks.
            await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))

    async def _drop_known(
        self, fresh: list[tuple[Delivery, FrameMetaV1]]
    ) -> list[tuple[Delivery, FrameMetaV1]]:
        """Ack frames already stored, without running the model on them again.

        Frames the Redis cache knows (when there is one), redelivered frames (a worker
        died after the commit, before the ack) and, with `look_up_all` (a replay), every
        frame are looked up in the store, which has the last word: a cache entry alone
        never acks a frame. Anything not found here is
        still caught by the store when it is written.
        """
        ids = {meta.id: event_id(Domain.FRAMES, meta.id) for _, meta in fresh}
        known: set[uuid.UUID] = set()
        if self._cache:
            known = await self._cache.known(list(ids.values()))
        look_up = [
            ids[meta.id]
            for msg, meta in fresh
            if self._look_up_all or ids[meta.id] in known or delivery_info(msg).delivered > 1
        ]
        found: set[uuid.UUID] = set()
        if look_up and self._stored is not None:
            try:
                found = await self._stored(look_up)
            except Unavailable as exc:  # the store's insert-if-absent still has the last word
                log.warning("frames: cannot look up frames already stored (%s)", exc)
            else:
                if known - found:
                    self._metrics.cache_stale.labels(self._label).inc(len(known - found))
        if not found:
            return fresh
        rest = []
        for msg, meta in fresh:
            i = ids[meta.id]
            if i in found:
                await self._ack(msg, "stored already")
                self._metrics.duplicates.labels(
                    self._label, "cache" if i in known else "store"
                ).inc()
            else:
                rest.append((msg, meta))
        return rest

    async def _finish(
        self,
        fresh: list[tuple[Delivery, FrameMetaV1]],
        futures: list[asyncio.Future[Outcome]],
        stale: list[tuple[Delivery, Accepted]],
        received_at: datetime,
        started: float,
    ) -> None:
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await self._settle_frames(fresh, outcomes, stale, received_at, started)

    async def _settle_frames(
        self,
        fresh: list[tuple[Delivery, FrameMetaV1]],
        outcomes: list[Outcome | BaseException],
        stale: list[tuple[Delivery, Accepted]],
        received_at: datetime,
        started: float,
    ) -> None:
        provenance = self._pool.provenance
        assert provenance is not None
        accepted: dict[str, Accepted] = {}
        deliveries: dict[str, list[Delivery]] = {}
        unreadable: list[tuple[Delivery, DeadLetter]] = []
        failed: list[Delivery] = []
        given_back: list[Delivery] = []
        error: RetryLater | None = None
        for (msg, meta), outcome in zip(fresh, outcomes, strict=True):
            if isinstance(outcome, Unavailable):  # the pool stopped: not the frame's fault
                given_back.append(msg)
            elif isinstance(outcome, Unreadable):
                unreadable.append((msg, self._dead_letter(msg, outcome.reason, outcome.detail)))
            elif isinstance(outcome, Analysis):
                payload = FrameAnalyzedV1(
                    frame=meta,
                    detections=tuple(outcome.detections),
                    inference_ms=round(1000 * outcome.batch_inference_s / outcome.batch_size, 3),
                    batch_size=outcome.batch_size,
                    queue_ms=round(1000 * outcome.queue_s, 3),
                    model=provenance,
                )
                item = self._accepted(msg, meta, received_at, payload)
                self._trace_detection(msg, outcome)
                accepted.setdefault(item.message_id, item)
                deliveries.setdefault(item.message_id, []).append(msg)
            else:
                failed.append(msg)
                error = (
                    outcome
                    if isinstance(outcome, RetryLater)
                    else DetectionFailed(f"unexpected error: {outcome!r}")
                )
        for msg, item in stale:
            accepted.setdefault(item.message_id, item)
            deliveries.setdefault(item.message_id, []).append(msg)

        m = self._metrics.frames
        if unreadable:
            m.labels("rejected").inc(len(unreadable))
            await self._dead_letter_all(unreadable)
        if given_back:
            await self._give_back(given_back)
        if failed:
            assert error is not None
            m.labels("failed").inc(len(failed))
            log.warning("frames: %s; %d frames will be retried", error, len(failed))
            await self._retry(failed, error)
        analysed = sum(1 for o in outcomes if isinstance(o, Analysis))
        if analysed:
            m.labels("analysed").inc(analysed)
        if accepted:
            await self._store_all(accepted, deliveries, started)
        else:
            self._observe(started)

    async def _give_back(self, msgs: list[Delivery]) -> None:
        """Nak frames the pool could not take (it stops): redelivered, never dead-lettered."""
        for msg in msgs:
            await self._settle(msg.nak())
            self._end_trace(msg, "given back")

    def _trace_detection(self, msg: Delivery, analysis: Analysis) -> None:
        """A traced frame's `detect queue`, `detect` and `detect in actor` spans."""
        root = self._traces.get(id(msg))
        if root is None or not analysis.sent_ns:
            return
        queued_ns = analysis.sent_ns - int(analysis.queue_s * 1e9)
        tracing.record(root, "detect queue", queued_ns, analysis.sent_ns, {})
        call = tracing.record(
            root,
            "detect",
            analysis.sent_ns,
            analysis.answered_ns,
            {
                "pipeline.detector.actor": analysis.actor,
                "pipeline.detector.batch_size": analysis.batch_size,
                "pipeline.detections": len(analysis.detections),
            },
        )
        began, ended = analysis.in_actor_ns
        if began:
            tracing.record(
                call,
                "detect in actor",
                began,
                ended,
                {"pipeline.detector.inference_ms": round(1000 * analysis.batch_inference_s, 3)},
            )

    def _meta(self, msg: Delivery) -> FrameMetaV1:
        """The frame's metadata, or `Rejected` with the reason to dead-letter it."""
        delivered = delivery_info(msg).delivered
        if delivered > self._max_deliver:
            raise Rejected(
                Reason.MAX_DELIVER_EXCEEDED,
                f"delivered {delivered} times without being acked (limit {self._max_deliver})",
            )
        try:
            parsed = self._subjects.parse(msg.subject)
        except SubjectError as exc:
            raise Rejected(Reason.BAD_SUBJECT, str(exc)) from None
        versions = SCHEMAS[Domain.FRAMES].versions
        if parsed.major not in versions:
            supported = ", ".join(f"v{m}" for m in sorted(versions))
            raise Rejected(
                Reason.UNSUPPORTED_VERSION, f"frames v{parsed.major} is not supported ({supported})"
            )
        body = msg.data or b""
        if len(body) > self._max_bytes:
            raise Rejected(
                Reason.OVERSIZED, f"frame is {len(body)} bytes, the limit is {self._max_bytes}"
            )
        try:
            meta = FrameMetaV1.from_headers(msg.headers or {})
        except ValidationError as exc:
            raise Rejected(Reason.SCHEMA_VIOLATION, validation_summary(exc)) from None
        if not body.startswith(_MAGIC[meta.encoding]):
            raise Rejected(Reason.UNDECODABLE_IMAGE, f"body is not a {meta.encoding.value} image")
        refused = check_size(Frame(body, meta.width, meta.height), self._max_pixels)
        if refused is not None:
            raise Rejected(refused.reason, refused.detail)
        return meta

    def _accepted(
        self,
        msg: Delivery,
        meta: FrameMetaV1,
        received_at: datetime,
        payload: FrameAnalyzedV1 | FrameSkippedV1,
    ) -> Accepted:
        return Accepted(
            domain=Domain.FRAMES,
            message_id=meta.id,
            subject=msg.subject,
            stream_seq=delivery_info(msg).stream_seq,
            schema_version=meta.schema_version,
            received_at=received_at,
            payload=payload.model_dump(mode="json"),
            event="FrameAnalyzed" if isinstance(payload, FrameAnalyzedV1) else "FrameSkipped",
            trace_id=tracing.trace_id(msg.headers),
        )
