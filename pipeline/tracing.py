"""Tracing: OpenTelemetry spans of a message's way through the worker, off by default.

A message whose producer sent a W3C `traceparent` header gets spans in the producer's
trace: `<domain> receive` from the pull to the settlement, and under it `validate`,
`commit` and `ack` (or the message's end as a dead letter or a retry). A frame analysed
by the detector also gets `detect queue` (waiting for a batch and a free actor),
`detect` (the Ray call to the actor) and under it `detect in actor` (decoding and the
model in the actor, timed by the actor's clock, with the model's time for the batch as
`pipeline.detector.inference_ms`). The actors export nothing themselves (a batch serves
frames of many traces, and Ray's processes would each need an exporter): they return
their times with the results, and the worker records the spans. Messages without
the header get none, so the untraced path costs one look at the headers. The trace id
is stored with the event (`trace_id`) and put on the log lines about the message.
Spans are exported over OTLP/HTTP when `PIPELINE_OTEL_EXPORTER_OTLP_ENDPOINT` is set;
otherwise the API's no-op tracer drops them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["child", "configure_tracing", "receive", "record", "trace_id", "tracer"]

log = logging.getLogger(__name__)

tracer = trace.get_tracer("pipeline")
_PROPAGATOR = TraceContextTextMapPropagator()


def configure_tracing(endpoint: str, service_name: str) -> bool:
    """Export spans to the OTLP/HTTP `endpoint` (http://collector:4318); False if none."""
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    log.info("tracing: spans exported to %s", endpoint)
    return True


def trace_id(headers: Mapping[str, str] | None) -> str:
    """The trace id of a message's `traceparent` header (32 hex digits), or ""."""
    value = headers.get("traceparent", "") if headers else ""
    parts = value.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1].lower()
    return ""


def receive(
    name: str, headers: Mapping[str, str] | None, attributes: dict[str, Any]
) -> Span | None:
    """The root span of a traced message (a child of its producer's span), or None."""
    if not headers or "traceparent" not in headers:
        return None
    context = _PROPAGATOR.extract(dict(headers))
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return tracer.start_span(name, context=context, kind=SpanKind.CONSUMER, attributes=attributes)


def child(parent: Span, name: str) -> Span:
    """A span under `parent` (end it with `.end()`)."""
    context: Context = trace.set_span_in_context(parent)
    return tracer.start_span(name, context=context)


def record(parent: Span, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> Span:
    """A span under `parent` of work timed elsewhere (from `start_ns` to `end_ns`, Unix
    ns); ended, returned to be the parent of others."""
    context: Context = trace.set_span_in_context(parent)
    span = tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)
    return span
