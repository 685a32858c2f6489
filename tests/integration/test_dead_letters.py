"""Dead letters on a real NATS server: written once for ever, and always storable."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from pipeline.app import apply_streams
from pipeline.errors import ConfigError, PipelineError, Reason
from pipeline.ingest.deadletter import DeadLetter, DeadLetters
from pipeline.ops.embedded import EmbeddedNats
from pipeline.settings import ALL_DOMAINS, Settings
from schemas import Domain
from streams import RETENTION, Subjects
from streams.definitions import LETTER_HEADER_BYTES

from ..conftest import make_intake, make_settings, running_worker, wait_until


class DiesBeforeTheAck:
    """A delivered message whose worker dies after the DLQ publish, before the ack."""

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject, self.reply, self.data, self.headers = (
            msg.subject,
            msg.reply,
            msg.data,
            msg.headers,
        )

    @property
    def metadata(self) -> Any:
        return self._msg.metadata

    async def ack(self) -> None:
        pass  # the process is gone: JetStream redelivers after ack_wait

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay)

    async def in_progress(self) -> None:
        await self._msg.in_progress()


class Unused:
    async def write(self, *args: object) -> None:
        raise AssertionError("nothing here is valid")


async def test_a_letter_is_written_once_when_its_source_comes_back_after_the_window(
    settings: Settings, nc: Client
) -> None:
    await apply_streams(nc, settings)
    subjects = Subjects(settings.namespace)
    jsm, js = nc.jsm(), nc.jetstream()
    # A short duplicate window on the DLQ, shorter than the ack wait below.
    dlq = (await jsm.stream_info(subjects.dead_letter_stream())).config
    await jsm.update_stream(dataclasses.replace(dlq, duplicate_window=1.0))
    sub = await js.pull_subscribe(
        subjects.wildcard(Domain.SECURITY),
        durable="dies",
        stream=subjects.stream(Domain.SECURITY),
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=2.0),
    )
    letters = DeadLetters(js, subjects, max_payload=nc.max_payload)
    intake = make_intake(Unused(), letters, subjects=subjects, ack_wait_s=2.0)
    await js.publish("security.v1.door-7", b"not json", headers={"Nats-Msg-Id": "bad-1"})

    [first] = await sub.fetch(1, timeout=5)
    await intake.handle([DiesBeforeTheAck(first)])
    await asyncio.sleep(2.5)  # past the DLQ's duplicate window and the ack wait
    [again] = await sub.fetch(1, timeout=10)
    assert again.metadata.num_delivered == 2
    await intake.handle([again])
    await intake.stop()

    letters = await DeadLetters(js, subjects).list()
    assert [(letter.reason, letter.stream_seq) for letter in letters] == [(Reason.INVALID_JSON, 1)]
    info = await jsm.consumer_info(subjects.stream(Domain.SECURITY), "dies")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_letter_larger_than_max_payload_keeps_what_fits_its_length_and_hash(
    nats_with_max_payload: Callable[[str], EmbeddedNats], pg_schema: str
) -> None:
    server = nats_with_max_payload("65536")
    settings = make_settings(server.url, pg_schema, max_message_bytes=1000)
    async with running_worker(settings) as worker:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        body = bytes(range(256)) * 255  # 65,280 bytes: fits alone, not with a letter's headers
        await js.publish("security.v1.door-7", body, headers={"Nats-Msg-Id": "huge-1"})
        letters = DeadLetters(js, worker.subjects)

        async def one_letter() -> bool:
            return len(await letters.list()) == 1

        await wait_until(one_letter)
        [letter] = await letters.list()
        assert letter.reason is Reason.OVERSIZED
        assert letter.body_bytes == len(body) and body.startswith(letter.body)
        assert letter.body_sha256 == hashlib.sha256(body).hexdigest()
        assert letter.headers.get("Nats-Msg-Id") == "huge-1"
        assert letter.dlq_seq is not None
        with pytest.raises(PipelineError, match="cannot be requeued"):
            await letters.requeue(letter.dlq_seq)
        await nc.close()


async def test_a_worker_refuses_a_server_that_cannot_carry_its_frames(
    nats_with_max_payload: Callable[[str], EmbeddedNats], pg_schema: str
) -> None:
    server = nats_with_max_payload("1MB")
    settings = make_settings(server.url, pg_schema, domains=ALL_DOMAINS)
    with pytest.raises(ConfigError, match=r"PIPELINE_MAX_FRAME_BYTES.*max_payload"):
        async with running_worker(settings):
            pass


async def test_letters_of_an_earlier_release_survive_the_one_per_subject_limit(
    settings: Settings, nc: Client
) -> None:
    subjects = Subjects(settings.namespace)
    jsm, js = nc.jsm(), nc.jetstream()
    # The DLQ as earlier releases made it: every letter of a domain on one subject.
    await jsm.add_stream(
        StreamConfig(name=subjects.dead_letter_stream(), subjects=[subjects.dead_letter_wildcard()])
    )
    for seq in (3, 5, 8):
        letter = DeadLetter(Reason.INVALID_JSON, "bad", "security.v1.d", "SECURITY", seq, 1, b"x")
        headers = {**letter.to_headers(), "Nats-Msg-Id": f"dlq:SECURITY:{seq}"}
        await js.publish(subjects.legacy_dead_letters(Domain.SECURITY), b"x", headers=headers)

    await apply_streams(nc, settings)

    letters = await DeadLetters(js, subjects).list(Domain.SECURITY)
    assert sorted(letter.stream_seq for letter in letters) == [3, 5, 8]
    assert {letter.reason for letter in letters} == {Reason.INVALID_JSON}
    config = (await jsm.stream_info(subjects.dead_letter_stream())).config
    assert config.max_msgs_per_subject == 1 and config.discard_new_per_subject


async def test_the_dlq_is_bounded_and_keeps_letters_as_long_as_any_source_keeps_messages(
    settings: Settings, nc: Client
) -> None:
    settings = settings.model_copy(
        update={"dead_letters_max_bytes": 64 * 1024**2, "dead_letter_max_body_bytes": 100_000}
    )
    await apply_streams(nc, settings)
    subjects = Subjects(settings.namespace)
    config = (await nc.jsm().stream_info(subjects.dead_letter_stream())).config
    assert config.max_bytes == 64 * 1024**2
    assert config.max_msg_size == 100_000 + LETTER_HEADER_BYTES
    assert config.max_age == RETENTION[Domain.SECURITY].max_age_s == 90 * 24 * 3600
    for domain in Domain:
        source = (await nc.jsm().stream_info(subjects.stream(domain))).config
        assert config.max_age is not None and source.max_age is not None
        assert config.max_age >= source.max_age, domain


async def test_a_big_frame_letter_keeps_the_bodys_hash_and_length_not_the_body(
    settings: Settings, nc: Client
) -> None:
    await apply_streams(nc, settings)  # the default body limit: 256 KiB
    subjects = Subjects(settings.namespace)
    js = nc.jetstream()
    letters = DeadLetters(
        js,
        subjects,
        max_payload=nc.max_payload,
        max_body_bytes=settings.dead_letter_max_body_bytes,
    )
    body = b"\xff\xd8\xff" + bytes(range(256)) * 24_000  # a 6 MB frame
    frame = DeadLetter(
        Reason.DIMENSION_MISMATCH,
        "image is 3840x2160, metadata says 1920x1080",
        "frames.v1.cam-01",
        "FRAMES",
        12,
        1,
        body,
        headers={"Frame-Id": "f-12", "Nats-Msg-Id": "f-12"},
    )
    small = dataclasses.replace(frame, stream_seq=13, body=body[:1000], headers={})
    await letters.publish(Domain.FRAMES, [frame, small])

    big, kept = sorted(await letters.list(), key=lambda letter: letter.stream_seq)
    assert big.body == b""
    assert big.body_bytes == len(body)
    assert big.body_sha256 == hashlib.sha256(body).hexdigest()
    assert big.body_limit == 256 * 1024
    assert big.headers == {"Frame-Id": "f-12", "Nats-Msg-Id": "f-12"}
    assert big.reason is Reason.DIMENSION_MISMATCH
    assert (kept.body, kept.body_bytes, kept.body_limit) == (body[:1000], None, None)
    raw = await js.get_msg(subjects.dead_letter_stream(), seq=big.dlq_seq)
    assert raw.headers is not None and raw.headers["Pipeline-Body-Limit"] == "262144"
    assert big.dlq_seq is not None
    with pytest.raises(PipelineError, match="cannot be requeued"):
        await letters.requeue(big.dlq_seq)


async def test_a_letter_over_the_streams_message_limit_is_written_without_its_body(
    settings: Settings, nc: Client
) -> None:
    """A DLQ whose max_msg_size is below what this worker was told still takes its letters."""
    await apply_streams(
        nc, settings.model_copy(update={"dead_letter_max_body_bytes": 1024})
    )  # the stream takes letters of 1 KiB + headers
    subjects = Subjects(settings.namespace)
    letters = DeadLetters(nc.jetstream(), subjects, max_payload=nc.max_payload)
    body = bytes(200_000)
    letter = DeadLetter(Reason.OVERSIZED, "big", "security.v1.x", "SECURITY", 4, 1, body)
    await letters.publish(Domain.SECURITY, [letter])
    [back] = await letters.list()
    assert (back.body, back.body_bytes) == (b"", len(body))
    assert back.body_sha256 == hashlib.sha256(body).hexdigest()


async def test_a_full_dlq_pauses_the_domain_and_acks_nothing_until_there_is_room(
    nats_server: EmbeddedNats, pg_schema: str, nc: Client
) -> None:
    settings = make_settings(
        nats_server.url, pg_schema, dead_letters_max_bytes=1024**2, pause_probe_max_s=0.5
    )
    await apply_streams(nc, settings)
    subjects = Subjects(settings.namespace)
    js, jsm = nc.jetstream(), nc.jsm()
    seq = 0
    for size in (200_000, 10_000, 100, 0):  # fill the DLQ with letters of another domain
        while True:
            seq += 1
            try:
                await js.publish(subjects.dead_letter(Domain.METRICS, seq, 0), bytes(size))
            except nats.js.errors.APIError:
                break
            assert seq < 1000, "the DLQ took more than its max_bytes"
    async with running_worker(settings) as worker:

        def dlq(metric: str) -> float | None:
            return worker.metrics.registry.get_sample_value(
                f"pipeline_dead_letter_stream_{metric}", {"stream": "DLQ"}
            )

        await wait_until(lambda: dlq("limit_bytes") == 1024**2)  # for the alert
        assert (dlq("bytes") or 0) > 0.99 * 1024**2 and (dlq("messages") or 0) >= seq - 4
        await js.publish("security.v1.door-7", b"not json", headers={"Nats-Msg-Id": "bad-1"})
        await wait_until(
            lambda: any("security paused (dead_letters)" in p for p in worker.pauses.active())
        )
        await asyncio.sleep(1.0)  # several probes refused meanwhile
        consumer = await jsm.consumer_info(
            subjects.stream(Domain.SECURITY), subjects.durable(Domain.SECURITY)
        )
        assert consumer.num_ack_pending == 1, "held, neither acked nor dropped"
        letters = DeadLetters(js, subjects)
        assert await letters.list(Domain.SECURITY) == []

        await letters.purge(Domain.METRICS)

        async def written() -> bool:
            return len(await letters.list(Domain.SECURITY)) == 1

        await wait_until(written)
        await wait_until(lambda: worker.pauses.active() == [])

        async def acked() -> bool:
            info = await jsm.consumer_info(
                subjects.stream(Domain.SECURITY), subjects.durable(Domain.SECURITY)
            )
            return info.num_ack_pending == 0

        await wait_until(acked)
        assert worker.metrics.total("pipeline_dead_lettered") == 1
