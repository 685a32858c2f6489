"""A message its producer traced gets spans in the producer's trace; its event the trace id."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.simulate import Cameras
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from schemas import Domain

from ..conftest import running_worker, wait_until
from .helpers import frames_settings, security_body, stored_rows


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this process, in memory (a process sets its tracer provider once)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    exporter.clear()


async def test_a_traced_message_is_followed_from_pull_to_ack(
    settings: Settings, nc: Client, pg_schema: str, spans: InMemorySpanExporter
) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    bad_trace = secrets.token_hex(16)
    js = nc.jetstream()
    async with running_worker(settings) as worker:
        subject = worker.subjects.subject(Domain.SECURITY, 1, "door-7")
        await js.publish(
            subject,
            security_body("traced-1"),
            headers={"Nats-Msg-Id": "traced-1", "traceparent": f"00-{trace_id}-{parent}-01"},
        )
        await js.publish(subject, security_body("plain-1"), headers={"Nats-Msg-Id": "plain-1"})
        await js.publish(
            subject,
            b'{"id": "bad-1"}',
            headers={"Nats-Msg-Id": "bad-1", "traceparent": f"00-{bad_trace}-{parent}-01"},
        )
        await wait_until(lambda: len(stored_rows(pg_schema)) == 2)
        await wait_until(lambda: worker.metrics.total("pipeline_dead_lettered") == 1)

    def of(trace_hex: str) -> dict[str, object]:
        return {
            s.name: s
            for s in spans.get_finished_spans()
            if format(s.context.trace_id, "032x") == trace_hex
        }

    stored = of(trace_id)
    assert set(stored) == {"security receive", "validate", "commit", "ack"}
    root = stored["security receive"]
    assert root.parent is not None and format(root.parent.span_id, "016x") == parent
    assert root.attributes["pipeline.outcome"] == "stored"
    assert root.attributes["messaging.message.id"] == "traced-1"
    for name in ("validate", "commit", "ack"):
        assert stored[name].parent.span_id == root.context.span_id, name
    assert root.start_time <= stored["validate"].start_time
    assert stored["ack"].end_time <= root.end_time

    rejected = of(bad_trace)
    assert set(rejected) == {"security receive", "validate", "ack"}
    assert str(rejected["security receive"].attributes["pipeline.outcome"]).startswith(
        "dead-lettered"
    )

    states = {row[0]: row[3] for row in stored_rows(pg_schema)}
    assert states[event_id(Domain.SECURITY, "traced-1")]["trace_id"] == trace_id
    assert states[event_id(Domain.SECURITY, "plain-1")]["trace_id"] == ""


@pytest.mark.usefixtures("ray_cluster")
async def test_a_traced_frame_is_followed_through_the_detector(
    nats_server: EmbeddedNats,
    nc: Client,
    pg_schema: str,
    model_dir: Path,
    spans: InMemorySpanExporter,
) -> None:
    settings = frames_settings(nats_server.url, pg_schema, model_dir, frames_max_age_s=30)
    traces = {name: secrets.token_hex(16) for name in ("live", "old", "bad")}
    js = nc.jetstream()
    async with running_worker(settings) as worker:
        cameras = Cameras(worker.subjects, width=320, height=240, variants=2, seed=3)
        live, old, bad = cameras.frame(), cameras.frame(), cameras.frame()
        hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        for name, frame, changes, body in (
            ("live", live, {}, live.body),
            ("old", old, {"Frame-Captured-At": hour_ago}, old.body),
            ("bad", bad, {}, b"not an image"),
        ):
            traceparent = f"00-{traces[name]}-{secrets.token_hex(8)}-01"
            headers = {**frame.headers, **changes, "traceparent": traceparent}
            await js.publish(frame.subject, body, headers=headers)
        await wait_until(lambda: len(stored_rows(pg_schema)) == 2, timeout_s=60)
        await wait_until(lambda: worker.metrics.total("pipeline_dead_lettered") == 1)

    def of(name: str) -> dict[str, Any]:
        return {
            s.name: s
            for s in spans.get_finished_spans()
            if format(s.context.trace_id, "032x") == traces[name]
        }

    analysed = of("live")
    assert set(analysed) == {
        "frames receive",
        "validate",
        "detect queue",
        "detect",
        "detect in actor",
        "commit",
        "ack",
    }
    root = analysed["frames receive"]
    assert root.attributes["pipeline.outcome"] == "stored"
    detect = analysed["detect"]
    assert detect.parent.span_id == root.context.span_id
    assert detect.attributes["pipeline.detector.batch_size"] >= 1
    in_actor = analysed["detect in actor"]
    assert in_actor.parent.span_id == detect.context.span_id
    inference_ns = in_actor.attributes["pipeline.detector.inference_ms"] * 1e6
    assert 0 < inference_ns <= in_actor.end_time - in_actor.start_time
    # The actor's clock is this machine's here: its work lies within the call.
    assert detect.start_time <= in_actor.start_time <= in_actor.end_time <= detect.end_time
    assert analysed["detect queue"].end_time == detect.start_time
    assert root.start_time <= analysed["detect queue"].start_time
    assert detect.end_time <= analysed["commit"].start_time <= analysed["ack"].start_time
    assert analysed["ack"].end_time <= root.end_time

    assert set(of("old")) == {"frames receive", "validate", "commit", "ack"}  # skipped
    rejected = of("bad")
    assert set(rejected) == {"frames receive", "validate", "ack"}
    assert rejected["frames receive"].attributes["pipeline.outcome"] == (
        "dead-lettered: undecodable_image"
    )
    states = {row[0]: row[3] for row in stored_rows(pg_schema)}
    for name, frame in (("live", live), ("old", old)):
        assert states[event_id(Domain.FRAMES, frame.message_id)]["trace_id"] == traces[name]
