"""Pull fetches that leave no request open behind them.

nats-py's `PullSubscription.fetch` returns at its own deadline even while the server is
still sending the messages it asked for. Those arrive afterwards in the subscription's
buffer, where nobody sees them and their ack wait runs, until the next fetch takes them.
When the handler of the batch in hand takes longer than the ack wait (frames waiting for
room in the detector pool: their batch is marked in progress, the buffered ones are
not), the server redelivers them and the work is done twice (the store keeps one copy,
the other is counted as a duplicate). With 200 kB messages, a 10 ms batch window and the
event loop held for 50 ms once each fetch's first message is in (as a busy host holds
it), 20 of 40 of nats-py's fetches left messages behind, and none of these
(`tests/unit/test_pull.py`).

`fetch` here sends one pull request, which expires on the server at the fetch's
deadline, and returns only once it has ended: its batch delivered, or the server's
status saying that it is over (408 expired, 404, 409 refused). The deadline does not cut
off messages already on their way. A request whose end never comes (the connection was
lost meanwhile) is given up `GRACE_S` after its deadline; what it delivers later is
taken first by the next fetch (and its end, arriving during a later request, can end
that one early: the rare case where a message may still wait in the buffer). A time-out
with nothing fetched raises `nats.errors.TimeoutError`, which FastStream's batch loop
expects (nats-py's own can raise the builtin one: nats-io/nats.py#1008), and a time-out
too short to ask the server in (under 1 ms) raises it at once, without a request.

Once installed, an idle consumer does not ask every batch window: after a fetch that
found nothing, the next one with a window shorter than `IDLE_WAIT_S` asks for a single
message and waits up to `IDLE_WAIT_S` for it (a long poll), so a worker with nothing to
do sends one request a second per subscription rather than a hundred (a frames worker
idled at 60 ms of CPU a second). The first message after a quiet spell comes back as
soon as it is published, on its own; the fetches after it take batches again. (A worker
stopped while idle waits for its poll to end: up to `IDLE_WAIT_S` more.)

FastStream calls `fetch` on subscriptions it makes itself, so `install` puts it on nats-py's
class. It uses the subscription's private members (`_sub`, `_nms`, `_deliver`, `_nc`),
hence the upper bound on nats-py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

__all__ = ["GRACE_S", "IDLE_WAIT_S", "fetch", "install", "upstream_fetch"]

upstream_fetch = JetStreamContext.PullSubscription.fetch
"""nats-py's own `fetch`."""

GRACE_S = 2.0
"""How long after its deadline a request's end is waited for before it is given up."""

IDLE_WAIT_S = 1.0
"""After a fetch that found nothing, how long the next one waits for a first message."""

_idle_wait_s = 0.0
"""`IDLE_WAIT_S` once `install` has run (0: no long polls)."""

_IDLE = "_pipeline_idle"
"""The subscription's attribute that says its last fetch found nothing."""

DEFAULT_TIMEOUT_S = 5.0
"""A fetch without a time-out waits this long, as nats-py's does by default."""

_MIN_TIMEOUT_S = 0.001
"""A pull request expires 0.1 ms before the fetch's deadline: shorter would be in the past."""

_ENDS = {api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT, api.StatusCode.CONFLICT}
_HEARTBEAT = api.StatusCode.CONTROL_MESSAGE


async def fetch(
    sub: JetStreamContext.PullSubscription,
    batch: int = 1,
    timeout: float | None = 5,  # noqa: ASYNC109 (the signature of the method it stands for)
    heartbeat: float | None = None,
) -> list[Msg]:
    """Up to `batch` messages; returns once no request of this call can deliver more."""
    if batch < 1:
        raise ValueError("nats: invalid batch size")
    if timeout is not None and timeout <= 0:
        raise ValueError("nats: invalid fetch timeout")
    msgs = _buffered(sub, batch)
    if msgs:  # the rest of the window is the next fetch's
        setattr(sub, _IDLE, False)
        return msgs
    wait = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if wait < _MIN_TIMEOUT_S:
        raise nats.errors.TimeoutError
    if wait < _idle_wait_s and getattr(sub, _IDLE, False):
        await _pull(sub, msgs, 1, _idle_wait_s, heartbeat)  # a long poll while idle
    else:
        await _pull(sub, msgs, batch, wait, heartbeat)
    setattr(sub, _IDLE, not msgs)
    if not msgs:
        raise nats.errors.TimeoutError
    return msgs


def install(idle_wait_s: float = IDLE_WAIT_S) -> None:
    """Make `PullSubscription.fetch` this module's `fetch`, long-polling `idle_wait_s`
    while idle (0: never); calling again does nothing more."""
    global _idle_wait_s
    cls: Any = JetStreamContext.PullSubscription
    cls.fetch = fetch
    _idle_wait_s = idle_wait_s


def _buffered(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    """Messages already in the subscription's buffer (a given-up request's), up to `batch`."""
    inner = sub._sub
    assert inner is not None
    queue = inner._pending_queue
    msgs: list[Msg] = []
    while len(msgs) < batch and not queue.empty():
        msg = queue.get_nowait()
        inner._pending_size -= len(msg.data)
        if not JetStreamContext.is_status_msg(msg):  # the end of a request given up
            msgs.append(msg)
    return msgs


async def _pull(
    sub: JetStreamContext.PullSubscription,
    msgs: list[Msg],
    batch: int,
    wait: float,
    heartbeat: float | None,
) -> None:
    """Ask for `batch` messages, waiting up to `wait` s for them to be published, and add
    what comes to `msgs` until the request ends.

    Every request expires: one without (a `no_wait` alone) is not answered at all while
    the consumer has `max_ack_pending` messages unacknowledged, and would deliver later,
    to nobody."""
    request: dict[str, Any] = {"batch": batch, "expires": int(wait * 1e9) - 100_000}
    if heartbeat:
        request["idle_heartbeat"] = int(heartbeat * 1e9)
    await sub._nc.publish(sub._nms, json.dumps(request).encode(), sub._deliver)
    give_up = time.monotonic() + wait + GRACE_S
    inner = sub._sub
    assert inner is not None
    queue = inner._pending_queue
    needed = batch
    while needed:
        if queue.empty():  # `next_msg` starts a task per call: only to wait
            try:
                msg = await inner.next_msg(timeout=max(give_up - time.monotonic(), 0.001))
            except nats.errors.TimeoutError:
                return  # the end never came: what it still delivers waits for the next fetch
        else:
            msg = queue.get_nowait()
            inner._pending_size -= len(msg.data)
        status = JetStreamContext.is_status_msg(msg)
        if status == _HEARTBEAT:
            continue
        if status in _ENDS:
            return
        if status:
            raise nats.js.errors.APIError.from_msg(msg)
        msgs.append(msg)
        needed -= 1
