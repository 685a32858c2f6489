"""Message models and upcasters: round trips, and every invalid input rejected with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import Reason, Rejected
from pipeline.ingest.codec import decode
from schemas import (
    ENVELOPE,
    SCHEMAS,
    CheckResult,
    Domain,
    FrameMetaV1,
    HealthReportV1,
    HealthReportV2,
    HealthStatus,
    MetricSample,
    MetricsBatchV1,
    SecurityEventV1,
    Severity,
)
from streams import Subjects

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,40}", fullmatch=True)
offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)
times = st.builds(
    lambda dt, tz: dt.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    offsets,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
attributes = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.one_of(st.text(max_size=50), st.booleans(), st.integers(-(2**53), 2**53), finite),
    max_size=5,
)

security_events = st.builds(
    SecurityEventV1,
    id=ids,
    source=names,
    occurred_at=times,
    kind=st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True),
    severity=st.sampled_from(Severity),
    zone=st.none() | st.text(min_size=1, max_size=20),
    attributes=attributes,
)
reports_v1 = st.builds(
    HealthReportV1,
    id=ids,
    service=names,
    instance=names,
    reported_at=times,
    status=st.sampled_from(HealthStatus),
    checks=st.dictionaries(
        st.text(min_size=1, max_size=20), st.sampled_from(HealthStatus), max_size=5
    ),
    message=st.none() | st.text(max_size=100),
)
reports_v2 = st.builds(
    HealthReportV2,
    id=ids,
    service=names,
    instance=names,
    reported_at=times,
    status=st.sampled_from(HealthStatus),
    checks=st.lists(
        st.builds(
            CheckResult,
            name=st.text(min_size=1, max_size=20),
            status=st.sampled_from(HealthStatus),
            latency_ms=st.none() | st.floats(min_value=0, max_value=1e6),
        ),
        max_size=5,
    ).map(tuple),
)
metric_batches = st.builds(
    MetricsBatchV1,
    id=ids,
    service=names,
    instance=names,
    collected_at=times,
    samples=st.lists(
        st.builds(
            MetricSample,
            name=st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True),
            value=finite,
            unit=st.sampled_from(["", "s", "bytes"]),
            labels=st.dictionaries(
                st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=3
            ),
        ),
        min_size=1,
        max_size=10,
    ).map(tuple),
)


@pytest.mark.parametrize(
    ("strategy", "domain", "major"),
    [
        (security_events, Domain.SECURITY, 1),
        (reports_v2, Domain.MONITORING, 2),
        (metric_batches, Domain.METRICS, 1),
    ],
)
@given(data=st.data())
def test_json_round_trip_through_the_decoder(
    strategy: st.SearchStrategy[object], domain: Domain, major: int, data: st.DataObject
) -> None:
    model: Any = data.draw(strategy)
    body = model.model_dump_json().encode()
    decoded = decode(Subjects(), domain, f"{domain}.v{major}.src", body, max_bytes=1 << 20)
    assert (decoded.message_id, decoded.schema_version) == (model.id, model.schema_version)
    # The payload is the message without its envelope, and reads back as the same content.
    dumped = json.loads(body)
    assert decoded.payload == {k: v for k, v in dumped.items() if k not in ENVELOPE}
    assert SCHEMAS[domain].read(decoded.payload).model_dump() == {
        k: v for k, v in model.model_dump().items() if k not in ENVELOPE
    }


def test_a_v1_health_report_is_stored_in_the_v2_shape() -> None:
    body = json.dumps(
        {
            "id": "r-1",
            "schema_version": "1.3",
            "service": "api",
            "instance": "api-0",
            "reported_at": "2026-11-27T10:00:00+01:00",
            "status": "degraded",
            "checks": {"db": "down", "cache": "ok"},
            "message": "db unreachable",
        }
    ).encode()
    decoded = decode(Subjects(), Domain.MONITORING, "monitoring.v1.api", body, max_bytes=4096)
    assert decoded.schema_version == "1.3", "the producer's minor is kept as sent"
    assert decoded.payload == {
        "service": "api",
        "instance": "api-0",
        "reported_at": "2026-11-27T09:00:00Z",
        "status": "degraded",
        "checks": [
            {"name": "cache", "status": "ok", "latency_ms": None, "detail": None},
            {"name": "db", "status": "down", "latency_ms": None, "detail": None},
        ],
        "message": "db unreachable",
    }


@given(reports_v1)
def test_v1_health_reports_upcast_to_v2_without_losing_anything(report: HealthReportV1) -> None:
    body = report.model_dump_json().encode()
    decoded = decode(Subjects(), Domain.MONITORING, "monitoring.v1.api", body, max_bytes=1 << 20)
    current: Any = SCHEMAS[Domain.MONITORING].read(decoded.payload)
    assert isinstance(current.checks, tuple)
    assert {c.name: c.status for c in current.checks} == report.checks
    assert all(c.latency_ms is None and c.detail is None for c in current.checks)
    assert (decoded.message_id, decoded.schema_version) == (report.id, report.schema_version)
    assert (decoded.payload["status"], decoded.payload["message"]) == (
        report.status.value,
        report.message,
    )
    assert current.reported_at == report.reported_at


@given(times)
def test_timestamps_are_normalised_to_utc(when: datetime) -> None:
    event = SecurityEventV1(id="a", source="s", occurred_at=when, kind="k", severity=Severity.LOW)
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.occurred_at == when


def _expected_reason(body: bytes, major: int, known: bool) -> Reason:
    """The verdict bytes deserve, worked out without the decoder."""
    if not known:
        return Reason.UNSUPPORTED_VERSION
    if len(body) > 200:
        return Reason.OVERSIZED
    try:
        json.loads(body.decode("utf-8"))
    except ValueError:
        return Reason.INVALID_JSON
    return Reason.SCHEMA_VIOLATION


@given(st.binary(max_size=300) | st.from_regex(rb"\A[{}\[\]\"0-9a-z:, ]{0,250}\Z"))
def test_any_bytes_are_rejected_with_the_reason_they_deserve(body: bytes) -> None:
    for domain, schema in SCHEMAS.items():
        if domain is Domain.FRAMES:
            continue
        for major in (*schema.versions, 7):
            with pytest.raises(Rejected) as info:
                decode(Subjects(), domain, f"{domain}.v{major}.x", body, max_bytes=200)
            assert info.value.reason is _expected_reason(body, major, major in schema.versions)
            assert info.value.detail


def _valid_security() -> dict[str, object]:
    return {
        "id": "m-1",
        "source": "door-7",
        "occurred_at": "2026-11-27T10:00:00Z",
        "kind": "door.forced",
        "severity": "high",
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"occurred_at": "2026-11-27T10:00:00"}, "timezone"),
        ({"severity": "apocalyptic"}, "severity"),
        ({"id": ""}, "id"),
        ({"id": "has space"}, "id"),
        ({"source": "a.b c"}, "source"),
        ({"unknown": 1}, "unknown"),
        ({"severity": 3}, "severity"),
        ({"schema_version": "2.0"}, "schema_version"),
        ({"attributes": {f"k{i}": i for i in range(65)}}, "attributes"),
        ({"attributes": {"k": [1, 2]}}, "attributes"),
        ({"attributes": {"big": 2**63}}, "64-bit"),
        ({"attributes": {"small": -(2**63) - 1}}, "64-bit"),
        ({"attributes": {"k": "x" * 1025}}, "attributes"),
    ],
)
def test_invalid_security_events_say_which_field(change: dict[str, object], reason: str) -> None:
    body = json.dumps({**_valid_security(), **change}).encode()
    with pytest.raises(Rejected) as info:
        decode(Subjects(), Domain.SECURITY, "security.v1.door-7", body, max_bytes=1 << 20)
    assert info.value.reason is Reason.SCHEMA_VIOLATION
    assert reason in info.value.detail or reason in str(info.value).lower()


def test_64_bit_integers_are_kept_exactly() -> None:
    body = json.dumps({**_valid_security(), "attributes": {"a": 2**63 - 1, "b": -(2**63)}})
    decoded = decode(Subjects(), Domain.SECURITY, "security.v1.x", body.encode(), max_bytes=4096)
    assert decoded.payload["attributes"] == {"a": 2**63 - 1, "b": -(2**63)}


def test_a_producer_one_minor_ahead_keeps_its_new_fields() -> None:
    ahead = {**_valid_security(), "schema_version": "1.1", "camera": "cam-3", "tags": ["x", 2]}
    decoded = decode(
        Subjects(), Domain.SECURITY, "security.v1.x", json.dumps(ahead).encode(), max_bytes=4096
    )
    assert decoded.schema_version == "1.1"
    assert decoded.payload["camera"] == "cam-3" and decoded.payload["tags"] == ["x", 2]
    assert decoded.payload["kind"] == "door.forced"


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"schema_version": "1.0", "camera": "cam-3"}, "camera"),  # a version it knows
        ({"camera": "cam-3"}, "camera"),  # no version: 1.0
        ({"schema_version": "1.1", "camera": 2**64}, "64 bits"),
        ({"schema_version": "1.1", "deep": [[[[[[[[[[1]]]]]]]]]]}, "nested"),
        ({"schema_version": "1.1", "camera": "cam-3", "severity": "apocalyptic"}, "severity"),
    ],
)
def test_unknown_fields_are_refused_unless_a_newer_minor_brings_them(
    message: dict[str, object], problem: str
) -> None:
    body = json.dumps({**_valid_security(), **message}).encode()
    with pytest.raises(Rejected) as info:
        decode(Subjects(), Domain.SECURITY, "security.v1.x", body, max_bytes=4096)
    assert info.value.reason is Reason.SCHEMA_VIOLATION
    assert problem in info.value.detail


def test_a_newer_minor_cannot_add_fields_inside_known_ones() -> None:
    report = {
        "id": "r-2",
        "schema_version": "2.1",
        "service": "api",
        "instance": "api-0",
        "reported_at": "2026-11-27T09:00:00Z",
        "status": "ok",
        "checks": [{"name": "db", "status": "ok", "weight": 3}],
    }
    with pytest.raises(Rejected, match="weight"):
        body = json.dumps(report).encode()
        decode(Subjects(), Domain.MONITORING, "monitoring.v2.api", body, max_bytes=4096)


def test_decoder_reasons_for_structure_problems() -> None:
    s = Subjects()
    ok = json.dumps(_valid_security()).encode()
    cases = [
        ("security.v1.door-7", b"{nope", Reason.INVALID_JSON),
        ("security.v2.door-7", ok, Reason.UNSUPPORTED_VERSION),
        ("security.door-7", ok, Reason.BAD_SUBJECT),
        ("metrics.v1.door-7", ok, Reason.BAD_SUBJECT),
        ("security.v1.door-7", ok + b" " * 100, Reason.OVERSIZED),
    ]
    for subject, body, reason in cases:
        with pytest.raises(Rejected) as info:
            decode(s, Domain.SECURITY, subject, body, max_bytes=len(ok) + 10)
        assert info.value.reason is reason, subject


@given(
    st.builds(
        FrameMetaV1,
        id=ids,
        camera=names,
        sequence=st.integers(0, 2**40),
        captured_at=times,
        width=st.integers(1, 16384),
        height=st.integers(1, 16384),
        encoding=st.sampled_from(["jpeg", "png"]),
    )
)
def test_frame_metadata_round_trips_through_headers(meta: FrameMetaV1) -> None:
    headers = meta.to_headers()
    assert headers["Nats-Msg-Id"] == meta.id
    assert FrameMetaV1.from_headers(headers) == meta


def test_frame_metadata_with_missing_or_bad_headers_is_rejected() -> None:
    meta = FrameMetaV1(
        id="f1",
        camera="cam-1",
        sequence=1,
        captured_at=datetime.now(UTC),
        width=640,
        height=480,
        encoding="jpeg",
    )
    headers = meta.to_headers()
    del headers["Frame-Width"]
    with pytest.raises(ValidationError, match="width"):
        FrameMetaV1.from_headers(headers)
    with pytest.raises(ValidationError, match="encoding"):
        FrameMetaV1.from_headers({**meta.to_headers(), "Frame-Encoding": "gif"})
