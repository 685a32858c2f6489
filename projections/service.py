"""The projections process: one runner thread per view, one listener, until stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import psycopg

from pipeline.metrics import ProjectionMetrics
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from pipeline.store.reader import EventReader

from . import VIEWS
from .runner import Listener, ViewRunner

__all__ = ["ProjectionService"]

log = logging.getLogger(__name__)


class ProjectionService:
    """Keeps every view (or those named) current; `start()`, then `stop()`."""

    def __init__(
        self,
        settings: Settings,
        views: Sequence[str] | None = None,
        metrics: ProjectionMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ProjectionMetrics()
        schema = settings.postgres_schema
        names = list(views) if views is not None else list(VIEWS)
        self.runners = [
            ViewRunner(
                VIEWS[name](),
                schema,
                batch_size=settings.projections_batch_size,
                poll_s=settings.projections_poll_s,
                metrics=self.metrics,
            )
            for name in names
        ]
        self.listener = Listener(EventReader(schema).channel, self.runners)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection to the store's database (autocommit; transactions are explicit)."""
        return psycopg.connect(**self.settings.postgres_connection(), autocommit=True)

    def start(self) -> None:
        """Make sure the event table exists, then start the threads."""
        self.settings.refuse_unsafe()
        EventStore(self.settings.eventsourcing_env()).close()  # creates the table if missing
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=runner.run,
                args=(self.connect, self._stop),
                kwargs={"standby_s": self.settings.projections_standby_s},
                name=f"view-{runner.view.name}",
                daemon=True,
            )
            for runner in self.runners
        ]
        self._threads.append(
            threading.Thread(
                target=self.listener.run,
                args=(self.connect, self._stop),
                name="listener",
                daemon=True,
            )
        )
        for thread in self._threads:
            thread.start()
        log.info("projections: %s", ", ".join(r.view.name for r in self.runners))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batches in hand and stop."""
        self._stop.set()
        for runner in self.runners:
            runner.wake.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []

    def ready(self) -> list[str]:
        """What keeps the process from being ready (for `/readyz`)."""
        if not self.listener.connected.is_set():
            return ["not connected to the event store's database"]
        return []
