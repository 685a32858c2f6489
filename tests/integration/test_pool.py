"""The detector pool on a real local Ray: batching, backpressure, failures, scaling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle

from pipeline.detection import pool as pool_module
from pipeline.detection.actor import DetectorActor
from pipeline.detection.detector import DetectorConfig
from pipeline.detection.frame import Analysis, Frame, Unreadable
from pipeline.detection.pool import DetectorPool, PoolConfig
from pipeline.errors import DetectionFailed, Reason
from pipeline.ingest.pause import Pauses
from pipeline.metrics import Metrics
from pipeline.ops.simulate import Cameras
from streams import Subjects

from ..conftest import wait_until

pytestmark = pytest.mark.usefixtures("ray_cluster")

POISON = b"poison"
"""Bytes after a JPEG's end that make `PoisonedActor` fail, as a decoder bug would."""


class PoisonedActor(DetectorActor):
    """A detector actor whose whole batch fails when it holds a poisoned frame."""

    def detect(self, frames: list[Frame]) -> Any:
        if any(frame.body.endswith(POISON) for frame in frames):
            raise RuntimeError("the decoder crashed on a frame")
        return super().detect(frames)


# Ray's workers cannot import the tests: the class travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


async def _stopped(pids: list[int], seconds: float) -> None:
    """Every given actor process stopped for `seconds` (slower than any timeout), then let go."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # replaced by the pool meanwhile
                os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def frames() -> list[Frame]:
    cameras = Cameras(Subjects(""), width=320, height=240, variants=4, seed=3)
    return [Frame(cameras.frame().body, 320, 240) for _ in range(12)]


def _config(model_dir: Path) -> DetectorConfig:
    return DetectorConfig(model=str(model_dir / "yolov8n.onnx"), imgsz=320, conf=1e-5)


@pytest.fixture
async def make_pool(model_dir: Path) -> AsyncIterator[type[DetectorPool]]:
    pools: list[DetectorPool] = []

    async def make(pauses: Pauses | None = None, **changes: object) -> DetectorPool:
        config = PoolConfig(**{"num_cpus": 0.5, **changes})  # type: ignore[arg-type]
        pool = DetectorPool(_config(model_dir), config, pauses=pauses)
        await pool.start()
        pools.append(pool)
        return pool

    yield make  # type: ignore[misc]
    for pool in pools:
        await pool.stop()


async def test_batches_hold_at_most_max_batch(make_pool, frames: list[Frame]) -> None:
    pool = await make_pool(max_batch=4, max_wait_s=1.0)
    outcomes = await pool.detect(frames)
    assert all(isinstance(o, Analysis) for o in outcomes)
    sizes = [o.batch_size for o in outcomes if isinstance(o, Analysis)]
    assert max(sizes) == 4
    assert sizes == [4] * 12
    registry = pool.metrics.registry
    assert registry.get_sample_value("pipeline_detector_batch_size_frames_count") == 3


async def test_a_lone_frame_waits_max_wait_then_goes_alone(make_pool, frames: list[Frame]) -> None:
    pool = await make_pool(max_batch=8, max_wait_s=0.3)
    [outcome] = await pool.detect(frames[:1])
    assert isinstance(outcome, Analysis)
    assert outcome.batch_size == 1
    assert 0.3 <= outcome.queue_s < 1.0


async def test_backpressure_bounds_work_in_hand(make_pool, frames: list[Frame]) -> None:
    pool = await make_pool(max_batch=2, max_wait_s=0.0, max_inflight=1)
    assert pool.config.max_queued == 2
    [pid] = await pool.actor_pids()
    os.kill(pid, signal.SIGSTOP)  # the actor holds its first batch until it is let go
    try:
        futures = [await pool.submit(f) for f in frames[:2]]
        await wait_until(lambda: pool.max_inflight_seen == 1)  # the batch is in the actor
        futures += [await pool.submit(f) for f in frames[2:4]]  # the queue's two places
        blocked = asyncio.create_task(pool.submit(frames[4]))
        done, _ = await asyncio.wait({blocked}, timeout=0.5)
        assert not done, "submit must wait while the queue is full"
    finally:
        os.kill(pid, signal.SIGCONT)
    futures.append(await blocked)
    outcomes = await asyncio.gather(*futures)
    assert all(isinstance(o, Analysis) for o in outcomes)
    assert pool.max_inflight_seen == 1


async def test_bad_images_get_a_reason(make_pool, frames: list[Frame]) -> None:
    pool = await make_pool()
    junk = Frame(frames[0].body[:20] + b"\x00" * 100, 320, 240)
    wrong = Frame(frames[0].body, 640, 480)
    good, bad, mismatched = await pool.detect([frames[0], junk, wrong])
    assert isinstance(good, Analysis)
    assert bad == Unreadable(Reason.UNDECODABLE_IMAGE, "the image header cannot be read")
    assert isinstance(mismatched, Unreadable)
    assert mismatched.reason is Reason.DIMENSION_MISMATCH
    assert "320x240" in mismatched.detail


async def test_frames_over_the_pixel_limit_are_refused_before_decoding(make_pool) -> None:
    cameras = Cameras(Subjects(""), width=640, height=480, variants=1, seed=5)
    pool = await make_pool(max_pixels=100_000)
    [outcome] = await pool.detect([Frame(cameras.frame().body, 640, 480)])
    assert outcome == Unreadable(
        Reason.OVERSIZED, "image is 640x480, over the limit of 100000 pixels"
    )


async def test_a_killed_actors_frames_go_through_once_it_is_restarted(
    make_pool, frames: list[Frame]
) -> None:
    pool = await make_pool(max_batch=12, max_wait_s=0.2, max_restarts=1)
    [pid] = await pool.actor_pids()
    futures = [await pool.submit(f) for f in frames]
    await wait_until(lambda: pool.max_inflight_seen == 1)  # the batch is in the actor
    os.kill(pid, signal.SIGKILL)
    # Ray restarts the actor; the batch goes back to the queue and through it.
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(o, Analysis) for o in outcomes), outcomes
    assert await pool.actor_pids() != [pid]
    assert pool.metrics.detector_failures._value.get() == 1  # type: ignore[attr-defined]
    assert pool.metrics.detector_restarts._value.get() == 1  # type: ignore[attr-defined]


async def _record_pauses(pauses: Pauses, seen: set[str]) -> None:
    """Add every pause line of `pauses` to `seen` until cancelled."""
    while True:
        seen.update(pauses.active())
        await asyncio.sleep(0.05)


async def test_a_hung_actor_is_replaced_and_its_batch_sent_to_the_new_one(
    make_pool, frames: list[Frame]
) -> None:
    metrics = Metrics()
    pauses = Pauses(metrics)
    pool = await make_pool(max_batch=4, max_wait_s=0.0, batch_timeout_s=5.0, pauses=pauses)
    [pid] = await pool.actor_pids()
    os.kill(pid, signal.SIGSTOP)  # alive, but it never answers
    seen: set[str] = set()
    watcher = asyncio.create_task(_record_pauses(pauses, seen))
    try:
        outcomes = await asyncio.wait_for(pool.detect(frames[:8]), timeout=120)
    finally:
        watcher.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert all(isinstance(o, Analysis) for o in outcomes), outcomes
    # While the only actor was being replaced, the frames intake was paused.
    assert any(line.startswith("frames paused (detector)") for line in seen), seen
    assert await pool.actor_pids() != [pid]
    assert pool.metrics.detector_restarts._value.get() == 1  # type: ignore[attr-defined]
    assert pauses.active() == []


async def test_two_actors_give_the_same_results_as_one(make_pool, frames: list[Frame]) -> None:
    one = await make_pool(actors=1, max_batch=2, max_wait_s=0.0)
    two = await make_pool(actors=2, max_batch=2, max_wait_s=0.0)
    a = await one.detect(frames)
    b = await two.detect(frames)
    assert [o.detections for o in a] == [o.detections for o in b]  # type: ignore[union-attr]
    assert len(set(await two.actor_pids())) == 2
    assert two.max_inflight_seen <= 2


async def test_large_jpegs_are_decoded_reduced_and_boxes_scaled_back(make_pool) -> None:
    cameras = Cameras(Subjects(""), width=1280, height=960, variants=2, seed=4)
    body = cameras.frame().body
    pool = await make_pool()  # imgsz 320: a 1280 px frame is decoded at 1/4
    big, wrong = await pool.detect([Frame(body, 1280, 960), Frame(body, 1280, 720)])
    assert isinstance(big, Analysis) and big.detections
    boxes = [d.box for d in big.detections]
    assert all(0 <= x1 <= x2 <= 1280 and 0 <= y1 <= y2 <= 960 for x1, y1, x2, y2 in boxes)
    assert max(x2 for _, _, x2, _ in boxes) > 320, "boxes are in the frame's own pixels"
    assert wrong == Unreadable(
        Reason.DIMENSION_MISMATCH, "image is 1280x960, metadata says 1280x720"
    )


async def test_stopping_ends_even_when_a_cancellation_is_swallowed(make_pool) -> None:
    """Python 3.11's asyncio.wait_for can lose a cancellation; the pool stops regardless."""
    pool = await make_pool()
    wait = pool._added.wait
    swallowed = 0

    async def swallowing_wait() -> bool:
        nonlocal swallowed
        try:
            return await wait()
        except asyncio.CancelledError:
            swallowed += 1
            return True  # as a wait_for whose inner wait finished at the cancel

    pool._added.wait = swallowing_wait  # type: ignore[method-assign]
    await asyncio.sleep(0.1)  # the batcher waits for frames
    await asyncio.wait_for(pool.stop(), timeout=10)
    assert swallowed >= 1


