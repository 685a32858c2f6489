"""`pipeline.ingest.pull.fetch` on a real server: no message arrives after a fetch returns.

The first test shows what nats-py's own `fetch` does (and why `pull` exists); the others
hold `pull.fetch` to its contract.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext

from pipeline.ingest import pull

STREAM, SUBJECT, CONSUMER = "PULL", "pull.x", "pull"
PULL_REQUESTS = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"
"""Where a pull subscription sends its requests; a plain subscription there sees each one."""

BIG = b"x" * 200_000
"""A message big enough that a batch of them takes longer than a 10 ms window to arrive."""


@pytest.fixture(autouse=True)
def no_long_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fetch as asked, whether or not a worker in this process installed `pull`; the
    long polls of an idle consumer have tests of their own."""
    monkeypatch.setattr(pull, "_idle_wait_s", 0.0)


@pytest.fixture
async def sub(nc: Client) -> AsyncIterator[JetStreamContext.PullSubscription]:
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    yield await js.pull_subscribe(SUBJECT, durable=CONSUMER, stream=STREAM)


def _left_behind(sub: JetStreamContext.PullSubscription) -> int:
    assert sub._sub is not None
    return sub._sub._pending_queue.qsize()


async def _publish(nc: Client, n: int, body: bytes = b"m") -> None:
    js = nc.jetstream()
    for _ in range(n):
        await js.publish(SUBJECT, body)


async def _requests(nc: Client, seen: Subscription) -> list[dict[str, Any]]:
    """The pull requests sent since the last call (the flush's reply comes after them)."""
    await nc.flush()
    return [json.loads((await seen.next_msg(1)).data) for _ in range(seen.pending_msgs)]


def _hold_at_first_message(sub: JetStreamContext.PullSubscription) -> Callable[[], None]:
    """Arm a hold: the next message into the subscription's buffer holds the event loop
    for 50 ms, as a busy host's other work holds it, while the rest of its batch is still
    on its way. Returns the function that arms it (once per fetch)."""
    assert sub._sub is not None
    queue = sub._sub._pending_queue
    put = queue.put_nowait
    loop = asyncio.get_running_loop()
    armed = False

    def put_then_hold(msg: Any) -> None:
        nonlocal armed
        put(msg)
        if armed:
            armed = False
            loop.call_soon(time.sleep, 0.05)

    def arm() -> None:
        nonlocal armed
        armed = True

    queue.put_nowait = put_then_hold  # type: ignore[method-assign]
    return arm


async def _batches(
    nc: Client,
    sub: JetStreamContext.PullSubscription,
    fetch: Any,
    rounds: int = 20,
) -> tuple[int, int, int]:
    """Rounds of 16 big messages fetched in a 10 ms window, as FastStream's batch loop does,
    with 50 ms of handling per fetch: (fetches, fetches that left messages behind, received).

    Once the first message of each fetch is in, the event loop is held for 50 ms: the
    rest are on their way when the fetch's deadline passes. (Holding it at a fixed time
    instead left nothing behind on a host fast enough to take a whole batch before it.)"""
    fetches = left = received = 0
    arm = _hold_at_first_message(sub)
    for _ in range(rounds):
        await _publish(nc, 16, BIG)
        got = 0
        while got < 16:
            arm()
            try:
                msgs = await fetch(sub, 16 - got, 0.01)
            except nats.errors.TimeoutError:
                continue
            fetches += 1
            got += len(msgs)
            await asyncio.sleep(0.05)  # the handler at work: late messages arrive meanwhile
            left += _left_behind(sub) > 0
            for msg in msgs:
                await msg.ack()
        received += got
    return fetches, left, received


