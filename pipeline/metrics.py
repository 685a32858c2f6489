"""Prometheus metrics of the pipeline, on an explicit registry, prefixed `pipeline_`."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

__all__ = ["Metrics", "serve_metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """Every metric the worker exports; one instance per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "pipeline_messages_consumed_total",
            "Messages received from JetStream.",
            ["domain"],
            registry=r,
        )
        self.stored = Counter(
            "pipeline_events_stored_total",
            "Events committed to the event store.",
            ["domain"],
            registry=r,
        )
        self.duplicates = Counter(
            "pipeline_duplicates_total",
            "Deliveries of messages already stored, acked and not stored again.",
            ["domain", "found_in"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "pipeline_dead_lettered_total",
            "Messages moved to the DLQ.",
            ["domain", "reason"],
            registry=r,
        )
        self.retried = Counter(
            "pipeline_retries_total",
            "Messages nak'd for redelivery after a transient failure.",
            ["domain", "error"],
            registry=r,
        )
        self.batch_size = Histogram(
            "pipeline_batch_size_messages",
            "Messages per pulled batch.",
            ["domain"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.handler_seconds = Histogram(
            "pipeline_handler_seconds",
            "Time to handle one batch, pull to ack.",
            ["domain"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "pipeline_commit_seconds",
            "Time to look up and commit one batch.",
            ["domain"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_pending = Gauge(
            "pipeline_consumer_pending_messages",
            "Messages not yet delivered (consumer lag).",
            ["domain"],
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "pipeline_consumer_ack_pending_messages",
            "Messages delivered but not yet acked.",
            ["domain"],
            registry=r,
        )
        self.settle_errors = Counter(
            "pipeline_ack_errors_total",
            "Acks or naks NATS did not take (the messages are redelivered).",
            ["domain"],
            registry=r,
        )
        self.frames = Counter(
            "pipeline_frames_total",
            "Camera frames by outcome: analysed, skipped (too old), failed (nak'd), rejected.",
            ["outcome"],
            registry=r,
        )
        self.detections = Counter(
            "pipeline_detections_total", "Objects detected, per class.", ["label"], registry=r
        )
        self.detector_batch_size = Histogram(
            "pipeline_detector_batch_size_frames",
            "Frames per batch sent to a detector actor.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.detector_queue_seconds = Histogram(
            "pipeline_detector_queue_seconds",
            "Time a frame waited in the pool's queue before its batch was sent.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.detector_inference_seconds = Histogram(
            "pipeline_detector_inference_seconds",
            "Model time per batch (decode and transfer excluded).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.detector_frame_seconds = Histogram(
            "pipeline_detector_frame_seconds",
            "Model time per frame (batch time / frames in the batch).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.detector_failures = Counter(
            "pipeline_detector_failures_total",
            "Detector calls that failed (their frames are redelivered).",
            registry=r,
        )
        self.detector_restarts = Counter(
            "pipeline_detector_actor_restarts_total",
            "Detector actors restarted or replaced after a failure.",
            registry=r,
        )
        self.cache_errors = Counter(
            "pipeline_dedup_cache_errors_total", "Failed calls to the Redis id cache.", registry=r
        )

    def total(self, name: str) -> float:
        """Sum of a counter's samples over all labels (`name` without `_total`)."""
        return sum(
            sample.value
            for metric in self.registry.collect()
            if metric.name == name
            for sample in metric.samples
            if sample.name == f"{name}_total"
        )


def serve_metrics(metrics: Metrics, host: str, port: int) -> WSGIServer:
    """Serve `/metrics` from a background thread; `.shutdown()` stops it."""
    disable_created_metrics()  # type: ignore[no-untyped-call] # `_created` series only add noise to every counter
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
