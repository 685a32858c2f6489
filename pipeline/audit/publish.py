"""A copy of every signed checkpoint outside the database: the AUDIT stream in JetStream.

The stream denies deletes and purges, so once a checkpoint is there, not even the NATS
operator can take it back; someone who later rewrites the database and its checkpoints
is found out by comparing with the copy (`pipeline audit verify --checkpoint FILE`).

The publisher copies the stored checkpoints in size order: it reads the size of the last
one in the stream (its `Pipeline-Checkpoint-Size` header) and publishes those after it,
each with the message id `<origin>/<size>`, so a copy sent twice (a retry, two
processes) is stored once. While NATS is away the checkpoints wait in the database, and
the copy catches up when it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from psycopg.sql import SQL

from streams import Subjects

from ..metrics import AuditMetrics
from .tables import AuditTables

__all__ = ["SIZE_HEADER", "CheckpointPublisher"]

log = logging.getLogger(__name__)

SIZE_HEADER = "Pipeline-Checkpoint-Size"
_PAGE = 100


class CheckpointPublisher:
    """Copies the stored checkpoints not yet in the AUDIT stream to it, in order."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        tables: AuditTables,
        origin: str,
        connect: Callable[[], psycopg.Connection[Any]],
        metrics: AuditMetrics,
    ) -> None:
        self.js = js
        self.stream = subjects.audit_stream()
        self.subject = subjects.audit_checkpoints()
        self.tables = tables
        self.origin = origin
        self.connect = connect
        self.metrics = metrics

    async def published(self) -> int:
        """The size of the last checkpoint in the stream (0: none yet)."""
        try:
            last = await self.js.get_last_msg(self.stream, self.subject)
        except NotFoundError:
            return 0
        return int((last.headers or {}).get(SIZE_HEADER, 0))

    async def copy(self) -> int:
        """Publish the stored checkpoints after the stream's last; how many."""
        after = await self.published()
        self.metrics.published_size.set(after)
        copied = 0
        while True:
            rows = await anyio.to_thread.run_sync(self._after, after)
            for size, note in rows:
                await self.js.publish(
                    self.subject,
                    note,
                    stream=self.stream,
                    headers={"Nats-Msg-Id": f"{self.origin}/{size}", SIZE_HEADER: str(size)},
                )
                after = size
                copied += 1
                self.metrics.published_size.set(size)
            if len(rows) < _PAGE:
                return copied

    def _after(self, size: int) -> list[tuple[int, bytes]]:
        with self.connect() as conn:
            rows = conn.execute(
                SQL("SELECT size, note FROM {} WHERE size > %s ORDER BY size LIMIT %s").format(
                    self.tables.checkpoints
                ),
                (size, _PAGE),
            ).fetchall()
        return [(size, bytes(note)) for size, note in rows]
