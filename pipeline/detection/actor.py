"""The detector actor: runs in a Ray actor process, loads the model once, decodes and
detects batches of frames (`decode`)."""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from schemas import Detection, ModelProvenance

from .decode import decode_batch, gpu_decoding, scaled
from .detector import DetectorConfig, UltralyticsDetector
from .frame import Frame, Unreadable

__all__ = ["ActorCpu", "DetectorActor", "Reply", "Verdict"]

Verdict = list[Detection] | tuple[str, str]
"""A frame's detections, or (reason, detail) when it could not be analysed."""


class ActorCpu(NamedTuple):
    """CPU seconds an actor spent on one batch, by part."""

    decode: float
    """Decoding the frames (the process's CPU; on the GPU, what driving nvJPEG costs)."""
    model: float
    """The model's call, with its pre- and post-processing (the process's CPU: every
    thread of the runtime)."""
    call: float
    """The whole `detect` call (the process's CPU), decoding and the model included."""


class Reply(NamedTuple):
    """An actor's answer for a batch."""

    verdicts: list[Verdict]
    inference_s: float
    """The model's time for the batch (wall clock)."""
    in_actor_ns: tuple[int, int]
    """When the actor began and ended the batch (Unix ns, its own clock)."""
    cpu: ActorCpu


class DetectorActor:
    """Runs in a Ray actor process: loads the model once, decodes and detects batches."""

    def __init__(self, config: DetectorConfig, gpu: bool, max_pixels: int) -> None:
        self.detector = UltralyticsDetector(config, gpu=gpu)
        self.max_pixels = max_pixels
        # nvJPEG where the model runs on CUDA; otherwise (or if it fails) the CPU.
        on_gpu = config.decode_on_gpu and gpu_decoding(self.detector.device)
        self.decode_device = self.detector.device if on_gpu else ""

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

    def detect(self, frames: list[Frame]) -> Reply:
        """Decode and detect; per frame the detections or (reason, detail)."""
        began_ns, began_cpu = time.time_ns(), time.process_time()
        decoded = decode_batch(
            frames, self.detector.config.imgsz, self.max_pixels, self.decode_device
        )
        decode_cpu = time.process_time() - began_cpu
        images = []
        scales = []
        for frame, one in zip(frames, decoded, strict=True):
            if not isinstance(one, Unreadable):
                images.append(one[0])
                scales.append((one[1], frame.width, frame.height))
        model_began = time.process_time()
        found = self.detector.detect(images) if images else None
        model_cpu = time.process_time() - model_began
        results: list[Verdict] = []
        found_iter = iter(zip(found.detections, scales, strict=True) if found else [])
        for one in decoded:
            if isinstance(one, Unreadable):
                results.append((one.reason.value, one.detail))
            else:
                detections, (scale, width, height) = next(found_iter)
                results.append(scaled(detections, scale, width, height))
        cpu = ActorCpu(decode_cpu, model_cpu, time.process_time() - began_cpu)
        inference_s = found.inference_s if found else 0.0
        return Reply(results, inference_s, (began_ns, time.time_ns()), cpu)
