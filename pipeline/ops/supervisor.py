"""Run several worker processes on one host, sharing the durable consumers.

One Python process is bound by one core. Worker processes pull from the same durable
consumers, so JetStream spreads the messages between them, and the event store's
batch insert keeps them from storing a message twice. Each child serves its metrics on
`metrics_port + i`. A child that exits unexpectedly is started again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["metrics_ports", "supervise"]

log = logging.getLogger(__name__)

_RESTART_DELAY_S = 1.0


def metrics_ports(settings: Settings) -> list[int]:
    """The metrics port of each worker process: `metrics_port + i` (none when it is 0)."""
    if not settings.metrics_port:
        return []
    return [settings.metrics_port + i for i in range(settings.processes)]


async def _child(
    settings: Settings, index: int, stop: asyncio.Event, env_file: Path | None
) -> None:
    env = {**os.environ, "PIPELINE_PROCESSES": "1"}
    if env_file is not None:  # the children read the settings file this process read
        env["PIPELINE_ENV_FILE"] = str(env_file)
    if settings.metrics_port:
        env["PIPELINE_METRICS_PORT"] = str(metrics_ports(settings)[index])
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "run", "worker", env=env
        )
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await waiter
            return
        stopper.cancel()
        log.error("worker %d exited with %s; starting it again", index, proc.returncode)
        await asyncio.sleep(_RESTART_DELAY_S)


async def supervise(settings: Settings, stop: asyncio.Event, env_file: Path | None = None) -> None:
    """Run `settings.processes` workers until `stop` is set, then stop them gracefully;
    each reads `env_file` (the settings file of `PIPELINE_ENV_FILE` or `--demo`), if any."""
    log.info("starting %d worker processes", settings.processes)
    await asyncio.gather(*(_child(settings, i, stop, env_file) for i in range(settings.processes)))
