"""The dashboard's fan-out (`pipeline.api.hub`) without servers: one encoding for every
stream, a slow stream ended rather than holding the others back."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pipeline.api.board import Board
from pipeline.api.hub import QUEUE_SIZE, Hub, Stream, encode


def _hub() -> Hub:
    return Hub(cast(Board, None), cast(Any, None), cast(Any, None), "journal_events")


def _update(after: int, position: int) -> dict[str, Any]:
    return {
        "after": after,
        "position": position,
        "stored": {"security": 1},
        "events": [],
        "sections": {"lag": {"ready": True, "views": []}},
    }


def test_an_event_is_encoded_once_with_its_position_as_id() -> None:
    wire = encode("update", _update(4, 7), retry_ms=1000).decode()
    assert wire.startswith("event: update\ndata: {")
    assert wire.endswith("\nid: 7\nretry: 1000\n\n")


async def test_every_stream_gets_the_same_bytes_and_a_slow_one_is_ended() -> None:
    hub = _hub()
    fast, slow = hub.subscribe(), hub.subscribe()
    for n in range(QUEUE_SIZE + 1):
        payload = _update(n, n + 1)
        message = encode("update", payload)
        hub._publish(payload, message)
        got = fast.queue.get_nowait()
        assert got is message  # encoded once, shared
    assert hub.position == QUEUE_SIZE + 1
    assert slow.dropped and slow.queue.get_nowait() is None and slow.queue.empty()
    assert hub.streams == 1  # the slow one is forgotten; its client resumes later
    hub.end_streams()
    assert fast.queue.get_nowait() is None and hub.closed


async def test_reached_waits_for_the_follower() -> None:
    hub = _hub()
    hub.position = 3
    assert await hub.reached(3, 0.01)
    waiting = asyncio.create_task(hub.reached(5, 2.0))
    await asyncio.sleep(0.01)
    hub._publish(_update(3, 5), b"")
    assert await waiting
    assert not await hub.reached(9, 0.05)


def test_a_stream_ends_after_what_it_has_sent() -> None:
    stream = Stream(2)
    stream.offer(b"a")
    stream.end()
    assert stream.queue.get_nowait() is None


class _Board:
    """A board whose fingerprint and sections the test sets; counts its reads."""

    def __init__(self) -> None:
        self.head = 1
        self.incidents: list[tuple[Any, ...]] = [(0, 0, 0, None)]
        self.reads: list[tuple[str, ...]] = []

    def fingerprint(self, conn: Any) -> tuple[Any, ...]:
        return (self.head, [("security", self.head, "live")], self.incidents)

    def changes(self, conn: Any, after: int, upto: int) -> dict[str, Any]:
        return {"after": after, "position": upto, "stored": {}, "events": []}

    def recent(self, conn: Any, upto: int) -> list[Any]:
        return []

    def sections(self, conn: Any, names: list[str] | None = None) -> dict[str, Any]:
        names = names or ["incidents", "lag"]
        self.reads.append(tuple(names))
        return {n: {"head": self.head, "incidents": self.incidents} for n in names}


def test_an_incident_is_handed_over_at_the_next_step_not_after_the_sections_pause() -> None:
    from pipeline.api.hub import _Read

    board = _Board()
    hub = Hub(cast(Board, board), cast(Any, None), cast(Any, None), "journal_events")
    sent: list[dict[str, Any]] = []

    def hand_over(method: Any, *args: Any) -> None:
        if method == hub._publish:
            sent.append(args[0])

    hub._hand_over = hand_over  # type: ignore[method-assign]
    state = _Read()
    hub._step(cast(Any, None), state)  # the first read: every section
    board.head = 2
    hub._step(cast(Any, None), state)  # within SECTIONS_S: the sections wait
    assert board.reads == [("incidents", "lag")] and sent[-1]["sections"] == {}
    board.head, board.incidents = 3, [(1, 1, 0, 3)]  # the incident process recorded one
    hub._step(cast(Any, None), state)
    assert board.reads[-1] == ("incidents",)
    assert set(sent[-1]["sections"]) == {"incidents"} and sent[-1]["position"] == 3
