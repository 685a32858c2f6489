"""A frame as the detector pool takes it, and what becomes of it: `Analysis` or `Unreadable`."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import Detection

from ..errors import Reason
from .imagesize import image_size

__all__ = ["Analysis", "Frame", "Outcome", "Unreadable", "check_size"]


@dataclass(frozen=True)
class Frame:
    """An encoded frame and the size its metadata claims."""

    body: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Analysis:
    """What the model found in one frame."""

    detections: list[Detection]
    batch_size: int
    batch_inference_s: float
    """The model's time for the whole batch, in the actor."""
    queue_s: float
    """From the frame's submission to its batch's call to an actor."""
    sent_ns: int = 0
    """When the batch was sent to the actor (Unix time, ns)."""
    answered_ns: int = 0
    """When the actor's answer came back (Unix time, ns)."""
    actor: int = 0
    """Which actor of the pool (its index; -1 if it was replaced meanwhile)."""
    in_actor_ns: tuple[int, int] = (0, 0)
    """When the actor began and ended the batch: decoding and the model (Unix ns, by the
    actor's clock)."""


@dataclass(frozen=True)
class Unreadable:
    """A frame whose body could not be decoded or does not match its metadata."""

    reason: Reason
    detail: str


Outcome = Analysis | Unreadable


def check_size(frame: Frame, max_pixels: int) -> Unreadable | None:
    """Why a frame must not be decoded (from its header alone), or None if it may be."""
    size = image_size(frame.body)
    if size is None:
        return Unreadable(Reason.UNDECODABLE_IMAGE, "the image header cannot be read")
    width, height = size
    if width * height > max_pixels:
        return Unreadable(
            Reason.OVERSIZED, f"image is {width}x{height}, over the limit of {max_pixels} pixels"
        )
    if size != (frame.width, frame.height):
        return Unreadable(
            Reason.DIMENSION_MISMATCH,
            f"image is {width}x{height}, metadata says {frame.width}x{frame.height}",
        )
    return None
