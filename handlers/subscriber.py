"""The batch pull subscriber every domain handler registers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub

from pipeline.ingest.intake import Delivery
from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

__all__ = ["BatchHandler", "subscribe_batches"]


class BatchHandler(Protocol):
    """Handles the batches of one domain (`pipeline.intake.Intake`)."""

    @property
    def domain(self) -> Domain: ...

    async def handle(self, batch: Sequence[Delivery]) -> None: ...


async def _raw_batch(message: NatsMessage) -> Any:
    # The intake decodes each body itself, with per-message verdicts: the handler is
    # given the pulled messages as they came.
    return message.raw_message


def subscribe_batches(
    broker: NatsBroker,
    intake: BatchHandler,
    settings: Settings,
    subjects: Subjects,
    *,
    batch_size: int,
) -> None:
    """Pull batches of the intake's domain from its durable consumer and hand them on.

    Acks are manual: the intake acks each message only once its event is committed
    or its dead letter acknowledged.
    """
    domain = intake.domain

    @broker.subscriber(
        subjects.wildcard(domain),
        stream=JStream(subjects.stream(domain), declare=False),
        durable=subjects.durable(domain),
        pull_sub=PullSub(batch_size, timeout=settings.batch_timeout_s, batch=True),
        ack_policy=AckPolicy.MANUAL,
        # FastStream gives each subscriber `_INBOX.` unless told, whatever the connection's
        # prefix: pulled batches must arrive where this NATS user may read them.
        inbox_prefix=f"{settings.inbox_prefix()}.".encode(),
        decoder=_raw_batch,
        title=f"{domain.value}.v<major>.<source>",
        description=(
            f"{domain.value} messages of every supported major, stored as events; "
            f"payload schemas: {domain.value}.v<major>.json from `pipeline schemas export`"
        ),
    )
    # The batch comes from the decoder: asking for the message itself (`NatsMessage`)
    # has FastStream resolve it in a worker thread, a thread hop per batch.
    async def handle(batch: Any) -> None:  # Any: no payload model (see `description`)
        await intake.handle(cast("list[Delivery]", batch))
