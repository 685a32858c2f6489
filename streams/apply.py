"""Create or update streams and consumers idempotently, report drift, show status."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import APIError, NotFoundError
from nats.js.manager import JetStreamManager

__all__ = ["Applied", "Checked", "ConsumerStatus", "StreamStatus", "apply", "check", "status"]

# Fields the server fills in or normalises that we never set ourselves.
_IGNORED = frozenset({"description", "metadata", "placement", "mirror", "sources"})
# Stream fields a worker relies on: what the stream captures, and the DLQ's one letter per
# subject (each dead letter is written once). Retention and limits are the operator's.
_RELIED_ON = frozenset({"subjects", "max_msgs_per_subject", "discard", "discard_new_per_subject"})


@dataclass(frozen=True)
class Applied:
    """What `apply` did to one stream or consumer."""

    kind: str  # "stream" or "consumer"
    name: str
    action: str  # "created", "updated", "unchanged" or "failed"
    drift: tuple[str, ...] = ()
    error: str = ""

    def __str__(self) -> str:
        text = f"{self.kind} {self.name}: {self.action}"
        if self.drift:
            text += " (" + "; ".join(self.drift) + ")"
        if self.error:
            text += f" - {self.error}"
        return text


def _drift(desired: Any, actual: Any) -> tuple[str, ...]:
    """Fields set in `desired` whose value differs on the server."""
    out = []
    for name, want in desired.as_dict().items():
        if name in _IGNORED or want is None:
            continue
        have = actual.as_dict().get(name)
        if have != want:
            out.append(f"{name}: {have!r} -> {want!r}")
    return tuple(out)


async def apply(
    jsm: JetStreamManager,
    streams: Sequence[StreamConfig],
    consumers: Iterable[tuple[str, ConsumerConfig]] = (),
) -> list[Applied]:
    """Make the server match the given configs; safe to run any number of times."""
    results = [await _apply_stream(jsm, config) for config in streams]
    missing = {r.name for r in results if r.action == "failed" and r.error and not r.drift}
    for stream, config in consumers:
        if stream in missing:
            name = f"{stream}/{config.durable_name}"
            results.append(Applied("consumer", name, "failed", (), f"no stream {stream}"))
            continue
        results.append(await _apply_consumer(jsm, stream, config))
    return results


async def _apply_stream(jsm: JetStreamManager, config: StreamConfig) -> Applied:
    assert config.name
    try:
        info = await jsm.stream_info(config.name)
    except NotFoundError:
        try:
            await jsm.add_stream(config)
        except APIError as exc:  # e.g. more replicas than the cluster has servers
            return Applied("stream", config.name, "failed", (), str(exc.description or exc))
        return Applied("stream", config.name, "created")
    drift = _drift(config, info.config)
    if not drift:
        return Applied("stream", config.name, "unchanged")
    try:
        await jsm.update_stream(config)
    except APIError as exc:
        return Applied("stream", config.name, "failed", drift, str(exc.description or exc))
    return Applied("stream", config.name, "updated", drift)


async def _apply_consumer(jsm: JetStreamManager, stream: str, config: ConsumerConfig) -> Applied:
    assert config.durable_name
    name = f"{stream}/{config.durable_name}"
    try:
        info = await jsm.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await jsm.add_consumer(stream, config)
        return Applied("consumer", name, "created")
    drift = _drift(config, info.config)
    if not drift:
        return Applied("consumer", name, "unchanged")
    try:
        # Creating a consumer that exists with a new config is the update in JetStream.
        await jsm.add_consumer(stream, config)
    except APIError as exc:
        return Applied("consumer", name, "failed", drift, str(exc.description or exc))
    return Applied("consumer", name, "updated", drift)


@dataclass(frozen=True)
class Checked:
    """What `check` found: what keeps a worker from consuming, and other drift."""

    problems: tuple[str, ...] = ()
    """Missing streams or consumers, and drift in what a worker relies on: every field of
    its consumers, and a stream's subjects and per-subject limits."""
    drift: tuple[str, ...] = ()
    """Other differences (retention, limits): the operator's to decide; reported only."""


async def check(
    jsm: JetStreamManager,
    streams: Sequence[StreamConfig],
    consumers: Iterable[tuple[str, ConsumerConfig]] = (),
) -> Checked:
    """Compare the server with the given configs without changing anything.

    Needs only the stream and consumer info calls, which a worker's account grants.
    """
    problems: list[str] = []
    drift: list[str] = []
    for config in streams:
        assert config.name
        try:
            info = await jsm.stream_info(config.name)
        except NotFoundError:
            problems.append(f"stream {config.name} does not exist")
            continue
        for change in _drift(config, info.config):
            relied_on = change.partition(":")[0] in _RELIED_ON
            (problems if relied_on else drift).append(f"stream {config.name}: {change}")
    for stream, consumer in consumers:
        assert consumer.durable_name
        name = f"{stream}/{consumer.durable_name}"
        try:
            info = await jsm.consumer_info(stream, consumer.durable_name)
        except NotFoundError:
            problems.append(f"consumer {name} does not exist")
            continue
        problems += [f"consumer {name}: {change}" for change in _drift(consumer, info.config)]
    return Checked(tuple(problems), tuple(drift))


@dataclass(frozen=True)
class ConsumerStatus:
    """Backlog of one durable consumer."""

    name: str
    pending: int
    ack_pending: int
    redelivered: int


@dataclass(frozen=True)
class StreamStatus:
    """Size of one stream and the state of its consumers."""

    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: list[ConsumerStatus] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {self.messages} messages, {self.bytes} bytes, "
            f"seq {self.first_seq}..{self.last_seq}"
        ]
        lines += [
            f"  consumer {c.name}: pending {c.pending}, ack pending {c.ack_pending}, "
            f"redelivered {c.redelivered}"
            for c in self.consumers
        ]
        return "\n".join(lines)


async def status(jsm: JetStreamManager, stream_names: Iterable[str]) -> list[StreamStatus]:
    """Messages, bytes and consumer backlogs of the named streams that exist."""
    out = []
    for name in stream_names:
        try:
            info = await jsm.stream_info(name)
        except NotFoundError:
            continue
        consumers = [
            ConsumerStatus(
                name=c.name,
                pending=c.num_pending or 0,
                ack_pending=c.num_ack_pending or 0,
                redelivered=c.num_redelivered or 0,
            )
            for c in await jsm.consumers_info(name)
        ]
        state = info.state
        out.append(
            StreamStatus(
                name, state.messages, state.bytes, state.first_seq, state.last_seq, consumers
            )
        )
    return out
