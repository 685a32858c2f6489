"""Subjects, stream and consumer definitions, and their idempotent `apply`."""

from __future__ import annotations

from .apply import Applied, Checked, ConsumerStatus, StreamStatus, apply, check, status
from .definitions import (
    AUDIT_RETENTION,
    DEAD_LETTER_RETENTION,
    EVIDENCE_RETENTION,
    RETENTION,
    ConsumerLimits,
    Retention,
    consumer_config,
    evidence_bucket_config,
    stream_configs,
)
from .subjects import ParsedSubject, SubjectError, Subjects

__all__ = [
    "AUDIT_RETENTION",
    "DEAD_LETTER_RETENTION",
    "EVIDENCE_RETENTION",
    "RETENTION",
    "Applied",
    "Checked",
    "ConsumerLimits",
    "ConsumerStatus",
    "ParsedSubject",
    "Retention",
    "StreamStatus",
    "SubjectError",
    "Subjects",
    "apply",
    "check",
    "consumer_config",
    "evidence_bucket_config",
    "status",
    "stream_configs",
]
