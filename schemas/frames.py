"""Camera frame metadata (`frames.v1.<camera>`): the image is the body, metadata the headers."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .common import INT64_MAX, MessageId, Name, UtcDatetime

__all__ = [
    "FRAME_HEADERS",
    "Detection",
    "FrameAnalyzedV1",
    "FrameEncoding",
    "FrameMetaV1",
    "FrameSkippedV1",
    "ModelProvenance",
]


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
    sequence: Annotated[int, Field(ge=0, le=INT64_MAX)]
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


# Stored-event payloads: what the pipeline records for each frame.


class Detection(BaseModel):
    """One detected object, its box in pixels of the original frame (x1, y1, x2, y2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    class_id: Annotated[int, Field(ge=0)]
    label: str
    confidence: Annotated[float, Field(ge=0, le=1)]
    box: tuple[float, float, float, float]


class ModelProvenance(BaseModel):
    """Which model produced detections, and with which settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    format: str
    sha256: str
    imgsz: int
    conf: float
    iou: float
    classes: tuple[int, ...] | None
    half: bool
    device: str


class FrameAnalyzedV1(BaseModel):
    """Payload of a `FrameAnalyzed` event: the frame's metadata and its detections."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    frame: FrameMetaV1
    detections: tuple[Detection, ...]
    inference_ms: float
    batch_size: Annotated[int, Field(ge=1)]
    queue_ms: float
    model: ModelProvenance


class FrameSkippedV1(BaseModel):
    """Payload of a `FrameSkipped` event: a frame too old to analyse, recorded as such."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    frame: FrameMetaV1
    reason: str
    age_s: float
