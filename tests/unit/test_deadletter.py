"""Dead letters keep the original message whole, or say exactly what they left out."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import Reason
from pipeline.ingest.deadletter import DeadLetter, _size

header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
    lambda n: not n.startswith("Pipeline-")
)
header_values = st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip)


def _letter(body: bytes, headers: dict[str, str], detail: str = "bad", seq: int = 7) -> DeadLetter:
    return DeadLetter(
        reason=Reason.OVERSIZED,
        detail=detail,
        subject="frames.v1.cam-1",
        stream="FRAMES",
        stream_seq=seq,
        stored_ns=1_700_000_000_123_456_789,
        delivered=2,
        body=body,
        headers=headers,
    )


@given(
    reason=st.sampled_from(Reason),
    detail=st.text(max_size=3000),
    body=st.binary(max_size=500),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    seq=st.integers(1, 2**40),
    stored_ns=st.integers(0, 2**63 - 1),
)
def test_headers_round_trip(
    reason: Reason, detail: str, body: bytes, headers: dict[str, str], seq: int, stored_ns: int
) -> None:
    letter = DeadLetter(
        reason=reason,
        detail=detail,
        subject="security.v1.x",
        stream="SECURITY",
        stream_seq=seq,
        stored_ns=stored_ns,
        delivered=2,
        body=body,
        headers=headers,
    )
    wire = letter.to_headers()
    assert not any(k.startswith("Nats-") for k in wire), "no header may act on the DLQ stream"
    assert "\n" not in wire["Pipeline-Detail"] and len(wire["Pipeline-Detail"]) <= 1000
    back = DeadLetter.from_message(wire, body, dlq_seq=9)
    assert back.headers == headers
    assert (back.reason, back.subject, back.stream_seq, back.stored_ns) == (
        reason,
        "security.v1.x",
        seq,
        stored_ns,
    )
    assert (back.delivered, back.body, back.dlq_seq, back.cut) == (2, body, 9, False)


@given(
    body=st.binary(max_size=5000),
    headers=st.dictionaries(header_names, st.text(max_size=2000), max_size=8),
    max_payload=st.integers(2048, 8192),
)
def test_a_letter_is_fitted_to_the_servers_limit_and_says_what_it_left_out(
    body: bytes, headers: dict[str, str], max_payload: int
) -> None:
    letter = _letter(body, headers)
    fitted = letter.fitted(max_payload)
    wire = fitted.to_headers()
    assert _size(wire) + len(fitted.body) <= max_payload
    if fitted is letter:  # it fitted whole
        assert _size(letter.to_headers()) + len(body) <= max_payload
        return
    assert fitted.cut
    back = DeadLetter.from_message(wire, fitted.body, dlq_seq=1)
    assert back.headers in ({}, headers)
    assert back.headers_dropped == (back.headers != headers)
    assert body.startswith(back.body)
    if back.body != body:
        assert back.body_bytes == len(body)
        assert back.body_sha256 == hashlib.sha256(body).hexdigest()


def test_a_frame_near_max_payload_keeps_its_body_whole_when_it_fits() -> None:
    body = b"\xff\xd8\xff" + bytes(8 * 1024**2 - 3)  # 8 MiB, under a 9 MiB max_payload
    assert _letter(body, {"Frame-Id": "f1"}).fitted(9 * 1024**2).body is body
    cut = _letter(body + bytes(1024**2), {"Frame-Id": "f1"}).fitted(9 * 1024**2)
    assert cut.body_bytes == 9 * 1024**2 and len(cut.body) < 9 * 1024**2


@given(body=st.binary(max_size=3000), limit=st.integers(0, 2000))
def test_a_body_over_the_limit_is_left_out_and_its_hash_and_length_kept(
    body: bytes, limit: int
) -> None:
    letter = _letter(body, {"Frame-Id": "f1"})
    bounded = letter.bounded(limit)
    back = DeadLetter.from_message(bounded.to_headers(), bounded.body, dlq_seq=1)
    assert back.headers == {"Frame-Id": "f1"}
    if len(body) <= limit:
        assert bounded is letter and not back.cut
        return
    assert back.body == b"" and back.cut
    assert back.body_bytes == len(body) and back.body_limit == limit
    assert back.body_sha256 == hashlib.sha256(body).hexdigest()
    assert bounded.to_headers()["Pipeline-Body-Limit"] == str(limit)


def test_the_least_letter_keeps_the_reason_and_the_bodys_hash() -> None:
    body = b"\xff\xd8\xff" + bytes(5000)
    least = _letter(body, {"Frame-Id": "f1"}).fitted(4096).least()
    assert (least.body, least.headers, least.headers_dropped) == (b"", {}, True)
    assert least.body_bytes == len(body)
    assert least.body_sha256 == hashlib.sha256(body).hexdigest()
    assert least.reason is Reason.OVERSIZED and least.stream_seq == 7
