"""PostgreSQL fail-over: the primary killed under traffic, the standby promoted.

The worker, projections and API processes are given both servers
(`PIPELINE_POSTGRES_HOST=127.0.0.1,127.0.0.1`, one port each) and
`target_session_attrs=read-write`: they pause while no server accepts writes and go
on with the promoted standby. With synchronous replication nothing acked is lost,
nothing is stored twice, nothing is dead-lettered, and the views equal a rebuild.

Then what replication mode means for acked messages, measured: the standby is stopped,
messages are published, the primary is killed and the standby promoted without them.
Asynchronously, the worker had acked them (committed on the primary alone), so the new
primary lacks every one, until a replay from the stream stores them; synchronously, no
commit returned without the standby, so none was acked, and all are redelivered and
stored on the new primary.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.js.api import PubAck

from pipeline.app import apply_streams
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops.embedded import EmbeddedNats, free_port
from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import Expect, Outgoing, Traffic, publish
from pipeline.settings import Settings
from projections import VIEWS
from projections.rebuild import rebuild
from schemas import Domain
from streams import Subjects

from ..conftest import make_settings, wait_until
from ..pgcluster import PgCluster, available
from .helpers import ids_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(bool(available()), reason=available() or "a cluster can be made"),
]

SCHEMA = "failover"
READ = {"Authorization": "Bearer reader-token"}
ACK_WAIT_S = 2.0


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    """A primary and a standby streaming from it (synchronously when parametrized so)."""
    made = PgCluster(synchronous=getattr(request, "param", True))
    made.start()
    yield made
    made.stop()


def _settings(cluster: PgCluster, nats_url: str, **overrides: object) -> Settings:
    """The superuser's settings on both servers: migrations and the operator's steps."""
    return make_settings(
        nats_url,
        SCHEMA,
        postgres_host=cluster.host,
        postgres_port=cluster.port,
        postgres_dbname=cluster.dbname,
        ack_wait_s=ACK_WAIT_S,
        **overrides,
    )


def _start(
    command: str, cluster: PgCluster, role: str, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """`pipeline run <command>` as one of the store's roles, given both servers."""
    env = {
        **os.environ,
        "PIPELINE_POSTGRES_HOST": cluster.host,
        "PIPELINE_POSTGRES_PORT": cluster.port,
        "PIPELINE_POSTGRES_DBNAME": cluster.dbname,
        "PIPELINE_POSTGRES_USER": f"pipeline_{role}",
        "PIPELINE_POSTGRES_SCHEMA": SCHEMA,
        "PIPELINE_POSTGRES_CONNECT_TIMEOUT_S": "2",
        "PIPELINE_PAUSE_PROBE_MAX_S": "1",
        **{f"PIPELINE_{k.upper()}": v for k, v in extra.items()},
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", command], env=env, stdout=out, stderr=out
        )


