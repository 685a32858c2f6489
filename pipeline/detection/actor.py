"""The detector actor: runs in a Ray actor process, loads the model once, decodes and
detects batches of frames (`decode`)."""

from __future__ import annotations

import os
import time

from schemas import Detection, ModelProvenance

from .decode import decode, scaled
from .detector import DetectorConfig, UltralyticsDetector
from .frame import Frame, Unreadable

__all__ = ["DetectorActor", "Verdict"]

Verdict = list[Detection] | tuple[str, str]
"""A frame's detections, or (reason, detail) when it could not be analysed."""


class DetectorActor:
    """Runs in a Ray actor process: loads the model once, decodes and detects batches."""

    def __init__(self, config: DetectorConfig, gpu: bool, max_pixels: int) -> None:
        self.detector = UltralyticsDetector(config, gpu=gpu)
        self.max_pixels = max_pixels

    def ready(self) -> ModelProvenance:
        """The loaded model's provenance (also a liveness check)."""
        return self.detector.provenance

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def node_id(self) -> str:
        """The id of the Ray node the actor runs on (hex)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def probe(self) -> float:
        """Run the model on a blank image (a frame that cannot be at fault); its seconds."""
        import numpy as np  # the actors' (detection extra), not a Ray client's

        size = self.detector.config.imgsz
        return self.detector.detect([np.zeros((size, size, 3), np.uint8)]).inference_s

    def detect(self, frames: list[Frame]) -> tuple[list[Verdict], float, tuple[int, int]]:
        """Decode and detect; per frame the detections or (reason, detail); the model's
        seconds; when the actor began and ended the batch (Unix ns, its own clock)."""
        began_ns = time.time_ns()
        images = []
        scales = []
        verdicts: list[Verdict | None] = []
        for frame in frames:
            decoded = decode(frame, self.detector.config.imgsz, self.max_pixels)
            if isinstance(decoded, Unreadable):
                verdicts.append((decoded.reason.value, decoded.detail))
                continue
            image, scale = decoded
            images.append(image)
            scales.append((scale, frame.width, frame.height))
            verdicts.append(None)
        found = self.detector.detect(images) if images else None
        results: list[Verdict] = []
        found_iter = iter(zip(found.detections, scales, strict=True) if found else [])
        for verdict in verdicts:
            if verdict is None:
                detections, (scale, width, height) = next(found_iter)
                results.append(scaled(detections, scale, width, height))
            else:
                results.append(verdict)
        return results, found.inference_s if found else 0.0, (began_ns, time.time_ns())
