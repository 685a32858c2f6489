"""Group commit: batches from every domain's intake share one writer and one transaction.

All writers of the event table take its lock, so concurrent transactions only queue
behind each other. One writer task instead takes whatever batches are waiting, writes
them in a single transaction off the event loop, and hands each caller its own result.
Under load, batches merge; when idle, a batch is written at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from ..errors import StoreUnavailable
from ..store.eventstore import Accepted, EventStore, WriteResult

__all__ = ["GroupWriter"]


@dataclass
class _Request:
    batch: Sequence[Accepted]
    known: set[uuid.UUID]
    done: asyncio.Future[WriteResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupWriter:
    """Writes batches to the event store, merging those that wait into one transaction."""

    def __init__(self, store: EventStore, *, max_rows: int = 4096) -> None:
        self._store = store
        self._max_rows = max_rows
        self._waiting: list[_Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop after writing what is waiting (a commit is never cut off half-way)."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None

    async def write(self, batch: Sequence[Accepted], known: set[uuid.UUID]) -> WriteResult:
        """Store the batch (skipping `known` ids); returns what was stored and what was there.

        Raises what `EventStore.write` raises (`StoreUnavailable` when it cannot commit).
        A batch that fails is that of every caller whose batch shared its transaction.
        """
        request = _Request(batch, known)
        self._waiting.append(request)
        self._wake.set()
        return await request.done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                await self._write_some()
            if self._stopping:
                return

    async def _write_some(self) -> None:
        taken: list[_Request] = []
        rows = 0
        while self._waiting and (not taken or rows + len(self._waiting[0].batch) <= self._max_rows):
            request = self._waiting.pop(0)
            taken.append(request)
            rows += len(request.batch)
        merged = [a for r in taken for a in r.batch]
        known = set().union(*(r.known for r in taken))
        try:
            result = await anyio.to_thread.run_sync(self._store.write, merged, known)
        except BaseException as exc:  # every caller gets the failure of the shared transaction
            error = exc if isinstance(exc, Exception) else StoreUnavailable("writer cancelled")
            for request in taken:
                if not request.done.done():
                    request.done.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        claimed: set[uuid.UUID] = set()  # an id two callers sent is stored for the first
        for request in taken:
            ids = {a.event_id for a in request.batch}
            mine = (ids & result.stored) - claimed
            claimed |= mine
            unstorable = {i: e for i, e in result.unstorable.items() if i in ids}
            if not request.done.done():
                request.done.set_result(
                    WriteResult(
                        stored=mine,
                        duplicates=ids - mine - unstorable.keys(),
                        unstorable=unstorable,
                        refuted=ids & result.refuted,
                    )
                )
