"""Frames decoded in the detector actors, reduced where the model sees fewer pixels.

Only the compressed frame crosses process boundaries; each actor decodes its own, so
decoding runs in parallel. Before decoding, the image's size is read from its header and
a frame over `max_pixels`, or not of the size its metadata claims, is refused, so a
decompression bomb costs nothing. A JPEG at least twice the model's input size is decoded
at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, faster than decoding in full and
resizing) and its boxes are scaled back to the frame's pixels (`scaled`).
"""

from __future__ import annotations

from typing import Any

from schemas import Detection

from ..errors import Reason
from .frame import Frame, Unreadable, check_size

__all__ = ["decode", "reduction", "scaled"]

_JPEG = b"\xff\xd8\xff"
_READ_FLAGS = {
    1: 1,  # cv2.IMREAD_COLOR
    2: 17,  # cv2.IMREAD_REDUCED_COLOR_2
    4: 33,  # cv2.IMREAD_REDUCED_COLOR_4
    8: 65,  # cv2.IMREAD_REDUCED_COLOR_8
}


def decode(frame: Frame, imgsz: int, max_pixels: int) -> tuple[Any, int] | Unreadable:
    """The frame's pixels (a BGR array) and the reduction it was decoded at, or why not."""
    import cv2  # the actors' (detection extra), not a Ray client's
    import numpy as np

    refused = check_size(frame, max_pixels)
    if refused is not None:
        return refused
    body = np.frombuffer(frame.body, np.uint8)
    scale = reduction(frame, imgsz)
    image = cv2.imdecode(body, _READ_FLAGS[scale])
    expected = (-(-frame.height // scale), -(-frame.width // scale))
    if image is not None and image.shape[:2] != expected and scale > 1:
        image, scale = cv2.imdecode(body, _READ_FLAGS[1]), 1  # judged at full size
        expected = (frame.height, frame.width)
    if image is None:
        return Unreadable(Reason.UNDECODABLE_IMAGE, "body is not a decodable image")
    if image.shape[:2] != expected:
        h, w = image.shape[:2]
        return Unreadable(
            Reason.DIMENSION_MISMATCH,
            f"image is {w}x{h}, metadata says {frame.width}x{frame.height}",
        )
    return image, scale


def reduction(frame: Frame, imgsz: int) -> int:
    """The largest JPEG decoding reduction that keeps the long side at imgsz or more."""
    if not frame.body.startswith(_JPEG):
        return 1
    long_side = max(frame.width, frame.height)
    scale = 1
    while scale < 8 and long_side // (scale * 2) >= imgsz:
        scale *= 2
    return scale


def scaled(detections: list[Detection], scale: int, width: int, height: int) -> list[Detection]:
    """Boxes found on a reduced image, in pixels of the original frame."""
    if scale == 1:
        return detections
    out = []
    for d in detections:
        x1, y1, x2, y2 = d.box
        box = (
            round(min(x1 * scale, width), 1),
            round(min(y1 * scale, height), 1),
            round(min(x2 * scale, width), 1),
            round(min(y2 * scale, height), 1),
        )
        out.append(d.model_copy(update={"box": box}))
    return out
