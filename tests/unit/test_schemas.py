"""Message models and upcasters: round trips, and every invalid input rejected with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.errors import Reason, Rejected
from pipeline.ingest.codec import decode
from schemas import (
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
    upcast_v1_to_v2,
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
    model = data.draw(strategy)
    body = model.model_dump_json().encode()  # type: ignore[attr-defined]
    decoded = decode(Subjects(), domain, f"{domain}.v{major}.src", body, max_bytes=1 << 20)
    assert decoded == model


@given(reports_v1)
def test_v1_health_reports_upcast_to_v2_without_losing_anything(report: HealthReportV1) -> None:
    body = report.model_dump_json().encode()
    current = decode(Subjects(), Domain.MONITORING, "monitoring.v1.api", body, max_bytes=1 << 20)
    assert isinstance(current, HealthReportV2)
    assert current == upcast_v1_to_v2(report)
    assert {c.name: c.status for c in current.checks} == report.checks
    assert (current.id, current.status, current.reported_at, current.message) == (
        report.id,
        report.status,
        report.reported_at,
        report.message,
    )


@given(times)
def test_timestamps_are_normalised_to_utc(when: datetime) -> None:
    event = SecurityEventV1(id="a", source="s", occurred_at=when, kind="k", severity=Severity.LOW)
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.occurred_at == when


@given(st.binary(max_size=300))
def test_any_bytes_either_decode_or_are_rejected_with_a_reason(body: bytes) -> None:
    for domain, schema in SCHEMAS.items():
        if domain is Domain.FRAMES:
            continue
        for major in (*schema.versions, 7):
            try:
                decode(Subjects(), domain, f"{domain}.v{major}.x", body, max_bytes=200)
            except Rejected as exc:
                assert exc.reason in Reason
                assert exc.detail


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
    ],
)
def test_invalid_security_events_say_which_field(change: dict[str, object], reason: str) -> None:
    body = json.dumps({**_valid_security(), **change}).encode()
    with pytest.raises(Rejected) as info:
        decode(Subjects(), Domain.SECURITY, "security.v1.door-7", body, max_bytes=1 << 20)
    assert info.value.reason is Reason.SCHEMA_VIOLATION
    assert reason in info.value.detail or reason in str(info.value).lower()


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
