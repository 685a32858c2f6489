"""Logging: plain text lines for a terminal, JSON lines for a log collector.

Lines about one message carry its `domain`, `subject`, `stream_seq` and `message_id` as
fields (`extra=`); `PIPELINE_LOG_FORMAT=json` writes every field as a key of the line's
JSON object, the text format appends them as `key=value`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

__all__ = ["FIELDS", "JsonFormatter", "TextFormatter", "configure_logging"]

FIELDS = (
    "domain",
    "subject",
    "stream_seq",
    "message_id",
    "trace_id",
    "reason",
    "cause",
    "count",
    "request_id",
)
"""Structured fields the pipeline puts on its log lines, when they apply."""


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS if hasattr(record, name)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as a text line, its structured fields appended."""
        text = super().format(record)
        fields = _fields(record)
        if not fields:
            return text
        head, sep, rest = text.partition("\n")  # keep a traceback below the fields
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{head} {tail}{sep}{rest}"


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the root logger's records to stderr as text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
