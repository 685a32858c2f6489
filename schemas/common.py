"""Shared field types and the base model of every inbound message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "AttributeValue",
    "Attributes",
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

AttributeValue = (
    Annotated[str, StringConstraints(max_length=1024)]
    | bool
    | int
    | Annotated[float, Field(allow_inf_nan=False)]
)
Attributes = Annotated[
    dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], AttributeValue],
    Field(max_length=64),
]


class Message(BaseModel):
    """Base of every inbound message model: immutable, strict, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    id: MessageId
