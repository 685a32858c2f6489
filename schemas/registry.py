"""Which model each domain and major version decodes to, and how old majors are upcast."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from .frames import FrameMetaV1
from .metrics import MetricsBatchV1
from .monitoring import HealthReportV1, HealthReportV2, upcast_v1_to_v2
from .security import SecurityEventV1

__all__ = ["SCHEMAS", "Domain", "DomainSchema"]


class Domain(StrEnum):
    """A family of messages with its own subjects, stream and event type."""

    FRAMES = "frames"
    SECURITY = "security"
    MONITORING = "monitoring"
    METRICS = "metrics"


Upcaster = Callable[[Any], BaseModel]


@dataclass(frozen=True)
class DomainSchema:
    """The supported majors of one domain; `current` is what every message is upcast to."""

    domain: Domain
    versions: Mapping[int, type[BaseModel]]
    current: int
    upcasters: Mapping[int, Upcaster] = field(default_factory=dict)

    def upcast(self, major: int, model: BaseModel) -> BaseModel:
        """Apply upcasters major by major until the model is of the current major."""
        while major < self.current:
            model = self.upcasters[major](model)
            major += 1
        return model


SCHEMAS: Mapping[Domain, DomainSchema] = {
    Domain.FRAMES: DomainSchema(Domain.FRAMES, {1: FrameMetaV1}, current=1),
    Domain.SECURITY: DomainSchema(Domain.SECURITY, {1: SecurityEventV1}, current=1),
    Domain.MONITORING: DomainSchema(
        Domain.MONITORING,
        {1: HealthReportV1, 2: HealthReportV2},
        current=2,
        upcasters={1: upcast_v1_to_v2},
    ),
    Domain.METRICS: DomainSchema(Domain.METRICS, {1: MetricsBatchV1}, current=1),
}
