"""Cursors of the query API: what a page hands out, the next request reads back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from projections.queries import BadCursor, decode_cursor, encode_cursor


def test_a_cursor_round_trips() -> None:
    key = [datetime(2026, 11, 27, 9, 0, 1, 5, tzinfo=UTC), 12345]
    assert decode_cursor(encode_cursor(key), (datetime, int)) == key
    labels = [datetime(2026, 11, 27, 9, 0, tzinfo=UTC), "svc", "i-0", "cpu", {"queue": "a"}]
    assert decode_cursor(encode_cursor(labels), (datetime, str, str, str, dict)) == labels


@pytest.mark.parametrize(
    "cursor",
    [
        "not-base64!",
        encode_cursor([1, 2, 3]),  # wrong length
        encode_cursor(["2026-11-27T09:00:00+00:00", "12"]),  # wrong type
        encode_cursor(["yesterday", 12]),  # not a time
        encode_cursor([True, 12])[:-2],  # cut
    ],
)
def test_a_cursor_the_api_did_not_hand_out_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        decode_cursor(cursor, (datetime, int))
