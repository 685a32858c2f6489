"""Which model each domain and major version decodes to, how old majors are upcast, and
the payload model of the stored events."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from .frames import FrameMetaV1
from .metrics import MetricsBatchV1
from .monitoring import HealthReportV1, HealthReportV2, upcast_v1_to_v2
from .security import SecurityEventV1

__all__ = ["ENVELOPE", "SCHEMAS", "Domain", "DomainSchema", "payload_model"]

ENVELOPE = ("id", "schema_version")
"""Fields of every message that a stored event keeps beside its payload, not in it."""


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

    @property
    def payload(self) -> type[BaseModel]:
        """The model of a stored event's payload: the current major without the envelope."""
        return payload_model(self.versions[self.current])

    def read(self, payload: Mapping[str, Any]) -> BaseModel:
        """A stored event's payload (decoded from JSON) as its model."""
        return self.payload.model_validate(payload, strict=False)

    def upcast(self, major: int, model: BaseModel) -> BaseModel:
        """Apply upcasters major by major until the model is of the current major."""
        while major < self.current:
            model = self.upcasters[major](model)
            major += 1
        return model


@functools.cache
def payload_model(message: type[BaseModel]) -> type[BaseModel]:
    """`message` without its envelope (`id`, `schema_version`), as stored in an event.

    Fields a newer minor version added (kept as sent, see `Message`) are allowed. Lax, so
    it reads payloads decoded from JSON (timestamps as strings).
    """
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in message.model_fields.items()
        if name not in ENVELOPE
    }
    return create_model(
        f"{message.__name__}Payload",
        __config__=ConfigDict(frozen=True, extra="allow"),
        __doc__=f"Payload of a stored {message.__name__} (no id or schema_version).",
        **fields,
    )


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
