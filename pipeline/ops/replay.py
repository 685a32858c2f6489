"""`pipeline replay DOMAIN --since TIME [--until TIME]`: messages a stream still holds, again.

A new ephemeral consumer reads the domain's stream from `since` and feeds each batch to
the intake a worker would use (`Worker(consume=False)`: the same store, dead letters
and, for frames, detector pool): what is stored already is found in the store and acked
(stored once, counted as a duplicate), what was lost is stored, what is invalid is
dead-lettered (once: a dead letter's subject names the stream sequence, so one written
before is not written again: it is counted as invalid, already in the DLQ). The workers'
durable consumers are not touched. Messages stored in the stream after `until`, or after
the replay started, are left to the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from schemas import Domain

from ..app import Worker, connect_nats
from ..ingest.intake import Intake, delivery_info
from ..settings import Settings
from .failures import no_stream
from .progress import Progress

__all__ = ["Replayed", "replay"]


@dataclass(frozen=True)
class Replayed:
    """What a replay did."""

    domain: str
    messages: int
    stored: int
    duplicates: int
    dead_lettered: int
    """Invalid messages whose letter this replay wrote."""
    already_dead_lettered: int
    """Invalid messages whose letter the DLQ held already (not written again)."""


async def replay(
    settings: Settings,
    domain: Domain,
    since: datetime,
    until: datetime | None = None,
) -> Replayed:
    """Re-drive the messages of `domain`'s stream stored in [since, until) through an intake."""
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    until = until if until is None or until.tzinfo else until.replace(tzinfo=UTC)
    batch = settings.frames_batch_size if domain is Domain.FRAMES else settings.batch_size
    worker = Worker(settings.model_copy(update={"domains": (domain,)}), consume=False)
    async with worker:
        intake = worker.intakes[domain]
        nc = await connect_nats(settings)
        js = nc.jetstream()
        stream = worker.subjects.stream(domain)
        try:
            try:
                last = (await js.stream_info(stream)).state.last_seq
            except NotFoundError:
                raise no_stream(settings, stream) from None
            sub = await js.pull_subscribe(
                worker.subjects.wildcard(domain),
                stream=stream,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_TIME,
                    opt_start_time=since,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=settings.ack_wait_s,
                    max_ack_pending=batch * 4,
                    inactive_threshold=60.0,
                ),
            )
            bar = Progress(
                f"replaying {domain.value}", (await sub.consumer_info()).num_pending or 0
            )
            try:
                await _feed(
                    sub,
                    intake,
                    bar,
                    last,
                    until,
                    batch,
                    lambda: worker.metrics.total("pipeline_retries"),
                )
            finally:
                bar.close()
                await sub.unsubscribe()
        finally:
            await nc.drain()
    m = worker.metrics
    held = int(m.total("pipeline_dead_letters_held"))
    return Replayed(
        domain=domain.value,
        messages=int(m.total("pipeline_messages_consumed")),
        stored=int(m.total("pipeline_events_stored")),
        duplicates=int(m.total("pipeline_duplicates")),
        dead_lettered=int(m.total("pipeline_dead_lettered")) - held,
        already_dead_lettered=held,
    )


async def _feed(
    sub: Any,
    intake: Intake,
    bar: Progress,
    last: int,
    until: datetime | None,
    batch: int,
    naks: Callable[[], float],
) -> None:
    """Hand the consumer's messages to the intake until every one in range is settled.

    Messages past the range are terminated (this consumer leaves them to the workers).
    A message nak'd for a retry comes back: the replay ends once as many redeliveries
    as naks (`naks()`) have been handed on, so none is left behind.
    """
    seen = redelivered = 0
    done = False
    while True:
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except TimeoutError:
            msgs = []
        wanted = []
        for msg in msgs:
            where = delivery_info(msg)
            stored_at = datetime.fromtimestamp(where.stored_ns / 1e9, UTC)
            if where.stream_seq > last or (until is not None and stored_at >= until):
                done = True
                await msg.term()
                continue
            redelivered += where.delivered > 1
            wanted.append(msg)
        if wanted:
            await intake.handle(wanted)
            seen += len(wanted)
            bar.update(seen)
        if msgs and not done:
            continue
        await intake.flush()  # the batches in hand are committed and acked (or nak'd)
        if naks() > redelivered:
            continue  # retries still to come back
        if done:
            return
        info = await sub.consumer_info()
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
