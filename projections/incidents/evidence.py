"""Evidence frames kept: copied out of the FRAMES stream into the evidence object store
bucket before the stream drops them, and read back for the API.

The FRAMES stream keeps a frame an hour (less when its byte cap is reached); an incident
is kept for ever. `EvidenceKeeper`, a thread of the incident service, follows the frames
that become evidence (`frames.FrameTable.pending`), reads each from the FRAMES stream by
the stream sequence its `FrameAnalyzed` event recorded (checking the message's
`Frame-Id`), and puts it in the bucket under the event's id, with the frame's metadata
in the object's headers and description. The copy is at least once and idempotent: the
bucket is asked first (an object of that name holding that frame is kept already, so a
frame copied just before a crash, and dropped from the stream since, is still found
kept), a second put of the same name only replaces the object with the same bytes, and
the frame's row in `incident_frames` is written after the bucket has acknowledged. A
frame the stream no longer holds is settled as `expired`; NATS away or the bucket
missing delays the copies (they wait in the incident log) and never the incident
process. One keeper per schema copies; the others stand by.

`FrameBucket.read` serves a kept frame to the API with message gets only (the API's
NATS user reads the bucket's stream and creates nothing), checking the object's digest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import nats
import psycopg
from nats.aio.client import Client
from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from pipeline.metrics import IncidentMetrics
from pipeline.settings import Settings
from schemas import Domain
from schemas.frames import FRAME_HEADERS
from streams import Subjects

from .frames import EvidenceFrame, FrameTable, Settled

__all__ = [
    "EXPIRED_REASON",
    "EvidenceKeeper",
    "FrameBucket",
    "FrameDamaged",
    "NatsLink",
    "StoredFrame",
]

log = logging.getLogger(__name__)

EXPIRED_REASON = "frame expired before it was kept"
NO_MESSAGE = 10037
"""JetStream's error code for a stream that holds no message at a sequence."""
EVENT_ID = "Pipeline-Event-Id"
FRAME_ID = FRAME_HEADERS["id"]
"""The header naming a frame (its message id), on its message and on its object."""
_COPIED = ("Frame-", "Nats-Msg-Id")
"""Headers of the frame's message that its object keeps."""
_BATCH = 200
"""Incident events the keeper reads at a time."""


class FrameDamaged(Exception):
    """An object of the bucket whose bytes do not match its digest."""

    def __init__(self, name: str) -> None:
        super().__init__(f"evidence frame {name}: its bytes do not match the bucket's digest")
        self.name = name


@dataclass(frozen=True, slots=True)
class StoredFrame:
    """A kept frame's bytes and the object's headers (the frame's metadata)."""

    data: bytes
    headers: dict[str, str]

    @property
    def content_type(self) -> str:
        """The media type the frame was stored with."""
        return self.headers.get("Content-Type", "application/octet-stream")


class FrameBucket:
    """The evidence bucket and the FRAMES stream of one NATS connection."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.js = nc.jetstream()
        self.name = subjects.evidence_bucket()
        self.stream = f"OBJ_{self.name}"
        self.frames = subjects.stream(Domain.FRAMES)
        self.store = ObjectStore(self.name, self.stream, self.js)

    @classmethod
    async def open(cls, nc: Client, subjects: Subjects) -> FrameBucket:
        """The bucket, once the server says it exists (`BucketNotFoundError` otherwise:
        `pipeline streams apply` makes it)."""
        bucket = cls(nc, subjects)
        await bucket.js.object_store(bucket.name)
        return bucket

    async def keep(self, frame: EvidenceFrame) -> Settled:
        """Copy one frame from the FRAMES stream into the bucket, unless it is there."""
        name = str(frame.event_id)
        with contextlib.suppress(ObjectNotFoundError):
            info = await self.store.get_info(name)
            if _header(info.headers, FRAME_ID) == frame.frame.id:
                return Settled(frame, "kept", info.size, info.digest)
        try:
            msg = await self.js.get_msg(self.frames, seq=frame.stream_seq)
        except NotFoundError as exc:
            if exc.err_code != NO_MESSAGE:
                raise  # no FRAMES stream at all: not the frame's fault
            return Settled(frame, "expired", reason=EXPIRED_REASON)
        found = (msg.headers or {}).get(FRAME_ID)
        if found != frame.frame.id:
            # The sequence holds another frame: the stream was made anew since.
            return Settled(frame, "expired", reason=f"{EXPIRED_REASON} (the stream was reset)")
        headers = {k: [v] for k, v in (msg.headers or {}).items() if k.startswith(_COPIED)}
        headers.update(
            {
                EVENT_ID: [name],
                "Pipeline-Incident-Id": [str(frame.incident_id)],
                "Pipeline-Subject": [frame.subject],
                "Pipeline-Stream-Seq": [str(frame.stream_seq)],
                "Content-Type": [frame.content_type],
            }
        )
        f = frame.frame
        meta = ObjectMeta(
            name=name,
            description=f"frame {f.id} of {f.camera} captured at {f.captured_at.isoformat()}, "
            f"evidence of incident {frame.incident_id}",
            headers=headers,  # as NATS headers are: a list of values per name
        )
        info = await self.store.put(name, msg.data or b"", meta)
        return Settled(frame, "kept", info.size, info.digest)

    async def read(self, name: str) -> StoredFrame | None:
        """A kept frame (None when the bucket has no object of that name)."""
        try:
            info = await self.store.get_info(name)
        except ObjectNotFoundError:
            return None
        data = bytearray()
        chunks = f"$O.{self.name}.C.{info.nuid}"
        seq = 1
        for _ in range(info.chunks or 0):
            msg = await self.js.get_msg(self.stream, seq=seq, subject=chunks, next=True)
            data += msg.data or b""
            seq = (msg.seq or seq) + 1
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        if info.digest is not None and info.digest.partition("=")[2] != digest:
            raise FrameDamaged(name)
        headers = {k: _header(info.headers, k) or "" for k in info.headers or {}}
        return StoredFrame(bytes(data), headers)


def _header(headers: dict[str, Any] | None, name: str) -> str | None:
    """One header of an object (a list of values, as NATS headers are, or one value)."""
    value = (headers or {}).get(name)
    if isinstance(value, list):
        return str(value[0]) if value else None
    return None if value is None else str(value)


async def _quiet(exc: Exception) -> None:
    log.debug("evidence: NATS: %r", exc)


class NatsLink:
    """A NATS connection made on first use and kept while it is connected; made anew by
    the first use after it was lost. (No reconnecting in the background: nats.py's
    `connect` with unlimited reconnects would wait for a server that is down forever.)"""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.namespace)
        self._nc: Client | None = None
        self._bucket: FrameBucket | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        """The connection; raises the connect error when NATS cannot be reached now."""
        async with self._lock:
            if self._nc is None or not self._nc.is_connected:
                if self._nc is not None and not self._nc.is_closed:
                    await self._nc.close()
                self._nc = self._bucket = None
                self._nc = await nats.connect(
                    self.settings.nats_servers(),
                    connect_timeout=2,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # else it tries a server that is down 60 times
                    reconnect_time_wait=0.1,
                    error_cb=_quiet,
                    **self.settings.nats_options(),
                )
            return self._nc

    async def bucket(self) -> FrameBucket:
        """The evidence bucket on the connection (looked up once per connection)."""
        nc = await self.client()
        async with self._lock:
            if self._nc is not nc:  # lost and made anew meanwhile: not this one's bucket
                raise nats.errors.ConnectionClosedError
            if self._bucket is None:
                self._bucket = await FrameBucket.open(nc, self.subjects)
            return self._bucket

    async def close(self) -> None:
        """Close the connection, if one was made."""
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()
            self._nc = self._bucket = None


_OUTAGES = (OSError, nats.errors.Error, TimeoutError, psycopg.Error)
"""What NATS or the database away raise (logged once per kind, then retried)."""


class _Standby(Exception):
    """Another keeper copies this schema's evidence frames."""


