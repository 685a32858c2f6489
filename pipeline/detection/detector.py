"""Object detection: one interface, one implementation on Ultralytics YOLO.

The detector loads whichever file the configuration names: PyTorch `.pt`, ONNX
`.onnx` (through ONNX Runtime), TensorRT `.engine`,
or a model YAML such as `yolov8n.yaml` for a randomly initialised model (tests and
offline demos; seeded, so every actor builds the same weights). It never downloads
anything unless the file named is an official Ultralytics model that is not on disk, and
never in production (`offline`: Ultralytics runs with `YOLO_OFFLINE`).

A `.pt` file is a pickle: loading it can run code. With `sha256` set (always in
production), the file's SHA-256 is computed and compared before anything loads it, and a
file with another hash is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from schemas import Detection, ModelProvenance

from ..errors import ConfigError
from ..settings import Settings
from .extra import require

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FORMATS",
    "Detector",
    "DetectorConfig",
    "UltralyticsDetector",
    "export_model",
    "letterbox",
    "model_format",
    "unletterboxed",
    "verified_sha256",
]

FORMATS = {".pt": "pytorch", ".onnx": "onnx", ".engine": "engine", ".yaml": "yaml"}
"""File suffix -> model format."""

# Ultralytics must never pip-install packages from inside the pipeline.
os.environ.setdefault("YOLO_AUTOINSTALL", "0")


class DetectorConfig(BaseModel):
    """What to load and how to run it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "yolov8n.yaml"
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="the file's, if pinned")
    offline: bool = Field(False, description="never let Ultralytics download (production)")
    device: str = Field(
        "", description="'cpu', 'cuda:0', ...; empty picks cuda:0 if a GPU is given"
    )
    imgsz: Annotated[int, Field(ge=32, le=4096)] = 640
    conf: Annotated[float, Field(ge=0, le=1)] = 0.25
    iou: Annotated[float, Field(gt=0, le=1)] = 0.45
    classes: tuple[int, ...] | None = None
    half: bool = False
    decode_on_gpu: bool = Field(
        True, description="decode JPEGs with nvJPEG when the model runs on CUDA (else the CPU)"
    )
    threads: Annotated[int, Field(ge=0)] = 0
    max_det: Annotated[int, Field(ge=1)] = 300

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectorConfig:
        """The detector the settings name; `ConfigError` if the model file has no known format."""
        try:
            model_format(settings.detector_model)
        except ValueError as exc:
            raise ConfigError("PIPELINE_DETECTOR_MODEL", str(exc)) from None
        return cls(
            model=settings.detector_model,
            sha256=settings.detector_model_sha256,
            offline=settings.env == "production",
            device=settings.detector_device,
            imgsz=settings.detector_imgsz,
            conf=settings.detector_conf,
            iou=settings.detector_iou,
            classes=settings.detector_classes,
            half=settings.detector_half,
            threads=settings.detector_threads,
        )


def model_format(model: str) -> str:
    """The format of a model file from its suffix, or a `ValueError` naming the choices."""
    suffix = Path(model).suffix.lower()
    if suffix == ".yml":
        suffix = ".yaml"
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot load {model!r}: a model is a {', '.join(FORMATS)} file "
            "(export other formats with `pipeline model export`)"
        )
    return FORMATS[suffix]


def verified_sha256(config: DetectorConfig) -> str:
    """The SHA-256 of the model file, read before anything loads it; a `ConfigError` if it
    differs from `config.sha256`, when that is set (or if the file is missing)."""
    path = Path(config.model)
    if not path.is_file():
        raise ConfigError(
            "PIPELINE_DETECTOR_MODEL",
            f"model file {config.model!r} not found; set PIPELINE_DETECTOR_MODEL to a "
            f"{', '.join(FORMATS)} file",
        )
    actual = _sha256(path)
    if config.sha256 and actual != config.sha256:
        raise ConfigError(
            "PIPELINE_DETECTOR_MODEL_SHA256",
            f"{config.model} has SHA-256 {actual}, not {config.sha256}: refusing to load it",
        )
    return actual


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BatchDetections:
    """Detections of each image of a batch, and the model's time for the batch."""

    detections: list[list[Detection]]
    inference_s: float


class Detector(Protocol):
    """Finds objects in decoded BGR images (height x width x 3, uint8)."""

    @property
    def provenance(self) -> ModelProvenance: ...

    def detect(self, images: list[np.ndarray[Any, Any]]) -> BatchDetections: ...


