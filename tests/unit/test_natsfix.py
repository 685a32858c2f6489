"""Pull `fetch` time-outs surface as `nats.errors.TimeoutError`, the type callers catch."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest
from nats.js.client import JetStreamContext

from pipeline.ingest.natsfix import ensure_fetch_timeout_contract


async def test_a_bare_asyncio_timeout_from_fetch_is_translated() -> None:
    ensure_fetch_timeout_contract()
    ensure_fetch_timeout_contract()  # idempotent
    sub: Any = JetStreamContext.PullSubscription.__new__(JetStreamContext.PullSubscription)
    sub._sub = object()

    async def deadline_passed(*args: object, **kwargs: object) -> list[object]:
        raise TimeoutError  # the builtin, as asyncio raises it

    sub._fetch_n = deadline_passed
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(batch=10, timeout=0.01)


async def test_a_time_out_too_short_for_a_pull_request_sends_none() -> None:
    ensure_fetch_timeout_contract()
    sub: Any = JetStreamContext.PullSubscription.__new__(JetStreamContext.PullSubscription)
    sub._sub = object()
    calls: list[object] = []

    async def record(*args: object, **kwargs: object) -> list[object]:
        calls.append(args)
        return []

    sub._fetch_n = record
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(batch=10, timeout=0.0002)
    assert calls == []
    assert await sub.fetch(batch=10, timeout=0.01) == []
    assert len(calls) == 1
