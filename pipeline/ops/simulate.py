"""Simulated producers: security, monitoring and metrics traffic, and cameras.

Mixes in duplicates (the same message published again) and bad messages of every kind
the pipeline dead-letters, and says for each message what the pipeline should do
with it, so tests and benchmarks can keep a ledger.
"""

from __future__ import annotations

import asyncio
import functools
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
from nats.js.api import PubAck

from schemas import (
    Detection,
    Domain,
    FrameAnalyzedV1,
    FrameEncoding,
    FrameMetaV1,
    FrameSkippedV1,
    ModelProvenance,
)
from streams import Subjects

from ..ingest.codec import decode
from ..store.eventstore import Accepted

__all__ = ["Cameras", "Expect", "Outgoing", "Traffic", "publish", "stored_events", "uuid7"]


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
_ROUTINE_KINDS = [("badge.accepted", "info"), ("motion.after_hours", "medium")]
_ROUTINE_WEIGHTS = [4, 1]
"""Routine traffic's security events: what no rule of the example sites file takes (the
demo's incidents come from `scenes.Scenes`)."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Traffic:
    """Generates messages; `bad_ratio` and `duplicate_ratio` are fractions of all messages.

    `routine` traffic has none of the events the example sites file's rules take: its
    security events are granted badges and motion after hours, its services never report
    `down` (the demo plays its incidents apart, `scenes.Scenes`). Otherwise every kind of
    security event is as likely, and 2 % of health reports say `down`.
    """

    def __init__(
        self,
        subjects: Subjects,
        *,
        domains: tuple[Domain, ...] = (Domain.SECURITY, Domain.MONITORING, Domain.METRICS),
        duplicate_ratio: float = 0.02,
        bad_ratio: float = 0.01,
        oversize_bytes: int = 300 * 1024,
        routine: bool = False,
        seed: int | None = None,
    ) -> None:
        self.subjects = subjects
        self.routine = routine
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
            kind, severity = self._kind()
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

    def _kind(self) -> tuple[str, str]:
        if self.routine:
            return self._rng.choices(_ROUTINE_KINDS, weights=_ROUTINE_WEIGHTS)[0]
        return self._rng.choice(_KINDS)

    def _health(self, message_id: str, service: str, major: int) -> dict[str, Any]:
        weights = [92, 8, 0] if self.routine else [90, 8, 2]
        status = self._rng.choices(["ok", "degraded", "down"], weights=weights)[0]
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


class Cameras:
    """Cameras publishing real images: the sample photos shipped with Ultralytics,
    cropped, resized and brightness-jittered per frame, JPEG- or PNG-encoded.

    `bad()` makes the frames the pipeline must dead-letter, with the reason it should
    give; `duplicate()` re-sends a frame already published.
    """

    def __init__(
        self,
        subjects: Subjects,
        *,
        cameras: int = 2,
        width: int = 640,
        height: int = 480,
        encoding: FrameEncoding = FrameEncoding.JPEG,
        variants: int = 16,
        seed: int | None = None,
    ) -> None:
        from ..detection.extra import require

        require("--cameras", "simulated cameras", ("cv2", "ultralytics"), "--cameras 0")
        import cv2

        self.subjects = subjects
        self.names = [f"cam-{i + 1:02d}" for i in range(cameras)]
        self.width = width
        self.height = height
        self.encoding = FrameEncoding(encoding)
        self._rng = random.Random(seed)
        self._sequence: Counter[str] = Counter()
        self._recent: list[Outgoing] = []
        sources = [cv2.imread(str(p)) for p in sample_images()]
        # Encoding costs milliseconds: a fixed set of jittered variants is made up front.
        self._bodies = [self._render(sources[i % len(sources)]) for i in range(variants)]

    def _render(self, image: Any) -> bytes:
        import cv2

        h, w = image.shape[:2]
        crop = self._rng.uniform(0.7, 1.0)
        ch, cw = int(h * crop), int(w * crop)
        y, x = self._rng.randint(0, h - ch), self._rng.randint(0, w - cw)
        frame = cv2.resize(image[y : y + ch, x : x + cw], (self.width, self.height))
        frame = cv2.convertScaleAbs(frame, alpha=self._rng.uniform(0.8, 1.2))
        ext = ".jpg" if self.encoding is FrameEncoding.JPEG else ".png"
        ok, encoded = cv2.imencode(ext, frame)
        assert ok
        return bytes(encoded.tobytes())

    def __iter__(self) -> Iterator[Outgoing]:
        while True:
            yield self.frame()

    def frame(self, camera: str | None = None, *, body: bytes | None = None) -> Outgoing:
        """The next frame of a camera (round robin when not given)."""
        total = sum(self._sequence.values())
        camera = camera or self.names[total % len(self.names)]
        meta = FrameMetaV1(
            id=uuid7(),
            camera=camera,
            sequence=self._sequence[camera],
            captured_at=datetime.now(UTC),
            width=self.width,
            height=self.height,
            encoding=self.encoding,
        )
        self._sequence[camera] += 1
        out = Outgoing(
            subject=self.subjects.subject(Domain.FRAMES, 1, camera),
            body=body if body is not None else self._rng.choice(self._bodies),
            headers=meta.to_headers(),
            domain=Domain.FRAMES,
            message_id=meta.id,
            expect=Expect.STORE,
        )
        self._recent.append(out)
        del self._recent[:-100]
        return out

    def duplicate(self) -> Outgoing:
        """A frame published before, again, with a fresh transport id (past the window)."""
        original = self._rng.choice(self._recent)
        headers = {**original.headers, "Nats-Msg-Id": f"{original.message_id}-retry-{uuid7()}"}
        return Outgoing(
            original.subject,
            original.body,
            headers,
            Domain.FRAMES,
            original.message_id,
            Expect.DUPLICATE,
        )

    def bad(self, reason: str) -> Outgoing:
        """A frame the pipeline must dead-letter for `reason`: undecodable_image,
        dimension_mismatch or schema_violation."""
        good = self.frame()
        self._recent.pop()
        headers = dict(good.headers)
        body = good.body
        if reason == "undecodable_image":  # the right magic bytes, then garbage
            body = body[:16] + bytes(self._rng.getrandbits(8) for _ in range(64))
        elif reason == "dimension_mismatch":
            headers["Frame-Width"] = str(self.width // 2)
        elif reason == "schema_violation":
            del headers["Frame-Captured-At"]
        else:
            raise ValueError(f"no bad frame for {reason!r}")
        return Outgoing(
            good.subject, body, headers, Domain.FRAMES, good.message_id, Expect.DEAD_LETTER, reason
        )


def sample_images() -> list[Any]:
    """The sample photos shipped with the ultralytics package."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ultralytics")  # found without importing torch
    assert spec is not None and spec.origin is not None, "ultralytics is not installed"
    folder = Path(spec.origin).parent / "assets"
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no sample images in {folder}")
    return images


