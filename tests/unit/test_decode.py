"""Decoding frames: the GPU path (nvJPEG) where CUDA is present, the CPU otherwise or when
nvJPEG fails, and the letterbox that takes GPU-decoded images to the model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.detection import decode as decoding
from pipeline.detection.decode import decode, decode_batch, gpu_decoding
from pipeline.detection.detector import (
    DetectorConfig,
    UltralyticsDetector,
    letterbox,
    unletterboxed,
)
from pipeline.detection.frame import Frame, Unreadable
from pipeline.errors import Reason
from pipeline.ops.simulate import Cameras
from streams import Subjects

LOW_CONF = 1e-5  # random weights score boxes near 1e-4


@pytest.fixture(scope="module")
def frames() -> list[Frame]:
    cameras = Cameras(Subjects(""), width=320, height=240, variants=4, seed=5)
    good = [Frame(cameras.frame().body, 320, 240) for _ in range(3)]
    junk = Frame(b"\xff\xd8\xff" + b"\x00" * 200, 320, 240)  # a JPEG header, no image
    wrong = Frame(good[0].body, 640, 480)  # metadata that lies about the size
    return [good[0], junk, good[1], wrong, good[2]]


def test_the_gpu_decodes_only_on_a_cuda_device_torch_sees() -> None:
    assert gpu_decoding("cpu") is False
    assert gpu_decoding("") is False
    assert gpu_decoding("cuda:0") is torch.cuda.is_available()


def test_without_a_gpu_each_frame_is_decoded_on_the_cpu(frames: list[Frame]) -> None:
    batch = decode_batch(frames, 320, 10**7)
    one_by_one = [decode(f, 320, 10**7) for f in frames]
    assert [type(b) for b in batch] == [type(o) for o in one_by_one]
    assert isinstance(batch[1], Unreadable) and batch[1].reason is Reason.UNDECODABLE_IMAGE
    assert isinstance(batch[3], Unreadable) and batch[3].reason is Reason.DIMENSION_MISMATCH
    for b, o in zip(batch, one_by_one, strict=True):
        if not isinstance(b, Unreadable):
            assert isinstance(o, tuple)
            assert np.array_equal(b[0], o[0]) and b[1] == o[1] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA fails")
def test_a_gpu_that_fails_falls_back_to_the_cpu(frames: list[Frame]) -> None:
    """nvJPEG on a CUDA device torch cannot use raises: every frame goes to the CPU."""
    batch = decode_batch(frames, 320, 10**7, device="cuda:0")
    expected = decode_batch(frames, 320, 10**7)
    assert [type(b) for b in batch] == [type(e) for e in expected]
    for b, e in zip(batch, expected, strict=True):
        if isinstance(b, Unreadable):
            assert isinstance(e, Unreadable) and b.reason is e.reason
        else:
            assert isinstance(e, tuple) and np.array_equal(b[0], e[0])


def test_the_tensor_path_decodes_what_the_cpu_decodes(frames: list[Frame]) -> None:
    """torchvision's decoder on the CPU stands in for nvJPEG: the same batch path, tensors
    out; the frames it cannot take (junk, a lying size) are judged on the CPU."""
    batch = decode_batch(frames, 320, 10**7, device="cpu")
    assert isinstance(batch[1], Unreadable) and batch[1].reason is Reason.UNDECODABLE_IMAGE
    assert isinstance(batch[3], Unreadable) and batch[3].reason is Reason.DIMENSION_MISMATCH
    for i in (0, 2, 4):
        one = batch[i]
        assert isinstance(one, tuple)
        image, scale = one
        assert isinstance(image, torch.Tensor) and scale == 1
        assert tuple(image.shape) == (3, 240, 320) and image.dtype == torch.uint8
        bgr = cv2.imdecode(np.frombuffer(frames[i].body, np.uint8), cv2.IMREAD_COLOR)
        assert bgr is not None
        rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)
        # Two IDCTs agree to a few levels.
        assert (image.int() - rgb.int()).abs().float().mean() < 2.0


def test_a_failed_batch_is_retried_frame_by_frame(
    frames: list[Frame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG fails a whole call for one frame it refuses: the others are decoded alone."""
    import torchvision.io  # type: ignore[import-untyped]

    real = torchvision.io.decode_jpeg
    calls: list[int] = []

    def strict(data, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(data) if isinstance(data, list) else 1)
        if isinstance(data, list):
            raise RuntimeError("nvJPEG refused one image of the batch")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", strict)
    batch = decoding.decode_batch(frames, 320, 10**7, device="cpu")
    # The junk and the lying size are refused from their headers, before any decoding.
    assert calls == [3, 1, 1, 1]  # the batch, then one by one
    assert [isinstance(b, Unreadable) for b in batch] == [False, True, False, True, False]
    assert isinstance(batch[0][0], torch.Tensor)  # type: ignore[index]


