"""Camera frame metadata (`frames.v1.<camera>`): the image is the body, metadata the headers."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .common import MessageId, Name, UtcDatetime

__all__ = ["FRAME_HEADERS", "FrameEncoding", "FrameMetaV1"]


class FrameEncoding(StrEnum):
    """How the frame body is encoded."""

    JPEG = "jpeg"
    PNG = "png"


FRAME_HEADERS: Mapping[str, str] = {
    "id": "Frame-Id",
    "schema_version": "Frame-Schema-Version",
    "camera": "Frame-Camera",
    "sequence": "Frame-Sequence",
    "captured_at": "Frame-Captured-At",
    "width": "Frame-Width",
    "height": "Frame-Height",
    "encoding": "Frame-Encoding",
}
"""Model field -> NATS header carrying it."""


class FrameMetaV1(BaseModel):
    """Metadata of one encoded camera frame, carried in NATS headers."""

    # Header values are strings, so numbers and times are parsed (lax mode).
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: MessageId
    schema_version: Annotated[str, StringConstraints(pattern=r"^1\.\d{1,4}$")] = "1.0"
    camera: Name
    sequence: Annotated[int, Field(ge=0)]
    captured_at: UtcDatetime
    width: Annotated[int, Field(gt=0, le=16384)]
    height: Annotated[int, Field(gt=0, le=16384)]
    encoding: FrameEncoding

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> FrameMetaV1:
        """Read the metadata from message headers (missing headers fail validation)."""
        return cls.model_validate(
            {field: headers[name] for field, name in FRAME_HEADERS.items() if name in headers}
        )

    def to_headers(self) -> dict[str, str]:
        """The headers a producer sends with the frame (plus `Nats-Msg-Id`)."""
        values = self.model_dump(mode="json")
        headers = {name: str(values[field]) for field, name in FRAME_HEADERS.items()}
        headers["Nats-Msg-Id"] = self.id
        return headers