async def publish(
    js: JetStreamContext,
    messages: Iterator[Outgoing],
    *,
    rate: float | None = None,
    count: int | None = None,
    duration_s: float | None = None,
    on_published: Callable[[Outgoing], None] | None = None,
    on_acked: Callable[[Outgoing, PubAck], None] | None = None,
) -> Counter[str]:
    """Publish until `count` messages or `duration_s` seconds, at `rate` per second.

    Returns how many of each expectation were published. `on_acked` is called with each
    message the stream acknowledged (`duplicate` when its duplicate window dropped it).
    """
    counts: Counter[str] = Counter()
    started = time.monotonic()
    sent = 0
    window = 256
    while (count is None or sent < count) and (
        duration_s is None or time.monotonic() - started < duration_s
    ):
        out = next(messages)
        acked = await js.publish_async(out.subject, out.body, headers=out.headers)
        if on_acked:
            acked.add_done_callback(functools.partial(_acked, on_acked, out))
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


def _acked(
    callback: Callable[[Outgoing, PubAck], None], out: Outgoing, ack: asyncio.Future[PubAck]
) -> None:
    if not ack.cancelled() and ack.exception() is None:
        callback(out, ack.result())


_LABELS = ("person", "car", "bicycle", "dog", "truck")
_MODEL = ModelProvenance(
    name="yolov8n",
    format="onnx",
    sha256="0" * 64,
    imgsz=640,
    conf=0.25,
    iou=0.45,
    classes=None,
    half=False,
    device="cpu",
)


def stored_events(
    count: int, *, seed: int | None = None, cameras: int = 2, frames_ratio: float = 0.1
) -> Iterator[Accepted]:
    """`count` messages as the worker stores them, to write to a store directly.

    For tests and benchmarks of the read side: the JSON domains' messages are made by
    `Traffic` and decoded as the worker decodes them; frames are analysed by a stand-in
    (random detections of a fixed model) and one in twenty is skipped as too old.
    """
    rng = random.Random(seed)
    subjects = Subjects()
    traffic = Traffic(subjects, seed=seed, duplicate_ratio=0.0, bad_ratio=0.0)
    sequence: Counter[str] = Counter()
    for n in range(count):
        received_at = datetime.now(UTC)
        if cameras and rng.random() < frames_ratio:
            camera = f"cam-{rng.randint(1, cameras):02d}"
            meta = FrameMetaV1(
                id=uuid7(),
                camera=camera,
                sequence=sequence[camera],
                captured_at=received_at,
                width=640,
                height=480,
                encoding=FrameEncoding.JPEG,
            )
            sequence[camera] += 1
            payload: FrameAnalyzedV1 | FrameSkippedV1
            if n % 20 == 19:
                payload = FrameSkippedV1(frame=meta, reason="too_old", age_s=12.5)
            else:
                found = [
                    Detection(
                        class_id=i,
                        label=rng.choice(_LABELS),
                        confidence=round(rng.random(), 3),
                        box=(10.0, 20.0, 110.0, 220.0),
                    )
                    for i in range(rng.randint(0, 3))
                ]
                payload = FrameAnalyzedV1(
                    frame=meta,
                    detections=tuple(found),
                    inference_ms=round(rng.uniform(5, 40), 3),
                    batch_size=4,
                    queue_ms=round(rng.uniform(0, 5), 3),
                    model=_MODEL,
                )
            yield Accepted(
                domain=Domain.FRAMES,
                message_id=meta.id,
                subject=subjects.subject(Domain.FRAMES, 1, camera),
                stream_seq=n + 1,
                schema_version=meta.schema_version,
                received_at=received_at,
                payload=payload.model_dump(mode="json"),
                event="FrameAnalyzed" if isinstance(payload, FrameAnalyzedV1) else "FrameSkipped",
            )
            continue
        out = traffic.valid(rng.choice(traffic.domains))
        decoded = decode(subjects, out.domain, out.subject, out.body, max_bytes=1 << 20)
        yield Accepted(
            domain=out.domain,
            message_id=decoded.message_id,
            subject=out.subject,
            stream_seq=n + 1,
            schema_version=decoded.schema_version,
            received_at=received_at,
            payload=decoded.payload,
        )
