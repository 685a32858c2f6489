"""Hold nats-py's pull `fetch` to its contract: time-outs raise `nats.errors.TimeoutError`.

nats-py 2.16 can raise the bare `asyncio.TimeoutError` from `fetch` when a deadline
runs out just before its lingering pull request. FastStream's batch loop only catches
the nats error, so the loop task dies and the messages it had already gathered for the
batch stay unacked until `ack_wait` redelivers them (FastStream issue #2219). Nothing
is lost, but those messages arrive `ack_wait` seconds late. Translating the error
keeps the loop running and the batch delivered.
"""

from __future__ import annotations

import functools
from typing import Any

import nats.errors
from nats.js.client import JetStreamContext

__all__ = ["ensure_fetch_timeout_contract"]


def ensure_fetch_timeout_contract() -> None:
    """Wrap `PullSubscription.fetch` once; calling again does nothing."""
    cls: Any = JetStreamContext.PullSubscription
    if getattr(cls.fetch, "_pipeline_wrapped", False):
        return
    original = cls.fetch

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch._pipeline_wrapped = True  # type: ignore[attr-defined]
    cls.fetch = fetch