def _worker(cluster: PgCluster, nats_url: str, log: Path, domains: str) -> subprocess.Popen[bytes]:
    return _start(
        "worker",
        cluster,
        "writer",
        log,
        nats_url=nats_url,
        batch_size="64",
        batch_timeout_s="0.02",
        ack_wait_s=str(ACK_WAIT_S),  # as the streams were applied
        metrics_port="0",
        domains=domains,
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit status (kill -9 after 30 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _stored(cluster: PgCluster) -> Counter[uuid.UUID]:
    """How many stored events each id has on the primary of the moment."""
    with cluster.connect() as conn:
        rows = conn.execute(f'SELECT originator_id FROM "{SCHEMA}".journal_events').fetchall()
    return Counter(row[0] for row in rows)


def _count_on(cluster: PgCluster) -> int:
    try:
        with cluster.connect() as conn:
            row = conn.execute(f'SELECT count(*) FROM "{SCHEMA}".journal_events').fetchone()
    except Exception:  # no primary at the moment
        return -1
    assert row is not None
    return int(row[0])


def _views_current(cluster: PgCluster) -> bool:
    try:
        with cluster.connect() as conn:
            head = conn.execute(
                f'SELECT coalesce(max(notification_id), 0) FROM "{SCHEMA}".journal_events'
            ).fetchone()
            at = dict(conn.execute(f'SELECT view, position FROM "{SCHEMA}".projection_positions'))
    except Exception:
        return False
    assert head is not None
    return all(at.get(name) == head[0] for name in VIEWS)


def _view_rows(cluster: PgCluster, view: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each of a view's tables, sorted: for comparing two builds."""
    with cluster.connect() as conn:
        return {
            t.name: sorted(conn.execute(f'SELECT * FROM "{SCHEMA}"."{t.name}"'), key=repr)
            for t in view.tables
        }


def _pauses(log: Path) -> list[float]:
    """Seconds each pause of the store lasted, from the worker's log."""
    return [
        float(s) for s in re.findall(r"resumed, store is back after ([0-9.]+) s", log.read_text())
    ]


async def _api_answers(port: int) -> tuple[int, dict[str, Any]]:
    """Status and body of `/v1/projections` (0: no answer)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        try:
            answer = await http.get("/v1/projections", headers=READ)
        except httpx.TransportError:
            return 0, {}
    body = answer.json() if answer.status_code == 200 else {}
    return answer.status_code, {"views": body}


async def test_fail_over_under_traffic_loses_nothing_and_stores_nothing_twice(
    cluster: PgCluster, nats_server: EmbeddedNats, nc: Client, tmp_path: Path
) -> None:
    settings = _settings(cluster, nats_server.url)
    migrate(settings)
    await apply_streams(nc, settings)
    subjects = Subjects()
    api_port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("worker-1", "worker-2", "proj", "api")}
    domains = '["security", "monitoring", "metrics"]'
    processes = [
        _worker(cluster, nats_server.url, logs["worker-1"], domains),
        _worker(cluster, nats_server.url, logs["worker-2"], domains),
        _start(
            "projections",
            cluster,
            "projector",
            logs["proj"],
            projections_poll_s="0.5",
            projections_metrics_port="0",
        ),
        _start(
            "api",
            cluster,
            "api",
            logs["api"],
            api_port=str(api_port),
            api_tokens='{"reader-token": ["read"]}',
        ),
    ]
    ledger: list[Outgoing] = []
    traffic = Traffic(subjects, seed=31, duplicate_ratio=0.02, bad_ratio=0.0)
    try:

        async def api_up() -> bool:
            return (await _api_answers(api_port))[0] == 200

        await wait_until(api_up, timeout_s=60)
        # 8,000 messages at 250 a second: traffic before, during and after the outage.
        sending = asyncio.create_task(
            publish(nc.jetstream(), iter(traffic), count=8000, rate=250, on_published=ledger.append)
        )
        await wait_until(lambda: _count_on(cluster) >= 1500, timeout_s=120)
        killed_at = time.monotonic()
        cluster.kill_primary()
        await asyncio.sleep(3)  # no server accepts writes: everyone waits
        outage = [await _api_answers(api_port) for _ in range(3)]
        cluster.promote()
        promoted_at = time.monotonic()
        at_promotion = _count_on(cluster)
        await wait_until(lambda: _count_on(cluster) > at_promotion, timeout_s=60)
        resumed_s = time.monotonic() - promoted_at
        assert not sending.done(), "the traffic ended before the fail-over"
        await sending

        expected = {
            i
            for d in (Domain.SECURITY, Domain.MONITORING, Domain.METRICS)
            for i in ids_of(
                d, [o.message_id for o in ledger if o.domain is d and o.expect is Expect.STORE]
            )
        }
        await wait_until(lambda: _count_on(cluster) >= len(expected), timeout_s=240)
        await asyncio.sleep(2 * ACK_WAIT_S + 1)  # redeliveries of anything still unacked
        dead = await DeadLetters(nc.jetstream(), subjects).count()
        await wait_until(lambda: _views_current(cluster), timeout_s=120)

        async def api_on_new_primary() -> bool:
            status, body = await _api_answers(api_port)
            return status == 200 and all(v["lag_events"] == 0 for v in body["views"])

        await wait_until(api_on_new_primary, timeout_s=60)
        _, answer = await _api_answers(api_port)
        for process, log in zip(processes, logs.values(), strict=True):
            assert process.poll() is None, log.read_text()[-3000:]
    finally:
        if "sending" in locals() and not sending.done():
            sending.cancel()
        codes = [_stop(p) for p in processes]

    counts = _stored(cluster)
    assert set(counts) == expected, f"{len(expected - set(counts))} lost"
    assert set(counts.values()) == {1}, "an event was stored twice"
    assert dead == 0, "a valid message was dead-lettered during the outage"
    assert codes == [0, 0, 0, 0], {n: log.read_text()[-2000:] for n, log in logs.items()}
    pauses = _pauses(logs["worker-1"]) + _pauses(logs["worker-2"])
    assert pauses, "the workers did not pause"
    assert all(status != 200 for status, _ in outage), "the API answered with no primary"
    with cluster.connect() as conn:
        head = conn.execute(
            f'SELECT max(notification_id) FROM "{SCHEMA}".journal_events'
        ).fetchone()
    assert head is not None
    assert {v["view"]: v["head"] for v in answer["views"]} == dict.fromkeys(VIEWS, head[0])

    # The views the projections kept across the fail-over equal a rebuild from zero.
    for name, cls in VIEWS.items():
        live = _view_rows(cluster, cls)
        with cluster.connect() as conn:
            rebuild(conn, SCHEMA, cls())
        assert _view_rows(cluster, cls) == live, f"view {name}"
    print(
        f"\nfail-over: {len(expected)} stored once each, 0 dead letters; "
        f"primary killed, promoted {promoted_at - killed_at:.1f} s later; "
        f"first event stored on the new primary {resumed_s:.1f} s after promotion; "
        f"worker pauses (s): {', '.join(f'{p:.1f}' for p in sorted(pauses))}; "
        f"API during the outage: {[s for s, _ in outage]}"
    )


async def _acked(nc: Client, subjects: Subjects) -> tuple[int, int]:
    """(messages acked, messages delivered) by the security consumer."""
    info = await nc.jetstream().consumer_info(
        subjects.stream(Domain.SECURITY), subjects.durable(Domain.SECURITY)
    )
    delivered = info.delivered.stream_seq if info.delivered else 0
    return int(delivered or 0) - int(info.num_ack_pending or 0), int(delivered or 0)


@pytest.mark.parametrize("cluster", [False, True], ids=["async", "sync"], indirect=True)
async def test_a_promoted_standby_lacks_acked_messages_unless_replication_is_synchronous(
    cluster: PgCluster, nats_server: EmbeddedNats, nc: Client, tmp_path: Path
) -> None:
    settings = _settings(cluster, nats_server.url)
    migrate(settings)
    await apply_streams(nc, settings)
    subjects = Subjects()
    traffic = Traffic(
        subjects, domains=(Domain.SECURITY,), seed=41, duplicate_ratio=0.0, bad_ratio=0.0
    )
    seqs: dict[int, str] = {}

    def acked_by_stream(out: Outgoing, ack: PubAck) -> None:
        seqs[ack.seq] = out.message_id

    log = tmp_path / "worker.log"
    worker = _worker(cluster, nats_server.url, log, '["security"]')
    try:
        # 300 messages stored and replayed on the standby.
        await publish(nc.jetstream(), iter(traffic), count=300, on_acked=acked_by_stream)
        await wait_until(lambda: _count_on(cluster) == 300, timeout_s=60)
        cluster.wait_replayed()

        # The standby stops receiving; 300 more are published.
        cluster.standby.stop("fast")
        await publish(nc.jetstream(), iter(traffic), count=300, on_acked=acked_by_stream)
        if cluster.synchronous:
            # Every commit waits for the standby: let the worker try for a while.
            await wait_until(lambda: _acked_delivered_past(nc, subjects, 300), timeout_s=60)
            await asyncio.sleep(3 * ACK_WAIT_S)
        else:
            await wait_until(lambda: _all_acked(nc, subjects, 600), timeout_s=60)
        acked, delivered = await _acked(nc, subjects)
        on_old_primary = _count_on(cluster)

        cluster.kill_primary()
        cluster.standby.start()
        cluster.promote()

        # The worker goes on with the promoted standby; whatever was not acked comes
        # again and is stored (ack_wait 2 s).
        await wait_until(lambda: _all_acked(nc, subjects, 600), timeout_s=120)
        await asyncio.sleep(2 * ACK_WAIT_S + 1)
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        code = _stop(worker)
    assert code == 0, log.read_text()[-3000:]

    stored = _stored(cluster)
    assert set(stored.values()) <= {1}, "an event was stored twice"
    acked_ids = ids_of(Domain.SECURITY, [seqs[s] for s in sorted(seqs)[:acked]])
    lost = acked_ids - set(stored)
    print(
        f"\n{'synchronous' if cluster.synchronous else 'asynchronous'}: with the standby "
        f"stopped, {delivered - 300} delivered, {acked - 300} acked, {on_old_primary} events "
        f"visible on the old primary; after promotion {len(stored)} stored, "
        f"{len(lost)} acked messages missing"
    )
    if cluster.synchronous:
        assert acked == 300, "a commit returned without the standby"
        assert delivered > 300, "the worker never tried to store the second 300"
        assert lost == set() and len(stored) == 600
    else:
        assert acked == 600 and on_old_primary == 600
        assert len(lost) == 300 and len(stored) == 300, "the acked messages survived"
        # The stream still holds them: a replay stores what the new primary lacks, once.
        replay = _cli(cluster, nats_server.url, "replay", "security", "--since", "1h")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        replayed = _stored(cluster)
        assert set(replayed) == ids_of(Domain.SECURITY, list(seqs.values()))
        assert set(replayed.values()) == {1}
        print(f"replay: {replay.stdout.strip().splitlines()[-1]}")


def _cli(cluster: PgCluster, nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`pipeline <args>` as the writer role, given both servers."""
    env = {
        **os.environ,
        "PIPELINE_NATS_URL": nats_url,
        "PIPELINE_POSTGRES_HOST": cluster.host,
        "PIPELINE_POSTGRES_PORT": cluster.port,
        "PIPELINE_POSTGRES_DBNAME": cluster.dbname,
        "PIPELINE_POSTGRES_USER": "pipeline_writer",
        "PIPELINE_POSTGRES_SCHEMA": SCHEMA,
        "PIPELINE_ACK_WAIT_S": str(ACK_WAIT_S),
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def _acked_delivered_past(nc: Client, subjects: Subjects, seq: int) -> bool:
    return (await _acked(nc, subjects))[1] > seq


async def _all_acked(nc: Client, subjects: Subjects, count: int) -> bool:
    acked, delivered = await _acked(nc, subjects)
    return acked == delivered == count
