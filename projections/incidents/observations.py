"""What correlation reads from the store: security events, detections and health reports.

`observe` turns a stored event (with its position) into one of three observations, or
None for events correlation does not read (metrics, skipped frames). Each keeps the
event's identity, its store position and its capture time `at`: when the producer says
it happened (`occurred_at`, `captured_at`, `reported_at`), but never later than when
the pipeline received it, so a producer whose clock runs ahead cannot move correlation's
clock (see `correlate.py`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, cast

from pipeline.store.domain import CameraFrame, HealthReport, SecurityEvent
from pipeline.store.reader import Positioned
from schemas import SCHEMAS, Domain, FrameAnalyzedV1, HealthStatus, Severity

__all__ = ["DetectionSeen", "Observation", "SecuritySeen", "ServiceSeen", "observe"]


@dataclass(frozen=True, slots=True)
class SecuritySeen:
    """A stored security event."""

    position: int
    event_id: uuid.UUID
    at: datetime
    source: str
    kind: str
    severity: Severity
    zone: str | None = None
    """The zone the event itself names (the sites file's placement of its source wins)."""


@dataclass(frozen=True, slots=True)
class DetectionSeen:
    """A stored analysed frame: its camera and detections as (label, confidence)."""

    position: int
    event_id: uuid.UUID
    at: datetime
    camera: str
    detections: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class ServiceSeen:
    """A stored health report."""

    position: int
    event_id: uuid.UUID
    at: datetime
    service: str
    instance: str
    status: HealthStatus


Observation = SecuritySeen | DetectionSeen | ServiceSeen


class _Security(Protocol):
    source: str
    occurred_at: datetime
    kind: str
    severity: Severity
    zone: str | None


class _Health(Protocol):
    service: str
    instance: str
    reported_at: datetime
    status: HealthStatus


def observe(item: Positioned) -> Observation | None:
    """The observation of a stored event, or None if correlation does not read it."""
    event = item.event
    received: datetime = event.timestamp
    if isinstance(event, SecurityEvent.Recorded):
        s = cast(_Security, SCHEMAS[Domain.SECURITY].read(event.payload))
        return SecuritySeen(
            item.position,
            event.originator_id,
            min(s.occurred_at, received),
            s.source,
            s.kind,
            Severity(s.severity),
            s.zone,
        )
    if isinstance(event, CameraFrame.FrameAnalyzed):
        frame = FrameAnalyzedV1.model_validate(event.payload)
        return DetectionSeen(
            item.position,
            event.originator_id,
            min(frame.frame.captured_at, received),
            frame.frame.camera,
            tuple((d.label, d.confidence) for d in frame.detections),
        )
    if isinstance(event, HealthReport.Recorded):
        h = cast(_Health, SCHEMAS[Domain.MONITORING].read(event.payload))
        return ServiceSeen(
            item.position,
            event.originator_id,
            min(h.reported_at, received),
            h.service,
            h.instance,
            HealthStatus(h.status),
        )
    return None
