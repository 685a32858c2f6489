"""Hold nats-py's pull `fetch` to its contract: time-outs raise `nats.errors.TimeoutError`.

nats-py 2.16 can raise the bare `asyncio.TimeoutError` from `fetch` when a deadline
runs out just before its lingering pull request. FastStream's batch loop only catches
the nats error, so the loop task dies and the messages it had already gathered for the
batch stay unacked until `ack_wait` redelivers them (FastStream issue #2219). Nothing
is lost, but those messages arrive `ack_wait` seconds late. Translating the error
keeps the loop running and the batch delivered.

FastStream also calls `fetch` with whatever is left of its batch window, which can be a
few microseconds; nats-py would then send a pull request that expires in the past. Such
a call now times out at once without a request.
"""

from __future__ import annotations

import functools
from typing import Any

import nats.errors
from nats.js.client import JetStreamContext

__all__ = ["ensure_fetch_timeout_contract"]

# nats-py turns a time-out into the request's `expires` minus 0.1 ms: a shorter one
# would ask the server for a pull that expires in the past.
_MIN_TIMEOUT_S = 0.001


def ensure_fetch_timeout_contract() -> None:
    """Wrap `PullSubscription.fetch` once; calling again does nothing."""
    cls: Any = JetStreamContext.PullSubscription
    if getattr(cls.fetch, "_pipeline_wrapped", False):
        return
    original = cls.fetch

    @functools.wraps(original)
    async def fetch(
        self: Any,
        batch: int = 1,
        timeout: float | None = 5,  # noqa: ASYNC109 (the signature of the method it wraps)
        **kwargs: Any,
    ) -> Any:
        if timeout is not None and timeout < _MIN_TIMEOUT_S:
            raise nats.errors.TimeoutError
        try:
            return await original(self, batch, timeout, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch._pipeline_wrapped = True  # type: ignore[attr-defined]
    cls.fetch = fetch