class UltralyticsDetector:
    """A `Detector` on an Ultralytics YOLO model, loaded once."""

    def __init__(self, config: DetectorConfig, *, gpu: bool = False) -> None:
        fmt = model_format(config.model)
        if config.offline:
            # Read by Ultralytics when it is first imported (an actor sets it before, too).
            os.environ["YOLO_OFFLINE"] = "1"
        import torch
        from ultralytics import YOLO

        # PyTorch threads (0: every core). Ray limits an actor's OpenMP threads to its CPU
        # reservation, and Ultralytics resets them to cores - 1 when it sets up a device,
        # so they are set again before every batch.
        self._threads = config.threads or os.cpu_count() or 1
        self._torch = torch
        self.config = config
        self.device = config.device or ("cuda:0" if gpu else "cpu")
        download = False
        if fmt == "yaml":
            from ultralytics.nn.tasks import yaml_model_load

            path = Path(config.model)
            # The architecture (with its scale, `n` in yolov8n.yaml) is what identifies it.
            spec = json.dumps(yaml_model_load(config.model), sort_keys=True, default=str)
            sha256 = hashlib.sha256(spec.encode()).hexdigest()
            torch.manual_seed(0)  # the same random weights in every actor
        else:
            path = Path(config.model)
            # A bare official name (yolo11n.pt) not on disk is downloaded by Ultralytics,
            # in development only and when no hash is pinned.
            download = (
                fmt == "pytorch"
                and path.parent == Path(".")
                and not path.exists()
                and not (config.sha256 or config.offline)
            )
            if not download:
                sha256 = verified_sha256(config)  # before the file is loaded
        self._model = YOLO(str(path), task="detect")
        if fmt != "yaml" and download:
            path = Path(getattr(self._model, "ckpt_path", None) or path)
            sha256 = _sha256(path)
        if fmt in ("yaml", "pytorch"):
            self._model.to(self.device)
        self.names: dict[int, str] = dict(self._model.names)
        self._provenance = ModelProvenance(
            name=path.stem,
            format=fmt,
            sha256=sha256,
            imgsz=config.imgsz,
            conf=config.conf,
            iou=config.iou,
            classes=config.classes,
            half=config.half,
            device=self.device,
        )
        # The first prediction opens the runtime session and warms it up (about a second
        # on a CPU, more under load); it happens here, so an actor that answers `ready`
        # answers its first batch within the usual time too.
        import numpy

        blank = [numpy.zeros((config.imgsz, config.imgsz, 3), numpy.uint8)]
        self.detect(blank)
        if fmt == "onnx" and self._without_spinning(path):
            self.detect(blank)  # the new session's first run

    def _without_spinning(self, path: Path) -> bool:
        """ONNX Runtime on the CPU: reopen the session with threads that sleep between
        runs instead of spinning. Spinning threads take a core's worth of CPU after each
        run (about 1 ms per frame at batch 8 here, and 10 % of the model's own CPU) from
        the decoding, the worker and the model's other thread; the model is as fast
        without. Returns whether the session was reopened."""
        backend: Any = getattr(getattr(self._model.predictor, "model", None), "backend", None)
        session = getattr(backend, "session", None)
        if session is None or getattr(backend, "use_io_binding", False):
            return False
        providers = session.get_providers()
        if providers != ["CPUExecutionProvider"]:
            return False
        import onnxruntime  # type: ignore[import-untyped]

        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        backend.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        return True

    @property
    def provenance(self) -> ModelProvenance:
        """Model name, format, weights hash and thresholds, recorded with every frame."""
        return self._provenance

    def detect(self, images: list[Any]) -> BatchDetections:
        """Detect objects in a batch of images, in one call to the model: BGR arrays
        (height x width x 3, uint8), or RGB tensors (3 x height x width, uint8, as nvJPEG
        decodes them), letterboxed on their device and their boxes placed back."""
        c = self.config
        started = time.perf_counter()
        self._torch.set_num_threads(self._threads)
        placed: list[tuple[float, float, float, int, int]] = []
        source: Any = images
        if images and isinstance(images[0], self._torch.Tensor):
            source, placed = letterbox(images, c.imgsz)
        results = self._model.predict(
            source,
            imgsz=c.imgsz,
            conf=c.conf,
            iou=c.iou,
            classes=list(c.classes) if c.classes is not None else None,
            device=self.device,
            max_det=c.max_det,
            batch=max(1, len(images)),
            verbose=False,
            **({"half": True} if c.half else {}),
        )
        elapsed = time.perf_counter() - started
        found = []
        for i, result in enumerate(results):
            boxes = result.boxes
            data: Any = boxes.data if boxes is not None else []
            if hasattr(data, "cpu"):
                data = data.cpu().numpy()
            if placed:
                data = unletterboxed(data, *placed[i])
            found.append(
                [
                    Detection(
                        class_id=int(row[5]),
                        label=self.names.get(int(row[5]), str(int(row[5]))),
                        confidence=round(float(row[4]), 6),
                        box=(
                            round(float(row[0]), 1),
                            round(float(row[1]), 1),
                            round(float(row[2]), 1),
                            round(float(row[3]), 1),
                        ),
                    )
                    for row in data
                ]
            )
        return BatchDetections(found, elapsed)


