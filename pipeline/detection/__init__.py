"""Object detection: the YOLO detector, its Ray actor pool and the frame intake."""

from __future__ import annotations

from .detector import DetectorConfig, UltralyticsDetector, export_model, model_format
from .pool import DetectorPool, Frame, PoolConfig, connect_ray

__all__ = [
    "DetectorConfig",
    "DetectorPool",
    "Frame",
    "PoolConfig",
    "UltralyticsDetector",
    "connect_ray",
    "export_model",
    "model_format",
]
