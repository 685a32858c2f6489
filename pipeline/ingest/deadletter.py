"""Dead letters: rejected messages kept whole, with a reason, in the DLQ stream.

A dead letter carries the original body as its body and the original headers, plus
`Pipeline-*` headers for the reason, detail, original subject, stream and sequence.
Original `Nats-*` headers are kept as `Pipeline-Original-Nats-*` so they do not act
on the DLQ stream.

Each letter has a subject of its own, named after its source message's stream sequence
and storage time, and the DLQ stream keeps one message per subject (discarding later
ones): a worker that dies between the DLQ publish and the source ack cannot
dead-letter a message twice, however late the redelivery comes.

A letter keeps a body of at most `max_body_bytes` (a setting, so that a camera sending
bad frames cannot fill the DLQ stream with megabytes each): a longer body is left out,
and the letter records its length and SHA-256 and the limit (`Pipeline-Body-Limit`).
A letter must also fit the server's `max_payload` and the DLQ stream's largest message.
When the original body and headers do not leave room, the original headers are dropped
first, then the body is cut; the letter then records the body's full length and
SHA-256. Either way it cannot be requeued.

A DLQ stream that refuses a letter (full, or down) raises `DeadLetterUnavailable`: the
domain pauses and the source message stays unacked until the letter is written.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from schemas import Domain
from streams import Subjects
from streams.definitions import LETTER_HEADER_BYTES

from ..errors import DeadLetterUnavailable, PipelineError, Reason

__all__ = ["DeadLetter", "DeadLetters"]

H_REASON = "Pipeline-Reason"
H_DETAIL = "Pipeline-Detail"
H_SUBJECT = "Pipeline-Subject"
H_STREAM = "Pipeline-Stream"
H_SEQ = "Pipeline-Stream-Seq"
H_DELIVERED = "Pipeline-Delivered"
H_AT = "Pipeline-Dead-Lettered-At"
H_STORED = "Pipeline-Stream-Time-Ns"
H_BODY_BYTES = "Pipeline-Body-Bytes"
H_BODY_SHA256 = "Pipeline-Body-Sha256"
H_HEADERS_DROPPED = "Pipeline-Headers-Dropped"
H_BODY_LIMIT = "Pipeline-Body-Limit"
_ORIGINAL = "Pipeline-Original-"
_MAX_DETAIL = 1000
_SUBJECT_LIMIT = 10077
"""JetStream's error code for a store refusal: a subject already holding its one message
(the letter is there), but also a full stream (the letter is not)."""
_SUBJECT_HOLDS_ONE = "per subject"
"""In the description of the refusal that means the letter is there already."""
_TOO_LARGE = 10054
"""JetStream's error code for a message over the stream's `max_msg_size`."""
_ROOM = 512
"""Bytes kept free for the protocol line and the headers added when a letter is cut."""


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
    stored_ns: int = 0
    """When the source stream stored the message (with `stream_seq`, the letter's identity)."""
    dead_lettered_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    dlq_seq: int | None = None
    """Sequence in the DLQ stream, once read back from it."""
    body_bytes: int | None = None
    """Length of the original body when the letter holds only its start (else None)."""
    body_sha256: str = ""
    """SHA-256 of the original body when the letter holds only its start."""
    headers_dropped: bool = False
    """The original headers did not fit the server's limit and were left out."""
    body_limit: int | None = None
    """The body was longer than this limit of the DLQ and was left out (else None)."""

    @property
    def cut(self) -> bool:
        """Whether the letter lacks part of the original (body or headers)."""
        return self.body_bytes is not None or self.headers_dropped

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
                H_STORED: str(self.stored_ns),
                H_DELIVERED: str(self.delivered),
                H_AT: self.dead_lettered_at.isoformat(),
            }
        )
        if self.body_bytes is not None:
            headers[H_BODY_BYTES] = str(self.body_bytes)
            headers[H_BODY_SHA256] = self.body_sha256
        if self.headers_dropped:
            headers[H_HEADERS_DROPPED] = "true"
        if self.body_limit is not None:
            headers[H_BODY_LIMIT] = str(self.body_limit)
        return headers

    def bounded(self, max_body_bytes: int) -> DeadLetter:
        """This letter without its body when that is over `max_body_bytes` (its length
        and SHA-256 kept)."""
        if len(self.body) <= max_body_bytes or self.body_bytes is not None:
            return self
        return replace(
            self,
            body=b"",
            body_bytes=len(self.body),
            body_sha256=hashlib.sha256(self.body).hexdigest(),
            body_limit=max_body_bytes,
        )

    def least(self) -> DeadLetter:
        """This letter with neither body nor original headers (the body's length and
        SHA-256 kept): the smallest it can be."""
        return replace(
            self.bounded(0),
            body=b"",
            headers={},
            headers_dropped=self.headers_dropped or bool(self.headers),
        )

    def fitted(self, max_payload: int) -> DeadLetter:
        """This letter, cut to fit a server that takes at most `max_payload` bytes."""
        if _size(self.to_headers()) + len(self.body) + _ROOM <= max_payload:
            return self
        letter = self
        if _size(self.to_headers()) + _ROOM > max_payload // 2:
            letter = replace(letter, headers={}, headers_dropped=True)
        room = max_payload - _size(letter.to_headers()) - 2 * _ROOM
        if len(letter.body) <= room:
            return letter
        return replace(
            letter,
            body=letter.body[: max(room, 0)],
            body_bytes=len(self.body),
            body_sha256=hashlib.sha256(self.body).hexdigest(),
        )

    @classmethod
    def from_message(cls, headers: Mapping[str, str], body: bytes, dlq_seq: int) -> DeadLetter:
        """Read a dead letter back from a DLQ message."""
        original = {}
        for key, value in headers.items():
            if key.startswith(_ORIGINAL):
                original[key[len(_ORIGINAL) :]] = value
            elif not key.startswith(("Pipeline-", "Nats-")):
                original[key] = value
        body_bytes = headers.get(H_BODY_BYTES)
        body_limit = headers.get(H_BODY_LIMIT)
        return cls(
            reason=Reason(headers[H_REASON]),
            detail=headers.get(H_DETAIL, ""),
            subject=headers[H_SUBJECT],
            stream=headers.get(H_STREAM, ""),
            stream_seq=int(headers.get(H_SEQ, "0")),
            stored_ns=int(headers.get(H_STORED, "0")),
            delivered=int(headers.get(H_DELIVERED, "0")),
            body=body,
            headers=original,
            dead_lettered_at=datetime.fromisoformat(headers[H_AT]),
            dlq_seq=dlq_seq,
            body_bytes=int(body_bytes) if body_bytes is not None else None,
            body_sha256=headers.get(H_BODY_SHA256, ""),
            headers_dropped=headers.get(H_HEADERS_DROPPED) == "true",
            body_limit=int(body_limit) if body_limit is not None else None,
        )


