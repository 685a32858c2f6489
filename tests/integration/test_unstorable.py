"""One message the store refuses is dead-lettered alone; its batch-mates are stored once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from pipeline.errors import Reason
from pipeline.ingest.deadletter import DeadLetter, DeadLetters
from pipeline.ingest.writer import GroupWriter
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from schemas import Domain

from ..conftest import (
    PG_DB,
    PG_HOST,
    make_intake,
    running_worker,
    wait_until,
)
from .helpers import ids_of, security_body, stored_ids, writer_store

POISON = "poison-pill"
"""A zone the test's trigger makes PostgreSQL refuse (a data error, as a check would)."""


def _refuse_poison(schema: str) -> None:
    """A trigger on the event table that fails any row whose payload names the poison zone."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
        conn.execute(
            f"""CREATE FUNCTION "{schema}".refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF position('{POISON}' in convert_from(NEW.state, 'UTF8')) > 0 THEN
                RAISE EXCEPTION 'refused: poison' USING ERRCODE = '22023';
              END IF;
              RETURN NEW;
            END $$"""
        )
        conn.execute(
            f'CREATE TRIGGER refuse_poison BEFORE INSERT ON "{schema}".journal_events '
            f'FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse_poison()'
        )


async def test_a_refused_message_is_dead_lettered_alone_and_its_batch_mates_stored(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    async with running_worker(settings.model_copy(update={"batch_timeout_s": 0.3})) as worker:
        _refuse_poison(pg_schema)
        js = nc.jetstream()
        good = [f"good-{i}" for i in range(40)]
        for i, message_id in enumerate(good):
            if i == 20:
                body = security_body("bad-1", zone=POISON)
                await js.publish("security.v1.door-7", body, headers={"Nats-Msg-Id": "bad-1"})
            await js.publish(
                "security.v1.door-7", security_body(message_id), headers={"Nats-Msg-Id": message_id}
            )
        letters = DeadLetters(js, worker.subjects)

        async def one_letter() -> bool:
            return len(await letters.list()) == 1

        await wait_until(lambda: len(stored_ids(pg_schema)) == 40)
        await wait_until(one_letter)
        [letter] = await letters.list()
        assert letter.reason is Reason.UNSTORABLE
        assert "refused: poison" in letter.detail
        assert json.loads(letter.body)["id"] == "bad-1"
        assert worker.metrics.total("pipeline_retries") == 0
    assert set(stored_ids(pg_schema)) == ids_of(Domain.SECURITY, good)


async def test_an_integer_beyond_64_bits_is_refused_by_validation_not_by_the_store(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        big = security_body("big-1", attributes={"n": 2**64})
        await js.publish("security.v1.door-7", big, headers={"Nats-Msg-Id": "big-1"})
        for i in range(10):
            body = security_body(f"ok-{i}", attributes={"n": 2**63 - 1})
            await js.publish("security.v1.door-7", body, headers={"Nats-Msg-Id": f"ok-{i}"})
        letters = DeadLetters(js, worker.subjects)

        async def one_letter() -> bool:
            return len(await letters.list()) == 1

        await wait_until(one_letter)
        await wait_until(lambda: len(stored_ids(pg_schema)) == 10)
        [letter] = await letters.list()
        assert letter.reason is Reason.SCHEMA_VIOLATION and "64-bit" in letter.detail
        assert worker.metrics.total("pipeline_retries") == 0


# -- many batches, through the intake and the group writer on the real store ------------


@dataclass
class Delivery:
    """A delivered message for the intake, recording acks and naks."""

    subject: str
    data: bytes
    seq: int
    headers: dict[str, str] | None = None
    reply: str = ""
    fate: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(
            stream="SECURITY",
            num_delivered=1,
            sequence=SimpleNamespace(stream=self.seq),
            timestamp=datetime.now(UTC),
        )

    async def ack(self) -> None:
        self.fate.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.fate.append("nak")

    async def in_progress(self) -> None:
        pass


class Letters:
    """An in-memory DLQ (the store is what this test is about)."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def publish(self, domain: Domain, letters: Sequence[DeadLetter]) -> list[bool]:
        """Each letter written: new, every one (as `DeadLetters.publish` says)."""
        self.letters.extend(letters)
        return [True] * len(letters)


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[EventStore, str]]:
    """One store (with the poison trigger) for every example: ids differ between them."""
    schema = "t_unstorable_property"
    with writer_store(schema) as event_store:
        _refuse_poison(schema)
        yield event_store, schema


KINDS = st.sampled_from(["valid", "valid", "valid", "duplicate", "invalid", "unstorable"])
_run = iter(range(1_000_000))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=st.lists(st.lists(KINDS, min_size=1, max_size=40), min_size=1, max_size=4))
def test_mixed_batches_store_exactly_the_valid_messages_once(
    store: tuple[EventStore, str], batches: list[list[str]]
) -> None:
    event_store, schema = store
    run = next(_run)
    expected_stored: set[str] = set()
    expected_letters: dict[int, Reason] = {}
    pulled: list[list[Delivery]] = []
    seq = 0
    for kinds in batches:
        batch = []
        for kind in kinds:
            seq += 1
            message_id = f"r{run}-m{seq}"
            if kind == "duplicate" and expected_stored:
                message_id = sorted(expected_stored)[seq % len(expected_stored)]
                body = security_body(message_id)
            elif kind == "invalid":
                body = b'{"id": "broken"'
                expected_letters[seq] = Reason.INVALID_JSON
            elif kind == "unstorable":
                body = security_body(message_id, zone=POISON)
                expected_letters[seq] = Reason.UNSTORABLE
            else:
                body = security_body(message_id)
                expected_stored.add(message_id)
            batch.append(Delivery("security.v1.door-7", body, seq))
        pulled.append(batch)

    letters = Letters()

    async def consume() -> None:
        writer = GroupWriter(event_store)
        writer.start()
        intake = make_intake(writer, letters)
        for batch in pulled:  # batches in flight together share commits
            await intake.handle(batch)
        await intake.stop()
        await writer.stop()

    asyncio.run(consume())

    counts = stored_ids(schema)
    assert set(counts) >= ids_of(Domain.SECURITY, sorted(expected_stored))
    assert not ids_of(Domain.SECURITY, [f"r{run}-m{s}" for s in expected_letters]) & set(counts)
    assert all(n == 1 for n in counts.values())
    assert {letter.stream_seq: letter.reason for letter in letters.letters} == expected_letters
    assert all(d.fate == ["ack"] for batch in pulled for d in batch)
