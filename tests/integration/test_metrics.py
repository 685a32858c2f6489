"""The worker's /metrics endpoint, scraped over HTTP and checked against naming rules."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from pipeline.errors import StoreUnavailable
from pipeline.metrics import serve_metrics
from pipeline.ops.embedded import free_port
from pipeline.ops.simulate import Traffic
from pipeline.settings import Settings
from schemas import Domain

from ..conftest import running_worker, wait_until

UNIT_SUFFIXES = ("_total", "_seconds", "_messages", "_frames", "_bytes")
STATES = {"pipeline_intake_paused"}
"""Gauges of a state (1 or 0), without a unit."""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_metrics_are_served_and_well_named(settings: Settings, nc: Client) -> None:
    port = free_port()
    async with running_worker(settings) as worker:
        server = serve_metrics(worker.metrics, "127.0.0.1", port, ready=worker.ready)
        try:
            js = nc.jetstream()
            traffic = Traffic(worker.subjects, seed=9)
            for out in [traffic.valid(Domain.METRICS) for _ in range(30)] + [
                traffic.bad("invalid_json")
            ]:
                await js.publish(out.subject, out.body, headers=out.headers)
            await wait_until(lambda: worker.metrics.total("pipeline_events_stored") == 30)
            registry = worker.metrics.registry
            await wait_until(  # a round of the consumer lag poller after the last commit
                lambda: (
                    registry.get_sample_value(
                        "pipeline_consumer_pending_messages", {"domain": "metrics"}
                    )
                    == 0
                    and registry.get_sample_value(
                        "pipeline_consumer_ack_pending_messages", {"domain": "metrics"}
                    )
                    == 0
                )
            )
            base = f"http://127.0.0.1:{port}"
            _, text = await asyncio.to_thread(_get, f"{base}/metrics")
            assert await asyncio.to_thread(_get, f"{base}/healthz") == (200, '{"status": "alive"}')
            assert await asyncio.to_thread(_get, f"{base}/readyz") == (
                200,
                '{"ready": true, "problems": []}',
            )
            worker.pauses.enter("metrics", StoreUnavailable("connection refused"))
            status, body = await asyncio.to_thread(_get, f"{base}/readyz")
            assert status == 503
            assert json.loads(body)["problems"] == [
                "metrics paused (store) for 0 s: connection refused"
            ]
            worker.pauses.leave("metrics", "store")
        finally:
            server.shutdown()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name: f for name, f in families.items() if name.startswith("pipeline_")}
    for name, family in ours.items():
        assert family.documentation, name
        assert name.endswith(UNIT_SUFFIXES) or family.type == "counter" or name in STATES, name

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
