"""Object detection: the YOLO detector, its Ray actor pool and the frame intake."""

from __future__ import annotations

from .detector import DetectorConfig, UltralyticsDetector, export_model, model_format
from .frame import Frame
from .pool import DetectorPool, PoolConfig
from .raycluster import connect_ray

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
