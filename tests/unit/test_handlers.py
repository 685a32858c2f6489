"""Handlers are thin: each hands whole batches of its domain to one intake (in memory)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from faststream.nats import NatsBroker, TestNatsBroker

import handlers
from pipeline.ingest.intake import Delivery
from pipeline.settings import EVENT_DOMAINS, Settings
from schemas import Domain
from streams import Subjects


class Recorder:
    """Stands in for an intake and keeps the batches it was given."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.batches: list[list[Delivery]] = []

    async def handle(self, batch: Sequence[Delivery]) -> None:
        self.batches.append(list(batch))


@pytest.mark.parametrize("domain", EVENT_DOMAINS)
async def test_each_domain_subscriber_takes_its_own_wildcard(domain: Domain) -> None:
    settings = Settings(_env_file=None)
    subjects = Subjects("unit")
    broker = NatsBroker()
    recorders = {d: Recorder(d) for d in EVENT_DOMAINS}
    for recorder in recorders.values():
        handlers.register(broker, recorder, settings, subjects)

    async with TestNatsBroker(broker) as test_broker:
        subject = subjects.subject(domain, 1, "src-1")
        await test_broker.publish(b'{"id": "x"}', subject, stream=subjects.stream(domain))

    got = recorders[domain].batches
    assert len(got) == 1 and [m.subject for m in got[0]] == [subject]
    assert got[0][0].data == b'{"id": "x"}'
    assert all(not r.batches for d, r in recorders.items() if d is not domain)


async def test_the_workers_handlers_take_a_batch_without_a_thread_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's broker hands each pulled batch to its intake on the event loop:
    FastStream's dependency injection would resolve the handler's arguments in a worker
    thread, one round trip per batch."""
    import anyio.to_thread

    from pipeline.app import worker_broker

    hops: list[object] = []
    real = anyio.to_thread.run_sync

    async def counted(func: object, *args: object, **kwargs: object) -> object:
        hops.append(func)
        return await real(func, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    settings = Settings(_env_file=None)
    subjects = Subjects("unit")
    broker = worker_broker(settings)
    recorder = Recorder(Domain.SECURITY)
    handlers.register(broker, recorder, settings, subjects)

    async with TestNatsBroker(broker) as test_broker:
        subject = subjects.subject(Domain.SECURITY, 1, "src-1")
        await test_broker.publish(b'{"id": "x"}', subject, stream=subjects.stream(Domain.SECURITY))

    assert [[m.data for m in batch] for batch in recorder.batches] == [[b'{"id": "x"}']]
    assert hops == []
