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


def test_lines_about_a_traced_message_carry_its_trace_id() -> None:
    from types import SimpleNamespace

    from pipeline.ingest.intake import message_fields
    from schemas import Domain

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    msg = SimpleNamespace(
        subject="security.v1.door-7",
        reply="$JS.ACK.SECURITY.pipeline-security.1.42.42.1700000000000000000.0",
        headers={"Nats-Msg-Id": "m-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    fields = message_fields(Domain.SECURITY, msg)  # type: ignore[arg-type]
    assert fields["trace_id"] == trace_id and fields["stream_seq"] == 42
    line = json.loads(JsonFormatter().format(_record(**fields)))
    assert line["trace_id"] == trace_id
    untraced = SimpleNamespace(subject=msg.subject, reply=msg.reply, headers={})
    assert "trace_id" not in message_fields(Domain.SECURITY, untraced)  # type: ignore[arg-type]
