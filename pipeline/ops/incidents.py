"""`pipeline run incidents` and `pipeline incidents rebuild`: the incident process and its
rebuild, on the sites file of `PIPELINE_SITES_FILE`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import psycopg

from ..errors import ConfigError, PipelineError
from ..settings import Settings

if TYPE_CHECKING:
    from projections.incidents import SiteMap

__all__ = ["incidents_rebuild", "load_sites_file", "run_incidents"]

log = logging.getLogger("pipeline")


def load_sites_file(settings: Settings) -> SiteMap:
    """The sites file of the settings; `ConfigError` when none is set or it is invalid."""
    from projections.incidents import load_sites

    if not settings.sites_file:
        raise ConfigError(
            "PIPELINE_SITES_FILE",
            "not set: the incident process needs the sites file (zones, cameras, sources, "
            "rules); see the README's Incidents section",
        )
    return load_sites(settings.sites_file)


async def run_incidents(settings: Settings, stop: asyncio.Event) -> None:
    """Keep the incidents current until `stop` is set."""
    from projections.incidents.service import IncidentService

    from ..metrics import serve_metrics

    service = IncidentService(settings, load_sites_file(settings))
    await anyio.to_thread.run_sync(service.start)
    server = None
    if settings.incidents_metrics_port:
        server = serve_metrics(
            service.metrics,
            settings.metrics_host,
            settings.incidents_metrics_port,
            ready=service.ready,
        )
        log.info(
            "incidents: metrics on http://%s:%d/metrics, health on /healthz and /readyz",
            settings.metrics_host,
            settings.incidents_metrics_port,
        )
    try:
        await stop.wait()
        log.info("stopping: finishing the batch in hand")
    finally:
        await anyio.to_thread.run_sync(service.stop)
        if server is not None:
            server.shutdown()


def incidents_rebuild(
    settings: Settings, *, as_json: bool, out: Callable[[str], None] = print
) -> None:
    """Replay every incident from position 0 and refold the read model (the process
    stopped); print what was found."""
    from projections.incidents.process import IncidentProcess, ProcessRunning, rebuild

    process = IncidentProcess(
        load_sites_file(settings),
        settings.postgres_schema,
        batch_size=settings.projections_batch_size,
    )
    with psycopg.connect(**settings.postgres_connection(), autocommit=True) as conn:
        try:
            done = rebuild(conn, process)
        except ProcessRunning as exc:
            raise PipelineError(str(exc)) from None
    r = done.replayed
    if as_json:
        out(
            json.dumps(
                {
                    "position": r.position,
                    "decisions": r.derived,
                    "recorded_already": r.recorded,
                    "recorded_now": r.new,
                    "no_longer_made": len(r.missing),
                    "incidents": done.incidents,
                    "seconds": round(done.seconds, 3),
                }
            )
        )
        return
    out(
        f"rebuilt incidents to position {r.position} in {done.seconds:.1f} s: {r.derived:,} "
        f"decisions, {r.recorded:,} recorded already, {r.new:,} recorded now; "
        f"{done.incidents:,} incidents"
    )
    if r.missing:
        out(
            f"{len(r.missing):,} recorded decision(s) are no longer made by the sites file's "
            f"rules (kept in the log), such as {r.missing[0]}"
        )
