"""Pause and resume: a domain stops pulling while a server it needs is down.

An intake that meets an `Unavailable` error (the event store, the dead-letter stream or
the detector) keeps the messages in hand, retries the same step with capped backoff (the
retry is the probe) and pulls nothing more meanwhile: its handler does not return, so
its subscriber does not fetch. The held messages are marked in progress, so JetStream
neither redelivers them nor counts a delivery. While a pause lasts it is logged once,
shown as `pipeline_intake_paused{domain,cause} 1` and reported by `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import Unavailable
from ..metrics import Metrics

__all__ = ["Pauses", "Stopping"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Stopping(Exception):
    """The worker is stopping while a server is down: give the held messages back."""


@dataclass
class _Pause:
    since: float
    detail: str
    holders: int = 1


class Pauses:
    """The pauses of every domain of one worker, with the backoff of their probes."""

    def __init__(self, metrics: Metrics, *, first_s: float = 0.5, max_s: float = 10.0) -> None:
        self._metrics = metrics
        self._first_s = first_s
        self._max_s = max_s
        self._active: dict[tuple[str, str], _Pause] = {}
        self._stopping = asyncio.Event()

    def active(self) -> list[str]:
        """One line per pause in progress: `<domain> paused (<cause>) for N s: <detail>`."""
        now = time.monotonic()
        return [
            f"{domain} paused ({cause}) for {now - p.since:.0f} s: {p.detail}"
            for (domain, cause), p in sorted(self._active.items())
        ]

    def stop(self) -> None:
        """The worker is stopping: every retry loop gives up at its next failure."""
        self._stopping.set()

    async def until_available(self, domain: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it does not raise `Unavailable`, pausing `domain` meanwhile.

        Raises `Stopping` (from the last `Unavailable`) when the worker stops first.
        """
        delay = self._first_s
        paused: str | None = None
        try:
            while True:
                try:
                    return await attempt()
                except Unavailable as exc:
                    if paused is None:
                        paused = exc.cause
                        self.enter(domain, exc)
                    if self._stopping.is_set():
                        raise Stopping(str(exc)) from exc
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    delay = min(delay * 2, self._max_s)
        finally:
            if paused is not None:
                self.leave(domain, paused)

    def enter(self, domain: str, exc: Unavailable) -> None:
        """`domain` waits for the server `exc` names; pair with `leave`."""
        key = (domain, exc.cause)
        pause = self._active.get(key)
        if pause is not None:  # another batch of the domain already waits for it
            pause.holders += 1
            return
        self._active[key] = _Pause(time.monotonic(), str(exc))
        self._metrics.paused.labels(domain, exc.cause).set(1)
        log.warning(
            "%s: paused, %s unavailable (%s); probing every %.0f s at most",
            domain,
            exc.cause,
            exc,
            self._max_s,
            extra={"domain": domain, "cause": exc.cause},
        )

    def leave(self, domain: str, cause: str) -> None:
        """One waiter of `domain` got past `cause`; the pause ends with the last one."""
        pause = self._active.get((domain, cause))
        if pause is None:
            return
        pause.holders -= 1
        if pause.holders > 0:
            return
        del self._active[(domain, cause)]
        self._metrics.paused.labels(domain, cause).set(0)
        log.warning(
            "%s: resumed, %s is back after %.1f s",
            domain,
            cause,
            time.monotonic() - pause.since,
            extra={"domain": domain, "cause": cause},
        )
