"""Frames decoded in the detector actors, reduced where the model sees fewer pixels.

Only the compressed frame crosses process boundaries; each actor decodes its own, so
decoding runs in parallel. Before decoding, the image's size is read from its header and
a frame over `max_pixels`, or not of the size its metadata claims, is refused, so a
decompression bomb costs nothing.

On a CPU, a JPEG at least twice the model's input size is decoded at 1/2, 1/4 or 1/8
scale (libjpeg's DCT scaling, faster than decoding in full and resizing) and its boxes
are scaled back to the frame's pixels (`scaled`). Where the detector runs on CUDA, JPEGs
are decoded on the GPU in one call per batch (nvJPEG, `torchvision.io.decode_jpeg`) and
stay there for the model (`gpu_decoding` says when); a frame nvJPEG cannot decode (a
PNG, a JPEG it refuses) is decoded on the CPU instead, and judged there.
"""

from __future__ import annotations

import logging
from typing import Any

from schemas import Detection

from ..errors import Reason
from .frame import Frame, Unreadable, check_size

__all__ = ["Decoded", "decode", "decode_batch", "gpu_decoding", "reduction", "scaled"]

log = logging.getLogger(__name__)

_JPEG = b"\xff\xd8\xff"
_READ_FLAGS = {
    1: 1,  # cv2.IMREAD_COLOR
    2: 17,  # cv2.IMREAD_REDUCED_COLOR_2
    4: 33,  # cv2.IMREAD_REDUCED_COLOR_4
    8: 65,  # cv2.IMREAD_REDUCED_COLOR_8
}

Decoded = tuple[Any, int]
"""A decoded image and the reduction it was decoded at: a BGR array (height x width x 3)
from the CPU, or an RGB tensor (3 x height x width, uint8, on the GPU) from nvJPEG."""


def gpu_decoding(device: str) -> bool:
    """Whether frames for a detector on `device` are decoded on the GPU: a CUDA device
    that torch sees, and torchvision's nvJPEG decoder."""
    if not device.startswith("cuda"):
        return False
    try:
        import torch
        from torchvision.io import decode_jpeg  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def decode_batch(
    frames: list[Frame], imgsz: int, max_pixels: int, device: str = ""
) -> list[Decoded | Unreadable]:
    """Each frame's pixels, or why not: on the GPU `device` (nvJPEG) when given, the
    frames it cannot decode (and every frame, if it fails) on the CPU."""
    out: list[Decoded | Unreadable | None] = [None] * len(frames)
    if device:
        on_gpu = []
        for i, frame in enumerate(frames):
            refused = check_size(frame, max_pixels)
            if refused is not None:
                out[i] = refused
            elif frame.body.startswith(_JPEG):
                on_gpu.append(i)
        for i, image in zip(
            on_gpu, _decode_on_gpu([frames[i] for i in on_gpu], device), strict=True
        ):
            if image is not None:
                out[i] = (image, 1)
    return [
        done if done is not None else decode(frame, imgsz, max_pixels)
        for frame, done in zip(frames, out, strict=True)
    ]


def _decode_on_gpu(frames: list[Frame], device: str) -> list[Any]:
    """nvJPEG's images of the frames (in one call), None for those it could not decode
    or that are not of their metadata's size (the CPU judges those)."""
    if not frames:
        return []
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(f.body), dtype=torch.uint8) for f in frames]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:  # one frame nvJPEG refuses fails the call: one by one
        log.debug("nvJPEG refused a batch (%s); decoding its frames one by one", exc)
        images = []
        for one in data:
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    return [
        image if image is not None and tuple(image.shape[1:]) == (f.height, f.width) else None
        for f, image in zip(frames, images, strict=True)
    ]


def decode(frame: Frame, imgsz: int, max_pixels: int) -> Decoded | Unreadable:
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
