"""`pipeline replay DOMAIN --since TIME [--until TIME]`: messages a stream still holds, again.

A new ephemeral consumer reads the domain's stream from `since` and feeds each batch to
the same intake the worker uses: what is stored already is found in the store and acked
(stored once, counted as a duplicate), what was lost is stored, what is invalid is
dead-lettered (once: a dead letter's subject names the stream sequence, so one written
before is not written again). The durable consumer of the workers is not touched.
Messages stored in the stream after `until`, or after the replay started, are left to
the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import Domain
from streams import Subjects

from ..app import connect_nats
from ..errors import PipelineError
from ..ingest.deadletter import DeadLetters
from ..ingest.intake import Intake, delivery_info
from ..ingest.pause import Pauses
from ..ingest.writer import GroupWriter
from ..metrics import Metrics
from ..settings import Settings
from ..store.eventstore import EventStore
from .progress import Progress

__all__ = ["Replayed", "replay"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replayed:
    """What a replay did."""

    domain: str
    messages: int
    stored: int
    duplicates: int
    dead_lettered: int


async def replay(
    settings: Settings,
    domain: Domain,
    since: datetime,
    until: datetime | None = None,
    *,
    batch: int = 256,
) -> Replayed:
    """Re-drive the messages of `domain`'s stream stored in [since, until) through an intake."""
    if domain is Domain.FRAMES:
        raise PipelineError(
            "replay of frames is not supported (they need the detector pool); "
            "requeue frames through the worker instead"
        )
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    until = until if until is None or until.tzinfo else until.replace(tzinfo=UTC)
    subjects = Subjects(settings.namespace)
    nc = await connect_nats(settings)
    metrics = Metrics()
    store = await anyio.to_thread.run_sync(EventStore, settings.eventsourcing_env())
    writer = GroupWriter(store)
    writer.start()
    intake = Intake(
        domain,
        subjects=subjects,
        writer=writer,
        dead_letters=DeadLetters(nc.jetstream(), subjects, max_payload=nc.max_payload),
        metrics=metrics,
        pauses=Pauses(metrics, max_s=settings.pause_probe_max_s),
        max_deliver=settings.max_deliver,
        ack_wait_s=settings.ack_wait_s,
        max_message_bytes=settings.max_message_bytes,
        retry_delay=settings.retry_delay,
    )
    js = nc.jetstream()
    stream = subjects.stream(domain)
    try:
        last = (await js.stream_info(stream)).state.last_seq
        sub = await js.pull_subscribe(
            subjects.wildcard(domain),
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
        consumer = await sub.consumer_info()
        bar = Progress(f"replaying {domain.value}", consumer.num_pending or 0)
        seen = 0
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=1.0)
                except TimeoutError:
                    info = await sub.consumer_info()
                    if info.num_pending == 0 and info.num_ack_pending == 0:
                        break
                    continue
                wanted = []
                done = False
                for msg in msgs:
                    info_ = delivery_info(msg)
                    stored_at = datetime.fromtimestamp(info_.stored_ns / 1e9, UTC)
                    if info_.stream_seq > last or (until is not None and stored_at >= until):
                        done = True  # left to the workers
                        continue
                    wanted.append(msg)
                if wanted:
                    await intake.handle(wanted)
                    seen += len(wanted)
                    bar.update(seen)
                if done:
                    break
            await intake.stop()
        finally:
            bar.close()
            await sub.unsubscribe()
    finally:
        await writer.stop()
        await anyio.to_thread.run_sync(store.close)
        await nc.drain()
    return Replayed(
        domain=domain.value,
        messages=int(metrics.total("pipeline_messages_consumed")),
        stored=int(metrics.total("pipeline_events_stored")),
        duplicates=int(metrics.total("pipeline_duplicates")),
        dead_lettered=int(metrics.total("pipeline_dead_lettered")),
    )
