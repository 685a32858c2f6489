"""Performance metrics reported by services (`metrics.v1.<service>`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .common import Message, Name, UtcDatetime

__all__ = ["MetricSample", "MetricsBatchV1"]

Label = Annotated[str, StringConstraints(max_length=256)]


class MetricSample(BaseModel):
    """One measured value."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=128, pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:.]*$")
    ]
    value: Annotated[float, Field(allow_inf_nan=False)]
    unit: Annotated[str, StringConstraints(max_length=32)] = ""
    labels: Annotated[
        dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], Label],
        Field(max_length=32),
    ] = Field(default_factory=dict)


class MetricsBatchV1(Message):
    """A batch of samples one service instance collected at one time."""

    schema_version: Annotated[str, StringConstraints(pattern=r"^1\.\d{1,4}$")] = "1.0"
    service: Name
    instance: Name
    collected_at: UtcDatetime
    samples: Annotated[tuple[MetricSample, ...], Field(min_length=1, max_length=1000)]
