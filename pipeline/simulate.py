"""Simulated producers: realistic security, monitoring and metrics traffic.

Mixes in duplicates (the same message published again) and bad messages of every kind
the pipeline dead-letters, and says for each message what the pipeline should do
with it, so tests and benchmarks can keep a ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from nats.js import JetStreamContext

from schemas import Domain
from streams import Subjects

__all__ = ["Expect", "Outgoing", "Traffic", "publish", "uuid7"]


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562) as a string."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 64 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


class Expect(StrEnum):
    """What the pipeline should do with a simulated message."""

    STORE = "store"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Outgoing:
    """One message to publish, and what should become of it."""

    subject: str
    body: bytes
    headers: dict[str, str]
    domain: Domain
    message_id: str
    expect: Expect
    reason: str = ""


_SOURCES = {
    Domain.SECURITY: ["door-1", "door-7", "gate-north", "lobby-cam", "vault"],
    Domain.MONITORING: ["api-gateway", "billing", "auth", "search"],
    Domain.METRICS: ["worker-1", "worker-2", "worker-3", "ingest"],
}
_KINDS = [
    ("badge.accepted", "info"),
    ("badge.rejected", "low"),
    ("door.held_open", "medium"),
    ("door.forced", "high"),
    ("motion.after_hours", "medium"),
    ("alarm.tamper", "critical"),
]


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Traffic:
    """Generates messages; `bad_ratio` and `duplicate_ratio` are fractions of all messages."""

    def __init__(
        self,
        subjects: Subjects,
        *,
        domains: tuple[Domain, ...] = (Domain.SECURITY, Domain.MONITORING, Domain.METRICS),
        duplicate_ratio: float = 0.02,
        bad_ratio: float = 0.01,
        oversize_bytes: int = 300 * 1024,
        seed: int | None = None,
    ) -> None:
        self.subjects = subjects
        self.domains = domains
        self.duplicate_ratio = duplicate_ratio
        self.bad_ratio = bad_ratio
        self.oversize_bytes = oversize_bytes
        self._rng = random.Random(seed)
        self._recent: list[Outgoing] = []

    def __iter__(self) -> Iterator[Outgoing]:
        while True:
            yield self.next()

    def next(self) -> Outgoing:
        """The next message: mostly valid, some duplicates, some bad."""
        roll = self._rng.random()
        if roll < self.bad_ratio:
            return self.bad()
        if roll < self.bad_ratio + self.duplicate_ratio and self._recent:
            return self.duplicate()
        return self.valid(self._rng.choice(self.domains))

    def valid(self, domain: Domain) -> Outgoing:
        """A valid message of the domain (monitoring alternates v1 and v2)."""
        source = self._rng.choice(_SOURCES[domain])
        message_id = uuid7()
        major = 1
        body: dict[str, Any]
        if domain is Domain.SECURITY:
            kind, severity = self._rng.choice(_KINDS)
            body = {
                "id": message_id,
                "source": source,
                "occurred_at": _now(),
                "kind": kind,
                "severity": severity,
                "zone": f"zone-{self._rng.randint(1, 9)}",
                "attributes": {"badge": f"B{self._rng.randint(1000, 9999)}", "attempt": 1},
            }
        elif domain is Domain.MONITORING:
            major = self._rng.choice((1, 2))
            body = self._health(message_id, source, major)
        else:
            body = {
                "id": message_id,
                "service": source,
                "instance": f"{source}-0",
                "collected_at": _now(),
                "samples": [
                    {"name": "cpu_usage", "value": round(self._rng.random(), 3), "unit": "ratio"},
                    {
                        "name": "queue_depth",
                        "value": float(self._rng.randint(0, 500)),
                        "labels": {"queue": "default"},
                    },
                ],
            }
        out = self._message(domain, major, source, message_id, json.dumps(body).encode())
        self._recent.append(out)
        del self._recent[:-1000]
        return out

    def _health(self, message_id: str, service: str, major: int) -> dict[str, Any]:
        status = self._rng.choices(["ok", "degraded", "down"], weights=[90, 8, 2])[0]
        base = {
            "id": message_id,
            "service": service,
            "instance": f"{service}-0",
            "reported_at": _now(),
            "status": status,
        }
        if major == 1:
            return {**base, "checks": {"db": status, "cache": "ok"}}
        latency = round(self._rng.uniform(0.5, 40), 2)
        return {
            **base,
            "schema_version": "2.0",
            "checks": [
                {"name": "db", "status": status, "latency_ms": latency},
                {"name": "cache", "status": "ok"},
            ],
        }

    def _message(
        self,
        domain: Domain,
        major: int,
        source: str,
        message_id: str,
        body: bytes,
        expect: Expect = Expect.STORE,
        reason: str = "",
    ) -> Outgoing:
        return Outgoing(
            subject=self.subjects.subject(domain, major, source),
            body=body,
            headers={"Nats-Msg-Id": message_id},
            domain=domain,
            message_id=message_id,
            expect=expect,
            reason=reason,
        )

    def duplicate(self, fresh_transport_id: bool | None = None) -> Outgoing:
        """A message published before, again: same Nats-Msg-Id, or a new one.

        A new transport id gets past JetStream's duplicate window, as a producer
        retrying after the window would; the pipeline must still store it once.
        """
        original = self._rng.choice(self._recent)
        if fresh_transport_id is None:
            fresh_transport_id = self._rng.random() < 0.5
        headers = dict(original.headers)
        if fresh_transport_id:
            headers["Nats-Msg-Id"] = f"{original.message_id}-retry-{uuid7()}"
        return Outgoing(
            original.subject,
            original.body,
            headers,
            original.domain,
            original.message_id,
            Expect.DUPLICATE,
        )

    def bad(self, reason: str | None = None) -> Outgoing:
        """A message the pipeline must dead-letter, with the reason it should give."""
        makers: dict[str, Callable[[str], Outgoing]] = {
            "invalid_json": lambda i: self._message(
                Domain.SECURITY,
                1,
                "door-1",
                i,
                b'{"id": "' + i.encode() + b'", "kind": ',
                Expect.DEAD_LETTER,
                "invalid_json",
            ),
            "schema_violation": lambda i: self._message(
                Domain.METRICS,
                1,
                "worker-1",
                i,
                json.dumps({"id": i, "service": "worker-1", "samples": []}).encode(),
                Expect.DEAD_LETTER,
                "schema_violation",
            ),
            "unsupported_version": lambda i: self._message(
                Domain.SECURITY,
                9,
                "door-1",
                i,
                json.dumps({"id": i}).encode(),
                Expect.DEAD_LETTER,
                "unsupported_version",
            ),
            "oversized": lambda i: self._message(
                Domain.MONITORING,
                2,
                "auth",
                i,
                json.dumps({"id": i, "message": "x" * self.oversize_bytes}).encode(),
                Expect.DEAD_LETTER,
                "oversized",
            ),
        }
        reason = reason or self._rng.choice(sorted(makers))
        return makers[reason](uuid7())


async def publish(
    js: JetStreamContext,
    messages: Iterator[Outgoing],
    *,
    rate: float | None = None,
    count: int | None = None,
    duration_s: float | None = None,
    on_published: Callable[[Outgoing], None] | None = None,
) -> Counter[str]:
    """Publish until `count` messages or `duration_s` seconds, at `rate` per second.

    Returns how many of each expectation were published.
    """
    counts: Counter[str] = Counter()
    started = time.monotonic()
    sent = 0
    window = 256
    while (count is None or sent < count) and (
        duration_s is None or time.monotonic() - started < duration_s
    ):
        out = next(messages)
        await js.publish_async(out.subject, out.body, headers=out.headers)
        counts[out.expect.value] += 1
        if on_published:
            on_published(out)
        sent += 1
        if sent % window == 0:
            await js.publish_async_completed()
        if rate:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    await js.publish_async_completed()
    return counts
