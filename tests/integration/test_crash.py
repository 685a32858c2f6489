"""Kill -9 the worker process repeatedly while it consumes: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from nats.aio.client import Client

from pipeline.app import apply_streams
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.simulate import Cameras, Expect, Outgoing, Traffic, publish
from schemas import Domain
from streams import Subjects

from ..conftest import make_settings, wait_until
from .helpers import body_digest, count_events, ids_of, start_worker, stop_worker, stored_ids

MESSAGES = 20_000
KILLS = 3


async def _kill_while_consuming(
    start: Callable[[], subprocess.Popen[bytes]],
    schema: str,
    thresholds: list[int],
    total: int,
    log: Path,
) -> subprocess.Popen[bytes]:
    """Start a worker; kill -9 it once each threshold of stored events is reached, and
    start it again; returns the last worker."""
    worker = start()
    try:
        for threshold in thresholds:
            await wait_until(lambda t=threshold: count_events(schema) >= t, timeout_s=120)
            assert worker.poll() is None, log.read_text()[-3000:]
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            assert count_events(schema) < total, "the kill came after consumption ended"
            worker = start()
    except BaseException:
        stop_worker(worker)
        raise
    return worker


async def test_kill_9_during_consumption_loses_and_duplicates_nothing(
    nats_server: EmbeddedNats, pg_schema: str, nc: Client, tmp_path: Path
) -> None:
    subjects = Subjects()
    ledger: list[Outgoing] = []
    # The operator's step, with the workers' consumer settings (the workers check them).
    await apply_streams(nc, make_settings(nats_server.url, pg_schema, ack_wait_s=2.0))
    traffic = Traffic(subjects, seed=11, duplicate_ratio=0.05, bad_ratio=0.01)
    await publish(nc.jetstream(), iter(traffic), count=MESSAGES, on_published=ledger.append)

    expected = {
        i
        for d in (Domain.SECURITY, Domain.MONITORING, Domain.METRICS)
        for i in ids_of(
            d, [o.message_id for o in ledger if o.domain is d and o.expect is Expect.STORE]
        )
    }
    bad = [o for o in ledger if o.expect is Expect.DEAD_LETTER]
    assert len(expected) > 18_000 and len(bad) > 100

    log = tmp_path / "worker.log"
    thresholds = [len(expected) * (k + 1) // (KILLS + 2) for k in range(KILLS)]
    worker = await _kill_while_consuming(
        lambda: start_worker(nats_server.url, pg_schema, log),
        pg_schema,
        thresholds,
        len(expected),
        log,
    )
    try:
        await wait_until(lambda: count_events(pg_schema) >= len(expected), timeout_s=180)
        letters = DeadLetters(nc.jetstream(), subjects)

        async def dead_letters_done() -> bool:
            return len(await letters.list(limit=len(bad) + 100)) >= len(bad)

        await wait_until(dead_letters_done, timeout_s=60)
        # Let redeliveries of anything still unacked (ack_wait 2 s) play out.
        await asyncio.sleep(5)
        found = await letters.list(limit=len(bad) + 100)
    finally:
        stop_worker(worker)

    counts = stored_ids(pg_schema)
    assert set(counts) == expected, "lost or unexpected events"
    assert set(counts.values()) == {1}, "an event was stored twice"
    assert len(found) == len(bad), "a dead letter was lost or doubled"
    assert sorted(map(body_digest, found)) == sorted(
        hashlib.sha256(o.body).hexdigest() for o in bad
    )
    assert worker.returncode == 0, log.read_text()[-3000:]


async def test_kill_9_of_a_frames_worker_loses_and_duplicates_no_frame(
    nats_server: EmbeddedNats, pg_schema: str, nc: Client, tmp_path: Path, model_dir: Path
) -> None:
    """The worker process (and the local Ray it started) killed mid-run, twice."""
    settings = make_settings(nats_server.url, pg_schema, domains=(Domain.FRAMES,), ack_wait_s=2.0)
    await apply_streams(nc, settings)
    cameras = Cameras(Subjects(), width=320, height=240, variants=4, seed=12)
    sent = [cameras.frame() for _ in range(150)]
    await publish(nc.jetstream(), iter(sent), count=len(sent))
    expected = ids_of(Domain.FRAMES, [o.message_id for o in sent])
    env = {
        "PIPELINE_DOMAINS": '["frames"]',
        "PIPELINE_DETECTOR_MODEL": str(model_dir / "yolov8n.onnx"),
        "PIPELINE_DETECTOR_IMGSZ": "320",
        "PIPELINE_DETECTOR_MAX_BATCH": "4",
        "PIPELINE_FRAMES_BATCH_SIZE": "8",
    }
    log = tmp_path / "worker.log"
    worker = await _kill_while_consuming(
        lambda: start_worker(nats_server.url, pg_schema, log, env),
        pg_schema,
        [30, 60],
        len(expected),
        log,
    )
    try:
        await wait_until(lambda: count_events(pg_schema) >= len(expected), timeout_s=180)
        await asyncio.sleep(3)  # redeliveries of anything still unacked (ack_wait 2 s)
    finally:
        stop_worker(worker)
    counts = stored_ids(pg_schema)
    assert set(counts) == expected, "lost or unexpected frames"
    assert set(counts.values()) == {1}, "a frame was stored twice"
    assert worker.returncode == 0, log.read_text()[-3000:]
