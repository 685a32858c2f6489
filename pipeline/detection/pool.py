"""The detector pool: YOLO on Ray actors, fed by a dynamic batcher.

Frames are submitted one by one and wait in a bounded queue. The batcher takes up to
`max_batch` of them, or fewer once the oldest has waited `max_wait_s`, and sends the
batch to the least-loaded actor. Each actor has at most `max_inflight` batches in hand;
when every actor is full the queue fills, `submit` waits, and the frames handler stops
pulling: backpressure all the way to JetStream.

Failures: a batch has `batch_timeout_s` to come back. An actor that fails a batch is out
of service until it is back (`repair`): while no actor is in service batches wait and
the frames intake is paused (`pipeline_intake_paused{cause="detector"}`): slowness is an
outage, never a frame's fault. A failed batch (of one frame or several) is split: its
frames go back to the front of the queue, one per batch, blamed for nothing. A frame that
fails again, alone, is judged by the test frame its actor answers next (`repair`).
Frames still in the pool when it stops fail with `DetectorUnavailable` (the handler gives
them back; they are never dead-lettered for it).

The actors (`actor`) decode the frames themselves (`decode`); the Ray they run on is
`raycluster`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas import Domain, ModelProvenance

from ..errors import ConfigError, DetectorUnavailable, Reason
from ..ingest.pause import Pauses
from ..metrics import Metrics
from ..settings import Settings
from .actor import DetectorActor, Reply
from .detector import DetectorConfig
from .frame import Analysis, Frame, Outcome, Unreadable
from .raycluster import yolo_env
from .repair import Member, Pending, Repairs, cause

__all__ = ["DetectorPool", "PoolConfig"]

log = logging.getLogger(__name__)


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
    scheduling_strategy: str = "SPREAD"
    """Ray's placement of the actors: "SPREAD" over the cluster's nodes, so that a node's
    loss takes only its share of them; "DEFAULT" packs them onto few nodes."""

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
            scheduling_strategy=settings.detector_scheduling,
            batch_timeout_s=settings.detector_batch_timeout_s,
            max_pixels=settings.frames_max_pixels,
        )

    @property
    def max_queued(self) -> int:
        """Frames waiting for a batch: enough to fill every actor's next batches."""
        return self.max_batch * self.actors * self.max_inflight


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
        self._actors: list[Member] = []
        self._queue: deque[Pending] = deque()
        self._added = asyncio.Event()
        self._actor_up = asyncio.Event()
        self._room = asyncio.Semaphore(config.max_queued)
        self._slots = asyncio.Semaphore(config.actors * config.max_inflight)
        self._batcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._calls: set[asyncio.Task[None]] = set()
        self._repairs = Repairs(
            timeout_s=config.batch_timeout_s,
            new_actor=self._new_actor,
            send_back=self._send_back,
            back_up=self._actor_up.set,
            metrics=self.metrics,
        )
        self.max_inflight_seen = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the actors and wait until each has loaded the model."""
        self._actors = [Member(self._new_actor()) for _ in range(self.config.actors)]
        try:
            provenances = await asyncio.gather(*(a.handle.ready.remote() for a in self._actors))
        except Exception as exc:
            await self.stop()
            raise ConfigError(
                "PIPELINE_DETECTOR_MODEL",
                f"the detector actors could not load {self.detector.model!r}: {cause(exc)}",
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
        self._repairs.cancel()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        await self._repairs.stop()
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
            scheduling_strategy=c.scheduling_strategy,
            runtime_env={"env_vars": yolo_env(offline=self.detector.offline)},
        )
        return remote.remote(self.detector, c.num_gpus > 0, c.max_pixels)

    @property
    def batches_in_hand(self) -> int:
        """Batches sent to the actors and not answered yet."""
        return sum(a.load for a in self._actors)

    async def actor_pids(self) -> list[int]:
        """Process ids of the actors (for tests and operators)."""
        return list(await asyncio.gather(*(a.handle.pid.remote() for a in self._actors)))

    async def actor_nodes(self) -> list[str]:
        """Ids of the Ray nodes the actors run on, in the actors' order."""
        return list(await asyncio.gather(*(a.handle.node_id.remote() for a in self._actors)))

    # -- submitting ------------------------------------------------------------------

    async def submit(self, frame: Frame) -> asyncio.Future[Outcome]:
        """Queue a frame; waits while the queue is full. Await the returned future."""
        if self._batcher is None:
            raise DetectorUnavailable("the detector pool is not running")
        await self._room.acquire()
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append(Pending(frame, future, time.perf_counter()))
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

    async def _collect(self) -> list[Pending]:
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

    async def _pick(self) -> Member:
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

    async def _call(self, actor: Member, batch: list[Pending]) -> None:
        m = self.metrics
        sent, sent_ns = time.perf_counter(), time.time_ns()
        for pending in batch:
            m.detector_queue_seconds.observe(sent - pending.enqueued)
        m.detector_batch_size.observe(len(batch))
        handle = actor.handle
        try:
            reply: Reply = await asyncio.wait_for(
                handle.detect.remote([p.frame for p in batch]), self.config.batch_timeout_s
            )
        except Exception as exc:
            m.detector_failures.inc()
            hung = isinstance(exc, TimeoutError)
            reason = f"no answer within {self.config.batch_timeout_s:.0f} s" if hung else cause(exc)
            # Only the failure that takes the actor out of service says anything about its
            # frames: calls it held besides fail because it is being restarted or replaced.
            first = actor.handle is handle and actor.up.is_set()
            if first:
                self._repairs.start(actor, replace=hung)
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
        results, inference_s, in_actor, cpu = reply
        which = self._actors.index(actor) if actor in self._actors else -1  # -1: replaced
        m.detector_inference_seconds.observe(inference_s)
        m.detector_cpu_seconds.labels("decode").inc(cpu.decode)
        m.detector_cpu_seconds.labels("model").inc(cpu.model)
        m.detector_cpu_seconds.labels("call").inc(cpu.call)
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

    def _send_back(self, batch: list[Pending]) -> None:
        """Put a failed batch's frames back at the front of the queue, one per batch."""
        for pending in reversed(batch):
            if not pending.future.done():
                pending.alone = True
                self._queue.appendleft(pending)
        self._added.set()