def _size(headers: Mapping[str, str]) -> int:
    """Bytes of a NATS header block (`NATS/1.0`, one `key: value` line each, a blank line)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _letter(raw: RawStreamMsg) -> DeadLetter:
    assert raw.seq is not None, "a stored message always has a sequence"
    return DeadLetter.from_message(raw.headers or {}, raw.data or b"", raw.seq)


class DeadLetters:
    """Publish, list, requeue and purge dead letters."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        max_payload: int = 1024 * 1024,
        max_body_bytes: int | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._stream = subjects.dead_letter_stream()
        self._max_body_bytes = max_body_bytes
        self._max_letter_bytes = max_payload
        if max_body_bytes is not None:  # the DLQ stream's `max_msg_size` (streams.definitions)
            self._max_letter_bytes = min(max_payload, max_body_bytes + LETTER_HEADER_BYTES)
        self._timeout_s = timeout_s

    async def publish(self, domain: Domain, letters: Sequence[DeadLetter]) -> list[bool]:
        """Publish dead letters and wait for the DLQ stream to hold every one; for each,
        whether it was written now (False: the stream held it already).

        A letter already in the stream (its source was dead-lettered before) is not
        written again. Raises `DeadLetterUnavailable` when the stream does not answer.
        """
        return list(await asyncio.gather(*(self._publish(domain, letter) for letter in letters)))

    async def _publish(self, domain: Domain, letter: DeadLetter) -> bool:
        if self._max_body_bytes is not None:
            letter = letter.bounded(self._max_body_bytes)
        letter = letter.fitted(self._max_letter_bytes)
        subject = self._subjects.dead_letter(domain, letter.stream_seq, letter.stored_ns)
        try:
            try:
                await self._js.publish(
                    subject, letter.body, headers=letter.to_headers(), timeout=self._timeout_s
                )
            except APIError as exc:
                if exc.err_code != _TOO_LARGE:
                    raise
                # The stream takes smaller letters than this worker was told (its
                # max_msg_size was set by hand or by another release): the smallest letter.
                least = letter.least()
                await self._js.publish(
                    subject, least.body, headers=least.to_headers(), timeout=self._timeout_s
                )
        except APIError as exc:
            if exc.err_code == _SUBJECT_LIMIT and _SUBJECT_HOLDS_ONE in (exc.description or ""):
                return False  # written before, by this or another worker
            # Full ("maximum bytes exceeded") or down: the domain pauses until it takes it.
            raise DeadLetterUnavailable(
                f"DLQ publish to {subject} failed: {exc.description or exc!r}"
            ) from exc
        except (NatsError, TimeoutError) as exc:
            raise DeadLetterUnavailable(f"DLQ publish to {subject} failed: {exc!r}") from exc
        return True

    async def list(self, domain: Domain | None = None, limit: int | None = 100) -> list[DeadLetter]:
        """Dead letters in stream order, optionally of one domain; the first `limit`
        (None: all)."""
        if domain is None:
            subject = self._subjects.dead_letter_wildcard()
        else:
            subject = self._subjects.dead_letters(domain)
        out: list[DeadLetter] = []
        seq = 1
        while limit is None or len(out) < limit:
            try:
                raw = await self._js.get_msg(self._stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            letter = _letter(raw)
            out.append(letter)
            seq = (letter.dlq_seq or seq) + 1
        return out

    async def count(self, domain: Domain | None = None) -> int:
        """How many dead letters the DLQ holds, or how many of one domain."""
        if domain is None:
            return (await self._js.stream_info(self._stream)).state.messages
        # Each letter has a subject of its own: a consumer counts them, where the
        # stream's per-subject counts would list every one.
        info = await self._js.add_consumer(
            self._stream,
            ConsumerConfig(
                filter_subject=self._subjects.dead_letters(domain),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=10.0,
                mem_storage=True,
            ),
        )
        try:
            return info.num_pending or 0
        finally:
            await self._js.delete_consumer(self._stream, info.name)

    async def adopt_legacy(self) -> int:
        """Give letters of earlier releases (a domain's all on one subject) subjects of their own.

        Run before the DLQ stream keeps one message per subject: that limit would drop
        all but the last letter of each old subject. Returns how many letters moved.
        """
        moved = 0
        for domain in Domain:
            subject = self._subjects.legacy_dead_letters(domain)
            while True:
                try:
                    raw = await self._js.get_msg(self._stream, seq=1, subject=subject, next=True)
                except NotFoundError:
                    break
                await self._publish(domain, _letter(raw))
                assert raw.seq is not None
                await self._js.delete_msg(self._stream, raw.seq)
                moved += 1
        return moved

    async def get(self, dlq_seq: int) -> DeadLetter:
        """One dead letter by its DLQ sequence; `NotFoundError` if there is none."""
        return _letter(await self._js.get_msg(self._stream, seq=dlq_seq))

    async def requeue(self, dlq_seq: int) -> str:
        """Publish a dead letter back to its original subject, then delete it from the DLQ."""
        letter = await self.get(dlq_seq)
        if letter.cut:
            raise PipelineError(
                f"dead letter #{dlq_seq} holds only part of its original message "
                "(it did not fit the server's max_payload) and cannot be requeued"
            )
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
        subject = self._subjects.dead_letters(domain) if domain else None
        await self._js.purge_stream(self._stream, subject=subject)
