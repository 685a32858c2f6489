"""The event store: aggregates and their events, the batch recorder, the transcoder."""

from __future__ import annotations

from .domain import (
    CameraFrame,
    HealthReport,
    MetricsBatch,
    RecordedMessage,
    SecurityEvent,
    aggregate_class,
    event_id,
)
from .eventstore import Accepted, EventStore, Journal, WriteResult

__all__ = [
    "Accepted",
    "CameraFrame",
    "EventStore",
    "HealthReport",
    "Journal",
    "MetricsBatch",
    "RecordedMessage",
    "SecurityEvent",
    "WriteResult",
    "aggregate_class",
    "event_id",
]
