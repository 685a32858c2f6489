"""The orjson transcoder writes exactly what eventsourcing's JSONTranscoder writes and reads
it back the same way, except under its verbatim keys, which read back as written."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, UUIDAsHex
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.store.eventstore import event_mapper
from pipeline.store.transcoder import OrjsonTranscoder

_marks = st.builds(
    lambda name, data: {"_type_": name, "_data_": data},
    st.sampled_from(["datetime_iso", "decimal_str", "uuid_hex", "nope", ""]),
    st.sampled_from(["2026-11-27T09:00:00+00:00", "12.50", "6f4b1c9e3a525d7e9a410c8e2f5b7d13", 1]),
)
"""Objects a producer may send that look like the transcoder's type marks."""

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        | _marks
    ),
    max_leaves=20,
)
"""Plain JSON values, as producers send them (finite numbers, 64-bit integers)."""

_typed = st.sampled_from(
    [
        datetime(2026, 11, 27, 9, 0, 1, 5, tzinfo=UTC),
        uuid.UUID("6f4b1c9e-3a52-5d7e-9a41-0c8e2f5b7d13"),
        Decimal("12.50"),
    ]
)
_written = st.sampled_from([datetime(2026, 11, 27, 9, 0, 1, 5, tzinfo=UTC), Decimal("12.50")])
"""The registered types events hold (orjson writes a `uuid.UUID` as a plain string, so
event attributes are never UUIDs; the aggregate id has its own column)."""
_events = st.recursive(
    _json | _written,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_values = st.recursive(
    _json | _typed,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def _pair(verbatim: tuple[str, ...] = ()) -> tuple[JSONTranscoder, OrjsonTranscoder]:
    stock, fast = JSONTranscoder(), OrjsonTranscoder(verbatim)
    for transcoder in (stock, fast):
        for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
            transcoder.register(transcoding)
    return stock, fast


@given(st.dictionaries(st.text(max_size=8), _events, max_size=6))
@example({"small": 1e-05, "smaller": 1.5e-07, "big": 1e16, "exp": 1e-300})
@example({"negative": [-1e-05, -0.00012], "id": "0190f2b0-8335e-7a1b"})
@example({"text": "1e-5 and 0.00001 as text", "n": 0.1})
def test_encoding_is_the_stock_transcoders_byte_for_byte(state: dict[str, Any]) -> None:
    stock, fast = _pair(("payload",))
    assert fast.encode(state) == stock.encode(state)


@given(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "payload"), _values, max_size=6))
def test_decoding_outside_the_verbatim_keys_is_the_stock_transcoders(
    state: dict[str, Any],
) -> None:
    stock, fast = _pair(("payload",))
    try:
        data = stock.encode(state)
        expected = stock.decode(data)
    except Exception:  # a mark of a type nobody registered: the stock reader refuses it too
        return
    assert fast.decode(data) == expected


@given(_json, _written)
@example({"_type_": "nope", "_data_": "x"}, datetime(2026, 11, 27, tzinfo=UTC))
@example({"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:00+00:00"}, Decimal("1"))
@example({"a": [{"_type_": "decimal_str", "_data_": "12.50"}]}, Decimal("1"))
def test_a_producers_json_under_a_verbatim_key_reads_back_as_written(
    payload: Any, stamp: Any
) -> None:
    _, fast = _pair(("payload",))
    state = {"timestamp": stamp, "payload": payload, "note": "n"}
    decoded = fast.decode(fast.encode(state))
    assert decoded["payload"] == payload
    assert decoded["timestamp"] == stamp


def test_the_journals_transcoder_keeps_payloads_verbatim() -> None:
    transcoder = event_mapper().transcoder
    stamp = {"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:00+00:00"}
    data = json.dumps({"timestamp": stamp, "payload": {"attributes": stamp}}).encode()
    decoded = transcoder.decode(data)
    assert decoded["timestamp"] == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    assert decoded["payload"] == {"attributes": stamp}


def test_text_that_looks_like_a_type_mark_is_text() -> None:
    stock, fast = _pair(("payload",))
    data = json.dumps(
        {
            "note": '{"_type_": "uuid_hex"}',
            "at": {"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:00+00:00"},
        }
    ).encode()
    assert fast.decode(data) == stock.decode(data)
    assert fast.decode(data)["at"] == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize("verbatim", [(), ("payload",)])
def test_what_orjson_refuses_is_read_as_json_reads_it(verbatim: tuple[str, ...]) -> None:
    _, fast = _pair(verbatim)
    mark = {"_type_": "nope", "_data_": 1}
    data = json.dumps({"value": float("nan"), "big": 2**100, "payload": mark}).encode()
    decoded = fast.decode(data) if verbatim else None
    if decoded is None:  # without verbatim keys, the mark is taken for a type: refused
        with pytest.raises(Exception, match="nope"):
            fast.decode(data)
        return
    assert decoded["big"] == 2**100
    assert decoded["value"] != decoded["value"]  # NaN
    assert decoded["payload"] == mark
