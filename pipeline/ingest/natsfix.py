"""Hold nats-py's pull `fetch` to its contract: time-outs raise `nats.errors.TimeoutError`.

Upstream bug: since nats-py 2.15 (nats-io/nats.py#934), `PullSubscription.fetch` raises
the bare builtin `TimeoutError` when its deadline runs out just after the server answered
its first pull request without a message; nats-io/nats.py#1008 (open) would raise
`FetchTimeoutError` there again. FastStream's batch loop catches only the nats error, so
the loop task dies and the messages it had already gathered for the batch stay unacked
until `ack_wait` redelivers them. Nothing is lost, but those messages arrive `ack_wait`
seconds late. Translating the error keeps the loop running and the batch delivered.

FastStream also calls `fetch` with whatever is left of its batch window, which can be a
few microseconds; nats-py then sends a pull request whose `expires` is already past (or
negative). Such a call times out at once, without a request.

FastStream calls `fetch` on subscriptions it makes itself, so the adapter is installed on
the class (`ensure_fetch_timeout_contract`). `tests/unit/test_natsfix.py` shows the bug on
nats-py's own `fetch` (`upstream_fetch`) against a real server; once it fails, nats-py is
fixed: drop this module, its call in `pipeline/app.py` and nats-py's upper bound.
"""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

__all__ = ["ensure_fetch_timeout_contract", "fetch", "upstream_fetch"]

upstream_fetch = JetStreamContext.PullSubscription.fetch
"""nats-py's own `fetch`, as it is without the adapter."""

# nats-py turns a time-out into the request's `expires` minus 0.1 ms: a shorter one
# would ask the server for a pull that expires in the past.
_MIN_TIMEOUT_S = 0.001


async def fetch(
    sub: JetStreamContext.PullSubscription,
    batch: int = 1,
    timeout: float | None = 5,  # noqa: ASYNC109 (the signature of the method it stands for)
    **kwargs: Any,
) -> list[Msg]:
    """`sub.fetch` by nats-py's own code, every time-out raised as `nats.errors.TimeoutError`."""
    if timeout is not None and timeout < _MIN_TIMEOUT_S:
        raise nats.errors.TimeoutError
    try:
        return await upstream_fetch(sub, batch, timeout, **kwargs)
    except nats.errors.TimeoutError:
        raise
    except TimeoutError as exc:
        raise nats.errors.TimeoutError from exc


def ensure_fetch_timeout_contract() -> None:
    """Make `PullSubscription.fetch` the adapter `fetch`; calling again does nothing."""
    cls: Any = JetStreamContext.PullSubscription
    cls.fetch = fetch
