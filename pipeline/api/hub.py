"""The dashboard's one follower of the store, whose changes every open stream shares.

One thread per API process reads the store and the views (woken by the writers' commit
notifications through a `Listener`, polling as a fallback) and turns each move into one
server-sent event, encoded once: `id` the store position it brings a client to, `data`
what was stored since the previous one (`after`) and the sections that changed. Every
stream is a bounded queue of those bytes: no query per client per event. A stream that
falls `QUEUE_SIZE` events behind is ended; its client reconnects with the last id it
received and is resumed from the store (`pipeline.api.routes.stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from fastapi.sse import format_sse_event

from ..store.follow import Listener, is_outage
from .board import LAST_EVENTS, Board

__all__ = ["QUEUE_SIZE", "Hub", "Stream", "encode"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 64
"""Events a stream may fall behind before it is ended."""
POLL_S = 1.0
"""How often the follower looks when no notification comes (a lost one, a view moving)."""
BUSY_POLL_S = 0.1
"""How often it looks while the views catch up with an event stored in the last seconds."""
BUSY_FOR_S = 5.0
SETTLE_S = 1.0
"""After a notification it looks that often for this long whatever the views' positions
say (an operator's action moves no position)."""
STEP_S = 0.1
"""The least time between two reads: under a steady flow of commits the follower reads at
most ten times a second, whatever the rate of notifications."""
SECTIONS_S = 0.3
"""The least time between two reads of the sections (a dozen queries); the incidents'
section alone is read again as soon as the incidents change."""
REFRESH_S = 20.0
"""The sections' windows (the last hour, the last day) slide: read them again this often."""

Connection = Callable[[], "contextlib.AbstractContextManager[psycopg.Connection[Any]]"]


def encode(kind: str, payload: dict[str, Any], *, retry_ms: int | None = None) -> bytes:
    """One server-sent event whose id is the payload's position."""
    return format_sse_event(
        data_str=orjson.dumps(payload).decode(),
        event=kind,
        id=str(payload["position"]),
        retry=retry_ms,
    )


class Stream:
    """One client's queue of encoded events; `None` in it ends the stream."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)
        self.dropped = False

    def offer(self, message: bytes) -> None:
        """Queue `message`; a full queue ends the stream (its client resumes later)."""
        if self.dropped:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped = True
            self.end()

    def end(self) -> None:
        """End the stream after what it has sent (anything queued is dropped)."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Hub:
    """Follows the store for every dashboard stream of one API process (started by the
    first stream, stopped with the application)."""

    def __init__(
        self, board: Board, connection: Connection, listen: Callable[[], Any], channel: str
    ) -> None:
        self.board = board
        self._connection = connection
        self._listener = Listener(channel, [self])
        self._listen = listen
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Kept by the event loop's thread only (the follower hands them over).
        self.position = -1
        self.sections: dict[str, Any] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=LAST_EVENTS)
        self.closed = False
        self._streams: set[Stream] = set()
        self._ready = asyncio.Event()
        self._moved = asyncio.Event()

    # -- the event loop's side ---------------------------------------------------------

    def start(self) -> None:
        """Start following (once; from the event loop)."""
        if self._threads or self.closed:
            return
        self._loop = asyncio.get_running_loop()
        for name, target in (
            ("dashboard-listener", lambda: self._listener.run(self._listen, self._stop)),
            ("dashboard-follower", self._follow),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def ready(self, timeout_s: float) -> bool:
        """Whether the follower has read the store once (waiting up to `timeout_s`)."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._ready.is_set()

    async def reached(self, position: int, timeout_s: float) -> bool:
        """Whether the follower is at `position` or beyond (waiting up to `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while self.position < position:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), left)
        return True

    def subscribe(self) -> Stream:
        """A new stream, which gets every event after `self.position` as it stands now."""
        stream = Stream()
        self._streams.add(stream)
        return stream

    def unsubscribe(self, stream: Stream) -> None:
        """Forget a stream whose client has gone."""
        self._streams.discard(stream)

    @property
    def streams(self) -> int:
        """How many streams are open."""
        return len(self._streams)

    def end_streams(self) -> None:
        """End every stream and refuse new ones: the server is stopping."""
        self.closed = True
        for stream in list(self._streams):
            stream.end()

    async def close(self) -> None:
        """Stop following and end every stream."""
        self.end_streams()
        self._stop.set()
        self.wake.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 10)

    def _begin(self, position: int, sections: dict[str, Any], recent: list[Any]) -> None:
        self.position, self.sections = position, sections
        self.recent.extend(recent)
        self._ready.set()

    def _publish(self, payload: dict[str, Any], message: bytes) -> None:
        self.position = payload["position"]
        self.sections.update(payload["sections"])
        self.recent.extend(payload["events"])
        for stream in list(self._streams):
            stream.offer(message)
            if stream.dropped:
                self._streams.discard(stream)
        self._moved.set()
        self._moved = asyncio.Event()

    def _hand_over(self, method: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self._loop.call_soon_threadsafe(method, *args)

    # -- the follower's thread ---------------------------------------------------------

    def _follow(self) -> None:
        state = _Read()
        delay = 0.5
        while not self._stop.is_set():
            notified = self.wake.is_set()
            self.wake.clear()
            try:
                with self._connection() as conn:
                    busy = self._step(conn, state, notified)
                delay = 0.5
            except Exception as exc:
                if is_outage(exc):
                    log.warning(
                        "dashboard: the store does not answer (%s); again in %.1f s", exc, delay
                    )
                else:
                    log.exception("dashboard: reading the store failed; again in %.1f s", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            self._stop.wait(STEP_S)
            self.wake.wait(BUSY_POLL_S if busy else POLL_S)

    def _step(self, conn: psycopg.Connection[Any], state: _Read, notified: bool = False) -> bool:
        """Read what moved and hand it to the event loop; whether to look again soon (the
        views, the incident process, an operator's action take their time to show)."""
        board = self.board
        fingerprint = board.fingerprint(conn)
        head = fingerprint[0]
        now = time.monotonic()
        incidents = fingerprint[2:]  # the incidents' counts and last change
        if state.position < 0:
            state.sections = board.sections(conn)
            state.position, state.fingerprint, state.refreshed = head, fingerprint, now
            state.incidents = incidents
            recent = board.recent(conn, head)
            self._hand_over(self._begin, head, dict(state.sections), recent)
            return False
        if head > state.position or notified:
            state.moved = now
        changes = board.changes(conn, state.position, max(head, state.position))
        changed: dict[str, Any] = {}
        stale = fingerprint != state.fingerprint
        if (stale and now - state.refreshed >= SECTIONS_S) or now - state.refreshed > REFRESH_S:
            sections = board.sections(conn)
            changed = {k: v for k, v in sections.items() if state.sections.get(k) != v}
            state.sections, state.fingerprint, state.refreshed = sections, fingerprint, now
            state.incidents = incidents
        elif incidents != state.incidents:
            # An incident opened or changed: it is shown now, not after the pause that
            # bounds how often a steady flow of events makes the follower read the others.
            found = board.sections(conn, ["incidents"])
            changed = {k: v for k, v in found.items() if state.sections.get(k) != v}
            state.sections = {**state.sections, **found}
            state.incidents = incidents
        if head > state.position or changed:
            payload = {**changes, "sections": changed}
            state.position = payload["position"]
            self._hand_over(self._publish, payload, encode("update", payload))
        pending = fingerprint != state.fingerprint  # read the sections at the next step
        since = now - state.moved
        return pending or since < SETTLE_S or (since < BUSY_FOR_S and _views_behind(fingerprint))


class _Read:
    """What the follower has read and handed over."""

    def __init__(self) -> None:
        self.position = -1
        self.sections: dict[str, Any] = {}
        self.fingerprint: tuple[Any, ...] = ()
        self.incidents: tuple[Any, ...] = ()
        """The incidents' part of the fingerprint when that section was last read."""
        self.refreshed = 0.0
        self.moved = 0.0


def _views_behind(fingerprint: tuple[Any, ...]) -> bool:
    """Whether a view (or the incident process) is behind the head in `fingerprint`."""
    head, positions = fingerprint[0], fingerprint[1]
    if not isinstance(positions, list):
        return False
    return any(position < head for _view, position, _state in positions)
