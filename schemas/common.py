"""Shared field types and the base model of every inbound message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, ClassVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "AttributeValue",
    "Attributes",
    "Int64",
    "Message",
    "MessageId",
    "Name",
    "UtcDatetime",
]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


MessageId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"),
]
"""Producer-assigned message id (UUIDv7 recommended); also sent as `Nats-Msg-Id`."""

Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
]
"""A source, service, instance or camera name: also valid as a subject token."""

UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timestamp with an explicit offset, normalised to UTC; naive times are rejected."""

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
"""An integer the event store can hold: JSON numbers beyond 64 bits are refused."""


def _no_big_int(value: object) -> object:
    # Without this, an integer beyond 64 bits would pass as a float, changing its value.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
        raise ValueError("integer beyond the signed 64-bit range")
    return value


AttributeValue = Annotated[
    Annotated[str, StringConstraints(max_length=1024)]
    | bool
    | Int64
    | Annotated[float, Field(allow_inf_nan=False)],
    BeforeValidator(_no_big_int),
]
Attributes = Annotated[
    dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], AttributeValue],
    Field(max_length=64),
]


class Message(BaseModel):
    """Base of every inbound message model: immutable, strict, no unknown fields.

    A message whose `schema_version` has a higher minor than `MINOR` comes from a producer
    ahead of the pipeline: its unknown top-level fields are kept as they are (see
    `pipeline.ingest.codec`); anything else unknown is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    MINOR: ClassVar[int] = 0
    """The highest minor version of the model's major that the pipeline knows."""

    id: MessageId
    schema_version: str
