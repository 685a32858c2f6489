"""The event path end to end against real NATS (from the wheel) and the machine's PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import uuid

from nats.aio.client import Client

from pipeline.app import Worker
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops.simulate import Expect, Traffic
from pipeline.settings import Settings
from schemas import SCHEMAS, Domain

from ..conftest import running_worker, wait_until
from .helpers import body_digest, ids_of, security_body, stored_ids, stored_rows


async def test_each_domain_is_stored_once_with_its_payload(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=1)
        sent = [
            traffic.valid(d)
            for d in (Domain.SECURITY, Domain.MONITORING, Domain.METRICS)
            for _ in range(20)
        ]
        for out in sent:
            await js.publish(out.subject, out.body, headers=out.headers)
        await wait_until(lambda: len(stored_rows(pg_schema)) == len(sent))

    rows = {row[0]: row for row in stored_rows(pg_schema)}
    for out in sent:
        _, version, topic, state = rows[ids_of(out.domain, [out.message_id]).pop()]
        assert version == 1
        assert topic.startswith("pipeline.store.domain:")
        assert state["subject"] == out.subject
        assert state["message_id"] == out.message_id
        assert state["class_version"] == 2  # the payload's version
        assert not {"id", "schema_version"} & set(state["payload"])
        read = SCHEMAS[out.domain].read(state["payload"]).model_dump(mode="json")
        sent = json.loads(out.body)
        assert all(read[k] == sent[k] for k in ("service", "source", "kind") if k in sent)
    topics = {row[2] for row in rows.values()}
    assert topics == {
        "pipeline.store.domain:SecurityEvent.Recorded",
        "pipeline.store.domain:HealthReport.Recorded",
        "pipeline.store.domain:MetricsBatch.Recorded",
    }


async def test_monitoring_v1_and_v2_side_by_side_are_stored_as_v2(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        v1 = {
            "id": "h-1",
            "service": "api",
            "instance": "api-0",
            "reported_at": "2026-11-27T09:00:00Z",
            "status": "degraded",
            "checks": {"db": "down", "cache": "ok"},
        }
        v2 = {
            "id": "h-2",
            "schema_version": "2.3",
            "service": "api",
            "instance": "api-1",
            "reported_at": "2026-11-27T09:00:01Z",
            "status": "ok",
            "checks": [{"name": "db", "status": "ok", "latency_ms": 3.5}],
        }
        await js.publish(
            worker.subjects.subject(Domain.MONITORING, 1, "api"), json.dumps(v1).encode()
        )
        await js.publish(
            worker.subjects.subject(Domain.MONITORING, 2, "api"), json.dumps(v2).encode()
        )
        await wait_until(lambda: len(stored_rows(pg_schema)) == 2)

        report = worker.store.journal.repository.get(ids_of(Domain.MONITORING, ["h-1"]).pop())
        assert report.schema_version == "1.0", "the version the producer sent"
        assert report.payload["checks"] == [
            {"name": "cache", "status": "ok", "latency_ms": None, "detail": None},
            {"name": "db", "status": "down", "latency_ms": None, "detail": None},
        ]
        newer = worker.store.journal.repository.get(ids_of(Domain.MONITORING, ["h-2"]).pop())
        assert newer.schema_version == "2.3"
        assert newer.payload["checks"][0]["latency_ms"] == 3.5


async def test_every_kind_of_bad_input_is_dead_lettered_with_its_reason(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=2)
        bad = [
            traffic.bad(reason)
            for reason in ("invalid_json", "schema_violation", "unsupported_version", "oversized")
        ]
        good = [traffic.valid(Domain.SECURITY) for _ in range(10)]
        extra = [
            (
                "security.v1.door-1",
                security_body("naive", occurred_at="2026-11-27T10:00:00"),
                "schema_violation",
            ),
            ("security.version1.door-1", security_body("no-version"), "bad_subject"),
            (
                "metrics.v1.w",
                b'{"id": "nan", "service": "w", "instance": "w", '
                b'"collected_at": "2026-11-27T10:00:00Z", '
                b'"samples": [{"name": "x", "value": NaN}]}',
                "schema_violation",
            ),
        ]
        for out in bad + good:
            await js.publish(out.subject, out.body, headers=out.headers)
        for subject, body, _ in extra:
            await js.publish(subject, body, headers={"Trace": "t-1"})

        letters = DeadLetters(js, worker.subjects)
        await wait_until(lambda: len(stored_rows(pg_schema)) == len(good))
        expected = len(bad) + len(extra)

        async def all_dead_lettered() -> bool:
            return len(await letters.list()) == expected

        await wait_until(all_dead_lettered)
        found = await letters.list()

    by_reason = sorted(letter.reason.value for letter in found)
    assert by_reason == sorted([o.reason for o in bad] + [r for _, _, r in extra])
    originals = {o.message_id: o for o in bad}
    for letter in found:
        assert letter.detail
        assert letter.stream_seq > 0
        assert letter.delivered == 1
        digest = body_digest(letter)
        original = next(
            (o for o in originals.values() if hashlib.sha256(o.body).hexdigest() == digest), None
        )
        if original is not None:
            assert letter.subject == original.subject
            assert letter.headers["Nats-Msg-Id"] == original.message_id
        else:
            assert letter.headers == {"Trace": "t-1"}
    assert stored_ids(pg_schema).keys() == ids_of(Domain.SECURITY, [o.message_id for o in good])


async def test_duplicates_inside_and_after_the_window_are_stored_once(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=3)
        originals = [traffic.valid(Domain.SECURITY) for _ in range(50)]
        for out in originals:
            await js.publish(out.subject, out.body, headers=out.headers)
        # Same Nats-Msg-Id inside the window: JetStream itself drops it.
        ack = await js.publish(
            originals[0].subject, originals[0].body, headers=originals[0].headers
        )
        assert ack.duplicate
        await wait_until(lambda: len(stored_rows(pg_schema)) == 50)
        # A new transport id stands for a retry after the window: the pipeline drops it.
        for out in originals:
            await js.publish(out.subject, out.body, headers={"Nats-Msg-Id": str(uuid.uuid4())})

        async def all_seen() -> bool:
            return worker.metrics.total("pipeline_duplicates") == 50

        await wait_until(all_seen)

    counts = stored_ids(pg_schema)
    assert len(counts) == 50
    assert set(counts.values()) == {1}


async def test_two_workers_racing_on_one_consumer_store_each_message_once(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    small = settings.model_copy(update={"batch_size": 16})
    async with running_worker(small) as first, Worker(small) as second:
        js = nc.jetstream()
        traffic = Traffic(first.subjects, seed=4, duplicate_ratio=0.3, bad_ratio=0.0)
        sent = [next(iter(traffic)) for _ in range(2000)]
        for out in sent:
            headers = out.headers
            if out.expect is Expect.DUPLICATE:
                headers = {"Nats-Msg-Id": str(uuid.uuid4())}
            await js.publish_async(out.subject, out.body, headers=headers)
        await js.publish_async_completed()
        unique = {(o.domain, o.message_id) for o in sent}
        await wait_until(lambda: len(stored_rows(pg_schema)) == len(unique), timeout_s=60)

        async def all_acked() -> bool:
            handled = first.metrics.total("pipeline_messages_consumed") + second.metrics.total(
                "pipeline_messages_consumed"
            )
            return handled >= len(sent)

        await wait_until(all_acked)
        assert first.metrics.total("pipeline_messages_consumed") > 0
        assert second.metrics.total("pipeline_messages_consumed") > 0

    counts = stored_ids(pg_schema)
    assert len(counts) == len(unique)
    assert set(counts.values()) == {1}
