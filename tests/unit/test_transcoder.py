"""The orjson transcoder reads exactly what eventsourcing's JSONTranscoder reads."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, UUIDAsHex
from hypothesis import given
from hypothesis import strategies as st

from pipeline.store.transcoder import OrjsonTranscoder

_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_typed = st.sampled_from(
    [
        datetime(2026, 11, 27, 9, 0, 1, 5, tzinfo=UTC),
        uuid.UUID("6f4b1c9e-3a52-5d7e-9a41-0c8e2f5b7d13"),
        Decimal("12.50"),
    ]
)
_values = st.recursive(
    _plain | _typed,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def _pair() -> tuple[JSONTranscoder, OrjsonTranscoder]:
    stock, fast = JSONTranscoder(), OrjsonTranscoder()
    for transcoder in (stock, fast):
        for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
            transcoder.register(transcoding)
    return stock, fast


@given(st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_decoding_matches_the_stock_transcoder(state: dict[str, Any]) -> None:
    stock, fast = _pair()
    data = stock.encode(state)
    assert fast.decode(data) == stock.decode(data)


@given(st.dictionaries(st.text(max_size=8), _plain, max_size=4), _typed)
def test_events_with_a_typed_timestamp_decode_as_with_the_stock_transcoder(
    state: dict[str, Any], stamp: Any
) -> None:
    stock, fast = _pair()
    data = stock.encode({**state, "timestamp": stamp})
    assert fast.decode(data) == stock.decode(data)


def test_text_that_looks_like_a_transcoded_value_is_text() -> None:
    stock, fast = _pair()
    data = json.dumps(
        {
            "note": '{"_type_": "uuid_hex"}',
            "payload": {"_type_": "not-ours", "_data_": 1, "extra": 2},
            "at": {"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:00+00:00"},
        }
    ).encode()
    assert fast.decode(data) == stock.decode(data)
    assert fast.decode(data)["at"] == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def test_what_orjson_refuses_is_read_as_json_reads_it() -> None:
    stock, fast = _pair()
    data = b'{"value": NaN, "big": 123456789012345678901234567890}'
    decoded = fast.decode(data)
    assert decoded["big"] == stock.decode(data)["big"]
    assert decoded["value"] != decoded["value"]  # NaN
