"""The detector pool on a Ray cluster of two nodes (a head and a worker node on this host,
as Ray's own tests make them with `ray.cluster_utils.Cluster`): the actors are spread over
both; the worker node's raylet is killed mid-stream, frames go on on the head, none is
lost or stored twice, and the killed node's actor is brought back on the head."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from pipeline.detection.frame import Analysis, Frame, Outcome
from pipeline.detection.pool import DetectorPool
from pipeline.ops.embedded import EmbeddedNats, free_port
from pipeline.ops.simulate import Cameras, Outgoing
from schemas import Domain

from ..conftest import running_worker, wait_until
from .helpers import frames_settings, ids_of, stored_ids, stored_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass
class TwoNodes:
    """A Ray cluster of a head and a worker node, each of two CPUs: room for both actors
    on either, so Ray's default placement would pack them onto the head (the driver's
    node); they are spread by the pool's placement ("SPREAD")."""

    cluster: Any
    worker: Any
    """The worker node (`ray._private.node.Node`)."""

    @property
    def address(self) -> str:
        """The head's GCS address, as a driver joins it (PIPELINE_RAY_ADDRESS)."""
        return str(self.cluster.address)

    @property
    def head_id(self) -> str:
        return str(self.cluster.head_node.node_id)

    @property
    def worker_id(self) -> str:
        return str(self.worker.node_id)

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet (its actors' processes go with it); its pid."""
        [raylet] = self.worker.all_processes["raylet"]
        os.kill(raylet.process.pid, signal.SIGKILL)
        return int(raylet.process.pid)


def _node() -> dict[str, Any]:
    """Two CPUs, and ports of its own where Ray would take fixed ones."""
    return {
        "num_cpus": 2,
        "include_dashboard": False,
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
    }


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    """The cluster; this process's local Ray (the other tests') is stopped meanwhile and
    started again afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.detection.raycluster import connect_ray

    local = ray.is_initialized()
    if local:
        ray.shutdown()
    # Short paths (Ray's socket names must fit in 107 bytes), and the cluster's address
    # file there rather than in a /tmp/ray other Rays on this host may use.
    temp = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
    os.makedirs(os.path.join(temp, "ray"))
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=_node())
        worker = cluster.add_node(**_node())
        cluster.wait_for_nodes()
        yield TwoNodes(cluster, worker)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        if local:
            connect_ray(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))


@dataclass(frozen=True)
class Answer:
    """A frame's outcome as the pool gave it: when, and by which actor."""

    at: float
    actor: int


def _watch_answers(pool: DetectorPool) -> list[Answer]:
    """Record every analysis the pool answers (the intake calls `pool.submit`)."""
    answers: list[Answer] = []
    submit = pool.submit

    def record(future: asyncio.Future[Outcome]) -> None:
        if not future.cancelled() and future.exception() is None:
            outcome = future.result()
            if isinstance(outcome, Analysis):
                answers.append(Answer(time.monotonic(), outcome.actor))

    async def submit_and_watch(frame: Frame) -> asyncio.Future[Outcome]:
        future = await submit(frame)
        future.add_done_callback(record)
        return future

    pool.submit = submit_and_watch  # type: ignore[method-assign]
    return answers


async def _publish(nc: Client, messages: list[Outgoing]) -> None:
    js = nc.jetstream()
    for out in messages:
        await js.publish(out.subject, out.body, headers=out.headers)


async def _repaired_at(pool: DetectorPool) -> float:
    """When the pool counts its first actor back in service."""
    while pool.metrics.detector_restarts._value.get() < 1:
        await asyncio.sleep(0.05)
    return time.monotonic()


async def test_a_killed_worker_node_loses_no_frame_and_the_head_goes_on(
    two_nodes: TwoNodes, nats_server: EmbeddedNats, pg_schema: str, nc: Client, model_dir: Path
) -> None:
    settings = frames_settings(
        nats_server.url,
        pg_schema,
        model_dir,
        ray_address=two_nodes.address,
        detector_actors=2,
        detector_max_batch=4,
        detector_batch_timeout_s=60.0,
    )
    async with running_worker(settings) as worker:
        pool = worker.pool
        assert pool is not None
        nodes = await pool.actor_nodes()
        assert sorted(nodes) == sorted([two_nodes.head_id, two_nodes.worker_id]), "spread"
        on_head = nodes.index(two_nodes.head_id)
        answers = _watch_answers(pool)
        cameras = Cameras(worker.subjects, width=320, height=240, variants=4, seed=11)
        sent = [cameras.frame() for _ in range(200)]

        await _publish(nc, sent[:100])
        await wait_until(lambda: len(answers) >= 40, timeout_s=120)
        assert {a.actor for a in answers} == {0, 1}, "both nodes' actors answered"
        repaired = asyncio.create_task(_repaired_at(pool))
        killed_at = time.monotonic()
        two_nodes.kill_worker_raylet()
        await _publish(nc, sent[100:])  # mid-stream: half the frames come after the kill

        expected = ids_of(Domain.FRAMES, [o.message_id for o in sent])
        await wait_until(lambda: set(stored_ids(pg_schema)) == expected, timeout_s=240)
        all_stored_s = time.monotonic() - killed_at
        back_at = await asyncio.wait_for(repaired, timeout=120)
        # Ray restarts the lost actor on the node that is left.
        assert await pool.actor_nodes() == [two_nodes.head_id] * 2
        # Between the kill and the lost actor's return, the head's actor answered frames.
        meanwhile = [a for a in answers if killed_at < a.at < back_at]
        assert meanwhile, "no frame was answered while the worker node's actor was lost"
        assert {a.actor for a in meanwhile} == {on_head}
        assert worker.metrics.total("pipeline_detector_failures") >= 1
        assert worker.metrics.total("pipeline_dead_lettered") == 0
        assert worker.metrics.total("pipeline_retries") == 0
        print(
            f"\nworker node killed: every frame stored {all_stored_s:.1f} s later, the lost "
            f"actor back on the head after {back_at - killed_at:.1f} s; "
            f"{len(meanwhile)} frames answered by the head's actor meanwhile"
        )
    assert Counter(stored_ids(pg_schema).values()) == Counter({1: 200})
    topics = {topic.rpartition(".")[2] for _, _, topic, _ in stored_rows(pg_schema)}
    assert topics == {"FrameAnalyzed"}
