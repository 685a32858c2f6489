"""`pipeline run audit`: the audit log kept and signed, its checkpoints copied to JetStream,
metrics served."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
import nats
from nats.aio.client import Client

from streams import Subjects

from ..audit.publish import CheckpointPublisher
from ..audit.service import AuditService
from ..metrics import serve_metrics
from ..settings import Settings

__all__ = ["run_audit"]

log = logging.getLogger(__name__)


async def run_audit(settings: Settings, stop: asyncio.Event) -> None:
    """Keep the audit log current and signed, and its copy in JetStream, until `stop`."""
    service = AuditService(settings)
    await anyio.to_thread.run_sync(service.start)
    server = None
    if settings.audit_metrics_port:
        server = serve_metrics(
            service.metrics, settings.metrics_host, settings.audit_metrics_port, ready=service.ready
        )
        log.info(
            "audit: metrics on http://%s:%d/metrics, health on /healthz and /readyz",
            settings.metrics_host,
            settings.audit_metrics_port,
        )
    try:
        await _copy_checkpoints(settings, service, stop)
    finally:
        await anyio.to_thread.run_sync(service.stop)
        if server is not None:
            server.shutdown()


async def _copy_checkpoints(settings: Settings, service: AuditService, stop: asyncio.Event) -> None:
    """Copy new checkpoints to the AUDIT stream now and then; NATS away only delays it."""
    subjects = Subjects(settings.namespace)
    interval = max(1.0, settings.audit_checkpoint_interval_s)
    nc: Client | None = None
    problem = ""

    async def quiet(exc: Exception) -> None:
        log.debug("audit: NATS: %r", exc)

    try:
        while not stop.is_set():
            try:
                if nc is None:
                    nc = await nats.connect(
                        settings.nats_servers(),
                        connect_timeout=2,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=1,
                        error_cb=quiet,
                        **settings.nats_options(),
                    )
                publisher = CheckpointPublisher(
                    nc.jetstream(),
                    subjects,
                    service.log.tables,
                    service.log.origin,
                    service.connect,
                    service.metrics,
                )
                copied = await publisher.copy()
                if problem:
                    log.info("audit: checkpoints copied to stream %s again", publisher.stream)
                    problem = ""
                if copied:
                    log.debug("audit: %d checkpoint(s) copied", copied)
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                if repr(exc) != problem:
                    log.warning(
                        "audit: cannot copy checkpoints to stream %s at %s (%r); they wait in "
                        "the database (has the operator run `pipeline streams apply`?)",
                        subjects.audit_stream(),
                        settings.nats_url,
                        exc,
                    )
                    problem = repr(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        if nc is not None:
            await nc.close()
