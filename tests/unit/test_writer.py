"""Group commit: concurrent batches share transactions, each caller gets its own result.

The store stand-in holds every transaction until the test lets them through, and says
when one has begun: the tests order the writer's work by those two signals, not by time.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import pytest

from pipeline.errors import StoreUnavailable
from pipeline.ingest.writer import GroupWriter
from pipeline.store.eventstore import Accepted, WriteResult
from schemas import Domain

pytestmark = pytest.mark.timeout(30)  # a writer that loses a batch leaves its caller waiting

T = TypeVar("T")


class GatedStore:
    """Records each transaction; each waits until `release` is set, then commits or fails."""

    def __init__(self, fail_with: str | None = None) -> None:
        self.transactions: list[list[str]] = []
        self.stored: set[uuid.UUID] = set()
        self.began = threading.Event()
        """Set when a transaction has begun (and is waiting for `release`)."""
        self.release = threading.Event()
        self.fail_with = fail_with
        """A transaction holding this message id fails as a whole."""

    def write(self, batch: Sequence[Accepted], known: set[uuid.UUID] | None = None) -> WriteResult:
        ids = [a.message_id for a in batch]
        self.transactions.append(ids)
        self.began.set()
        if not self.release.wait(10):
            raise AssertionError("the test never released the transaction")
        if self.fail_with in ids:
            raise StoreUnavailable("database is down")
        new = {a.event_id for a in batch} - self.stored - (known or set())
        self.stored |= new
        return WriteResult(stored=new, duplicates={a.event_id for a in batch} - new)


def _batch(*ids: str) -> list[Accepted]:
    now = datetime.now(UTC)
    return [Accepted(Domain.SECURITY, i, "security.v1.x", 1, "1.0", now, {"id": i}) for i in ids]


def _ids(*message_ids: str) -> set[uuid.UUID]:
    return {a.event_id for a in _batch(*message_ids)}


async def _begun(call: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
    """A task running `call`, returned once it has run up to where it first suspends."""
    begun = asyncio.Event()

    async def run() -> T:
        begun.set()
        return await call()

    task = asyncio.create_task(run())
    await begun.wait()
    return task


async def _queued(writer: GroupWriter, *ids: str) -> asyncio.Task[WriteResult]:
    """A task writing `ids`, returned once its batch waits in the writer."""
    return await _begun(lambda: writer.write(_batch(*ids), set()))


async def _busy(writer: GroupWriter, store: GatedStore, *ids: str) -> asyncio.Task[WriteResult]:
    """A task writing `ids`, returned once its transaction has begun in the store."""
    task = await _queued(writer, *ids)
    assert await asyncio.to_thread(store.began.wait, 10), "the writer never began a transaction"
    return task


async def test_waiting_batches_are_merged_and_results_split() -> None:
    store = GatedStore()
    writer = GroupWriter(store)  # type: ignore[arg-type]
    writer.start()
    first = await _busy(writer, store, "a")
    queued = [await _queued(writer, "b", "c"), await _queued(writer, "c", "d")]
    store.release.set()
    results = await asyncio.gather(first, *queued)
    await writer.stop()

    assert store.transactions == [["a"], ["b", "c", "c", "d"]]
    assert [r.stored for r in results] == [_ids("a"), _ids("b", "c"), _ids("d")]
    assert [r.duplicates for r in results] == [set(), set(), _ids("c")]  # "c" is the 2nd's
    assert store.stored == _ids("a", "b", "c", "d")


async def test_a_failed_transaction_fails_every_caller_in_it() -> None:
    store = GatedStore(fail_with="c")
    writer = GroupWriter(store)  # type: ignore[arg-type]
    writer.start()
    first = await _busy(writer, store, "a")
    queued = [await _queued(writer, "b"), await _queued(writer, "c")]
    store.release.set()
    outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
    await writer.stop()

    assert store.transactions == [["a"], ["b", "c"]]
    assert outcomes[0] == WriteResult(stored=_ids("a"))  # its own transaction committed
    assert [type(o) for o in outcomes[1:]] == [StoreUnavailable, StoreUnavailable]
    assert store.stored == _ids("a")


async def test_stop_writes_what_is_waiting() -> None:
    store = GatedStore()
    writer = GroupWriter(store)  # type: ignore[arg-type]
    writer.start()
    first = await _busy(writer, store, "a")
    pending = await _queued(writer, "z")
    stopping = await _begun(writer.stop)  # asked to stop while "a" is being written
    store.release.set()
    await stopping

    assert store.transactions == [["a"], ["z"]]
    assert (await first).stored == _ids("a")
    assert (await pending).stored == _ids("z")