def letterbox(
    images: list[Any], imgsz: int
) -> tuple[Any, list[tuple[float, float, float, int, int]]]:
    """RGB uint8 tensors (3 x h x w) as one batch the model takes (n x 3 x side x side,
    0-1, on their device; the side is imgsz rounded up to the model's stride of 32): each
    resized to fit imgsz, keeping its aspect, and centred on grey, as Ultralytics
    letterboxes arrays. Per image (ratio, left, top, width, height) for
    `unletterboxed`."""
    import torch
    import torch.nn.functional as F

    side = -(-imgsz // 32) * 32  # the model's stride divides the sides
    batch = torch.full(
        (len(images), 3, side, side), 114 / 255, dtype=torch.float32, device=images[0].device
    )
    placed = []
    for i, image in enumerate(images):
        _, h, w = image.shape
        ratio = min(imgsz / h, imgsz / w)
        nh, nw = round(h * ratio), round(w * ratio)
        pixels = image.unsqueeze(0).float().div_(255)
        if (nh, nw) != (h, w):
            pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", align_corners=False)
        top, left = (side - nh) // 2, (side - nw) // 2
        batch[i, :, top : top + nh, left : left + nw] = pixels[0]
        placed.append((ratio, float(left), float(top), w, h))
    return batch, placed


def unletterboxed(rows: Any, ratio: float, left: float, top: float, width: int, height: int) -> Any:
    """Detections (x1, y1, x2, y2, conf, class rows) of a letterboxed image, in its pixels."""
    import numpy as np

    rows = np.array(rows, dtype=np.float64, copy=True)
    if len(rows):
        rows[:, [0, 2]] = ((rows[:, [0, 2]] - left) / ratio).clip(0, width)
        rows[:, [1, 3]] = ((rows[:, [1, 3]] - top) / ratio).clip(0, height)
    return rows


def export_model(
    model: str,
    fmt: str = "onnx",
    *,
    imgsz: int = 640,
    half: bool = False,
    device: str = "cpu",
    out_dir: Path | None = None,
    batch: int = 1,
) -> Path:
    """Export a `.pt` (or a model YAML) to ONNX or TensorRT; returns the new file.

    The export lands next to the `.pt`; a YAML model is first saved as `<name>.pt` in
    `out_dir` (default: the current folder). ONNX gets a dynamic batch axis so the pool
    can send batches of any size; a TensorRT engine takes batches up to `batch`.
    """
    require("pipeline model export", "exporting a model")
    from ultralytics import YOLO

    source = model_format(model)
    if source not in ("pytorch", "yaml"):
        raise ValueError(f"export starts from a .pt file or a model YAML, not {model!r}")
    if fmt not in ("onnx", "engine"):
        raise ValueError(f"cannot export to {fmt!r}: choose onnx or engine")
    if source == "yaml":
        import torch

        torch.manual_seed(0)  # the same weights as the detector builds from this YAML
        weights = (out_dir or Path.cwd()) / f"{Path(model).stem}.pt"
        weights.parent.mkdir(parents=True, exist_ok=True)
        YOLO(model, task="detect").save(str(weights))
        model = str(weights)
    yolo = YOLO(model, task="detect")
    out = yolo.export(format=fmt, imgsz=imgsz, dynamic=True, half=half, device=device, batch=batch)
    return Path(out)
