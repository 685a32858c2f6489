"""Inbound message models per domain and version, and their upcasters. Pure pydantic."""

from __future__ import annotations

from .common import Message
from .frames import (
    Detection,
    FrameAnalyzedV1,
    FrameEncoding,
    FrameMetaV1,
    FrameSkippedV1,
    ModelProvenance,
)
from .metrics import MetricSample, MetricsBatchV1
from .monitoring import CheckResult, HealthReportV1, HealthReportV2, HealthStatus, upcast_v1_to_v2
from .registry import ENVELOPE, SCHEMAS, Domain, DomainSchema, payload_model
from .security import SecurityEventV1, Severity

__all__ = [
    "ENVELOPE",
    "SCHEMAS",
    "CheckResult",
    "Detection",
    "Domain",
    "DomainSchema",
    "FrameAnalyzedV1",
    "FrameEncoding",
    "FrameMetaV1",
    "FrameSkippedV1",
    "HealthReportV1",
    "HealthReportV2",
    "HealthStatus",
    "Message",
    "MetricSample",
    "MetricsBatchV1",
    "ModelProvenance",
    "SecurityEventV1",
    "Severity",
    "payload_model",
    "upcast_v1_to_v2",
]
