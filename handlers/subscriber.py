"""The batch pull subscriber every domain handler registers."""

from __future__ import annotations

from typing import Any

from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub

from pipeline.intake import Intake
from pipeline.settings import Settings
from streams import Subjects

__all__ = ["subscribe_batches"]


async def _raw_batch(message: NatsMessage) -> Any:
    # The intake decodes each body itself, with per-message verdicts.
    return None


def subscribe_batches(
    broker: NatsBroker, intake: Intake, settings: Settings, subjects: Subjects
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
        pull_sub=PullSub(settings.batch_size, timeout=settings.batch_timeout_s, batch=True),
        ack_policy=AckPolicy.MANUAL,
        decoder=_raw_batch,
        title=f"{domain.value}.v<major>.<source>",
        description=f"{domain.value} messages, every supported major, stored as events",
    )
    async def handle(message: NatsMessage) -> None:
        await intake.handle(message.raw_message)
