"""Group commit: concurrent batches share transactions, each caller gets its own result."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from pipeline.errors import StoreUnavailable
from pipeline.ingest.writer import GroupWriter
from pipeline.store.eventstore import Accepted, WriteResult
from schemas import Domain


class SlowStore:
    """Records each transaction; the first one waits so that others queue behind it."""

    def __init__(self, fail: bool = False) -> None:
        self.transactions: list[list[str]] = []
        self.stored: set[uuid.UUID] = set()
        self.release = threading.Event()
        self.fail = fail

    def write(self, batch: Sequence[Accepted], known: set[uuid.UUID] | None = None) -> WriteResult:
        if not self.transactions:
            self.release.wait(5)
        self.transactions.append([a.message_id for a in batch])
        if self.fail:
            raise StoreUnavailable("database is down")
        new = {a.event_id for a in batch} - self.stored - (known or set())
        self.stored |= new
        return WriteResult(stored=new, duplicates={a.event_id for a in batch} - new)


def _batch(*ids: str) -> list[Accepted]:
    now = datetime.now(UTC)
    return [Accepted(Domain.SECURITY, i, "security.v1.x", 1, "1.0", now, {"id": i}) for i in ids]


async def test_waiting_batches_are_merged_and_results_split() -> None:
    store = SlowStore()
    writer = GroupWriter(store)  # type: ignore[arg-type]
    writer.start()
    first = asyncio.create_task(writer.write(_batch("a"), set()))
    await asyncio.sleep(0.05)
    queued = [
        asyncio.create_task(writer.write(_batch(*ids), set())) for ids in (["b", "c"], ["c", "d"])
    ]
    await asyncio.sleep(0.05)
    store.release.set()
    results = await asyncio.gather(first, *queued)
    await writer.stop()

    assert store.transactions == [["a"], ["b", "c", "c", "d"]]
    assert [len(r.stored) for r in results] == [1, 2, 1]  # "c" counts for the first caller
    assert len(store.stored) == 4


async def test_a_failed_transaction_fails_every_caller_in_it() -> None:
    store = SlowStore(fail=True)
    store.release.set()
    writer = GroupWriter(store)  # type: ignore[arg-type]
    writer.start()
    outcomes = await asyncio.gather(
        writer.write(_batch("a"), set()), writer.write(_batch("b"), set()), return_exceptions=True
    )
    await writer.stop()
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)


async def test_stop_writes_what_is_waiting() -> None:
    store = SlowStore()
    store.release.set()
    writer = GroupWriter(store)  # type: ignore[arg-type]
    pending = asyncio.create_task(writer.write(_batch("z"), set()))
    await asyncio.sleep(0)
    writer.start()
    await writer.stop()
    assert (await pending).stored == {_batch("z")[0].event_id}
    assert store.transactions == [["z"]]
