"""Domain aggregates: each accepted message becomes a one-event aggregate.

The aggregate id is uuid5 of the domain and the producer's message id, so a second copy
of a message maps to the same (id, version 1) and the event store's primary key
rejects it, whichever worker or delivery it comes from.

Each event class has a payload version (eventsourcing's `class_version`, stored with
the event when above 1). An event stored in an older version is upcast when it is read,
one `upcast_vN_vN+1` at a time, so readers only ever see the current payload:
- `Recorded` of security, monitoring and metrics: v1 kept the message whole in the
  payload; v2 keeps `id` and `schema_version` beside it only (as `message_id` and
  `schema_version`, the version the producer sent), and the payload as
  `schemas.SCHEMAS[domain].payload` describes it;
- `FrameAnalyzed` and `FrameSkipped`: v1, `schemas.FrameAnalyzedV1` / `FrameSkippedV1`.
"""

from __future__ import annotations

import sys
import uuid
from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic, register_topic

from schemas import ENVELOPE, Domain

__all__ = [
    "CameraFrame",
    "HealthReport",
    "MessageRecorded",
    "MetricsBatch",
    "RecordedMessage",
    "SecurityEvent",
    "aggregate_class",
    "domain_of",
    "domain_topics",
    "event_id",
    "topics_of",
]

# Fixed namespace so ids are stable across versions and deployments.
_NAMESPACE = uuid.UUID("6f4b1c9e-3a52-5d7e-9a41-0c8e2f5b7d13")


def event_id(domain: Domain, message_id: str) -> uuid.UUID:
    """The stored event's identity: uuid5 of the domain and the producer's message id."""
    return uuid.uuid5(_NAMESPACE, f"{domain.value}:{message_id}")


class RecordedMessage(Aggregate):
    """A message accepted from a stream, with where it came from."""

    domain: ClassVar[Domain]

    class Recorded(Aggregate.Created):
        """The message was accepted and stored; the event's timestamp is when it arrived."""

        message_id: str
        subject: str
        stream_seq: int
        schema_version: str
        payload: dict[str, Any]
        trace_id: str = ""
        """The producer's trace (W3C trace id), when it sent one; events stored before
        trace ids were kept read as "" (this default)."""

    def __init__(
        self,
        message_id: str,
        subject: str,
        stream_seq: int,
        schema_version: str,
        payload: dict[str, Any],
        trace_id: str = "",
    ) -> None:
        self.message_id = message_id
        self.subject = subject
        self.stream_seq = stream_seq
        self.schema_version = schema_version
        self.payload = payload
        self.trace_id = trace_id

    @property
    def received_at(self) -> datetime:
        """When the pipeline received the message (the `Recorded` event's timestamp)."""
        return self.created_on


class MessageRecorded(RecordedMessage.Recorded):
    """`Recorded` of a JSON domain (security, monitoring, metrics), payload v2."""

    class_version = 2

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """v1 kept the whole message as the payload; `id` and `schema_version` live beside it."""
        payload = state["payload"]
        state["payload"] = {k: v for k, v in payload.items() if k not in ENVELOPE}


class SecurityEvent(RecordedMessage):
    """A security event (door forced, badge swipe, alarm)."""

    domain = Domain.SECURITY

    class Recorded(MessageRecorded):
        """The message was accepted and stored."""

    # Restated: the aggregate metaclass builds each class's creation from its own __init__.
    __init__ = RecordedMessage.__init__


class HealthReport(RecordedMessage):
    """A service health report, stored in the current (v2) shape."""

    domain = Domain.MONITORING

    class Recorded(MessageRecorded):
        """The message was accepted and stored."""

    # Restated: the aggregate metaclass builds each class's creation from its own __init__.
    __init__ = RecordedMessage.__init__


class MetricsBatch(RecordedMessage):
    """A batch of metric samples from one service instance."""

    domain = Domain.METRICS

    class Recorded(MessageRecorded):
        """The message was accepted and stored."""

    # Restated: the aggregate metaclass builds each class's creation from its own __init__.
    __init__ = RecordedMessage.__init__


class CameraFrame(RecordedMessage):
    """A camera frame: analysed by the detector, or skipped because it arrived too late."""

    domain = Domain.FRAMES

    class Recorded(RecordedMessage.Recorded):
        """The frame was accepted and stored (the generic event; frames use the two below)."""

    class FrameAnalyzed(RecordedMessage.Recorded):
        """The detector ran on the frame; the payload holds its detections and provenance."""

    class FrameSkipped(RecordedMessage.Recorded):
        """The frame was older than the age limit and recorded without analysis."""

    # Restated: the aggregate metaclass builds each class's creation from its own __init__.
    __init__ = RecordedMessage.__init__


_BY_DOMAIN: dict[Domain, type[RecordedMessage]] = {
    cls.domain: cls for cls in (SecurityEvent, HealthReport, MetricsBatch, CameraFrame)
}


def aggregate_class(domain: Domain) -> type[RecordedMessage]:
    """The aggregate that records messages of a domain."""
    return _BY_DOMAIN[domain]


_DOMAIN_OF_EVENT: dict[type, Domain] = {
    event: domain
    for domain, cls in _BY_DOMAIN.items()
    for event in vars(cls).values()
    if isinstance(event, type) and issubclass(event, RecordedMessage.Recorded)
}


def domain_topics(domain: Domain) -> list[str]:
    """Every topic the events of a domain are stored under."""
    return [t for e, d in _DOMAIN_OF_EVENT.items() if d is domain for t in topics_of(e)]


def domain_of(event: object) -> Domain:
    """The domain of a stored event."""
    return _DOMAIN_OF_EVENT[type(event)]


def topics_of(event_class: type) -> tuple[str, ...]:
    """Every topic events of `event_class` are stored under (the current one first)."""
    topic = get_topic(event_class)
    module, _, name = topic.partition(":")
    if module == __name__:
        return (topic, f"{_OLD_MODULE}:{name}")
    return (topic,)


_OLD_MODULE = "pipeline.domain"

# Events stored before the store moved into its own package name this module
# `pipeline.domain`: their topics still resolve.
register_topic(_OLD_MODULE, sys.modules[__name__])
