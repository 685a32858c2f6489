"""`pipeline demo`: embedded NATS and PostgreSQL, a worker with its detector pool on a
local Ray, the projections and the query API, and simulated producers and cameras."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import nats

from projections.service import ProjectionService

from ..api.server import run_api
from ..app import Worker, apply_streams_once
from ..metrics import serve_metrics
from ..settings import ALL_DOMAINS, EVENT_DOMAINS, Settings
from .embedded import EmbeddedNats, EmbeddedPostgres, free_port
from .migrate import migrate
from .simulate import Cameras, Outgoing, Traffic, publish

__all__ = ["run_demo"]


def _line(published: Counter[str], worker: Worker) -> str:
    m = worker.metrics
    return (
        f"published {sum(published.values()):>7} "
        f"(dup {published['duplicate']}, bad {published['dead_letter']}) | "
        f"stored {m.total('pipeline_events_stored'):>7.0f} | "
        f"duplicates dropped {m.total('pipeline_duplicates'):>5.0f} | "
        f"dead-lettered {m.total('pipeline_dead_lettered'):>5.0f} | "
        f"frames analysed {_frames(worker, 'analysed'):>5.0f}, "
        f"detections {m.total('pipeline_detections'):>5.0f}"
    )


def _frames(worker: Worker, outcome: str) -> float:
    value = worker.metrics.registry.get_sample_value("pipeline_frames_total", {"outcome": outcome})
    return value or 0.0


async def run_demo(
    data_dir: Path,
    *,
    rate: float,
    duration_s: float | None,
    stop: asyncio.Event,
    cameras: int = 2,
    fps: float = 1.0,
    model: str | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Run everything on embedded servers until `stop` is set or `duration_s` passes.

    The detector is `model`, else PIPELINE_DETECTOR_MODEL, else a randomly initialised
    yolov8n (no download; it finds next to nothing: name a trained `.pt` to see objects).
    Parts start in order (NATS, PostgreSQL, the worker, the producers) and stop in the
    reverse order; the servers' own logs stay in files under `data_dir`.
    """
    # The demo's own lines are its output; the worker's routine INFO lines are not.
    for name in ("pipeline", "projections"):
        logging.getLogger(name).setLevel(logging.WARNING)
    nats_server = EmbeddedNats(data_dir / "nats")
    postgres = EmbeddedPostgres(data_dir)
    async with contextlib.AsyncExitStack() as parts:
        url = await anyio.to_thread.run_sync(nats_server.start)
        parts.push_async_callback(anyio.to_thread.run_sync, nats_server.stop)
        address = await anyio.to_thread.run_sync(postgres.start)
        parts.push_async_callback(anyio.to_thread.run_sync, postgres.stop)
        say(f"NATS {url}, PostgreSQL {address.host} (data and server logs in {data_dir})")
        metrics_port = free_port()
        detector = {"detector_model": model} if model else {}
        settings = Settings(
            _env_file=None,
            **detector,  # type: ignore[arg-type]
            nats_url=url,
            postgres_host=address.host,
            postgres_port=address.port,
            postgres_user=address.user,
            postgres_dbname=address.dbname,
            metrics_port=metrics_port,
            consumer_lag_interval_s=1.0,
            api_port=free_port(),
            api_tokens={f"demo-{secrets.token_hex(8)}": ("read", "operate")},
            domains=ALL_DOMAINS if cameras else EVENT_DOMAINS,
        )
        if cameras:
            say(f"detector {settings.detector_model} on a local Ray: loading the model")
        # The owner's and the operator's steps; then each process as its own role.
        await anyio.to_thread.run_sync(migrate, settings)
        await apply_streams_once(settings)
        role = _roles(settings)
        worker = await parts.enter_async_context(Worker(role["writer"]))
        server = serve_metrics(worker.metrics, settings.metrics_host, metrics_port, worker.ready)
        parts.callback(server.shutdown)
        say(
            f"metrics on http://127.0.0.1:{metrics_port}/metrics "
            f"(health: /healthz, /readyz); Ctrl-C stops"
        )
        views = ProjectionService(role["projector"])
        await anyio.to_thread.run_sync(views.start)
        parts.push_async_callback(anyio.to_thread.run_sync, lambda: views.stop())
        api_stop, api_started = asyncio.Event(), asyncio.Event()
        api = asyncio.create_task(run_api(role["api"], api_stop, api_started))
        await asyncio.wait(
            {api, asyncio.create_task(api_started.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if api.done():
            await api  # raises why it could not start
        parts.push_async_callback(_stop_api, api, api_stop)
        token = next(iter(settings.api_tokens))
        say(
            f"query API on http://127.0.0.1:{settings.api_port}/docs, e.g. curl -H "
            f"'Authorization: Bearer {token}' "
            f"'http://127.0.0.1:{settings.api_port}/v1/security/events?limit=5'"
        )
        await _simulate(
            settings,
            worker,
            rate=rate,
            cameras=cameras,
            fps=fps,
            duration_s=duration_s,
            stop=stop,
            say=say,
        )
    say("stopped")


def _roles(settings: Settings) -> dict[str, Settings]:
    """The settings of each process, connecting as its role (the embedded server trusts
    its local connections, so the roles need no password)."""
    return {
        kind: settings.model_copy(update={"postgres_user": settings.postgres_role(kind)})
        for kind in ("writer", "projector", "api")
    }


async def _stop_api(api: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await api


async def _simulate(
    settings: Settings,
    worker: Worker,
    *,
    rate: float,
    cameras: int,
    fps: float,
    duration_s: float | None,
    stop: asyncio.Event,
    say: Callable[[str], None],
) -> None:
    nc = await nats.connect(settings.nats_url)
    published: Counter[str] = Counter()

    def count(out: Outgoing) -> None:
        published[out.expect.value] += 1

    traffic = Traffic(worker.subjects)
    producers = [
        publish(nc.jetstream(), iter(traffic), rate=rate, duration_s=duration_s, on_published=count)
    ]
    if cameras:
        frames = Cameras(worker.subjects, cameras=cameras)
        producers.append(
            publish(
                nc.jetstream(),
                iter(frames),
                rate=fps * cameras,
                duration_s=duration_s,
                on_published=count,
            )
        )
    producer = asyncio.gather(*producers)
    try:
        while not producer.done() and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            say(_line(published, worker))
    finally:
        # The producers stop first, while everything under them still runs.
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
    # Let the worker catch up with what was published.
    deadline = time.monotonic() + 10
    expected = published["store"]
    while time.monotonic() < deadline and worker.metrics.total("pipeline_events_stored") < expected:
        await asyncio.sleep(0.2)
    say("final: " + _line(published, worker))
    await nc.drain()
