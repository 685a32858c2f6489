"""The pipeline on a 3-node NATS JetStream cluster on loopback, with real faults.

Streams are applied at replicas 3 by `pipeline streams apply`; a worker process is given
every server's URL; a careful producer publishes with `Nats-Msg-Id` and JetStream acks,
retrying each message until it is acknowledged. The stream leader is killed (-9) and
restarted mid-stream, then another node; and one node, with a producer and the worker
on it, is cut off from the other two and joined again. Every acknowledged message must
be stored once, and nothing dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from pipeline.ingest.deadletter import DeadLetters
from schemas import Domain
from streams import Subjects

from ..conftest import wait_until
from ..natscluster import NatsCluster
from .helpers import count_events, ids_of, security_body, start_worker, stop_worker, stored_ids

SUBJECTS = Subjects()
STREAM = SUBJECTS.stream(Domain.SECURITY)
SMALL = str(8 * 1024**2)  # JetStream reserves a stream's byte cap up front, on every replica


WORKER_ENV = {
    "PIPELINE_STREAM_REPLICAS": "3",
    "PIPELINE_FRAMES_MAX_BYTES": SMALL,
    "PIPELINE_DEAD_LETTERS_MAX_BYTES": SMALL,
}
"""What a worker must agree on with the operator (else it logs the drift)."""


def _operator_env(url: str, replicas: int, namespace: str = "") -> dict[str, str]:
    """The operator's `pipeline streams apply` environment: the workers' consumer settings
    (ack_wait 2 s, as `start_worker` sets), small byte caps."""
    return {
        **os.environ,
        "PIPELINE_NATS_URL": url,
        "PIPELINE_STREAM_REPLICAS": str(replicas),
        "PIPELINE_NAMESPACE": namespace,
        "PIPELINE_ACK_WAIT_S": "2",
        "PIPELINE_FRAMES_MAX_BYTES": SMALL,
        "PIPELINE_DEAD_LETTERS_MAX_BYTES": SMALL,
        "PIPELINE_EVIDENCE_MAX_BYTES": SMALL,
    }


async def run_streams_apply(
    url: str, replicas: int, cwd: Path, namespace: str = ""
) -> tuple[int, str, str]:
    """Run `pipeline streams apply`: its exit status, output and error output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        "streams",
        "apply",
        env=_operator_env(url, replicas, namespace),
        cwd=cwd,  # no stray .env file
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, out.decode(), err.decode()


async def streams_apply(url: str, replicas: int, cwd: Path, namespace: str = "") -> list[str]:
    """`pipeline streams apply`, which must succeed; its report, one line per stream or
    consumer."""
    status, out, err = await run_streams_apply(url, replicas, cwd, namespace)
    assert status == 0, out + err
    return out.splitlines()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three servers, full mesh of routes on loopback."""
    servers = NatsCluster(tmp_path / "nats")
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
def isolable(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three servers whose n3 has every route through a proxy the test can cut."""
    servers = NatsCluster(tmp_path / "nats", isolable="n3")
    servers.start()
    yield servers
    servers.stop()


async def connect(url: str) -> Client:
    """A client of the servers in `url` (comma-separated) that reconnects for ever."""
    return await nats.connect(
        url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
    )


async def replicas_of(nc: Client, stream: str) -> tuple[int, str, list[str]]:
    """A stream's configured replicas, its leader and its current followers."""
    info = await nc.jsm().stream_info(stream)
    cluster = info.cluster
    followers = [p.name or "" for p in (cluster.replicas or []) if p.current] if cluster else []
    return info.config.num_replicas or 1, (cluster.leader or "") if cluster else "", followers


# --- replicas from settings


