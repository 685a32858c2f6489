"""Cursors of the query API: what a page hands out, the next request reads back; exact sums."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from projections.queries import BadCursor, decode_cursor, encode_cursor, exact


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
        encode_cursor(["2026-11-27T09:00:00", 12]),  # a time without its offset
        encode_cursor([True, 12])[:-2],  # cut
    ],
)
def test_a_cursor_the_api_did_not_hand_out_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        decode_cursor(cursor, (datetime, int))


@pytest.mark.parametrize(
    ("value", "digits"),
    [
        ("14019849096961617", "14019849096961617"),  # beyond 2^53: a double would round it
        ("1.4019849096961616E+16", "14019849096961616"),
        ("3.000", "3"),
        ("0.30", "0.3"),
        ("1E-7", "0.0000001"),
        ("-2.50", "-2.5"),
        ("1234567890123456789012345678901.5", "1234567890123456789012345678901.5"),  # > 28
    ],
)
def test_an_exact_sum_keeps_every_digit(value: str, digits: str) -> None:
    assert exact(Decimal(value)) == digits
    assert Decimal(exact(Decimal(value))) == Decimal(value)
