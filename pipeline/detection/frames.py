"""Frames: the analysis step of the frames intake (`FrameAnalysis`), on the detector pool.

The frames domain's intake is a plain `Intake` with this step (`frame_intake`). For each
pulled batch:
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

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from opentelemetry.trace import Span
from pydantic import ValidationError

from schemas import (
    SCHEMAS,
    Domain,
    FrameAnalyzedV1,
    FrameEncoding,
    FrameMetaV1,
    FrameSkippedV1,
)
from streams import SubjectError, Subjects

from .. import tracing
from ..errors import DetectionFailed, Reason, Rejected, RetryLater, Unavailable
from ..ingest.codec import validation_summary
from ..ingest.intake import Delivery, Intake, IntakeServices, Verdict, Work, delivery_info
from ..metrics import Metrics
from ..store.eventstore import Accepted
from .frame import Analysis, Frame, Unreadable, check_size
from .pool import DetectorPool

__all__ = ["FrameAnalysis", "frame_intake"]

log = logging.getLogger(__name__)

_MAGIC = {
    FrameEncoding.JPEG: (b"\xff\xd8\xff",),
    FrameEncoding.PNG: (b"\x89PNG\r\n\x1a\n",),
}

Stored = Callable[[list[uuid.UUID]], Awaitable[set[uuid.UUID]]]
"""Which of these event ids the event store holds."""


def frame_intake(
    *,
    pool: DetectorPool,
    max_message_bytes: int,
    max_age_s: float = 0.0,
    max_pixels: int = 7680 * 4320,
    stored: Stored | None = None,
    look_up_all: bool = False,
    **services: Any,
) -> Intake:
    """The frames domain's intake: a plain `Intake` with the detector pool's analysis step.

    `services` are the `IntakeServices` every intake is built with."""
    svc: IntakeServices = services  # type: ignore[assignment]
    analysis = FrameAnalysis(
        pool,
        subjects=svc["subjects"],
        metrics=svc["metrics"],
        max_bytes=max_message_bytes,
        max_age_s=max_age_s,
        max_pixels=max_pixels,
        stored=stored,
        look_up_all=look_up_all,
    )
    return Intake(Domain.FRAMES, max_message_bytes=max_message_bytes, analysis=analysis, **svc)


class FrameAnalysis:
    """The frames intake's analysis step (`pipeline.ingest.intake.Analysis`): checks a
    frame's metadata, runs the detector pool, turns its answer into an event."""

    def __init__(
        self,
        pool: DetectorPool,
        *,
        subjects: Subjects,
        metrics: Metrics,
        max_bytes: int,
        max_age_s: float = 0.0,
        max_pixels: int = 7680 * 4320,
        stored: Stored | None = None,
        look_up_all: bool = False,
    ) -> None:
        self.pool = pool
        self.look_up_all = look_up_all
        self._subjects = subjects
        self._metrics = metrics
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._max_pixels = max_pixels
        self._stored = stored

    def check(self, msg: Delivery, received_at: datetime) -> Accepted | Work:
        """A stale frame's `FrameSkipped`, or the frame to analyse; `Rejected` if bad."""
        meta = self._meta(msg)
        age = (received_at - meta.captured_at).total_seconds()
        if self._max_age_s and age > self._max_age_s:
            payload = FrameSkippedV1(frame=meta, reason="too_old", age_s=round(age, 3))
            return self._accepted(msg, meta, received_at, payload)
        return Work(meta.id, (Frame(msg.data or b"", meta.width, meta.height), meta))

    async def stored(self, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these frames' events the store holds (none known without a lookup)."""
        return await self._stored(ids) if self._stored is not None else set()

    async def submit(self, work: Work) -> Awaitable[Any]:
        """Queue the frame in the pool (waits while it is full); its outcome's future."""
        frame, _ = work.item
        return await self.pool.submit(frame)

    def verdict(self, msg: Delivery, work: Work, outcome: Any, received_at: datetime) -> Verdict:
        """The frame's `FrameAnalyzed` event, or why it is not stored now."""
        if isinstance(outcome, Unavailable):  # the pool stopped: not the frame's fault
            return outcome
        if isinstance(outcome, Unreadable):
            return Rejected(outcome.reason, outcome.detail)
        if isinstance(outcome, Analysis):
            provenance = self.pool.provenance
            assert provenance is not None
            _, meta = work.item
            payload = FrameAnalyzedV1(
                frame=meta,
                detections=tuple(outcome.detections),
                inference_ms=round(1000 * outcome.batch_inference_s / outcome.batch_size, 3),
                batch_size=outcome.batch_size,
                queue_ms=round(1000 * outcome.queue_s, 3),
                model=provenance,
            )
            return self._accepted(msg, meta, received_at, payload)
        if isinstance(outcome, RetryLater):
            return outcome
        return DetectionFailed(f"unexpected error: {outcome!r}")

    def count(self, outcome: str, n: int) -> None:
        """`pipeline_frames_total{outcome}`."""
        self._metrics.frames.labels(outcome).inc(n)

    def trace(self, root: Span, outcome: Any) -> None:
        """A traced frame's `detect queue`, `detect` and `detect in actor` spans."""
        if not isinstance(outcome, Analysis) or not outcome.sent_ns:
            return
        queued_ns = outcome.sent_ns - int(outcome.queue_s * 1e9)
        tracing.record(root, "detect queue", queued_ns, outcome.sent_ns, {})
        call = tracing.record(
            root,
            "detect",
            outcome.sent_ns,
            outcome.answered_ns,
            {
                "pipeline.detector.actor": outcome.actor,
                "pipeline.detector.batch_size": outcome.batch_size,
                "pipeline.detections": len(outcome.detections),
            },
        )
        began, ended = outcome.in_actor_ns
        if began:
            tracing.record(
                call,
                "detect in actor",
                began,
                ended,
                {"pipeline.detector.inference_ms": round(1000 * outcome.batch_inference_s, 3)},
            )

    def _meta(self, msg: Delivery) -> FrameMetaV1:
        """The frame's metadata, or `Rejected` with the reason to dead-letter it."""
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
