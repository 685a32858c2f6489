#!/usr/bin/env bash
# GPU check (not part of CI): the detector pool on CUDA, with a .pt model and with ONNX on
# ONNX Runtime's CUDA execution provider (no TensorRT). Prints per-frame times. Takes
# about a minute or two; needs an NVIDIA GPU and the project installed in .venv (or PYTHON).
#
#   bash bench/gpu_check.sh [frames]
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh 32    # dry run of the script on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 RAY_AUTH_MODE=disabled
"$PY" - "${1:-256}" <<'PYEOF'
import asyncio, json, sys, tempfile, time
from pathlib import Path

import torch

from pipeline.detection.detector import DetectorConfig, export_model
from pipeline.detection.frame import Analysis, Frame
from pipeline.detection.pool import DetectorPool, PoolConfig
from pipeline.detection.raycluster import connect_ray
from pipeline.ops.simulate import Cameras
from streams import Subjects

import os

count = int(sys.argv[1])
on_cpu = os.environ.get("GPU_CHECK_CPU") == "1"
if on_cpu:
    print("dry run on CPU (GPU_CHECK_CPU=1)", flush=True)
elif not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: nothing to check")
else:
    print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
onnx = export_model("yolov8n.yaml", "onnx", imgsz=640, out_dir=folder)
cameras = Cameras(Subjects(""), cameras=4, seed=1)
frames = [Frame(cameras.frame().body, 640, 480) for _ in range(count)]

import onnxruntime

models = [folder / "yolov8n.pt"]
if on_cpu or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
    models.append(onnx)
else:
    print("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): ONNX skipped")


async def run(model: Path, half: bool) -> dict:
    config = DetectorConfig(model=str(model), imgsz=640, half=half)
    gpus = 0 if on_cpu else 1
    pool = DetectorPool(
        config, PoolConfig(num_gpus=gpus, max_batch=16, max_wait_s=0.01, max_inflight=2)
    )
    await pool.start()
    try:
        await pool.detect(frames[:32])  # warm-up
        started = time.perf_counter()
        outcomes = await pool.detect(frames)
        elapsed = time.perf_counter() - started
    finally:
        await pool.stop()
    done = [o for o in outcomes if isinstance(o, Analysis)]
    assert len(done) == len(frames), "every frame analysed"
    model_ms = sum(o.batch_inference_s / o.batch_size for o in done) / len(done) * 1000
    return {
        "model": model.name, "device": pool.provenance.device, "half": half,
        "frames": len(done), "pipeline_ms_per_frame": round(1000 * elapsed / len(done), 2),
        "model_ms_per_frame": round(model_ms, 2), "frames_per_s": round(len(done) / elapsed, 1),
    }


async def main() -> None:
    connect_ray()
    for model in models:
        for half in (False, True) if model.suffix == ".pt" and not on_cpu else (False,):
            print(json.dumps(await run(model, half)), flush=True)


asyncio.run(main())
PYEOF