async def test_a_frame_that_fails_alone_fails_and_its_batch_mates_go_through(
    make_pool, frames: list[Frame], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "DetectorActor", PoisonedActor)
    pool = await make_pool(max_batch=4, max_wait_s=0.5, batch_timeout_s=30.0)
    poisoned = Frame(frames[0].body + POISON, 320, 240)
    batch = [frames[1], poisoned, frames[2], frames[3]]
    futures = [await pool.submit(f) for f in batch]
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 90)
    assert isinstance(outcomes[1], DetectionFailed), outcomes
    assert "alone" in str(outcomes[1])
    good = [outcomes[0], *outcomes[2:]]
    assert all(isinstance(o, Analysis) and o.batch_size == 1 for o in good), outcomes


async def test_actors_slower_than_the_timeout_pause_the_intake_and_fail_no_frame(
    make_pool, frames: list[Frame]
) -> None:
    """Every actor stops answering for a while: an outage, not the frames' fault."""
    metrics = Metrics()
    pauses = Pauses(metrics)
    pool = await make_pool(
        actors=2, max_batch=4, max_wait_s=0.0, batch_timeout_s=4.0, pauses=pauses
    )
    seen: set[str] = set()
    watcher = asyncio.create_task(_record_pauses(pauses, seen))
    slow = asyncio.create_task(_stopped(await pool.actor_pids(), 7.0))
    try:
        futures = [await pool.submit(f) for f in frames[:4]]  # to one actor
        await asyncio.sleep(1.0)
        futures += [await pool.submit(f) for f in frames[4:8]]  # to the other, a second later
        outcomes = await asyncio.wait_for(
            asyncio.gather(*futures, return_exceptions=True), timeout=120
        )
    finally:
        await slow
        watcher.cancel()
    assert all(isinstance(o, Analysis) for o in outcomes), outcomes
    assert any(line.startswith("frames paused (detector)") for line in seen), seen
    assert pauses.active() == []
