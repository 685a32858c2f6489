"""The incident process's parts: its thread, the listener that wakes it and the keeper
of the evidence frames (`pipeline run incidents` composes them in
`pipeline/ops/incidents.py`)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import psycopg

from pipeline.metrics import IncidentMetrics
from pipeline.settings import Settings
from pipeline.store.follow import Listener
from pipeline.store.reader import EventReader

from .evidence import EvidenceKeeper
from .process import IncidentProcess
from .sites import SiteMap

__all__ = ["IncidentService"]

log = logging.getLogger(__name__)


class IncidentService:
    """Keeps the incidents current; `start()`, then `stop()`."""

    def __init__(
        self, settings: Settings, sites: SiteMap, metrics: IncidentMetrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or IncidentMetrics()
        schema = settings.postgres_schema
        self.process = IncidentProcess(
            sites,
            schema,
            batch_size=settings.projections_batch_size,
            poll_s=settings.projections_poll_s,
            metrics=self.metrics,
        )
        self.listener = Listener(EventReader(schema).channel, [self.process])
        self.keeper = (
            EvidenceKeeper(settings, self.connect, self.metrics)
            if settings.evidence_frames
            else None
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection to the store's database (autocommit; transactions are explicit)."""
        return psycopg.connect(**self.settings.postgres_connection(), autocommit=True)

    def start(self) -> None:
        """Start the process's thread, the listener and the evidence keeper."""
        self.settings.refuse_unsafe()
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=self.process.run,
                args=(self.connect, self._stop),
                kwargs={"standby_s": self.settings.projections_standby_s},
                name="incidents",
                daemon=True,
            ),
            threading.Thread(
                target=self.listener.run,
                args=(self.connect, self._stop),
                name="listener",
                daemon=True,
            ),
        ]
        if self.keeper is not None:
            # In an event loop of its own (nats.py is asynchronous): NATS away delays the
            # evidence frames' copies, never the incidents.
            self._threads.append(
                threading.Thread(target=self._keep_evidence, name="evidence", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        log.info("incidents: following schema %s", self.settings.postgres_schema)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in hand and stop."""
        self._stop.set()
        self.process.wake.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []

    def _keep_evidence(self) -> None:
        asyncio.run(self._keep())

    async def _keep(self) -> None:
        assert self.keeper is not None
        stop = asyncio.Event()

        async def watch() -> None:
            await asyncio.get_running_loop().run_in_executor(None, self._stop.wait)
            stop.set()

        watcher = asyncio.create_task(watch())
        await self.keeper.run(stop)
        await watcher

    def ready(self) -> list[str]:
        """What keeps the process from being ready (for `/readyz`)."""
        if not self.listener.connected.is_set():
            return ["not connected to the event store's database"]
        return []