class EvidenceKeeper:
    """Copies the frames that become evidence into the bucket until stopped; one per
    schema (an advisory lock), the others stand by, as incident processes do."""

    def __init__(
        self,
        settings: Settings,
        connect: Callable[[], psycopg.Connection[Any]],
        metrics: IncidentMetrics | None = None,
    ) -> None:
        self.link = NatsLink(settings)
        self.table = FrameTable(settings.postgres_schema)
        self.connect = connect
        self.metrics = metrics or IncidentMetrics()
        self.poll_s = settings.projections_poll_s
        self.standby_s = settings.projections_standby_s
        self.after = 0
        """The `seq` of the last incident event whose frames are settled."""
        self._conn: psycopg.Connection[Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the evidence frames until `stop` is set; NATS or the database away only
        delays them (the problem is logged once, then again when it changes), and any
        other error is logged with its trace and tried again (with a backoff)."""
        delay, problem = 0.5, ""
        try:
            while not stop.is_set():
                try:
                    settled = await self.step()
                    if problem:
                        log.info(
                            "evidence: copying frames to bucket %s again",
                            self.link.subjects.evidence_bucket(),
                        )
                        problem = ""
                    delay = 0.5
                    if settled:
                        continue
                    wait = self.poll_s
                except _Standby:
                    self.after = 0
                    wait = self.standby_s
                except Exception as exc:
                    self.metrics.evidence_errors.inc()
                    if not isinstance(exc, _OUTAGES):
                        log.exception("evidence: unexpected error; again in %.1f s", delay)
                    elif repr(exc) != problem:
                        log.warning(
                            "evidence: cannot keep the incidents' frames (%r); they wait in "
                            "the incident log and the FRAMES stream (is NATS up, has the "
                            "operator run `pipeline streams apply`?)",
                            exc,
                        )
                    problem = repr(exc)
                    # `after` stays: a step that fails does not move it, and every frame
                    # before it is settled, so the next step starts where this one did.
                    await anyio.to_thread.run_sync(self._close)
                    wait, delay = delay, min(delay * 2, 30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self.link.close()
            await anyio.to_thread.run_sync(self._close)

    async def step(self) -> int:
        """Settle the frames of the next incident events; how many (0: none waiting)."""
        frames, upto = await anyio.to_thread.run_sync(self._pending)
        if upto == self.after:
            return 0
        bucket = await self.link.bucket() if frames else None
        for frame in frames:
            assert bucket is not None
            outcome = await bucket.keep(frame)
            await anyio.to_thread.run_sync(self._settle, outcome)
            self.metrics.evidence_frames.labels(outcome.state).inc()
            if outcome.state == "expired":
                log.warning(
                    "evidence: frame %s (event %s, %s seq %d) of incident %s: %s",
                    frame.frame.id,
                    frame.event_id,
                    bucket.frames,
                    frame.stream_seq,
                    frame.incident_id,
                    outcome.reason,
                )
        self.after = upto
        return max(len(frames), 1)

    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = self.connect()
            key = f"evidence:{self.table.schema}"
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
            if not (row and row[0]):
                # Two keepers would put the same frames at once, and the chunks of one
                # put would be left behind in the bucket.
                conn.close()
                raise _Standby(key)
            self.table.create(conn)
            self._conn = conn
        return self._conn

    def _pending(self) -> tuple[list[EvidenceFrame], int]:
        return self.table.pending(self._db(), self.after, _BATCH)

    def _settle(self, outcome: Settled) -> None:
        self.table.settle(self._db(), [outcome])

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
