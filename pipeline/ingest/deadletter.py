"""Dead letters: rejected messages kept whole, with a reason, in the DLQ stream.

A dead letter carries the original body as its body and the original headers, plus
`Pipeline-*` headers for the reason, detail, original subject, stream and sequence.
Original `Nats-*` headers are kept as `Pipeline-Original-Nats-*` so they do not act
on the DLQ stream. It is published with `Nats-Msg-Id: dlq:<stream>:<seq>`, so a worker
that dies between the DLQ publish and the source ack cannot dead-letter a message twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from schemas import Domain
from streams import Subjects

from ..errors import DeadLetterUnavailable, Reason

__all__ = ["DeadLetter", "DeadLetters"]

H_REASON = "Pipeline-Reason"
H_DETAIL = "Pipeline-Detail"
H_SUBJECT = "Pipeline-Subject"
H_STREAM = "Pipeline-Stream"
H_SEQ = "Pipeline-Stream-Seq"
H_DELIVERED = "Pipeline-Delivered"
H_AT = "Pipeline-Dead-Lettered-At"
_ORIGINAL = "Pipeline-Original-"
_MAX_DETAIL = 1000


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_DETAIL else flat[: _MAX_DETAIL - 3] + "..."


@dataclass(frozen=True)
class DeadLetter:
    """A rejected message and why it was rejected."""

    reason: Reason
    detail: str
    subject: str
    stream: str
    stream_seq: int
    delivered: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    dead_lettered_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    dlq_seq: int | None = None
    """Sequence in the DLQ stream, once read back from it."""

    def to_headers(self) -> dict[str, str]:
        """Headers of the DLQ message."""
        headers = {
            (_ORIGINAL + k if k.startswith("Nats-") else k): v for k, v in self.headers.items()
        }
        headers.update(
            {
                H_REASON: self.reason.value,
                H_DETAIL: _one_line(self.detail),
                H_SUBJECT: self.subject,
                H_STREAM: self.stream,
                H_SEQ: str(self.stream_seq),
                H_DELIVERED: str(self.delivered),
                H_AT: self.dead_lettered_at.isoformat(),
                "Nats-Msg-Id": f"dlq:{self.stream}:{self.stream_seq}",
            }
        )
        return headers

    @classmethod
    def from_message(cls, headers: Mapping[str, str], body: bytes, dlq_seq: int) -> DeadLetter:
        """Read a dead letter back from a DLQ message."""
        original = {}
        for key, value in headers.items():
            if key.startswith(_ORIGINAL):
                original[key[len(_ORIGINAL) :]] = value
            elif not key.startswith(("Pipeline-", "Nats-")):
                original[key] = value
        return cls(
            reason=Reason(headers[H_REASON]),
            detail=headers.get(H_DETAIL, ""),
            subject=headers[H_SUBJECT],
            stream=headers.get(H_STREAM, ""),
            stream_seq=int(headers.get(H_SEQ, "0")),
            delivered=int(headers.get(H_DELIVERED, "0")),
            body=body,
            headers=original,
            dead_lettered_at=datetime.fromisoformat(headers[H_AT]),
            dlq_seq=dlq_seq,
        )


def _letter(raw: RawStreamMsg) -> DeadLetter:
    assert raw.seq is not None, "a stored message always has a sequence"
    return DeadLetter.from_message(raw.headers or {}, raw.data or b"", raw.seq)


class DeadLetters:
    """Publish, list, requeue and purge dead letters."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, timeout_s: float = 5.0) -> None:
        self._js = js
        self._subjects = subjects
        self._stream = subjects.dead_letter_stream()
        self._timeout_s = timeout_s

    async def publish(self, domain: Domain, letters: Sequence[DeadLetter]) -> None:
        """Publish dead letters and wait for the DLQ stream to acknowledge every one."""
        subject = self._subjects.dead_letter(domain)
        try:
            await asyncio.gather(
                *(
                    self._js.publish(
                        subject, letter.body, headers=letter.to_headers(), timeout=self._timeout_s
                    )
                    for letter in letters
                )
            )
        except (NatsError, TimeoutError) as exc:
            raise DeadLetterUnavailable(f"DLQ publish to {subject} failed: {exc!r}") from exc

    async def list(self, domain: Domain | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters in stream order, optionally of one domain."""
        if domain is None:
            subject = self._subjects.dead_letter_wildcard()
        else:
            subject = self._subjects.dead_letter(domain)
        out: list[DeadLetter] = []
        seq = 1
        while len(out) < limit:
            try:
                raw = await self._js.get_msg(self._stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            letter = _letter(raw)
            out.append(letter)
            seq = (letter.dlq_seq or seq) + 1
        return out

    async def get(self, dlq_seq: int) -> DeadLetter:
        """One dead letter by its DLQ sequence; `NotFoundError` if there is none."""
        return _letter(await self._js.get_msg(self._stream, seq=dlq_seq))

    async def requeue(self, dlq_seq: int) -> str:
        """Publish a dead letter back to its original subject, then delete it from the DLQ."""
        letter = await self.get(dlq_seq)
        headers = dict(letter.headers)
        # A fresh transport id: the original may still be inside the duplicate window.
        headers["Nats-Msg-Id"] = f"requeue:{self._stream}:{dlq_seq}"
        await self._js.publish(
            letter.subject, letter.body, headers=headers, timeout=self._timeout_s
        )
        await self._js.delete_msg(self._stream, dlq_seq)
        return letter.subject

    async def purge(self, domain: Domain | None = None) -> None:
        """Delete every dead letter, or those of one domain."""
        subject = self._subjects.dead_letter(domain) if domain else None
        await self._js.purge_stream(self._stream, subject=subject)
