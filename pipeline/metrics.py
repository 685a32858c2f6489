"""Prometheus metrics of the pipeline, on an explicit registry, prefixed `pipeline_`,
served with the process's health checks."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = ["AuditMetrics", "IncidentMetrics", "Metrics", "ProjectionMetrics", "serve_metrics"]

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
        self.dead_letters_held = Counter(
            "pipeline_dead_letters_held_total",
            "Messages dead-lettered whose letter the DLQ held already (a replay, a late "
            "redelivery): acked, not written again; counted in pipeline_dead_lettered too.",
            ["domain"],
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
        self.detector_cpu_seconds = Counter(
            "pipeline_detector_cpu_seconds_total",
            "CPU time of the detector actors' calls, by part: decode (decoding the frames), "
            "model (the model's call, every thread), call (the whole call, both included).",
            ["part"],
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
        self.cache_stale = Counter(
            "pipeline_dedup_cache_stale_total",
            "Ids the cache called stored that the event store did not hold (they were stored).",
            ["domain"],
            registry=r,
        )
        self.paused = Gauge(
            "pipeline_intake_paused",
            "1 while a domain's intake is paused because a server it needs is down.",
            ["domain", "cause"],
            registry=r,
        )
        self.dead_letter_bytes = Gauge(
            "pipeline_dead_letter_stream_bytes",
            "Bytes the DLQ stream holds.",
            ["stream"],
            registry=r,
        )
        self.dead_letter_limit_bytes = Gauge(
            "pipeline_dead_letter_stream_limit_bytes",
            "The DLQ stream's byte cap (-1: none); full, it refuses letters and intakes pause.",
            ["stream"],
            registry=r,
        )
        self.dead_letter_messages = Gauge(
            "pipeline_dead_letter_stream_messages",
            "Dead letters the DLQ stream holds.",
            ["stream"],
            registry=r,
        )
        self.unstorable = Counter(
            "pipeline_unstorable_total",
            "Valid messages the event store refused (dead-lettered alone as unstorable).",
            ["domain"],
            registry=r,
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


class ProjectionMetrics:
    """Every metric a projections process exports; one instance per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.position = Gauge(
            "pipeline_projection_position",
            "Position (notification id) of the last event a view has applied or passed.",
            ["view"],
            registry=r,
        )
        self.head = Gauge(
            "pipeline_projection_store_head",
            "Position of the last event in the store, as last read by a view.",
            ["view"],
            registry=r,
        )
        self.lag_events = Gauge(
            "pipeline_projection_lag_events",
            "Events stored after a view's position (of any domain).",
            ["view"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "pipeline_projection_lag_seconds",
            "Seconds since the view was last at the head of the store (0 while it is).",
            ["view"],
            registry=r,
        )
        self.applied = Counter(
            "pipeline_projection_events_total",
            "Events applied to a view.",
            ["view"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "pipeline_projection_batch_seconds",
            "Time to read, apply and commit one batch of a view.",
            ["view"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stalled = Gauge(
            "pipeline_projection_stalled",
            "1 while a view is stopped at an event it cannot apply.",
            ["view"],
            registry=r,
        )
        self.active = Gauge(
            "pipeline_projection_active",
            "1 if this process keeps the view, 0 while another one does (standby).",
            ["view"],
            registry=r,
        )


class AuditMetrics:
    """Every metric the audit log's process exports; one instance per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.leaves = Counter(
            "pipeline_audit_leaves_total", "Events appended to the audit log.", registry=r
        )
        self.size = Gauge("pipeline_audit_log_size", "Leaves in the audit log.", registry=r)
        self.position = Gauge(
            "pipeline_audit_position", "Store position of the last logged event.", registry=r
        )
        self.checkpoint_size = Gauge(
            "pipeline_audit_checkpoint_size",
            "Leaves covered by the latest signed checkpoint.",
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "pipeline_audit_checkpoint_age_seconds",
            "Seconds since the first leaf no signed checkpoint covers was logged (0: all are).",
            registry=r,
        )
        self.checkpoints = Counter(
            "pipeline_audit_checkpoints_total", "Checkpoints signed and stored.", registry=r
        )
        self.signing_failures = Counter(
            "pipeline_audit_signing_failures_total",
            "Checkpoints not signed because a key could not sign (HSM away, wrong PIN).",
            registry=r,
        )
        self.sign_seconds = Histogram(
            "pipeline_audit_sign_seconds",
            "Time one key took to sign a checkpoint.",
            ["key"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "pipeline_audit_batch_seconds",
            "Time to read, hash and commit one batch of leaves.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published_size = Gauge(
            "pipeline_audit_published_size",
            "Leaves covered by the latest checkpoint copied to the AUDIT stream in JetStream.",
            registry=r,
        )
        self.active = Gauge(
            "pipeline_audit_active",
            "1 if this process keeps the audit log, 0 while another one does (standby).",
            registry=r,
        )


class IncidentMetrics:
    """Every metric the incident process exports; one instance per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "pipeline_incidents_opened_total",
            "Incidents opened, by the threat level of their first assessment.",
            ["level"],
            registry=r,
        )
        self.events = Counter(
            "pipeline_incident_events_total",
            "Incident events recorded by the process (not counting a replay's).",
            ["kind"],
            registry=r,
        )
        self.position = Gauge(
            "pipeline_incidents_position",
            "Store position of the last event the incident process has correlated.",
            registry=r,
        )
        self.head = Gauge(
            "pipeline_incidents_store_head",
            "Position of the last event in the store, as last read by the incident process.",
            registry=r,
        )
        self.lag_events = Gauge(
            "pipeline_incidents_lag_events",
            "Events stored after the incident process's position (of any domain).",
            registry=r,
        )
        self.lag_seconds = Gauge(
            "pipeline_incidents_lag_seconds",
            "Seconds since the incident process was last at the head of the store (0 at it).",
            registry=r,
        )
        self.unresolved = Gauge(
            "pipeline_incidents_unresolved",
            "Incidents not resolved, by threat level and state (open: not acknowledged yet), "
            "as the read model holds them after the last batch.",
            ["level", "state"],
            registry=r,
        )
        self.gathering = Gauge(
            "pipeline_incidents_gathering",
            "Incidents still gathering evidence (held in the correlator's memory).",
            registry=r,
        )
        self.late_events = Gauge(
            "pipeline_incidents_late_events",
            "Events stored too late to correlate (the sites file's lateness), counted from "
            "position 0 by the correlator of the last replay.",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "pipeline_incidents_batch_seconds",
            "Time to read, correlate and commit one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.replay_seconds = Gauge(
            "pipeline_incidents_replay_seconds",
            "How long the last replay from position 0 took (at start and after an error).",
            registry=r,
        )
        self.active = Gauge(
            "pipeline_incidents_active",
            "1 if this process keeps the incidents, 0 while another one does (standby).",
            registry=r,
        )
        self.evidence_frames = Counter(
            "pipeline_incident_evidence_frames_total",
            "Evidence frames settled: kept in the evidence bucket, or expired from the "
            "FRAMES stream before they could be copied.",
            ["outcome"],
            registry=r,
        )
        self.evidence_errors = Counter(
            "pipeline_incident_evidence_errors_total",
            "Failed attempts to copy evidence frames (NATS or the database away, the bucket "
            "missing or full); they are tried again.",
            registry=r,
        )


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


Readiness = Callable[[], list[str]]
"""Returns what keeps the process from being ready (empty when it is ready)."""


def serve_metrics(
    metrics: Metrics | ProjectionMetrics | AuditMetrics | IncidentMetrics,
    host: str,
    port: int,
    ready: Readiness | None = None,
) -> WSGIServer:
    """Serve `/metrics`, `/healthz` and `/readyz` from a background thread.

    `/healthz` answers 200 while the process runs; `/readyz` answers 200 when `ready()`
    reports nothing, else 503 with the problems as JSON. `.shutdown()` stops the server.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call] # `_created` series only add noise to every counter
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, 200, {"status": "alive"})
        if path == "/readyz":
            problems = ready() if ready is not None else []
            body = {"ready": not problems, "problems": problems}
            return _json(start_response, 503 if problems else 200, body)
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def _json(start_response: Callable[..., Any], status: int, body: object) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = {200: "OK", 503: "Service Unavailable"}[status]
    start_response(
        f"{status} {reason}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]
