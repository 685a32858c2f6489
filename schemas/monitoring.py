"""Health reports from services (`monitoring.v1.<service>`, `monitoring.v2.<service>`).

v2 turns the `checks` map of v1 into a list of check results with latency and detail.
Both majors are consumed side by side; v1 reports are upcast to v2 on the way in.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .common import Message, Name, UtcDatetime

__all__ = ["CheckResult", "HealthReportV1", "HealthReportV2", "HealthStatus", "upcast_v1_to_v2"]

CheckName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(max_length=2048)]


class HealthStatus(StrEnum):
    """Health of a service or of one of its checks."""

    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


class HealthReportV1(Message):
    """v1: overall status plus a map of check name to status."""

    schema_version: Annotated[str, StringConstraints(pattern=r"^1\.\d{1,4}$")] = "1.0"
    service: Name
    instance: Name
    reported_at: UtcDatetime
    status: HealthStatus
    checks: Annotated[dict[CheckName, HealthStatus], Field(max_length=128)] = Field(
        default_factory=dict
    )
    message: Text | None = None


class CheckResult(BaseModel):
    """The outcome of one health check."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: CheckName
    status: HealthStatus
    latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    detail: Text | None = None


class HealthReportV2(Message):
    """v2 (current): checks are a list of results with optional latency and detail."""

    schema_version: Annotated[str, StringConstraints(pattern=r"^2\.\d{1,4}$")] = "2.0"
    service: Name
    instance: Name
    reported_at: UtcDatetime
    status: HealthStatus
    checks: Annotated[tuple[CheckResult, ...], Field(max_length=128)] = ()
    message: Text | None = None


def upcast_v1_to_v2(report: HealthReportV1) -> HealthReportV2:
    """Turn a v1 report into the current model; v1 carried no latency or detail."""
    return HealthReportV2(
        id=report.id,
        schema_version="2.0",
        service=report.service,
        instance=report.instance,
        reported_at=report.reported_at,
        status=report.status,
        checks=tuple(
            CheckResult(name=name, status=status) for name, status in sorted(report.checks.items())
        ),
        message=report.message,
    )
