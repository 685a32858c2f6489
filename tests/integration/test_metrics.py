"""The worker's /metrics endpoint, scraped over HTTP and checked against naming rules."""

from __future__ import annotations

import asyncio
import urllib.request

from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app import Worker
from pipeline.metrics import serve_metrics
from pipeline.ops.embedded import free_port
from pipeline.ops.simulate import Traffic
from pipeline.settings import Settings
from schemas import Domain

from ..conftest import wait_until

UNIT_SUFFIXES = ("_total", "_seconds", "_messages", "_frames", "_bytes")


async def test_metrics_are_served_and_well_named(settings: Settings, nc: Client) -> None:
    port = free_port()
    async with Worker(settings) as worker:
        server = serve_metrics(worker.metrics, "127.0.0.1", port)
        try:
            js = nc.jetstream()
            traffic = Traffic(worker.subjects, seed=9)
            for out in [traffic.valid(Domain.METRICS) for _ in range(30)] + [
                traffic.bad("invalid_json")
            ]:
                await js.publish(out.subject, out.body, headers=out.headers)
            await wait_until(lambda: worker.metrics.total("pipeline_events_stored") == 30)
            await asyncio.sleep(1.0)  # one round of the consumer lag poller
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            )
        finally:
            server.shutdown()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name: f for name, f in families.items() if name.startswith("pipeline_")}
    for name, family in ours.items():
        assert family.documentation, name
        assert name.endswith(UNIT_SUFFIXES) or family.type == "counter", name

    def value(sample_name: str, **labels: str) -> float:
        for family in ours.values():
            for sample in family.samples:
                if sample.name == sample_name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        raise AssertionError(f"{sample_name} {labels} not exported")

    assert value("pipeline_events_stored_total", domain="metrics") == 30
    assert value("pipeline_messages_consumed_total", domain="metrics") == 30
    assert value("pipeline_dead_lettered_total", domain="security", reason="invalid_json") == 1
    assert value("pipeline_commit_seconds_count", domain="metrics") >= 1
    assert value("pipeline_batch_size_messages_sum", domain="metrics") == 30
    assert value("pipeline_consumer_pending_messages", domain="metrics") == 0
