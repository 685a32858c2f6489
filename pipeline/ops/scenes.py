"""The demo's incidents: now and then, the few messages that make one.

The demo's steady traffic is routine (`Traffic(..., routine=True)`): granted badges,
motion after hours, services `ok` or `degraded`, none of which the example sites file's
rules take. Every 20 to 60 s (`Scenes.pause`; the first after 10 s, one that opens an
incident whatever the cameras see) one scene is played: the messages of one kind of
incident, spread over some seconds, from a source drawn at random. Incidents then open
a few times a minute at most, in different zones and of different levels (the zone's
criticality and opening hours count):

| scene | messages | rule of `sites.example.yaml` |
|---|---|---|
| `tamper` | one `alarm.tamper` (critical) | `critical-security-event` |
| `badge-burst` | six `badge.rejected` at one door over 15 s | `badge-rejected-burst` |
| `held-open` | three `door.held_open` at one door over 20 s | `door-held-open-repeatedly` |
| `service-down` | a service reports `down` twice, 10 s apart, then `ok` | `service-down` |
| `forced-door` | one `door.forced` (high) | `forced-door-with-person` (*) |

(*) Only when a camera covering the door's zone sees a person within 30 s, which takes
a trained `--model`. A scene in a zone whose incident of that rule still gathers
evidence joins it instead of opening another (the sites file's `join_within`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas import Domain
from streams import Subjects

from .simulate import Expect, Outgoing, uuid7

__all__ = ["FIRST", "SCENES", "Scene", "Scenes", "play"]

_DOORS = ("door-1", "door-7", "gate-north")
_SECURITY = (*_DOORS, "lobby-cam", "vault")
_SERVICES = ("api-gateway", "auth", "billing", "search")

SCENES = {"tamper": 2, "badge-burst": 3, "held-open": 3, "service-down": 2, "forced-door": 1}
"""Each scene's weight in the draw."""
FIRST = ("tamper", "badge-burst", "service-down")
"""The first scene is one of these, which open an incident whatever the cameras see."""


@dataclass(frozen=True)
class Scene:
    """One incident's messages: (seconds after the scene starts, message)."""

    name: str
    messages: tuple[tuple[float, Outgoing], ...]


class Scenes:
    """Draws scenes and the pauses between them."""

    def __init__(
        self,
        subjects: Subjects,
        *,
        first_s: float = 10.0,
        pause_s: tuple[float, float] = (20.0, 60.0),
        seed: int | None = None,
    ) -> None:
        self.subjects = subjects
        self.first_s = first_s
        self.pause_s = pause_s
        self._rng = random.Random(seed)

    def pause(self) -> float:
        """Seconds from one scene's start to the next's."""
        return self._rng.uniform(*self.pause_s)

    def next(self, *, first: bool = False) -> Scene:
        """A scene drawn by weight (`SCENES`; the `first` among `FIRST`)."""
        names = [n for n in SCENES if not first or n in FIRST]
        name = self._rng.choices(names, weights=[SCENES[n] for n in names])[0]
        return self.scene(name)

    def scene(self, name: str) -> Scene:
        """The named scene, from a source drawn at random."""
        rng = self._rng
        if name == "tamper":
            steps = [(0.0, self._security(rng.choice(_SECURITY), "alarm.tamper", "critical"))]
        elif name == "badge-burst":
            door = rng.choice(_DOORS)
            steps = [(3.0 * n, self._security(door, "badge.rejected", "low")) for n in range(6)]
        elif name == "held-open":
            door = rng.choice(_DOORS)
            steps = [(10.0 * n, self._security(door, "door.held_open", "medium")) for n in range(3)]
        elif name == "service-down":
            service = rng.choice(_SERVICES)
            steps = [
                (0.0, self._health(service, "down")),
                (10.0, self._health(service, "down")),
                (20.0, self._health(service, "ok")),
            ]
        elif name == "forced-door":
            steps = [(0.0, self._security(rng.choice(_DOORS), "door.forced", "high"))]
        else:
            raise ValueError(f"no scene {name!r} (one of {', '.join(SCENES)})")
        return Scene(name, tuple(steps))

    def _security(self, source: str, kind: str, severity: str) -> Outgoing:
        message_id = uuid7()
        body = {
            "id": message_id,
            "source": source,
            "occurred_at": _now(),
            "kind": kind,
            "severity": severity,
            "attributes": {"badge": f"B{self._rng.randint(1000, 9999)}", "attempt": 1},
        }
        return self._message(Domain.SECURITY, source, message_id, body)

    def _health(self, service: str, status: str) -> Outgoing:
        message_id = uuid7()
        body = {
            "id": message_id,
            "service": service,
            "instance": f"{service}-0",
            "reported_at": _now(),
            "status": status,
            "checks": {"db": status, "cache": "ok"},
        }
        return self._message(Domain.MONITORING, service, message_id, body)

    def _message(
        self, domain: Domain, source: str, message_id: str, body: dict[str, Any]
    ) -> Outgoing:
        return Outgoing(
            subject=self.subjects.subject(domain, 1, source),
            body=json.dumps(body).encode(),
            headers={"Nats-Msg-Id": message_id},
            domain=domain,
            message_id=message_id,
            expect=Expect.STORE,
        )


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def play(
    js: JetStreamContext,
    scenes: Scenes,
    *,
    duration_s: float | None = None,
    on_scene: Callable[[Scene], None] | None = None,
    on_published: Callable[[Outgoing], None] | None = None,
    on_acked: Callable[[Outgoing, PubAck], None] | None = None,
) -> Counter[str]:
    """Play scenes until `duration_s` passes (or cancelled); how many messages of each
    expectation were published. Each message's capture time is when it is sent."""
    counts: Counter[str] = Counter()
    started = time.monotonic()
    end = None if duration_s is None else started + duration_s
    at = started + scenes.first_s
    first = True
    while end is None or at < end:
        await _sleep_until(at)
        scene, first = scenes.next(first=first), False
        if on_scene:
            on_scene(scene)
        for offset, out in scene.messages:
            if end is not None and at + offset >= end:
                break
            await _sleep_until(at + offset)
            sent = _stamped(out)
            ack = await js.publish(sent.subject, sent.body, headers=sent.headers)
            counts[sent.expect.value] += 1
            if on_published:
                on_published(sent)
            if on_acked:
                on_acked(sent, ack)
        at += scenes.pause()
    return counts


def _stamped(out: Outgoing) -> Outgoing:
    """`out` with its capture time set to now (a scene is drawn before it plays)."""
    body = json.loads(out.body)
    key = "occurred_at" if "occurred_at" in body else "reported_at"
    body[key] = _now()
    return Outgoing(
        out.subject, json.dumps(body).encode(), out.headers, out.domain, out.message_id, out.expect
    )


async def _sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
