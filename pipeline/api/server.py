"""`pipeline run api`: the query API under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from ..settings import Settings
from .app import create_app

__all__ = ["run_api"]

log = logging.getLogger("pipeline")


async def run_api(settings: Settings, stop: asyncio.Event) -> None:
    """Serve the API on `PIPELINE_API_HOST:PIPELINE_API_PORT` until `stop` is set."""
    if not settings.api_tokens:
        log.warning("PIPELINE_API_TOKENS is empty: every /v1 request will be refused (401)")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # While it serves, uvicorn takes SIGINT and SIGTERM itself and shuts down gracefully.
    task = asyncio.create_task(server.serve())
    log.info(
        "API on http://%s:%d (OpenAPI: /docs, /openapi.json)", settings.api_host, settings.api_port
    )
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopped.cancel()
    await task
