"""Log lines as text for a terminal, or JSON objects for a collector, with message fields."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.logs import JsonFormatter, TextFormatter, configure_logging


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("pipeline.x", logging.WARNING, __file__, 1, "held %d", (3,), None)
    record.__dict__.update(fields)
    return record


def test_json_lines_carry_the_message_fields() -> None:
    fields = {"domain": "security", "subject": "security.v1.d", "stream_seq": 7, "message_id": "m"}
    line = json.loads(JsonFormatter().format(_record(**fields)))
    assert line["message"] == "held 3" and line["level"] == "WARNING"
    assert {k: line[k] for k in fields} == fields
    assert line["time"].endswith("+00:00")


def test_text_lines_append_the_fields() -> None:
    text = TextFormatter().format(_record(domain="metrics", stream_seq=9))
    assert text.endswith("pipeline.x: held 3 domain=metrics stream_seq=9")


@pytest.mark.parametrize(("fmt", "kind"), [("json", JsonFormatter), ("text", TextFormatter)])
def test_the_format_is_chosen_by_the_setting(fmt: str, kind: type) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", fmt)
        assert [type(h.formatter) for h in root.handlers] == [kind]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
