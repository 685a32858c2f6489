"""Subject names: one place builds and parses them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import Domain
from streams import SubjectError, Subjects

sources = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True)


@given(st.sampled_from(Domain), st.integers(1, 999), sources, st.sampled_from(["", "acme", "t-1"]))
def test_build_then_parse(domain: Domain, major: int, source: str, namespace: str) -> None:
    subjects = Subjects(namespace)
    parsed = subjects.parse(subjects.subject(domain, major, source))
    assert (parsed.domain, parsed.major, parsed.source) == (domain, major, source)


@pytest.mark.parametrize(
    "subject",
    [
        "security",
        "security.v1",
        "alarms.v1.x",
        "security.1.x",
        "security.v0.x",
        "security.vx.x",
        "security.v1.-x",
        "other.security.v1.x",
    ],
)
def test_malformed_subjects_are_refused(subject: str) -> None:
    with pytest.raises(SubjectError):
        Subjects().parse(subject)


def test_names_under_a_namespace() -> None:
    s = Subjects("acme")
    assert s.subject(Domain.SECURITY, 1, "door-7") == "acme.security.v1.door-7"
    assert s.wildcard(Domain.METRICS) == "acme.metrics.>"
    assert s.stream(Domain.FRAMES) == "ACME_FRAMES"
    assert s.dead_letter(Domain.MONITORING, 42, 1700) == "acme.dlq.monitoring.42.1700"
    assert s.dead_letters(Domain.MONITORING) == "acme.dlq.monitoring.>"
    assert s.dead_letter_stream() == "ACME_DLQ"
    assert s.durable(Domain.SECURITY) == "pipeline-security"
    with pytest.raises(SubjectError, match="namespace"):
        s.parse("security.v1.door-7")
    with pytest.raises(ValueError, match="namespace"):
        Subjects("Bad Name")
