"""Dead letters keep the original message whole."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import Reason
from pipeline.ingest.deadletter import DeadLetter

header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
    lambda n: not n.startswith("Pipeline-")
)
header_values = st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip)


@given(
    reason=st.sampled_from(Reason),
    detail=st.text(max_size=3000),
    body=st.binary(max_size=500),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    seq=st.integers(1, 2**40),
)
def test_headers_round_trip(
    reason: Reason, detail: str, body: bytes, headers: dict[str, str], seq: int
) -> None:
    letter = DeadLetter(
        reason=reason,
        detail=detail,
        subject="security.v1.x",
        stream="SECURITY",
        stream_seq=seq,
        delivered=2,
        body=body,
        headers=headers,
    )
    wire = letter.to_headers()
    assert wire["Nats-Msg-Id"] == f"dlq:SECURITY:{seq}"
    assert "\n" not in wire["Pipeline-Detail"] and len(wire["Pipeline-Detail"]) <= 1000
    back = DeadLetter.from_message(wire, body, dlq_seq=9)
    assert back.headers == headers
    assert (
        back.reason,
        back.subject,
        back.stream_seq,
        back.delivered,
        back.body,
        back.dlq_seq,
    ) == (
        reason,
        "security.v1.x",
        seq,
        2,
        body,
        9,
    )
