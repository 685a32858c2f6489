"""The detector loads every supported format offline and applies its settings."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.detection.detector import DetectorConfig, UltralyticsDetector, model_format
from pipeline.detection.raycluster import yolo_env
from pipeline.errors import ConfigError
from pipeline.ops.simulate import sample_images
from pipeline.settings import Settings

# Random weights score every box near 1e-4: thresholds this low let boxes through.
LOW_CONF = 1e-5


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return cv2.imread(str(sample_images()[0]))


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolov8n.pt", "yolov8n.onnx"])
def test_each_format_loads_offline_and_detects(
    name: str, model_dir: Path, image: np.ndarray
) -> None:
    model = name if name.endswith(".yaml") else str(model_dir / name)
    detector = UltralyticsDetector(DetectorConfig(model=model, imgsz=320, conf=LOW_CONF))
    # Loading ran the first prediction: the runtime is open before the first batch.
    assert detector._model.predictor is not None
    found = detector.detect([image, image[:240, :320]])
    assert len(found.detections) == 2
    assert found.detections[0], "a threshold this low keeps boxes even with random weights"
    assert found.inference_s > 0
    h, w = image.shape[:2]
    for d in found.detections[0]:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h  # boxes in original pixels
        assert d.confidence >= LOW_CONF


def test_the_same_random_weights_in_every_detector(model_dir: Path, image: np.ndarray) -> None:
    """A YAML model is seeded, so the .pt saved from it and a new build agree."""
    config = DetectorConfig(model="yolov8n.yaml", imgsz=320, conf=LOW_CONF)
    a = UltralyticsDetector(config).detect([image]).detections
    b = UltralyticsDetector(config).detect([image]).detections
    c = UltralyticsDetector(config.model_copy(update={"model": str(model_dir / "yolov8n.pt")}))
    assert a == b == c.detect([image]).detections


def test_thresholds_and_class_filters_are_applied(model_dir: Path, image: np.ndarray) -> None:
    model = str(model_dir / "yolov8n.onnx")
    low = UltralyticsDetector(DetectorConfig(model=model, imgsz=320, conf=LOW_CONF))
    higher = UltralyticsDetector(DetectorConfig(model=model, imgsz=320, conf=1e-4))
    strict = UltralyticsDetector(DetectorConfig(model=model, imgsz=320, conf=0.5))
    many = low.detect([image]).detections[0]
    fewer = higher.detect([image]).detections[0]
    assert len(fewer) < len(many)
    assert all(d.confidence >= 1e-4 for d in fewer)
    assert strict.detect([image]).detections[0] == []

    classes = sorted({d.class_id for d in many})
    kept = classes[:1]
    only = UltralyticsDetector(
        DetectorConfig(model=model, imgsz=320, conf=LOW_CONF, classes=(*kept,))
    )
    assert {d.class_id for d in only.detect([image]).detections[0]} == set(kept)
    other = next(c for c in range(80) if c not in classes)
    none = UltralyticsDetector(
        DetectorConfig(model=model, imgsz=320, conf=LOW_CONF, classes=(other,))
    )
    assert none.detect([image]).detections[0] == []


def test_provenance_names_model_format_hash_and_thresholds(model_dir: Path) -> None:
    path = model_dir / "yolov8n.onnx"
    config = DetectorConfig(model=str(path), imgsz=320, conf=0.3, iou=0.6, classes=(0, 2))
    p = UltralyticsDetector(config).provenance
    assert (p.name, p.format, p.device) == ("yolov8n", "onnx", "cpu")
    assert p.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (p.imgsz, p.conf, p.iou, p.classes, p.half) == (320, 0.3, 0.6, (0, 2), False)
    pt = UltralyticsDetector(DetectorConfig(model=str(model_dir / "yolov8n.pt"))).provenance
    assert pt.format == "pytorch" and pt.sha256 != p.sha256


def test_formats_and_missing_files_give_clear_errors(tmp_path: Path) -> None:
    assert model_format("models/yolo11n.engine") == "engine"  # TensorRT: needs a GPU to load
    with pytest.raises(ValueError, match=r"a model is a \.pt, \.onnx, \.engine, \.yaml file"):
        model_format("model.tflite")
    with pytest.raises(ConfigError, match=r"PIPELINE_DETECTOR_MODEL: model file .* not found"):
        UltralyticsDetector(DetectorConfig(model=str(tmp_path / "missing.engine")))


class _Payload:
    """Unpickled, it writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.marker, "unpickled"))  # type: ignore[return-value]


