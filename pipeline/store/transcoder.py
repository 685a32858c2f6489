"""A JSON transcoder for the event store: orjson speed, producers' JSON kept as sent.

Encoding writes byte for byte what `eventsourcing`'s `JSONTranscoder` writes (registered
types become `{"_type_": ..., "_data_": ...}`; finite floats in Python's notation),
several times faster: orjson writes the document, and the few documents where orjson's
notation of a float could differ from Python's (below 1e-4, or an exponent) are written
by `JSONTranscoder` itself.

Decoding turns those type marks back into their types, except under the `verbatim` keys
of an event's state: there the value is a producer's JSON (the Journal's `payload`),
returned exactly as it was written. A producer may send an object such as
`{"_type_": "datetime_iso", "_data_": "..."}`; it is data, never taken for a registered
type. Events stored before this rule read the same way (no payload ever held a
registered type: payloads are plain JSON).

orjson writes `uuid.UUID` values as plain strings, so event attributes must not be UUIDs
(the Journal's events carry none; the aggregate id is stored in its own column).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder

__all__ = ["OrjsonTranscoder"]

_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_MARK = b'"_type_":'


def _float_notation_may_differ(data: bytes) -> bool:
    """Whether orjson may have written a float unlike Python's `repr`.

    They differ only for magnitudes below 1e-4 (`0.00001` vs `1e-05`, `1.5e-7` vs
    `1.5e-07`): such a number holds `0.0000`, or a digit followed by `e-`. Only a number
    counts (its text starts after `:`, `,` or `[`, and a sign), not the same characters
    inside a string such as an id (`...5e-7...`); text that still looks like one costs a
    slower encoding, never a wrong one.
    """
    find = data.find
    at = find(b"e-")
    while at > 0:
        if 48 <= data[at - 1] <= 57 and _starts_a_number(data, at - 1, b"0123456789."):
            return True
        at = find(b"e-", at + 2)
    at = find(b"0.0000")
    while at > 0:
        if _starts_a_number(data, at, b""):
            return True
        at = find(b"0.0000", at + 6)
    return False


def _starts_a_number(data: bytes, at: int, digits: bytes) -> bool:
    """Whether the text that ends in `digits` before `at` starts right after a JSON
    delimiter (`:`, `,`, `[`, and a minus sign): a number, not part of a string."""
    start = at
    while start > 0 and data[start - 1] in digits:
        start -= 1
    if start > 0 and data[start - 1] == 45:  # a minus sign
        start -= 1
    return start > 0 and data[start - 1] in b":,["


class OrjsonTranscoder(JSONTranscoder):
    """`JSONTranscoder`'s format, orjson's speed; values under `verbatim` keys read as sent."""

    def __init__(self, verbatim: Iterable[str] = ()) -> None:
        super().__init__()
        self.verbatim = frozenset(verbatim)
        """Keys of an event's state whose values are never taken for registered types."""

    def encode(self, obj: Any) -> bytes:
        """Encode `obj` as `JSONTranscoder.encode` does, sending registered types through
        their transcodings."""
        try:
            data = orjson.dumps(obj, default=self._encode_obj, option=_OPTIONS)
        except orjson.JSONEncodeError:  # what orjson refuses: the stock encoder's verdict
            return super().encode(obj)
        if _float_notation_may_differ(data):
            return super().encode(obj)
        return data

    def encode_plain(self, obj: Any) -> bytes | None:
        """`encode(obj)` for an object of JSON types alone (registered types already in
        their `{"_type_": ..., "_data_": ...}` form), without a call back per value; None
        where `encode` itself must decide (another type, a float whose notation may
        differ, what orjson refuses)."""
        try:
            data = orjson.dumps(obj, option=_OPTIONS)
        except orjson.JSONEncodeError:
            return None
        return None if _float_notation_may_differ(data) else data

    def decode(self, data: bytes) -> Any:
        """Decode `data`: type marks become their registered types, except under `verbatim`
        keys of the top-level object, whose values come back exactly as written."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:  # what orjson refuses (NaN, huge integers) json reads
            obj = json.loads(data)
        marks = data.count(_MARK)
        if not marks:
            return obj
        if type(obj) is not dict:
            return self._walk(obj)
        if marks == 1:  # the usual event: only its timestamp is a registered type
            stamp = obj.get("timestamp")
            if type(stamp) is dict and stamp.get("_type_") == "datetime_iso" and len(stamp) == 2:
                # What the registered DatetimeAsISO does, without its lookups.
                obj["timestamp"] = datetime.fromisoformat(stamp["_data_"])
                return obj
        verbatim = self.verbatim
        for key, value in obj.items():
            if key not in verbatim and (type(value) is dict or type(value) is list):
                obj[key] = self._walk(value)
        return self._decode_obj(obj)

    def _walk(self, obj: Any) -> Any:
        if type(obj) is list:
            return [self._walk(v) for v in obj]
        if type(obj) is dict:
            return self._decode_obj({k: self._walk(v) for k, v in obj.items()})
        return obj
