"""nats-py's pull `fetch` on a real server: the bug `natsfix` works around, and the contract.

The first two tests call nats-py's own `fetch` and show what it does wrong; each fails
once nats-py stops doing it, and then the adapter (or that part of it) can go.
"""

from __future__ import annotations

import json
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

from pipeline.ingest import natsfix
from pipeline.ingest.natsfix import ensure_fetch_timeout_contract, upstream_fetch

STREAM, SUBJECT, CONSUMER = "NATSFIX", "natsfix.x", "natsfix"
PULL_REQUESTS = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"
"""Where a pull subscription sends its requests; a plain subscription there sees each one."""


async def _empty_stream(nc: Client) -> tuple[JetStreamContext.PullSubscription, Subscription]:
    """A pull subscription on an empty stream, and a subscription seeing its pull requests."""
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    sub = await js.pull_subscribe(SUBJECT, durable=CONSUMER, stream=STREAM)
    return sub, await nc.subscribe(PULL_REQUESTS)


async def _requests(nc: Client, seen: Subscription) -> list[dict[str, Any]]:
    """The pull requests sent since the last call (the flush's reply comes after them)."""
    await nc.flush()
    return [json.loads((await seen.next_msg(1)).data) for _ in range(seen.pending_msgs)]


async def test_nats_py_fetch_still_raises_the_bare_timeout_error(nc: Client) -> None:
    """nats-io/nats.py#1008: when this fails, nats-py keeps the contract without natsfix."""
    sub, _ = await _empty_stream(nc)
    raised: list[type[BaseException]] = []
    # The server answers the first request with a time-out status just before the client's
    # own deadline; the deadline then runs out and nats-py raises the builtin error.
    for attempt in range(1000):
        try:
            await upstream_fetch(sub, 10, 0.0002 + 0.0001 * (attempt % 4))
        except TimeoutError as exc:
            raised.append(type(exc))
            if type(exc) is TimeoutError:
                break
    names = sorted({f"{t.__module__}.{t.__qualname__}" for t in raised})
    assert TimeoutError in set(raised), (
        f"nats-py's fetch raised only {names} in {len(raised)} time-outs: "
        "remove pipeline/ingest/natsfix.py's translation and the bound on nats-py"
    )


async def test_nats_py_asks_for_a_pull_that_expires_in_the_past(nc: Client) -> None:
    """A time-out under 0.1 ms becomes a pull request with `expires` at or below zero."""
    sub, seen = await _empty_stream(nc)
    with pytest.raises(TimeoutError):
        await upstream_fetch(sub, 10, 0.00005)
    requests = await _requests(nc, seen)
    assert requests, "nats-py sent no request: natsfix's short-time-out check can go"
    assert requests[0]["expires"] <= 0


async def test_with_the_adapter_every_time_out_is_the_nats_error(nc: Client) -> None:
    """The builtin error nats-py raises reaches callers as `nats.errors.TimeoutError`."""
    ensure_fetch_timeout_contract()
    ensure_fetch_timeout_contract()  # idempotent
    assert vars(JetStreamContext.PullSubscription)["fetch"] is natsfix.fetch
    sub, _ = await _empty_stream(nc)
    translated = calls = 0
    # Long enough for a request (1 ms and up): nats-py's bug is rarer there, but not gone.
    while not translated and calls < 5000:
        calls += 1
        try:
            got = await sub.fetch(batch=10, timeout=0.001 + 0.0001 * (calls % 5))
        except nats.errors.TimeoutError as exc:
            translated = type(exc.__cause__) is TimeoutError
        else:
            assert got == []  # the stream is empty: a 408 status ends the batch
    assert translated, f"no bare time-out to translate in {calls} fetches"


async def test_a_time_out_too_short_for_a_pull_request_sends_none(nc: Client) -> None:
    """Under 1 ms the adapter times out at once; from 1 ms a fetch asks the server."""
    ensure_fetch_timeout_contract()
    sub, seen = await _empty_stream(nc)
    for timeout in (0.00005, 0.0002, 0.0009):
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(batch=10, timeout=timeout)
    assert await _requests(nc, seen) == []

    await nc.jetstream().publish(SUBJECT, b"one")
    messages = await sub.fetch(batch=10, timeout=1)
    assert [m.data for m in messages] == [b"one"]
    assert [r["batch"] for r in await _requests(nc, seen)] == [10]
