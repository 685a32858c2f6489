"""The detector pool: YOLO on Ray actors, fed by a dynamic batcher.

Frames are submitted one by one and wait in a bounded queue. The batcher takes up to
`max_batch` of them, or fewer once the oldest has waited `max_wait_s`, and sends the
batch to the least-loaded actor. Each actor has at most `max_inflight` batches in hand;
when every actor is full the queue fills, `submit` waits, and the frames handler stops
pulling: backpressure all the way to JetStream.

Failures: a batch has `batch_timeout_s` to come back. An actor that dies on a batch is
restarted by Ray (`max_restarts`; past that the pool starts a new one); an actor that
does not answer in time is killed and replaced. An actor is back in service once it has
answered a test frame (`probe`) within `batch_timeout_s`: an actor that is merely slow
stays out, and while no actor is in service batches wait and the frames intake is
paused (`pipeline_intake_paused{cause="detector"}`): slowness is an outage, never a
frame's fault. A failed batch (of one frame or several) is split: its frames go back to
the front of the queue, one per batch, blamed for nothing. A frame that fails again,
alone, is judged by the test frame its actor answers next: answered in time, the
detector works and the frame fails with `DetectionFailed` (the handler naks it, and
dead-letters it once its deliveries are used up); not in time, it is an outage and the
frame goes back to the queue. Frames still in the pool when it stops fail with
`DetectorUnavailable` (the handler gives them back; they are never dead-lettered for it).

Actors decode the JPEG/PNG bodies themselves, so decoding runs in parallel and only the
compressed frame crosses process boundaries. Before decoding, an actor reads the image's
size from its header and refuses a frame over `max_pixels` or not of the size its
metadata claims, so a decompression bomb costs nothing. A JPEG at least twice the model's input
size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, faster than decoding
in full and resizing) and its boxes are scaled back to the frame's pixels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas import Detection, Domain, ModelProvenance

from ..errors import ConfigError, DetectionFailed, DetectorUnavailable, Reason
from ..ingest.pause import Pauses
from ..metrics import Metrics
from ..settings import Settings
from .detector import DetectorConfig, UltralyticsDetector
from .imagesize import image_size

__all__ = [
    "Analysis",
    "DetectorActor",
    "DetectorPool",
    "Frame",
    "PoolConfig",
    "RayVersions",
    "Unreadable",
    "check_size",
    "check_versions",
    "connect_ray",
    "local_versions",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """An encoded frame and the size its metadata claims."""

    body: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Analysis:
    """What the model found in one frame."""

    detections: list[Detection]
    batch_size: int
    batch_inference_s: float
    """The model's time for the whole batch, in the actor."""
    queue_s: float
    """From the frame's submission to its batch's call to an actor."""
    sent_ns: int = 0
    """When the batch was sent to the actor (Unix time, ns)."""
    answered_ns: int = 0
    """When the actor's answer came back (Unix time, ns)."""
    actor: int = 0
    """Which actor of the pool (its index; -1 if it was replaced meanwhile)."""
    in_actor_ns: tuple[int, int] = (0, 0)
    """When the actor began and ended the batch: decoding and the model (Unix ns, by the
    actor's clock)."""


@dataclass(frozen=True)
class Unreadable:
    """A frame whose body could not be decoded or does not match its metadata."""

    reason: Reason
    detail: str


Outcome = Analysis | Unreadable


def check_size(frame: Frame, max_pixels: int) -> Unreadable | None:
    """Why a frame must not be decoded (from its header alone), or None if it may be."""
    size = image_size(frame.body)
    if size is None:
        return Unreadable(Reason.UNDECODABLE_IMAGE, "the image header cannot be read")
    width, height = size
    if width * height > max_pixels:
        return Unreadable(
            Reason.OVERSIZED, f"image is {width}x{height}, over the limit of {max_pixels} pixels"
        )
    if size != (frame.width, frame.height):
        return Unreadable(
            Reason.DIMENSION_MISMATCH,
            f"image is {width}x{height}, metadata says {frame.width}x{frame.height}",
        )
    return None


