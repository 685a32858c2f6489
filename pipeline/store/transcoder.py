"""A JSON transcoder for the event store that encodes with orjson.

It writes exactly what `eventsourcing`'s `JSONTranscoder` writes (registered types become
`{"_type_": ..., "_data_": ...}`) and reads with it, several times faster. orjson writes
`uuid.UUID` values as plain strings, so event attributes must not be UUIDs (the
Journal's events carry none; the aggregate id is stored in its own column).
"""

from __future__ import annotations

from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder

__all__ = ["OrjsonTranscoder"]

_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)


class OrjsonTranscoder(JSONTranscoder):
    """`JSONTranscoder` with an orjson encoder; decoding is unchanged."""

    def encode(self, obj: Any) -> bytes:
        """Encode `obj`, sending registered types through their transcodings."""
        return orjson.dumps(obj, default=self._encode_obj, option=_OPTIONS)
