#!/usr/bin/env bash
# GPU check (not part of CI, run by hand on an NVIDIA machine): the detector pool on CUDA
# at batch 8 and 32, in FP32 and FP16, with a .pt (PyTorch), an .onnx (ONNX Runtime's CUDA
# execution provider) and a TensorRT .engine exported on the spot, each with the frames
# decoded on the GPU (nvJPEG) and on the CPU. Per run one JSON line: ms per frame through
# the pool and in the model, frames/s, and the CPU per frame outside the model (this
# process, which plays the worker's part, plus the actor's process, less the model's CPU),
# with the decoding's share; then nvJPEG against the CPU decoder alone. It fails, naming
# what is missing, when CUDA, nvJPEG, ONNX Runtime's CUDA provider or TensorRT is not
# there: nothing is skipped. Takes several minutes (the engine exports take the longest).
# Needs the project installed in .venv (or PYTHON) with the detection extra, and for the
# engine the `tensorrt` package.
#
#   bash bench/gpu_check.sh [frames]               # default 256 frames per run
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh 32     # dry run of the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 RAY_AUTH_MODE=disabled
"$PY" - "${1:-256}" <<'PYEOF'
import asyncio, json, os, sys, tempfile, time
from pathlib import Path

import torch

from pipeline.detection.decode import decode_batch, gpu_decoding
from pipeline.detection.detector import DetectorConfig, export_model
from pipeline.detection.frame import Analysis, Frame
from pipeline.detection.pool import DetectorPool, PoolConfig
from pipeline.detection.raycluster import connect_ray
from pipeline.ops.simulate import Cameras
from streams import Subjects

count = int(sys.argv[1])
on_cpu = os.environ.get("GPU_CHECK_CPU") == "1"
BATCHES = (8, 32)


def fail(what: str) -> None:
    print(f"GPU check FAILED: {what}", file=sys.stderr, flush=True)
    sys.exit(1)


if on_cpu:
    print("dry run on CPU (GPU_CHECK_CPU=1): FP32 .pt and .onnx, CPU decoding", flush=True)
    device = "cpu"
else:
    if not torch.cuda.is_available():
        fail("no CUDA device visible to torch (driver, CUDA_VISIBLE_DEVICES, a CPU build?)")
    device = "cuda:0"
    print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
    if not gpu_decoding(device):
        fail("torchvision cannot decode JPEGs on CUDA (nvJPEG): install a CUDA torchvision")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        fail(
            "onnxruntime has no CUDAExecutionProvider (has "
            f"{onnxruntime.get_available_providers()}): install onnxruntime-gpu"
        )
    try:
        import tensorrt
    except ImportError as exc:
        fail(f"TensorRT is not installed ({exc}): pip install tensorrt, for the .engine")
    print("onnxruntime", onnxruntime.__version__, "| tensorrt", tensorrt.__version__, flush=True)

folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
onnx = export_model("yolov8n.yaml", "onnx", imgsz=640, out_dir=folder)
pt = folder / "yolov8n.pt"
# (model file, FP16)
models: list[tuple[Path, bool]] = [(pt, False), (onnx, False)]
if not on_cpu:
    models.append((pt, True))
    for half in (False, True):
        engine = export_model(
            str(pt), "engine", imgsz=640, half=half, device="0", batch=max(BATCHES)
        )
        if not engine.is_file():
            fail(f"the TensorRT export wrote no engine ({engine})")
        kept = folder / f"yolov8n-{'fp16' if half else 'fp32'}.engine"
        engine.rename(kept)
        models.append((kept, half))

cameras = Cameras(Subjects(""), cameras=4, seed=1)
frames = [Frame(cameras.frame().body, 640, 480) for _ in range(count)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(model: Path, half: bool, batch: int, gpu_decode: bool) -> dict:
    config = DetectorConfig(model=str(model), imgsz=640, half=half, decode_on_gpu=gpu_decode)
    pool = DetectorPool(
        config,
        PoolConfig(num_gpus=0 if on_cpu else 1, max_batch=batch, max_wait_s=0.01, max_inflight=2),
    )
    await pool.start()
    try:
        await pool.detect(frames[: 2 * batch])  # warm-up
        [actor] = await pool.actor_pids()
        cpu = pool.metrics.detector_cpu_seconds
        parts = {k: cpu.labels(k)._value.get() for k in ("decode", "model", "call")}
        me, it = time.process_time(), cpu_seconds(actor)
        started = time.perf_counter()
        outcomes = await pool.detect(frames)
        elapsed = time.perf_counter() - started
        me, it = time.process_time() - me, cpu_seconds(actor) - it
        parts = {k: cpu.labels(k)._value.get() - v for k, v in parts.items()}
    finally:
        await pool.stop()
    done = [o for o in outcomes if isinstance(o, Analysis)]
    if len(done) != len(frames):
        fail(f"{model.name}: {len(frames) - len(done)} of {len(frames)} frames not analysed")
    model_ms = sum(o.batch_inference_s / o.batch_size for o in done) / len(done) * 1000
    per_frame = lambda s: round(1000 * s / len(done), 3)  # noqa: E731
    return {
        "model": model.name, "format": model.suffix[1:], "device": pool.provenance.device,
        "half": half, "batch": batch, "decode": "gpu" if gpu_decode and not on_cpu else "cpu",
        "frames": len(done), "pipeline_ms_per_frame": round(1000 * elapsed / len(done), 3),
        "model_ms_per_frame": round(model_ms, 3), "frames_per_s": round(len(done) / elapsed, 1),
        "cpu_ms_per_frame_outside_model": per_frame(me + it - parts["model"]),
        "cpu_ms_per_frame": {
            "caller": per_frame(me), "actor": per_frame(it), "actor_model": per_frame(parts["model"]),
            "actor_decode": per_frame(parts["decode"]),
        },
    }


def decoders() -> dict:
    """nvJPEG (batches of 32) against the CPU decoder, per frame: wall ms and CPU ms."""
    out = {}
    for name, dev in [("cpu", "")] + ([] if on_cpu else [("nvjpeg", device)]):
        decode_batch(frames[:32], 640, 10**8, dev)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(frames), 32):
            decode_batch(frames[i : i + 32], 640, 10**8, dev)
        if dev:
            torch.cuda.synchronize()
        out[name] = {
            "wall_ms_per_frame": round(1000 * (time.perf_counter() - wall) / len(frames), 3),
            "cpu_ms_per_frame": round(1000 * (time.process_time() - cpu) / len(frames), 3),
        }
    return out


async def main() -> None:
    connect_ray()
    for model, half in models:
        for batch in BATCHES:
            for gpu_decode in (False,) if on_cpu else (True, False):
                print(json.dumps(await run(model, half, batch, gpu_decode)), flush=True)
    print(json.dumps({"decoders": decoders()}), flush=True)


asyncio.run(main())
PYEOF
