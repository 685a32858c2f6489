"""The store writes each event directly as eventsourcing's mapper would, byte for byte,
for every kind of event and whatever JSON a producer sent; the mapper where the direct
way does not apply (a number orjson refuses, a float whose notation may differ)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.store.domain import aggregate_class
from pipeline.store.eventstore import Accepted, EventStore
from schemas import Domain

from .helpers import writer_store

KINDS = [
    (domain, name)
    for domain in Domain
    for name in ("Recorded", "FrameAnalyzed", "FrameSkipped")
    if hasattr(aggregate_class(domain), name)
]

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e-05, -1.5e-07, 0.00001234, 1e300, 0.1])
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def store() -> Iterator[EventStore]:
    with writer_store("t_store_encoding") as event_store:
        yield event_store


def _accepted(
    domain: Domain, received_at: datetime, payload: dict[str, Any], **more: Any
) -> Accepted:
    return Accepted(
        domain=domain,
        message_id="m-\u00e9-1",
        subject=f"{domain}.v1.x",
        stream_seq=42,
        schema_version="1.0",
        received_at=received_at,
        payload=payload,
        **more,
    )


def test_every_kind_of_event_has_a_direct_encoding() -> None:
    assert len(KINDS) >= 6  # each domain's Recorded, and the frames' two


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(KINDS),
    payload=st.dictionaries(st.text(max_size=10), _json, max_size=6),
    trace_id=st.sampled_from(["", "4bf92f3577b34da6a3ce929d0e0e4736"]),
    stamp=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_the_direct_encoding_is_the_mappers_byte_for_byte(
    store: EventStore,
    kind: tuple[Domain, str],
    payload: dict[str, Any],
    trace_id: str,
    stamp: datetime,
) -> None:
    domain, event = kind
    accepted = _accepted(domain, stamp, payload, event=event, trace_id=trace_id)
    assert store._to_stored(accepted) == store._mapped(accepted)


def test_a_time_zone_other_than_utc_is_written_as_the_mapper_writes_it(store: EventStore) -> None:
    stamp = datetime(2026, 11, 30, 9, 0, 0, 1, tzinfo=timezone(timedelta(hours=-5)))
    accepted = _accepted(Domain.SECURITY, stamp, {"a": 1})
    assert store._to_stored(accepted) == store._mapped(accepted)


def test_a_plain_payload_takes_the_direct_way(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(accepted: Accepted) -> None:
        raise AssertionError("the mapper was used")

    payload = {"name": "cpu", "value": 0.25, "labels": {"host": "a"}}
    accepted = _accepted(Domain.METRICS, datetime(2026, 11, 30, tzinfo=UTC), payload)
    expected = store._mapped(accepted)
    monkeypatch.setattr(store, "_mapped", refuse)
    assert store._to_stored(accepted) == expected