async def test_nats_py_fetch_leaves_messages_behind(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    """nats-py returns at its deadline while the server still sends: they wait in the buffer."""
    fetches, left, received = await _batches(nc, sub, pull.upstream_fetch)
    assert received == 320
    assert left, (
        f"none of nats-py's {fetches} fetches left a message behind: "
        "pipeline/ingest/pull.py may no longer be needed"
    )


async def test_pull_fetch_leaves_nothing_behind(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    fetches, left, received = await _batches(nc, sub, pull.fetch)
    assert received == 320
    assert left == 0, f"{left} of {fetches} fetches left messages in the client"


async def test_a_partial_batch_returns_when_its_request_expires(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    await _publish(nc, 5)
    started = time.monotonic()
    msgs = await pull.fetch(sub, 16, 0.3)
    assert [m.data for m in msgs] == [b"m"] * 5
    assert 0.25 < time.monotonic() - started < 1.0  # the 408 at the deadline, not the grace
    assert _left_behind(sub) == 0


async def test_a_full_batch_is_exactly_the_batch(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    await _publish(nc, 20)
    assert len(await pull.fetch(sub, 16, 1)) == 16
    assert _left_behind(sub) == 0
    assert len(await pull.fetch(sub, 16, 1)) == 4


async def test_waits_for_a_message_published_within_the_time_out(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    async def later() -> None:
        await asyncio.sleep(0.1)
        await _publish(nc, 1, b"late")

    task = asyncio.create_task(later())
    msgs = await pull.fetch(sub, 16, 1)
    await task
    assert [m.data for m in msgs] == [b"late"]
    assert _left_behind(sub) == 0


async def test_nothing_within_the_time_out_raises_the_nats_error(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    seen = await nc.subscribe(PULL_REQUESTS)
    started = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await pull.fetch(sub, 10, 0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    [request] = await _requests(nc, seen)
    assert request["batch"] == 10
    assert 0 < request["expires"] < 200_000_000


async def test_a_time_out_too_short_for_a_request_sends_none(
    nc: Client, sub: JetStreamContext.PullSubscription
) -> None:
    """Under 1 ms a request would expire in the past: none is sent."""
    seen = await nc.subscribe(PULL_REQUESTS)
    await _publish(nc, 1, b"one")
    for timeout in (0.00005, 0.0005, 0.0009):
        with pytest.raises(nats.errors.TimeoutError):
            await pull.fetch(sub, 10, timeout)
    assert await _requests(nc, seen) == []
    assert [m.data for m in await pull.fetch(sub, 10, 0.2)] == [b"one"]


async def test_a_consumer_at_max_ack_pending_leaves_no_request_waiting(nc: Client) -> None:
    """No answer comes while every allowed message is unacknowledged: the request expires
    at the deadline and leaves nothing open to deliver later, to nobody."""
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    config = ConsumerConfig(durable_name=CONSUMER, max_ack_pending=2)
    sub = await js.pull_subscribe(SUBJECT, durable=CONSUMER, stream=STREAM, config=config)
    await _publish(nc, 6)
    held = await pull.fetch(sub, 2, 1)
    assert len(held) == 2
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await pull.fetch(sub, 2, 0.1)
        assert time.monotonic() - started < 1.0  # not the grace
    assert (await js.consumer_info(STREAM, CONSUMER)).num_waiting == 0
    for msg in held:
        await msg.ack()
    await nc.flush()
    assert len(await pull.fetch(sub, 2, 1)) == 2
    assert _left_behind(sub) == 0


async def test_messages_a_given_up_request_delivers_are_taken_first(
    nc: Client, sub: JetStreamContext.PullSubscription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose end does not come in time is given up; the next fetch takes its
    late messages from the buffer before asking for more."""
    # Given up 0.25 s before it expires on the server: what it still delivers, and its end,
    # come to the buffer.
    monkeypatch.setattr(pull, "GRACE_S", -0.25)
    started = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await pull.fetch(sub, 2, 0.3)
    assert time.monotonic() - started < 0.2
    await _publish(nc, 1, b"orphan")
    await asyncio.sleep(0.35)  # the request's 408 arrives too
    assert _left_behind(sub) == 2
    msgs = await pull.fetch(sub, 2, 1)
    assert [m.data for m in msgs] == [b"orphan"]


def test_install_puts_it_on_the_class() -> None:
    pull.install()
    pull.install()  # idempotent
    assert vars(JetStreamContext.PullSubscription)["fetch"] is pull.fetch


async def test_a_batch_below_one_is_refused(sub: JetStreamContext.PullSubscription) -> None:
    with pytest.raises(ValueError, match="batch"):
        await pull.fetch(sub, 0, 1)


async def test_messages_already_arrived_are_taken_without_a_wait_each(
    nc: Client, sub: JetStreamContext.PullSubscription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`next_msg` starts a task and a timer per call: it is called only to wait for the
    next message, not for each one already in the buffer (a quarter of a worker's CPU)."""
    await _publish(nc, 200)
    assert sub._sub is not None
    inner = sub._sub
    waits = 0
    next_msg = inner.next_msg

    async def counted(timeout: float = 1.0) -> Any:  # noqa: ASYNC109 (next_msg's signature)
        nonlocal waits
        waits += 1
        await asyncio.sleep(0.02)  # the batch's other messages arrive meanwhile
        return await next_msg(timeout)

    monkeypatch.setattr(inner, "next_msg", counted)
    msgs = await pull.fetch(sub, 200, 2)
    assert len(msgs) == 200
    assert waits < 20, f"{waits} waits for 200 messages"


async def test_an_idle_consumer_waits_for_one_message_in_a_long_poll(
    nc: Client, sub: JetStreamContext.PullSubscription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a fetch that found nothing, the next asks for one message and waits up to
    `IDLE_WAIT_S` for it; once it has come, fetches take whole batches again."""
    monkeypatch.setattr(pull, "_idle_wait_s", 1.0)
    seen = await nc.subscribe(PULL_REQUESTS)
    with pytest.raises(nats.errors.TimeoutError):
        await pull.fetch(sub, 10, 0.01)

    async def later() -> None:
        await asyncio.sleep(0.3)
        await _publish(nc, 3, b"late")

    task = asyncio.create_task(later())
    started = time.monotonic()
    msgs = await pull.fetch(sub, 10, 0.01)
    waited = time.monotonic() - started
    await task
    assert [m.data for m in msgs] == [b"late"]
    assert 0.25 < waited < 0.9  # the message, not the window nor the poll's end
    assert [m.data for m in await pull.fetch(sub, 10, 0.2)] == [b"late"] * 2
    first, poll, again = await _requests(nc, seen)
    assert first["batch"] == 10 and first["expires"] < 10_000_000
    assert poll["batch"] == 1 and 900_000_000 < poll["expires"] <= 1_000_000_000
    assert again["batch"] == 10
    assert _left_behind(sub) == 0


async def test_an_idle_consumer_asks_once_a_second_not_every_window(
    nc: Client, sub: JetStreamContext.PullSubscription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastStream's batch loop fetches again and again with its 10 ms window: while
    nothing comes, that is one request per `IDLE_WAIT_S`, not a hundred a second."""
    monkeypatch.setattr(pull, "_idle_wait_s", 0.5)
    seen = await nc.subscribe(PULL_REQUESTS)
    ended = time.monotonic() + 1.6
    while time.monotonic() < ended:
        with pytest.raises(nats.errors.TimeoutError):
            await pull.fetch(sub, 10, 0.01)
    requests = await _requests(nc, seen)
    assert 3 <= len(requests) <= 5, requests
    assert (await nc.jetstream().consumer_info(STREAM, CONSUMER)).num_waiting <= 1
