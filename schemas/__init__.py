"""Inbound message models per domain and version, and their upcasters. Pure pydantic."""

from __future__ import annotations

from .common import Message
from .frames import FrameEncoding, FrameMetaV1
from .metrics import MetricSample, MetricsBatchV1
from .monitoring import CheckResult, HealthReportV1, HealthReportV2, HealthStatus, upcast_v1_to_v2
from .registry import SCHEMAS, Domain, DomainSchema
from .security import SecurityEventV1, Severity

__all__ = [
    "SCHEMAS",
    "CheckResult",
    "Domain",
    "DomainSchema",
    "FrameEncoding",
    "FrameMetaV1",
    "HealthReportV1",
    "HealthReportV2",
    "HealthStatus",
    "Message",
    "MetricSample",
    "MetricsBatchV1",
    "SecurityEventV1",
    "Severity",
    "upcast_v1_to_v2",
]