async def test_streams_apply_sets_replicas_on_new_and_existing_streams(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    """R1 created, then updated to R3 in place (consumers follow); new streams at R3."""
    first = await streams_apply(cluster.url, 1, tmp_path)
    assert f"stream {STREAM}: created" in first
    nc = await connect(cluster.url)
    try:
        assert (await replicas_of(nc, STREAM))[0] == 1
        assert not (await replicas_of(nc, STREAM))[2]

        update = await streams_apply(cluster.url, 3, tmp_path)
        assert f"stream {STREAM}: updated (num_replicas: 1 -> 3)" in update, update
        names = [line.split()[1].rstrip(":") for line in update if line.startswith("stream ")]
        assert len(names) == 7  # four domains, dead letters, audit, evidence bucket

        async def all_at_three() -> bool:
            found = [await replicas_of(nc, name) for name in names]
            return all(r == 3 and leader and len(f) == 2 for r, leader, f in found)

        await wait_until(all_at_three, timeout_s=60)
        durable = SUBJECTS.durable(Domain.SECURITY)

        async def consumer_at_three() -> bool:
            info = await nc.jsm().consumer_info(STREAM, durable)
            return bool(info.cluster and len(info.cluster.replicas or []) == 2)

        await wait_until(consumer_at_three, timeout_s=60)
        again = await streams_apply(cluster.url, 3, tmp_path)
        assert all(line.endswith(": unchanged") for line in again), again

        fresh = await streams_apply(cluster.url, 3, tmp_path, namespace="fresh")
        fresh_stream = Subjects("fresh").stream(Domain.SECURITY)
        assert f"stream {fresh_stream}: created" in fresh
        assert (await replicas_of(nc, fresh_stream))[0] == 3
    finally:
        await nc.close()


async def test_a_replica_count_above_the_cluster_size_fails_with_the_servers_reason(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    status, out, err = await run_streams_apply(cluster.url, 5, tmp_path)
    assert status != 0
    assert f"stream {STREAM}: failed - no suitable peers for placement" in out
    assert f"no stream {STREAM}" in out  # its consumer is not attempted
    assert "could not be updated" in err


async def test_the_worker_connects_when_the_first_listed_server_is_down(
    cluster: NatsCluster, pg_schema: str, tmp_path: Path
) -> None:
    """A list is a pool: a server that is down at startup is passed over, and the worker
    waits for the streams that server led to elect new leaders."""
    await streams_apply(cluster.url, 3, tmp_path)
    cluster.kill("n1")  # streams led by n1 answer nothing until they elect a new leader
    log = tmp_path / "worker.log"
    worker = start_worker(cluster.url, pg_schema, log, WORKER_ENV)
    try:
        tally = Tally()  # published while the streams on n1 elect new leaders
        await produce(cluster.url_of("n2", "n3"), 20, 50.0, tally)
        await wait_until(lambda: count_events(pg_schema) >= len(tally.acked), timeout_s=60)
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        stop_worker(worker)
    assert set(stored_ids(pg_schema)) == ids_of(Domain.SECURITY, tally.acked)


# --- a careful producer


@dataclass
class Tally:
    """What a producer saw: each attempt's outcome, when, and what was acknowledged."""

    acked: list[str] = field(default_factory=list)
    attempts: list[tuple[float, str]] = field(default_factory=list)

    def outcomes(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        """How many attempts had each outcome in [since, until)."""
        return Counter(kind for at, kind in self.attempts if since <= at < until)

    def spans(self, since: float, until: float) -> dict[str, tuple[float, float]]:
        """Each outcome's first and last attempt in [since, until), in seconds from since."""
        out: dict[str, tuple[float, float]] = {}
        for at, kind in self.attempts:
            if since <= at < until:
                first, _ = out.get(kind, (at - since, 0.0))
                out[kind] = (round(first, 2), round(at - since, 2))
        return out

    def first_ack_after(self, moment: float) -> float:
        """Seconds from `moment` to the first acknowledgement at or after it."""
        later = [at for at, kind in self.attempts if at >= moment and kind.startswith("acked")]
        return min(later) - moment if later else float("inf")


async def produce(
    url: str, count: int, rate: float, tally: Tally, *, ack_timeout_s: float = 2.0
) -> None:
    """Publish `count` security events at about `rate` a second, each with its id as
    Nats-Msg-Id, waiting for JetStream's ack; an attempt that fails is retried (same id)
    until one is acknowledged, as a careful producer does."""
    nc = await connect(url)
    js = nc.jetstream()
    subject = SUBJECTS.subject(Domain.SECURITY, 1, "door-7")
    try:
        started = time.monotonic()
        for n in range(count):
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            mid = str(uuid.uuid4())
            body = security_body(mid)
            while True:
                at = time.monotonic()
                try:
                    ack = await js.publish(
                        subject, body, timeout=ack_timeout_s, headers={"Nats-Msg-Id": mid}
                    )
                except nats.js.errors.NoStreamResponseError:
                    outcome = "no responders (503)"
                except nats.errors.TimeoutError:
                    outcome = "timeout"
                except nats.js.errors.APIError as exc:
                    outcome = f"error {exc.code}/{exc.err_code}: {exc.description}"
                except nats.errors.Error as exc:  # connection closed or reconnecting
                    outcome = type(exc).__name__
                else:
                    tally.attempts.append((at, "acked, duplicate" if ack.duplicate else "acked"))
                    tally.acked.append(mid)
                    break
                tally.attempts.append((at, outcome))
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _dead_letter_count(nc: Client) -> int:
    return len(await DeadLetters(nc.jetstream(), SUBJECTS).list(limit=1000))


def _report(title: str, figures: dict[str, object]) -> None:
    """Print what was measured (shown with `pytest -s`)."""
    print(f"\n{title}: {json.dumps(figures, default=str)}")


# --- node loss


@pytest.mark.slow
async def test_killing_the_stream_leader_then_another_node_loses_and_doubles_nothing(
    cluster: NatsCluster, pg_schema: str, tmp_path: Path
) -> None:
    messages, rate = 4000, 200.0
    await streams_apply(cluster.url, 3, tmp_path)
    log = tmp_path / "worker.log"
    worker = start_worker(cluster.url, pg_schema, log, WORKER_ENV)
    nc = await connect(cluster.url)
    tally = Tally()
    producing = asyncio.create_task(produce(cluster.url, messages, rate, tally))
    kills: list[dict[str, object]] = []

    async def kill_at(acked: int, victim: str, was: str) -> None:
        await wait_until(lambda: len(tally.acked) >= acked, timeout_s=120)
        await wait_until(lambda: count_events(pg_schema) > 0, timeout_s=60)
        assert count_events(pg_schema) < messages, "the kill came after consumption ended"
        if cluster.serving("faststream") == [victim]:
            was += ", the worker's server"
        kills.append({"node": victim, "was": was, "at": time.monotonic()})
        cluster.kill(victim)

    try:
        _, leader, followers = await replicas_of(nc, STREAM)
        assert len(followers) == 2
        await kill_at(messages // 4, leader, "the stream leader")
        await wait_until(lambda: len(tally.acked) >= messages // 2, timeout_s=120)
        cluster.restart(leader)

        # The second: the server of the worker's consumer connection, unless that was the
        # first (then the stream's new leader): the worker loses its server either way.
        _, new_leader, _ = await replicas_of(nc, STREAM)
        worker_on = cluster.serving("faststream")
        assert len(worker_on) == 1, worker_on
        other = worker_on[0] if worker_on[0] != leader else new_leader
        if other == leader:
            other = next(n for n in cluster.names if n != leader)
        await kill_at(
            messages * 3 // 4, other, "the stream leader" if other == new_leader else "a follower"
        )
        await asyncio.wait_for(producing, timeout=300)
        cluster.restart(other)
        cluster.wait_ready()

        await wait_until(lambda: count_events(pg_schema) >= messages, timeout_s=180)
        await asyncio.sleep(5)  # redeliveries of anything still unacked (ack_wait 2 s)
        letters = await _dead_letter_count(nc)
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        producing.cancel()
        stop_worker(worker)
        await nc.close()

    counts = stored_ids(pg_schema)
    assert len(tally.acked) == messages
    assert set(counts) == ids_of(Domain.SECURITY, tally.acked), "lost or unexpected events"
    assert set(counts.values()) == {1}, "an event was stored twice"
    assert letters == 0, "a valid message was dead-lettered"
    assert worker.returncode == 0, log.read_text()[-3000:]
    assert any("worker's" in str(kill["was"]) for kill in kills), kills
    for kill in kills:
        moment = float(kill.pop("at"))  # type: ignore[arg-type]
        kill["publish stalled s"] = round(tally.first_ack_after(moment), 2)
        seen = tally.outcomes(moment, moment + 30)
        kill["failed attempts"] = {k: n for k, n in seen.items() if not k.startswith("acked")}
    _report("node loss", {"acked": len(tally.acked), "stored": len(counts), "kills": kills})


# --- partition


@pytest.mark.slow
@pytest.mark.parametrize(
    "leader_on", ["n3", "n1"], ids=["leaders-in-minority", "leaders-in-majority"]
)
async def test_a_node_cut_off_refuses_what_it_cannot_replicate_and_nothing_is_lost(
    isolable: NatsCluster, pg_schema: str, tmp_path: Path, leader_on: str
) -> None:
    """n3, where a producer and the worker are connected, is cut off from n1 and n2 for
    15 s while a second producer publishes to n1; the stream's and the consumer's
    leaders start on n3 (the minority) or on n1 (the majority)."""
    cluster = isolable
    per_producer, rate, cut_s = 1500, 100.0, 15.0
    await streams_apply(cluster.url, 3, tmp_path)
    nc = await connect(cluster.url_of("n1", "n2"))
    await _move_leaders(nc, leader_on)
    log = tmp_path / "worker.log"
    worker = start_worker(cluster.url_of("n3"), pg_schema, log, WORKER_ENV)
    minority, majority = Tally(), Tally()
    producing = asyncio.gather(
        produce(cluster.url_of("n3"), per_producer, rate, minority),
        produce(cluster.url_of("n1"), per_producer, rate, majority),
    )
    try:
        await wait_until(lambda: count_events(pg_schema) >= 200, timeout_s=60)
        cut_at = time.monotonic()
        cluster.cut()
        stored_at_cut = count_events(pg_schema)
        await asyncio.sleep(cut_s)
        # Cut off indeed: n3 has no route, n1 and n2 only the one to each other.
        assert [cluster.routed(n) for n in cluster.names] == [1, 1, 0]
        stored_in_cut = count_events(pg_schema) - stored_at_cut
        healed_at = time.monotonic()
        cluster.heal()
        await asyncio.wait_for(producing, timeout=300)
        cluster.wait_ready()
        expected = ids_of(Domain.SECURITY, minority.acked + majority.acked)
        await wait_until(lambda: count_events(pg_schema) >= len(expected), timeout_s=180)
        await asyncio.sleep(5)  # redeliveries of anything still unacked (ack_wait 2 s)
        letters = await _dead_letter_count(nc)
        assert worker.poll() is None, log.read_text()[-3000:]
        leaders = await replicas_of(nc, STREAM)
    finally:
        producing.cancel()
        stop_worker(worker)
        await nc.close()

    counts = stored_ids(pg_schema)
    in_cut = minority.outcomes(cut_at, healed_at)
    figures = {
        "leaders before the cut": leader_on,
        "minority producer (n3) during the cut": dict(in_cut),
        "minority outcomes from the cut, first and last s": minority.spans(cut_at, healed_at),
        "minority producer 10 s from the heal": dict(minority.outcomes(healed_at, healed_at + 10)),
        "majority producer (n1) during the cut": dict(majority.outcomes(cut_at, healed_at)),
        "majority outcomes from the cut, first and last s": majority.spans(cut_at, healed_at),
        "events stored during the cut (worker on n3)": stored_in_cut,
        "first minority ack after heal s": round(minority.first_ack_after(healed_at), 2),
        "stream leader at the end": leaders[1],
        "acked": len(minority.acked) + len(majority.acked),
        "stored": len(counts),
    }
    _report("partition", figures)
    assert len(minority.acked) == len(majority.acked) == per_producer
    assert set(counts) == expected, "an acknowledged event was lost, or one never acked stored"
    assert set(counts.values()) == {1}, "an event was stored twice"
    assert letters == 0, "a valid message was dead-lettered"
    assert worker.returncode == 0, log.read_text()[-3000:]
    # The cut-off node acknowledges nothing it cannot replicate to a majority.
    late = [at for at, kind in minority.attempts if kind.startswith("acked") and at >= cut_at + 1]
    assert not [at for at in late if at < healed_at - 1], in_cut
    assert sum(in_cut.values()) > 0, "the minority producer made no attempt during the cut"
    # The majority keeps taking writes.
    assert majority.outcomes(cut_at + cut_s / 2, healed_at)["acked"] > 0


async def _move_leaders(nc: Client, to: str) -> None:
    """Make `to` the leader of the SECURITY stream and of its durable consumer."""
    durable = SUBJECTS.durable(Domain.SECURITY)
    jsm = nc.jsm()
    moves: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", lambda: jsm.stream_info(STREAM)),
        (
            f"$JS.API.CONSUMER.LEADER.STEPDOWN.{STREAM}.{durable}",
            lambda: jsm.consumer_info(STREAM, durable),
        ),
    ]
    for api, info in moves:

        async def leader(info: Callable[[], Awaitable[Any]] = info) -> str:
            try:
                found = await info()
            except nats.errors.TimeoutError:  # electing one
                return ""
            return str(found.cluster.leader or "") if found.cluster else ""

        async def elected(leader: Callable[[], Awaitable[str]] = leader) -> bool:
            return bool(await leader())

        await wait_until(elected, timeout_s=30)
        if await leader() != to:
            request = {"placement": {"preferred": to}}
            reply = await nc.request(api, json.dumps(request).encode(), timeout=5)
            assert b'"success":true' in reply.data, reply.data

        async def led(leader: Callable[[], Awaitable[str]] = leader) -> bool:
            return await leader() == to

        await wait_until(led, timeout_s=30)
