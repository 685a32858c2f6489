"""The detection extra (`pip install 'event-pipeline[detection]'`): what needs it, and the
one-line error where it is configured but not installed.

Ultralytics, PyTorch, OpenCV, ONNX Runtime and Ray are most of the install (PyTorch's
CUDA build alone is gigabytes), and only detection uses them: the other domains, the
projections, the API and the audit trail run without. A worker that sends frames to a
Ray cluster needs Ray's client only; the cluster's nodes run the model.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from ..errors import ConfigError
from ..settings import Settings

__all__ = [
    "EXTRA",
    "LOCAL_MODULES",
    "RAY_CLIENT_MODULES",
    "DetectionMissing",
    "missing",
    "require",
    "require_for_frames",
]

EXTRA = "event-pipeline[detection]"
"""The extra's requirement, as pip takes it."""
LOCAL_MODULES = ("ultralytics", "torch", "cv2", "numpy", "onnxruntime", "ray")
"""What a process that runs the model needs (its own actors on a local Ray, an export)."""
RAY_CLIENT_MODULES = ("ray",)
"""What a worker whose detector actors run on a Ray cluster needs."""


class DetectionMissing(ConfigError):
    """Detection is configured where the detection extra is not installed."""

    def __init__(self, setting: str, needed_by: str, modules: Sequence[str], instead: str = ""):
        self.needed_by = needed_by
        self.modules = tuple(modules)
        alternative = f", or {instead}" if instead else ""
        super().__init__(
            setting,
            f"for {needed_by}, install the detection extra: pip install '{EXTRA}' (no module "
            f"{', '.join(self.modules)} here){alternative}",
        )


def missing(modules: Sequence[str]) -> list[str]:
    """Those of `modules` that cannot be imported here (found without importing them; a
    folder of that name, such as Ray's /tmp/ray in the current directory, is not one)."""
    return [
        name for name in modules if getattr(importlib.util.find_spec(name), "origin", None) is None
    ]


def require(
    setting: str, needed_by: str, modules: Sequence[str] = LOCAL_MODULES, instead: str = ""
) -> None:
    """Raise `DetectionMissing` (naming `setting` and the extra) if a module is missing."""
    gone = missing(modules)
    if gone:
        raise DetectionMissing(setting, needed_by, gone, instead)


def require_for_frames(settings: Settings) -> None:
    """Refuse a worker with the frames domain where detection cannot run: without the
    extra, or, for a Ray cluster's client (`PIPELINE_RAY_ADDRESS`), without Ray."""
    remote = bool(settings.ray_address or os.environ.get("RAY_ADDRESS"))
    require(
        "PIPELINE_DOMAINS",
        "the frames domain",
        RAY_CLIENT_MODULES if remote else LOCAL_MODULES,
        instead="leave frames out of PIPELINE_DOMAINS",
    )