class DetectorActor:
    """Runs in a Ray actor process: loads the model once, decodes and detects batches."""

    def __init__(self, config: DetectorConfig, gpu: bool, max_pixels: int) -> None:
        self.detector = UltralyticsDetector(config, gpu=gpu)
        self.max_pixels = max_pixels

    def ready(self) -> ModelProvenance:
        """The loaded model's provenance (also a liveness check)."""
        return self.detector.provenance

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def probe(self) -> float:
        """Run the model on a blank image (a frame that cannot be at fault); its seconds."""
        import numpy as np  # the actors' (detection extra), not a Ray client's

        size = self.detector.config.imgsz
        return self.detector.detect([np.zeros((size, size, 3), np.uint8)]).inference_s

    def detect(
        self, frames: list[Frame]
    ) -> tuple[list[list[Detection] | tuple[str, str]], float, tuple[int, int]]:
        """Decode and detect; per frame the detections or (reason, detail); the model's
        seconds; when the actor began and ended the batch (Unix ns, its own clock)."""
        import cv2
        import numpy as np

        began_ns = time.time_ns()
        images = []
        scales = []
        verdicts: list[list[Detection] | tuple[str, str] | None] = []
        imgsz = self.detector.config.imgsz
        for frame in frames:
            refused = check_size(frame, self.max_pixels)
            if refused is not None:
                verdicts.append((refused.reason.value, refused.detail))
                continue
            # The model sees at most imgsz pixels a side: a large JPEG is decoded at 1/2,
            # 1/4 or 1/8 of its size (much faster) and its boxes scaled back.
            body = np.frombuffer(frame.body, np.uint8)
            scale = _reduction(frame, imgsz)
            image = cv2.imdecode(body, _READ_FLAGS[scale])
            expected = (-(-frame.height // scale), -(-frame.width // scale))
            if image is not None and image.shape[:2] != expected and scale > 1:
                image, scale = cv2.imdecode(body, _READ_FLAGS[1]), 1  # judged at full size
                expected = (frame.height, frame.width)
            if image is None:
                verdicts.append((Reason.UNDECODABLE_IMAGE.value, "body is not a decodable image"))
            elif image.shape[:2] != expected:
                h, w = image.shape[:2]
                verdicts.append(
                    (
                        Reason.DIMENSION_MISMATCH.value,
                        f"image is {w}x{h}, metadata says {frame.width}x{frame.height}",
                    )
                )
            else:
                images.append(image)
                scales.append((scale, frame.width, frame.height))
                verdicts.append(None)
        found = self.detector.detect(images) if images else None
        results: list[list[Detection] | tuple[str, str]] = []
        found_iter = iter(zip(found.detections, scales, strict=True) if found else [])
        for verdict in verdicts:
            if verdict is None:
                detections, (scale, width, height) = next(found_iter)
                results.append(_scaled(detections, scale, width, height))
            else:
                results.append(verdict)
        return results, found.inference_s if found else 0.0, (began_ns, time.time_ns())


_JPEG = b"\xff\xd8\xff"
_READ_FLAGS = {
    1: 1,  # cv2.IMREAD_COLOR
    2: 17,  # cv2.IMREAD_REDUCED_COLOR_2
    4: 33,  # cv2.IMREAD_REDUCED_COLOR_4
    8: 65,  # cv2.IMREAD_REDUCED_COLOR_8
}


def _reduction(frame: Frame, imgsz: int) -> int:
    """The largest JPEG decoding reduction that keeps the long side at imgsz or more."""
    if not frame.body.startswith(_JPEG):
        return 1
    long_side = max(frame.width, frame.height)
    scale = 1
    while scale < 8 and long_side // (scale * 2) >= imgsz:
        scale *= 2
    return scale


def _scaled(detections: list[Detection], scale: int, width: int, height: int) -> list[Detection]:
    """Boxes found on a reduced image, in pixels of the original frame."""
    if scale == 1:
        return detections
    out = []
    for d in detections:
        x1, y1, x2, y2 = d.box
        box = (
            round(min(x1 * scale, width), 1),
            round(min(y1 * scale, height), 1),
            round(min(x2 * scale, width), 1),
            round(min(y2 * scale, height), 1),
        )
        out.append(d.model_copy(update={"box": box}))
    return out


@dataclass(frozen=True)
class PoolConfig:
    """Size and batching of the pool."""

    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch: int = 8
    max_wait_s: float = 0.05
    max_inflight: int = 2
    max_restarts: int = 3
    batch_timeout_s: float = 60.0
    max_pixels: int = 7680 * 4320

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolConfig:
        """Size and batching of the pool, from the `PIPELINE_DETECTOR_*` settings."""
        return cls(
            actors=settings.detector_actors,
            num_cpus=settings.detector_num_cpus,
            num_gpus=settings.detector_num_gpus,
            max_batch=settings.detector_max_batch,
            max_wait_s=settings.detector_max_wait_ms / 1000,
            max_inflight=settings.detector_max_inflight,
            max_restarts=settings.detector_max_restarts,
            batch_timeout_s=settings.detector_batch_timeout_s,
            max_pixels=settings.frames_max_pixels,
        )

    @property
    def max_queued(self) -> int:
        """Frames waiting for a batch: enough to fill every actor's next batches."""
        return self.max_batch * self.actors * self.max_inflight


@dataclass
class _Pending:
    frame: Frame
    future: asyncio.Future[Outcome]
    enqueued: float
    sent: bool = False
    """Taken into a batch once (its place in the queue was given back then)."""
    alone: bool = False
    """Its batch failed: it goes in a batch of its own from now on."""


@dataclass
class _Actor:
    handle: Any
    load: int = 0
    up: asyncio.Event = field(default_factory=asyncio.Event)
    accused: list[tuple[_Pending, str]] = field(default_factory=list)
    """Frames that failed alone on this actor, judged by its next test frame."""

    def __post_init__(self) -> None:
        self.up.set()


@dataclass(frozen=True)
class RayVersions:
    """The Python and Ray of a Ray process (a client or a cluster)."""

    python: str
    ray: str

    def agrees_with(self, other: RayVersions) -> bool:
        """Whether a client of one may use a cluster of the other: the same Ray and the
        same Python minor (Ray's own rule for its clients)."""
        return self.ray == other.ray and _minor(self.python) == _minor(other.python)

    def __str__(self) -> str:
        return f"Python {self.python}, Ray {self.ray}"


def _minor(python: str) -> str:
    return ".".join(python.split(".")[:2])


def local_versions() -> RayVersions:
    """This process's Python and Ray."""
    import ray

    return RayVersions(".".join(map(str, sys.version_info[:3])), ray.__version__)


def check_versions(cluster: RayVersions, local: RayVersions, address: str) -> None:
    """Refuse a Ray cluster whose Python minor or Ray version differs from this process's."""
    if not cluster.agrees_with(local):
        raise ConfigError(
            "PIPELINE_RAY_ADDRESS",
            f"the Ray cluster at {address} runs {cluster}, this worker {local}: build the "
            "worker's and the Ray nodes' images with the same Python minor and Ray "
            "(deploy/Dockerfile, deploy/Dockerfile.gpu, ray.kuberay.rayVersion)",
        )


def _use_token_auth(address: str, token: str, *, required: bool) -> None:
    """Ray's token authentication for this process and the Ray it starts.

    Ray reads its mode and token from the environment (`RAY_AUTH_MODE`,
    `RAY_AUTH_TOKEN`), here and in the processes it starts. A local Ray without a token
    gets a random one that only this process knows. `RAY_AUTH_MODE=disabled` is honoured
    only where it is not `required` (development) and no token is given.
    """
    disabled = os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"
    if disabled and not token:
        if required:
            raise ConfigError(
                "RAY_AUTH_MODE",
                "Ray's token authentication may not be disabled in production",
            )
        return
    if not token and not address:
        token = secrets.token_hex(32)
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray read its configuration and token when it was imported: read them again, as Ray's
    # own `_enable_token_auth` does (ray 2.60, ray/_private/authentication).
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect_ray(
    address: str = "",
    *,
    num_cpus: int | None = None,
    temp_dir: str = "",
    auth_token: str = "",
    require_auth: bool = False,
) -> bool:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), else start a local one.

    Ray's token authentication stays on (`auth_token`: the cluster's token; see
    `_use_token_auth`). A cluster of another Python minor or Ray version is refused with a
    `ConfigError` naming both. Returns True if this call started Ray (and so should shut
    it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    _use_token_auth(address, auth_token, required=require_auth)
    if address:
        try:
            context = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except RuntimeError as exc:
            if "Version mismatch" not in str(exc):
                raise
            # Ray's own check (its message names both sides' versions).
            raise ConfigError("PIPELINE_RAY_ADDRESS", f"{exc}".strip()) from exc
        try:
            check_versions(_cluster_versions(context), local_versions(), address)
        except ConfigError:
            ray.shutdown()
            raise
        return True
    extra: dict[str, Any] = {"_temp_dir": temp_dir} if temp_dir else {}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        # Ray nices its workers to 15; the detector actors are the work this machine is
        # for, and a preempted inference thread stalls the model's other threads.
        _system_config={"worker_niceness": 0},
        **extra,
    )
    return True