def test_a_model_with_another_hash_is_refused_before_it_is_unpickled(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    import torch

    marker = tmp_path / "marker"
    tampered = tmp_path / "yolov8n.pt"
    tampered.write_bytes(pickle.dumps(_Payload(marker)))
    genuine = hashlib.sha256((model_dir / "yolov8n.pt").read_bytes()).hexdigest()
    real_load = torch.load

    def no_load(*args: object, **kwargs: object) -> object:
        pytest.fail("torch.load was called on a model whose hash was not checked")

    monkeypatch.setattr(torch, "load", no_load)
    config = DetectorConfig(model=str(tampered), sha256=genuine)
    with pytest.raises(ConfigError, match="PIPELINE_DETECTOR_MODEL_SHA256") as refused:
        UltralyticsDetector(config)
    assert hashlib.sha256(tampered.read_bytes()).hexdigest() in str(refused.value)
    assert not marker.exists()

    # The same file with its own hash pinned is loaded, and its pickle runs: what the
    # check prevents.
    monkeypatch.setattr(torch, "load", real_load)
    own = hashlib.sha256(tampered.read_bytes()).hexdigest()
    with pytest.raises(Exception):  # noqa: B017 - not a model, once unpickled
        UltralyticsDetector(config.model_copy(update={"sha256": own}))
    assert marker.read_text() == "unpickled"


def test_a_pinned_hash_is_checked_and_recorded(model_dir: Path) -> None:
    path = model_dir / "yolov8n.onnx"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    detector = UltralyticsDetector(DetectorConfig(model=str(path), imgsz=320, sha256=digest))
    assert detector.provenance.sha256 == digest
    with pytest.raises(
        ConfigError, match=re.escape(f"{path} has SHA-256 {digest}, not {'0' * 64}")
    ):
        UltralyticsDetector(DetectorConfig(model=str(path), imgsz=320, sha256="0" * 64))


def test_production_runs_ultralytics_offline_and_never_downloads(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        env="production",
        detector_model="yolo11n.pt",
        detector_model_sha256="1" * 64,
    )
    config = DetectorConfig.from_settings(settings)
    assert config.offline and config.sha256 == "1" * 64
    assert yolo_env(offline=True)["YOLO_OFFLINE"] == "1"
    # An official name not on disk would be downloaded in development; not here.
    with pytest.raises(ConfigError, match=r"model file 'yolo11n\.pt' not found"):
        UltralyticsDetector(config)
    assert not Path("yolo11n.pt").exists()


def test_onnx_on_the_cpu_runs_without_spinning_threads(model_dir: Path, image: np.ndarray) -> None:
    """ONNX Runtime's threads sleep between runs instead of spinning (CPU left to the
    decoding and the worker); detections stay the same."""
    detector = UltralyticsDetector(
        DetectorConfig(model=str(model_dir / "yolov8n.onnx"), imgsz=320, conf=LOW_CONF)
    )
    session = detector._model.predictor.model.backend.session
    config = session.get_session_options().get_session_config_entry
    assert config("session.intra_op.allow_spinning") == "0"
    assert config("session.inter_op.allow_spinning") == "0"
    found = detector.detect([image]).detections
    model = detector._model.predictor.model.backend
    import onnxruntime  # type: ignore[import-untyped]

    model.session = onnxruntime.InferenceSession(
        str(model_dir / "yolov8n.onnx"), providers=["CPUExecutionProvider"]
    )
    assert detector.detect([image]).detections == found
