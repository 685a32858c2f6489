"""Detector actors out of service, and how they come back.

An actor that fails a batch is taken out of service (`Repairs.start`): Ray restarts it
(`max_restarts`; past that a new one is started), and one that does not answer in time
is killed and replaced. It is back in service once it has answered a test frame
(`probe`) within the batch timeout: an actor that is merely slow stays out. The first
test frame also judges the frames that failed alone on it (`Member.accused`): answered
in time, the detector works and each such frame fails with `DetectionFailed`; not in
time, it is an outage and the frames go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DetectionFailed, DetectorUnavailable
from ..metrics import Metrics
from .frame import Frame, Outcome

__all__ = ["Member", "Pending", "Repairs", "cause"]

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A submitted frame, until its outcome is set."""

    frame: Frame
    future: asyncio.Future[Outcome]
    enqueued: float
    sent: bool = False
    """Taken into a batch once (its place in the queue was given back then)."""
    alone: bool = False
    """Its batch failed: it goes in a batch of its own from now on."""


@dataclass
class Member:
    """One actor of the pool: its Ray handle, batches in hand, and whether it is in service."""

    handle: Any
    load: int = 0
    up: asyncio.Event = field(default_factory=asyncio.Event)
    accused: list[tuple[Pending, str]] = field(default_factory=list)
    """Frames that failed alone on this actor, judged by its next test frame."""

    def __post_init__(self) -> None:
        self.up.set()


class Repairs:
    """Brings failed actors back into service; see the module docstring."""

    def __init__(
        self,
        *,
        timeout_s: float,
        new_actor: Callable[[], Any],
        send_back: Callable[[list[Pending]], None],
        back_up: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        self._timeout_s = timeout_s
        self._new_actor = new_actor
        self._send_back = send_back
        self._back_up = back_up
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, member: Member, *, replace: bool) -> None:
        """Take the actor out of service until it is restarted (or replaced, if hung)."""
        member.up.clear()
        task = asyncio.create_task(self._recover(member, replace=replace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        """Stop the repairs under way (their accused frames fail as the pool stops)."""
        for task in self._tasks:
            task.cancel()

    async def stop(self) -> None:
        """Cancel the repairs under way and wait for them to end."""
        self.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _recover(self, member: Member, *, replace: bool) -> None:
        """Wait for Ray to restart a failed actor, or start a new one, until it answers a
        test frame in time; then back in service. The first test frame judges the frames
        that failed alone on it."""
        if replace:  # hung: it would hold its next batches too
            self._replace(member)
        delay = 0.5
        judged = False
        try:
            while True:
                answered = await self._probe(member)
                if answered is not None and not judged:
                    judged = True
                    self._judge(member, answered)
                if answered:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        finally:
            if not judged:  # stopping: given back, not judged
                for pending, _ in member.accused:
                    if not pending.future.done():
                        pending.future.set_exception(
                            DetectorUnavailable("the detector pool stopped")
                        )
                member.accused.clear()
        self._metrics.detector_restarts.inc()
        member.up.set()
        self._back_up()

    def _judge(self, member: Member, answered: bool) -> None:
        """Frames that failed alone on the actor: theirs if it then answered a test frame
        in time (the detector works), else back to the queue (the detector is out)."""
        accused, member.accused = member.accused, []
        for pending, reason in accused:
            if answered and not pending.future.done():
                pending.future.set_exception(
                    DetectionFailed(
                        f"the detector failed on this frame alone ({reason}) "
                        "and answered a test frame in time right after"
                    )
                )
        if not answered:
            self._send_back([pending for pending, _ in accused])

    async def _probe(self, member: Member) -> bool | None:
        """Whether the actor answered a test frame within the batch timeout; None while it
        is still restarting or loading the model. One that does not answer is replaced."""
        import ray.exceptions

        timeout = self._timeout_s
        try:
            await asyncio.wait_for(member.handle.ready.remote(), timeout)
        except ray.exceptions.ActorDiedError:
            log.warning("a detector actor is gone for good; starting a new one")
            member.handle = self._new_actor()
            return None
        except Exception as exc:  # restarting, or loading the model: ask again shortly
            log.debug("detector actor not back yet: %s", cause(exc))
            return None
        try:
            await asyncio.wait_for(member.handle.probe.remote(), timeout)
        except TimeoutError:
            log.warning("a detector actor did not answer a test frame within %.0f s", timeout)
            self._replace(member)
            return False
        except Exception as exc:
            log.warning("a detector actor failed on a test frame: %s", cause(exc))
            return False
        return True

    def _replace(self, member: Member) -> None:
        """Kill a hung (or too slow) actor and start a new one in its place."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(member.handle, no_restart=True)
        member.handle = self._new_actor()


def cause(exc: BaseException) -> str:
    """The last line of an error's message (Ray's carry the remote traceback before it)."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