def test_letterbox_places_images_as_ultralytics_does_and_boxes_come_back() -> None:
    wide = torch.zeros((3, 240, 320), dtype=torch.uint8)
    wide[:, 100:140, 200:260] = 255  # a white block
    tall = torch.full((3, 480, 200), 255, dtype=torch.uint8)
    batch, placed = letterbox([wide, tall], 320)
    assert tuple(batch.shape) == (2, 3, 320, 320) and batch.dtype == torch.float32
    ratio, left, top, w, h = placed[0]
    assert (ratio, left, top, w, h) == (1.0, 0.0, 40.0, 320, 240)
    assert batch[0, 0, 40 + 120, 230].item() == 1.0  # the block, moved down by the padding
    assert batch[0, 0, 10, 10].item() == pytest.approx(114 / 255)  # grey padding
    ratio, left, top, w, h = placed[1]
    assert ratio == pytest.approx(320 / 480) and top == 0.0 and w == 200 and h == 480
    # A box found around the block, in letterboxed pixels, lands on it in the image's.
    rows = unletterboxed(np.array([[200.0, 140.0, 260.0, 180.0, 0.9, 0]]), *placed[0])
    assert rows[0, :4].tolist() == [200.0, 100.0, 260.0, 140.0]
    # Boxes over the padding are clipped to the image.
    rows = unletterboxed(np.array([[-5.0, 0.0, 400.0, 330.0, 0.9, 0]]), *placed[0])
    assert rows[0, :4].tolist() == [0.0, 0.0, 320.0, 240.0]


def test_the_detector_takes_gpu_decoded_images(model_dir: Path, frames: list[Frame]) -> None:
    """Tensors (as nvJPEG decodes them; here on the CPU) go through the model letterboxed
    on their device; their boxes are in the frames' pixels."""
    detector = UltralyticsDetector(
        DetectorConfig(model=str(model_dir / "yolov8n.onnx"), imgsz=320, conf=LOW_CONF)
    )
    decoded = decode_batch([frames[0], frames[2]], 320, 10**7, device="cpu")
    tensors = [d[0] for d in decoded]  # type: ignore[index]
    found = detector.detect(tensors)
    assert len(found.detections) == 2 and found.inference_s > 0
    assert found.detections[0], "a threshold this low keeps boxes even with random weights"
    for detections in found.detections:
        for d in detections:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= 320 and 0 <= y1 <= y2 <= 240
    # The same images as arrays, padded to the same square, give the same boxes once
    # placed back.
    padded = [
        cv2.copyMakeBorder(
            np.ascontiguousarray(t.permute(1, 2, 0).numpy()[..., ::-1]),
            40,
            40,
            0,
            0,
            cv2.BORDER_CONSTANT,
            value=(114, 114, 114),
        )
        for t in tensors
    ]
    as_arrays = detector.detect(padded)
    for detections, reference in zip(found.detections, as_arrays.detections, strict=True):
        rows = [[*d.box, d.confidence, 0] for d in reference]
        moved = sorted(tuple(r[:4]) for r in unletterboxed(rows, 1.0, 0, 40, 320, 240).tolist())
        boxes = sorted(d.box for d in detections)
        assert len(boxes) == len(moved)
        assert [v for b in boxes for v in b] == pytest.approx(
            [v for b in moved for v in b], abs=0.2
        )
