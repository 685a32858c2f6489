"""Security events from access control, alarms and intrusion detection (`security.v1.<source>`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from .common import Attributes, Message, Name, UtcDatetime

__all__ = ["SecurityEventV1", "Severity"]


class Severity(StrEnum):
    """How urgent a security event is."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class SecurityEventV1(Message):
    """Something a security system observed: a forced door, a badge swipe, an alarm."""

    schema_version: Annotated[str, StringConstraints(pattern=r"^1\.\d{1,4}$")] = "1.0"
    source: Name
    occurred_at: UtcDatetime
    kind: Annotated[
        str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")
    ]
    severity: Severity
    zone: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    location: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    attributes: Attributes = Field(default_factory=dict)