def _cluster_versions(context: Any) -> RayVersions:
    """The cluster's Python and Ray, as `ray.init` reports them.

    A Ray client's context carries the cluster's (its server's) versions; a driver
    joining a cluster by its GCS address was checked by Ray itself, strictly, and its
    context carries its own.
    """
    return RayVersions(str(context.python_version), str(context.ray_version))


class DetectorPool:
    """N detector actors behind one dynamic batcher. Start with `await pool.start()`."""

    def __init__(
        self,
        detector: DetectorConfig,
        config: PoolConfig,
        metrics: Metrics | None = None,
        *,
        pauses: Pauses | None = None,
    ) -> None:
        self.detector = detector
        self.config = config
        self.metrics = metrics or Metrics()
        self.provenance: ModelProvenance | None = None
        self._pauses = pauses
        self._actors: list[_Actor] = []
        self._queue: deque[_Pending] = deque()
        self._added = asyncio.Event()
        self._actor_up = asyncio.Event()
        self._room = asyncio.Semaphore(config.max_queued)
        self._slots = asyncio.Semaphore(config.actors * config.max_inflight)
        self._batcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._calls: set[asyncio.Task[None]] = set()
        self._repairs: set[asyncio.Task[None]] = set()
        self.max_inflight_seen = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the actors and wait until each has loaded the model."""
        self._actors = [_Actor(self._new_actor()) for _ in range(self.config.actors)]
        try:
            provenances = await asyncio.gather(*(a.handle.ready.remote() for a in self._actors))
        except Exception as exc:
            await self.stop()
            raise ConfigError(
                "PIPELINE_DETECTOR_MODEL",
                f"the detector actors could not load {self.detector.model!r}: {_cause(exc)}",
            ) from exc
        self.provenance = provenances[0]
        self._stopping = False
        self._batcher = asyncio.create_task(self._run())
        log.info(
            "detector pool: %d actor(s), %s (%s, sha256 %s...)",
            len(self._actors),
            self.provenance.name,
            self.provenance.format,
            self.provenance.sha256[:12],
        )

    async def stop(self) -> None:
        """Finish the batches in hand, then remove the actors (frames still queued fail)."""
        if self._batcher is not None:
            # Cancelled, and told: Python 3.11's asyncio.wait_for can swallow a
            # cancellation, so the batcher also ends on the flag, woken up here.
            self._stopping = True
            while not self._batcher.done():
                self._batcher.cancel()
                self._added.set()
                self._actor_up.set()
                await asyncio.wait({self._batcher}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        for task in self._repairs:
            task.cancel()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        if self._repairs:
            await asyncio.gather(*self._repairs, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(DetectorUnavailable("the detector pool stopped"))
        import ray

        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor.handle)
        self._actors.clear()

    def _new_actor(self) -> Any:
        import ray

        c = self.config
        remote = ray.remote(DetectorActor).options(
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
            max_restarts=c.max_restarts,
            max_task_retries=0,  # a failed call is handled here: its frames go elsewhere
            runtime_env={"env_vars": _yolo_env(offline=self.detector.offline)},
        )
        return remote.remote(self.detector, c.num_gpus > 0, c.max_pixels)

    async def actor_pids(self) -> list[int]:
        """Process ids of the actors (for tests and operators)."""
        return list(await asyncio.gather(*(a.handle.pid.remote() for a in self._actors)))

    # -- submitting ------------------------------------------------------------------

    async def submit(self, frame: Frame) -> asyncio.Future[Outcome]:
        """Queue a frame; waits while the queue is full. Await the returned future."""
        if self._batcher is None:
            raise DetectorUnavailable("the detector pool is not running")
        await self._room.acquire()
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(frame, future, time.perf_counter()))
        self._added.set()
        return future

    async def detect(self, frames: Sequence[Frame]) -> list[Outcome]:
        """Submit frames and wait for all their outcomes (exceptions are raised)."""
        futures = [await self.submit(f) for f in frames]
        return list(await asyncio.gather(*futures))

    # -- batching --------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            await self._slots.acquire()
            batch = await self._collect()
            if not batch:  # stopping: what is queued fails in `stop`
                self._slots.release()
                return
            try:
                actor = await self._pick()
            except asyncio.CancelledError:  # stopping while no actor is up
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(
                            DetectorUnavailable("the detector pool stopped")
                        )
                raise
            actor.load += 1
            self.max_inflight_seen = max(self.max_inflight_seen, actor.load)
            task = asyncio.create_task(self._call(actor, batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _collect(self) -> list[_Pending]:
        """Up to `max_batch` frames, or fewer once the oldest has waited `max_wait_s`."""
        while not self._queue:
            if self._stopping:
                return []
            self._added.clear()
            await self._added.wait()
        deadline = self._queue[0].enqueued + self.config.max_wait_s
        while len(self._queue) < self.config.max_batch and not self._stopping:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._added.wait(), remaining)
        if self._stopping:
            return []
        if self._queue[0].alone:
            batch = [self._queue.popleft()]
        else:
            batch = []
            while self._queue and len(batch) < self.config.max_batch and not self._queue[0].alone:
                batch.append(self._queue.popleft())
        for pending in batch:
            if not pending.sent:  # a frame sent back after a failure has no room of its own
                pending.sent = True
                self._room.release()
        return batch

    async def _pick(self) -> _Actor:
        """The least-loaded actor that is up; while none is, the frames intake is paused."""
        paused = False
        try:
            while True:
                up = [a for a in self._actors if a.up.is_set()]
                if up:
                    return min(up, key=lambda a: a.load)
                if self._stopping:
                    raise asyncio.CancelledError  # the batch's frames fail, as on a cancel
                if not paused and self._pauses is not None:
                    self._pauses.enter(
                        Domain.FRAMES.value,
                        DetectorUnavailable("no detector actor answers within the batch timeout"),
                    )
                    paused = True
                self._actor_up.clear()
                await self._actor_up.wait()
        finally:
            if paused and self._pauses is not None:
                self._pauses.leave(Domain.FRAMES.value, DetectorUnavailable.cause)

    async def _call(self, actor: _Actor, batch: list[_Pending]) -> None:
        m = self.metrics
        sent, sent_ns = time.perf_counter(), time.time_ns()
        for pending in batch:
            m.detector_queue_seconds.observe(sent - pending.enqueued)
        m.detector_batch_size.observe(len(batch))
        handle = actor.handle
        try:
            results, inference_s, in_actor = await asyncio.wait_for(
                handle.detect.remote([p.frame for p in batch]), self.config.batch_timeout_s
            )
        except Exception as exc:
            m.detector_failures.inc()
            hung = isinstance(exc, TimeoutError)
            reason = (
                f"no answer within {self.config.batch_timeout_s:.0f} s" if hung else _cause(exc)
            )
            # Only the failure that takes the actor out of service says anything about its
            # frames: calls it held besides fail because it is being restarted or replaced.
            first = actor.handle is handle and actor.up.is_set()
            if first:
                self._repair(actor, replace=hung)
            if first and len(batch) == 1 and batch[0].alone:
                log.warning(
                    "a detector call on one frame failed (%s); the frame is judged by the "
                    "actor's next test frame",
                    reason,
                )
                actor.accused.append((batch[0], reason))
            else:
                log.warning(
                    "a detector call failed (%s); its %d frames go back, one per batch",
                    reason,
                    len(batch),
                )
                self._send_back(batch)
            return
        finally:
            actor.load -= 1
            self._slots.release()
        answered_ns = time.time_ns()
        which = self._actors.index(actor) if actor in self._actors else -1  # -1: replaced
        m.detector_inference_seconds.observe(inference_s)
        analysed = sum(1 for r in results if isinstance(r, list))
        if analysed:
            m.detector_frame_seconds.observe(inference_s / analysed)
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, list):
                for detection in result:
                    m.detections.labels(detection.label).inc()
                pending.future.set_result(
                    Analysis(
                        result,
                        len(batch),
                        inference_s,
                        sent - pending.enqueued,
                        sent_ns,
                        answered_ns,
                        which,
                        in_actor,
                    )
                )
            else:
                pending.future.set_result(Unreadable(Reason(result[0]), result[1]))

    def _send_back(self, batch: list[_Pending]) -> None:
        """Put a failed batch's frames back at the front of the queue, one per batch."""
        for pending in reversed(batch):
            if not pending.future.done():
                pending.alone = True
                self._queue.appendleft(pending)
        self._added.set()

    def _judge(self, actor: _Actor, answered: bool) -> None:
        """Frames that failed alone on `actor`: theirs if it then answered a test frame in
        time (the detector works), else back to the queue (the detector is out)."""
        accused, actor.accused = actor.accused, []
        for pending, reason in accused:
            if answered and not pending.future.done():
                pending.future.set_exception(
                    DetectionFailed(
                        f"the detector failed on this frame alone ({reason}) "
                        "and answered a test frame in time right after"
                    )
                )
        if not answered:
            self._send_back([pending for pending, _ in accused])

    def _repair(self, actor: _Actor, *, replace: bool) -> None:
        """Take the actor out of service until it is restarted (or replaced, if hung)."""
        actor.up.clear()
        task = asyncio.create_task(self._recover(actor, replace=replace))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _recover(self, actor: _Actor, *, replace: bool) -> None:
        """Wait for Ray to restart a failed actor, or start a new one, until it answers a
        test frame in time; then back in service. The first test frame judges the frames
        that failed alone on it."""
        if replace:  # hung: it would hold its next batches too
            self._replace(actor)
        delay = 0.5
        judged = False
        try:
            while True:
                answered = await self._probe(actor)
                if answered is not None and not judged:
                    judged = True
                    self._judge(actor, answered)
                if answered:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        finally:
            if not judged:  # stopping: given back, not judged
                for pending, _ in actor.accused:
                    if not pending.future.done():
                        pending.future.set_exception(
                            DetectorUnavailable("the detector pool stopped")
                        )
                actor.accused.clear()
        self.metrics.detector_restarts.inc()
        actor.up.set()
        self._actor_up.set()

    async def _probe(self, actor: _Actor) -> bool | None:
        """Whether the actor answered a test frame within the batch timeout; None while it
        is still restarting or loading the model. One that does not answer is replaced."""
        import ray.exceptions

        timeout = self.config.batch_timeout_s
        try:
            await asyncio.wait_for(actor.handle.ready.remote(), timeout)
        except ray.exceptions.ActorDiedError:
            log.warning("a detector actor is gone for good; starting a new one")
            actor.handle = self._new_actor()
            return None
        except Exception as exc:  # restarting, or loading the model: ask again shortly
            log.debug("detector actor not back yet: %s", _cause(exc))
            return None
        try:
            await asyncio.wait_for(actor.handle.probe.remote(), timeout)
        except TimeoutError:
            log.warning("a detector actor did not answer a test frame within %.0f s", timeout)
            self._replace(actor)
            return False
        except Exception as exc:
            log.warning("a detector actor failed on a test frame: %s", _cause(exc))
            return False
        return True

    def _replace(self, actor: _Actor) -> None:
        """Kill a hung (or too slow) actor and start a new one in its place."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(actor.handle, no_restart=True)
        actor.handle = self._new_actor()


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _yolo_env(*, offline: bool = False) -> dict[str, str]:
    """Ultralytics settings of this process, passed on to the actors (`offline`: nothing
    is downloaded, whatever this process's environment says)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("YOLO_")}
    env.setdefault("YOLO_AUTOINSTALL", "0")
    if offline:
        env.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0")
    return env
