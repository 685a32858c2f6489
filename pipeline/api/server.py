"""`pipeline run api`: the query API under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from ..settings import Settings
from .app import create_app
from .routes.stream import end_streams

__all__ = ["run_api"]

log = logging.getLogger("pipeline")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves the signals to the process: its caller stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_api(
    settings: Settings, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """Serve the API on `PIPELINE_API_HOST:PIPELINE_API_PORT` until `stop` is set."""
    settings.refuse_unsafe(api=True)
    if not settings.api_tokens and not settings.oidc_issuer:
        log.warning(
            "PIPELINE_API_TOKENS and PIPELINE_OIDC_ISSUER are empty: "
            "every /v1 request will be refused (401)"
        )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():  # could not bind, or the application failed to start
        await task
        raise OSError(f"the API could not listen on {settings.api_host}:{settings.api_port}")
    log.info(
        "API on http://%s:%d (OpenAPI: /docs, /openapi.json)", settings.api_host, settings.api_port
    )
    if started is not None:
        started.set()
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    end_streams(app)  # uvicorn waits for every response to end, a dashboard's stream too
    stopped.cancel()
    await task
